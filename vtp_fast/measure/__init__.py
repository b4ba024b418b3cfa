"""Measuring: timing and benchmark rows, the machine's ceilings, the performance model of the fast ops, the
kernels' compile gate, the planners and the step profiler.

    timing        honest timing (`measure`) and where a row was measured (`env_info`)
    ceilings      the CPU roofline: this machine's measured matmul and copy ceilings
    rows          benchmark rows: RowLog, JSONL files, tables, plots, a bench module's command line
    perf_model    the performance model's inputs: the H200's ceilings, the kernels' work, efficiencies, real shapes
    perf_estimate FLOPs, bytes, bound and modelled time of one op at one shape and pass
    perf_report   the model beside measured rows (`vtp-fast bench --model`)
    gate          the ahead-of-time compile gate (`vtp-fast kernels check`), over gate_rows, gate_cases,
                  gate_triton and gate_cuda
    trace         one rank's micro-batch traced on the meta device: peak live bytes and FLOPs
    planner       `vtp-fast plan` for pretraining: memory per GPU and step time of each option
    plan_dit      `vtp-fast plan` for the DiT: training and sampling
    profile       `vtp-fast profile`: where a step spends its time
    study_flops   the model FLOPs of each unit of work a scaling study runs (its GPU plan: vtp_fast.study.plan)

Layer: above train and eval (it builds, traces and times their steps), below the study and the CLI. What training
itself needs to log its MFU (a step's FLOPs, the device's peak) is train's: vtp_fast.train.flops.
"""
