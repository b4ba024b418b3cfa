"""`vtp-fast profile`: where a multi-objective step spends its time.

Runs K steps of the configured job (after warm-up) with a TimingProbe in the step and reports, for data loading,
the teacher, each objective's forward and backward, the shared trunk's forward and backward, the loss weighting,
the finite check, the optimizer, the EMA update, zero_grad (and stage 2's adversarial parts), and the rest of the
step as one "other" row, the mean and median time of each and its share of the step: the means add up to the mean
step, where medians of the parts need not add up to the median step (under load, spikes land in different phases
in different steps). Plus model FLOPs per image (counted with torch.utils.flop_counter) and MFU when the device's
peak is known; on the CPU, the achieved GFLOP/s as a share of the machine's measured matmul ceiling (fp32, or bf16
when the run computes in bf16) at the run's threads, and the ceilings themselves (benchmark.cpu_ceilings). Writes
a markdown table, JSON, a bar chart and, on request, a torch.profiler trace.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from vtp_fast import distributed as dist
from vtp_fast.benchmark import cpu_ceilings, env_info, markdown_table, peak_tflops, share_of_ceiling
from vtp_fast.data.batch import Batch, BatchShape
from vtp_fast.data.pairs import StepBatches
from vtp_fast.data.views import ViewConfig
from vtp_fast.ops.registry import building_for
from vtp_fast.train.config import PretrainConfig
from vtp_fast.train.loop import start_process
from vtp_fast.train.probe import TimingProbe
from vtp_fast.train.sources import load_pairs
from vtp_fast.train.trainer import Trainer, _build_trainer, build_trainer, forward_backward, schedules
from vtp_fast.train.trainer import train_step as run_step


def flops_of(fn) -> int:
    """Model FLOPs of calling fn() (torch.utils.flop_counter: matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _deterministic_masks(batch: Batch, views) -> None:
    """Every global crop masked at the expected count: mask_probability x mean(mask_ratio) of its tokens."""
    fixed = torch.zeros_like(batch.masks)
    fixed[:, :_masked_tokens(batch.masks.shape[1], views)] = True
    StepBatches._add_masks(batch, fixed)


def _masked_tokens(tokens: int, views: ViewConfig) -> int:
    """The expected iBOT mask of a global crop of `tokens` tokens: mask_probability x mean(mask_ratio) of them."""
    return round(tokens * views.mask_probability * sum(views.mask_ratio) / 2)


def meta_batch(shape: BatchShape, views: ViewConfig, image_size: int, context: int) -> Batch:
    """One rank's batch of `shape` as StepBatches builds it from synthetic pairs (shapes, dtypes and layouts; iBOT
    masks at their expected count, see `_deterministic_masks`), allocated on the meta device: nothing of batch size
    exists on the host."""
    meta = torch.device("meta")
    empty = lambda *size, dtype=torch.float32: torch.empty(size, dtype=dtype, device=meta)  # noqa: E731
    n, k = shape.size, shape.ssl
    batch = Batch(images=empty(n, image_size, image_size, 3).permute(0, 3, 1, 2),  # normalize_u8's (n, 3, S, S)
                  tokens=empty(n, context, dtype=torch.long), ids=empty(n, dtype=torch.long),
                  bad_ids=empty(0, dtype=torch.long), bad_kinds=empty(0, dtype=torch.long))
    if k:
        tokens = (views.global_size // shape.patch) ** 2
        masked = 2 * k * _masked_tokens(tokens, views)
        batch.global_crops = empty(2 * k, 3, views.global_size, views.global_size)  # view-major
        batch.local_crops = (empty(views.local_crops * k, 3, views.local_size, views.local_size)
                             if views.local_crops else empty(0, 3, 1, 1))
        batch.masks = empty(2 * k, tokens, dtype=torch.bool)
        batch.mask_index, batch.mask_weight = empty(masked, dtype=torch.long), empty(masked)
    return batch


def meta_step(cfg: PretrainConfig) -> tuple[Trainer, Batch]:
    """The trainer of `cfg` built on the meta device as one process at cfg.batch (parameters without storage; the CPU
    backends, i.e. the reference maths) and its batch there (`meta_batch`), to trace a step (FLOPs, memory) without
    running it: host memory and time do not grow with the batch or the model. The RNG streams are left as they
    were."""
    meta = torch.device("meta")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with building_for("cpu"), meta:
            t = _build_trainer(cfg, meta, local=True)
    return t, meta_batch(t.shape, cfg.ssl.views, cfg.data.image_size, t.model.config.text_context_length)


def count_step_flops(cfg: PretrainConfig) -> tuple[int, Trainer, tuple[int, int] | None]:
    """FLOPs of one forward + backward of the pretraining step at cfg.batch as one process's micro-batch, counted on
    the meta device (`meta_step`: nothing runs), the trainer built there, and the (rows, feature width) the CLIP loss
    saw (None without CLIP)."""
    t, batch = meta_step(cfg)
    seen: list[tuple[int, int]] = []
    hook = (t.student.clip_loss.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
            if t.student.uses_clip else None)
    flops = flops_of(lambda: forward_backward(t, [batch], schedules(cfg, 0)))
    if hook is not None:
        hook.remove()
    return flops, t, (seen[0] if seen else None)


def micro_config(cfg: PretrainConfig, world: int, accumulation: int, model_config=None) -> PretrainConfig:
    """`cfg` as one rank's micro-batch on `world` ranks at `accumulation` micro-steps, for tracing on the meta device:
    fp32, not compiled, without LPIPS (its VGG weights may be absent); the architecture `model_config` (a VTPConfig)
    when given (a checkpoint's own when the run continues one)."""
    c = copy.deepcopy(cfg)
    if model_config is not None:
        c.model.init, c.model.overrides = None, dataclasses.asdict(model_config)
    c.batch.accumulation = accumulation
    per_rank = c.batch.per_rank(world, c.model.patch_size)
    c.batch.size, c.batch.ssl, c.batch.rec, c.batch.accumulation = per_rank.size, per_rank.ssl, per_rank.rec, 1
    c.objective.perceptual, c.run.compile, c.run.precision, c.data.synthetic = 0.0, False, "fp32", True
    return c


def step_flops(cfg: PretrainConfig, model_config) -> float:
    """Model FLOPs of one optimizer step of the run `cfg` over all ranks (forward + backward, teacher included),
    with the architecture `model_config` (a VTPConfig: a checkpoint's own when the run continues one)."""
    world, accumulation = dist.world_size(), cfg.batch.accumulation
    return float(count_step_flops(micro_config(cfg, world, accumulation, model_config))[0]) * accumulation * world


def count_flops(t, batch: Batch, sched: dict) -> int:
    """FLOPs of one step's forward + backward (teacher included)."""
    flops = flops_of(lambda: forward_backward(t, [batch], sched))
    t.optimizer.zero_grad(set_to_none=True)
    return flops


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


def profile(cfg: PretrainConfig, steps: int = 10, warmup: int = 3, out: Path | None = None,
            trace: bool = False) -> dict:
    cfg.batch.accumulation = 1  # phases are per micro-batch
    device, _, _ = start_process(cfg.run)
    t = build_trainer(cfg, device)
    pairs, _ = load_pairs(cfg, t.model.config.text_context_length)
    data = StepBatches(pairs, t.shape, cfg.ssl.views, seed=cfg.run.seed, trim_text=t.causal_text)
    out = Path(out or Path(cfg.run.out_dir) / "profile")
    out.mkdir(parents=True, exist_ok=True)

    flops = count_flops(t, data[0].to(device), schedules(cfg, 0))
    probe = TimingProbe(device)
    t.student.probe = probe
    rows = []
    profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                       + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []))
                if trace else None)
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
        profiler.export_chrome_trace(str(out / "trace.json"))

    names = list(dict.fromkeys(k for r in rows for k in r if k != "step_ms"))  # the discriminator may start late
    step_ms = statistics.median(r["step_ms"] for r in rows)
    step_mean = statistics.fmean(r["step_ms"] for r in rows)
    # means add up to the mean step; medians of the parts do not add up to the median step when load spikes land
    # in different phases in different steps
    table = [{"phase": n, "mean_ms": statistics.fmean(r.get(n, 0.0) for r in rows),
              "median_ms": statistics.median(r.get(n, 0.0) for r in rows)} for n in names]
    for row in table:
        row["share_pct"] = 100 * row["mean_ms"] / step_mean
    flops_per_image = flops / cfg.batch.size
    peak = peak_tflops(device)
    achieved = flops / (step_ms / 1e3) / 1e12
    # the CPU's roofline: measured after the timed steps, at the run's torch threads (cached per process)
    ceilings = cpu_ceilings() if device.type == "cpu" else None
    ceiling_dtype = "bf16" if cfg.run.precision == "bf16" else "fp32"  # "auto" is fp32 on the CPU
    result = {
        "config": {"preset": cfg.model.preset, "batch": cfg.batch.size, "ssl": cfg.batch.ssl, "rec": cfg.batch.rec,
                   "objective": t.objective.weights, "compile": cfg.run.compile, "precision": cfg.run.precision},
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
