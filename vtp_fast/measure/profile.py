"""`vtp-fast profile`: where a multi-objective step spends its time.

Runs K steps of the configured job (after warm-up) with a TimingProbe in the step and reports, for data loading,
the teacher, each objective's forward and backward, the shared trunk's forward and backward, the loss weighting,
the finite check, the optimizer, the EMA update, zero_grad (and stage 2's adversarial parts), and the rest of the
step as one "other" row, the mean and median time of each and its share of the step: the means add up to the mean
step, where medians of the parts need not add up to the median step (under load, spikes land in different phases
in different steps). Plus model FLOPs per image (counted with torch.utils.flop_counter) and MFU when the device's
peak is known; on the CPU, the achieved GFLOP/s as a share of the machine's measured matmul ceiling (fp32, or bf16
when the run computes in bf16) at the run's threads, and the ceilings themselves (vtp_fast.measure.ceilings).
Writes a markdown table, JSON, a bar chart and, on request, a torch.profiler trace.

The steps are training's own (vtp_fast.train.trainer.train_step, with the probe the step already calls); what
belongs here is the timing around them and the tables.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import torch

from vtp_fast.data.step_batches import StepBatches
from vtp_fast.measure.ceilings import cpu_ceilings, share_of_ceiling
from vtp_fast.measure.rows import markdown_table
from vtp_fast.measure.timing import env_info
from vtp_fast.train.config import PretrainConfig
from vtp_fast.train.flops import count_flops, peak_tflops
from vtp_fast.train.loop import start_process
from vtp_fast.train.probe import TimingProbe
from vtp_fast.train.sources import load_pairs
from vtp_fast.train.trainer import Trainer, build_trainer, schedules
from vtp_fast.train.trainer import train_step as run_step

# probe regions after the forward and backward, in step order, as named in the table
_AFTER = {"checks": "finite check (host sync)", "optimizer": "optimizer (clip, step)", "ema": "ema",
          "discriminator": "discriminator step", "zero_grad": "zero_grad"}
OTHER = "other (lr, loss centres, loss logs)"


def phase_times(probe: TimingProbe, data_ms: float, step_ms: float) -> dict[str, float]:
    """One step's ms per phase; `OTHER` is the rest of the step, so the phases add up to step_ms."""
    f = probe.forward_times()
    back = probe.backward_split(probe.stamps["forward:backward:start"], probe.stamps["forward:backward:end"])
    phases = {"data": data_ms, "teacher forward": f.get("teacher", 0.0), "trunk forward (shared)": f["trunk"]}
    for name in ("clip", "rec", "ssl", "gan"):
        if name in f:
            phases[f"{name} forward"] = f[name]
    phases["loss weighting"] = f["objective"]
    for name, ms in back.items():
        phases[f"{name} backward"] = ms
    phases |= {label: f[name] for name, label in _AFTER.items() if name in f}
    phases[OTHER] = step_ms - sum(phases.values())
    return phases


def _timed_steps(t: Trainer, data: StepBatches, cfg: PretrainConfig, device: torch.device, steps: int, warmup: int,
                 trace: Path | None) -> list[dict]:
    """Per timed step (after `warmup` untimed ones): step_ms and the ms of each phase; a torch.profiler trace of the
    timed steps written to `trace` when given."""
    probe = TimingProbe(device)
    t.student.probe = probe
    rows = []
    profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                       + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []))
                if trace is not None else None)
    for i in range(warmup + steps):
        if profiler is not None and i == warmup:
            profiler.start()
        probe.reset()
        start = probe.stamp()
        batch = data[i].to(device, non_blocking=True)
        got_data = probe.stamp()
        run_step(t, [batch], schedules(cfg, i))
        end = probe.stamp()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            step_ms = end.ms_since(start)
            rows.append({"step_ms": step_ms, **phase_times(probe, got_data.ms_since(start), step_ms)})
    if profiler is not None:
        profiler.stop()
        profiler.export_chrome_trace(str(trace))
    return rows


def _phase_table(rows: list[dict]) -> tuple[list[dict], float, float]:
    """(one row per phase: mean_ms, median_ms, share_pct of the mean step; the median step ms; the mean step ms)."""
    names = list(dict.fromkeys(k for r in rows for k in r if k != "step_ms"))  # the discriminator may start late
    step_ms = statistics.median(r["step_ms"] for r in rows)
    step_mean = statistics.fmean(r["step_ms"] for r in rows)
    # means add up to the mean step; medians of the parts do not add up to the median step when load spikes land
    # in different phases in different steps
    table = [{"phase": n, "mean_ms": statistics.fmean(r.get(n, 0.0) for r in rows),
              "median_ms": statistics.median(r.get(n, 0.0) for r in rows)} for n in names]
    for row in table:
        row["share_pct"] = 100 * row["mean_ms"] / step_mean
    return table, step_ms, step_mean


def profile(cfg: PretrainConfig, steps: int = 10, warmup: int = 3, out: Path | None = None,
            trace: bool = False) -> dict:
    """`steps` steps of `cfg` timed phase by phase after `warmup`: the result (also written as profile.md,
    profile.json and profile.png under `out`, default run.out_dir/profile, with trace.json when `trace`)."""
    cfg.batch.accumulation = 1  # phases are per micro-batch
    device, _, _ = start_process(cfg.run)
    t = build_trainer(cfg, device)
    pairs, _ = load_pairs(cfg, t.model.config.text_context_length)
    data = StepBatches(pairs, t.shape, cfg.ssl.views, seed=cfg.run.seed, trim_text=t.causal_text)
    out = Path(out or Path(cfg.run.out_dir) / "profile")
    out.mkdir(parents=True, exist_ok=True)

    flops = count_flops(t, data[0].to(device), schedules(cfg, 0))
    rows = _timed_steps(t, data, cfg, device, steps, warmup, out / "trace.json" if trace else None)
    table, step_ms, step_mean = _phase_table(rows)
    flops_per_image = flops / cfg.batch.size
    peak = peak_tflops(device)
    achieved = flops / (step_ms / 1e3) / 1e12
    # the CPU's roofline: measured after the timed steps, at the run's torch threads (cached per process)
    ceilings = cpu_ceilings() if device.type == "cpu" else None
    ceiling_dtype = "bf16" if cfg.run.precision == "bf16" else "fp32"  # "auto" is fp32 on the CPU
    result = {
        "config": {"preset": cfg.model.preset, "batch": cfg.batch.size, "ssl": cfg.batch.ssl, "rec": cfg.batch.rec,
                   "objective": t.objective.weights, "compile": cfg.run.compile_as,
                   "precision": cfg.run.precision},
        "steps": steps, "step_ms": step_ms, "step_mean_ms": step_mean, "images_per_s": cfg.batch.size / (step_ms / 1e3),
        "gflop_per_image": flops_per_image / 1e9, "achieved_tflop_per_s": achieved,
        "peak_tflop_per_s": peak, "mfu": achieved / peak if peak else None,
        "cpu_ceilings": {**dataclasses.asdict(ceilings), "line": ceilings.describe()} if ceilings else None,
        "ceiling_dtype": ceiling_dtype if ceilings else None,
        "ceiling_share": share_of_ceiling(flops, step_ms / 1e3, ceiling_dtype, ceilings) if ceilings else None,
        "phases": table, "env": env_info(),
    }
    _report(result, out, trace)
    return result


def _report(result: dict, out: Path, trace: bool) -> None:
    """profile.md, profile.json and profile.png under `out`, and the table and summary on stdout."""
    table, step_ms, steps, peak = result["phases"], result["step_ms"], result["steps"], result["peak_tflop_per_s"]
    achieved, preset = result["achieved_tflop_per_s"], result["config"]["preset"]
    md = markdown_table(table, ["phase", "mean_ms", "share_pct", "median_ms"])
    summary = (f"step {step_ms:.1f} ms (median of {steps}; mean {result['step_mean_ms']:.1f} ms, which the phases' "
               f"means add up to), {result['images_per_s']:.1f} images/s, "
               f"{result['gflop_per_image']:.2f} GFLOP/image (fwd+bwd, teacher included), "
               f"{achieved:.3f} TFLOP/s" + (f", MFU {100 * result['mfu']:.1f}% of {peak} TFLOP/s" if peak else
                                            ", MFU n/a (no known peak for this device)"))
    if result.get("cpu_ceilings"):
        summary += (f"; {1e3 * achieved:.1f} GFLOP/s = {100 * result['ceiling_share']:.1f}% of this CPU's measured "
                    f"{result['ceiling_dtype']} matmul ceiling\n{result['cpu_ceilings']['line']}")
    (out / "profile.md").write_text(f"# step profile: {preset} on {result['env']['device_name']}\n\n"
                                    f"{summary}\n\n{md}\n")
    (out / "profile.json").write_text(json.dumps(result, indent=1))
    _bar_chart(table, out / "profile.png", f"{preset}: step {result['step_mean_ms']:.1f} ms (mean of {steps})")
    print(md)
    print(summary)
    print(f"  table {out / 'profile.md'}\n  chart {out / 'profile.png'}\n  json  {out / 'profile.json'}"
          + (f"\n  trace {out / 'trace.json'}" if trace else ""))


def _bar_chart(table: list[dict], path: Path, title: str) -> None:
    from vtp_fast.plots import plt

    names = [r["phase"] for r in table][::-1]
    values = [r["mean_ms"] for r in table][::-1]
    shares = [r["share_pct"] for r in table][::-1]
    colors = ["#4c72b0" if "forward" in n else "#dd8452" if "backward" in n else "#8c8c8c" for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.2), dpi=120)
    ax.barh(names, values, color=colors)
    for y, (v, share) in enumerate(zip(values, shares, strict=True)):
        ax.text(v, y, f" {v:.1f} ms ({share:.0f}%)", va="center", fontsize=8)
    ax.set(xlabel="mean ms per step", title=title)
    ax.set_xlim(0, max(values) * 1.35)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
