"""The ahead-of-time compile gate: every Triton kernel compiled for a GPU target, on a machine with or without one.

    vtp-fast kernels check [--arch 90,80] [--dtypes bfloat16,float32] [--ops attention,...] [--subset]
                           [--cuda] [--json rows.jsonl] [--markdown table.md]

Each case calls an op's real launchers (kernels/<op>.py) on `meta` tensors of a real training shape inside
`vtp_fast.kernels.offline(arch, sms)`, so the launchers pick tiles, warps, stages and splits exactly as they
would on that GPU and record their launches instead of running them. Each recorded launch is then compiled
through Triton's own `warmup` path (specialisation, heuristics, and for an autotuned kernel every configuration
that survives the kernel's `prune_configs_by`) against a `GPUTarget` for the arch, and the ptxas log of every
compiled kernel is parsed: registers, spill bytes, stack, shared memory, the MMA instructions used (wgmma on
sm_90, mma.sync, or none: FMA) and ptxas performance warnings (C7515: serialised wgmma).

A kernel fails the gate when it does not compile, uses more shared memory than the SM has (it would raise
OutOfResources at launch), spills more than `SPILL_LIMIT` bytes, or when an autotuned launch is left with no
configuration that fits. The CUDA sources (csrc/*.cu) get the same report from `nvcc -Xptxas -v` (`--cuda`).

The gate's pieces: the cases (vtp_fast.measure.gate_cases), the Triton compilation (gate_triton), the CUDA sources
(gate_cuda), the rows and their table (gate_rows); this module is the command.
"""

from __future__ import annotations

from pathlib import Path

from vtp_fast.kernels import SMEM_LIMIT
from vtp_fast.measure.gate_cases import CASES, DTYPES
from vtp_fast.measure.gate_cuda import check_cuda
from vtp_fast.measure.gate_rows import SPILL_LIMIT, table, write_json
from vtp_fast.measure.gate_triton import check


def main(args) -> int:
    """`vtp-fast kernels check`: print the table, write it where asked, exit 1 on any failure."""
    import sys

    import torch.cuda

    if args.arch == "native":
        if not torch.cuda.is_available():
            raise ValueError("--arch native needs a visible GPU; name the archs instead, e.g. --arch 90,80")
        major, minor = torch.cuda.get_device_capability()
        archs, native = [10 * major + minor], True
    else:
        archs, native = [int(a) for a in args.arch.split(",")], False
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"--dtypes: unknown {unknown}; choices: {', '.join(DTYPES)}")
    ops = args.ops.split(",") if args.ops else None
    if ops and set(ops) - set(CASES) - {"csrc"}:
        raise ValueError(f"--ops: unknown {sorted(set(ops) - set(CASES) - {'csrc'})}; choices: "
                         f"{', '.join(CASES)}, csrc")
    progress = (lambda m: print(f"  compiling {m}", file=sys.stderr, flush=True)) if args.verbose else None
    rows = check(archs, dtypes, [o for o in ops if o != "csrc"] if ops else None, subset=args.subset,
                 native=native, progress=progress, jobs=args.jobs) if ops != ["csrc"] else []
    if args.cuda:
        rows += check_cuda(archs)
    text = table(rows)
    failed = [r for r in rows if r.failed]
    summary = (f"{len(rows)} kernel configurations on {', '.join(f'sm_{a}' for a in archs)}: "
               f"{len(failed)} failed (limits: spills <= {SPILL_LIMIT} B, shared memory per arch "
               f"{', '.join(f'sm_{a} {SMEM_LIMIT[a] // 1024} KB' for a in archs if a in SMEM_LIMIT)})")
    print(text)
    print(summary)
    if args.markdown:
        from vtp_fast.measure.timing import env_info

        env = env_info("cpu")
        where = (f"`vtp-fast kernels check {' '.join(sys.argv[3:])}`".replace("  ", " ") + f": Triton {env['triton']}, "
                 f"torch {env['torch']}, git {env['git']}, {env['date']}; "
                 + ("compiled by the GPU's driver" if native else "compiled offline for GPUTarget(cuda, arch)"))
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(f"{where}\n\n{text}\n\n{summary}\n")
    if args.json:
        write_json(rows, Path(args.json))
    for r in failed:
        print(f"FAIL sm_{r.arch} {r.op} [{r.case}] {r.dtype} {r.kernel} {r.config}: {r.status}", file=sys.stderr)
    return 1 if failed else 0
