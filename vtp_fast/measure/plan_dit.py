"""`vtp-fast plan` for the DiT (configs/dit/): whether `train-dit` fits on N GPUs of a kind and how fast it steps,
and how long `vtp-fast sample` takes to draw N images. The cost model is the tokenizer planner's
(vtp_fast.measure.planner): the same memory parts, the same step model, the same stated assumptions.

Training: the DiT's forward and backward (the flow loss included: `dit_loss`, what DiTJob.step runs) traced on the
meta device at the per-rank batch, for each activation checkpointing mode (none, selective, per_block: the
transforms DiTJob applies), with bf16 autocast emulated as the tokenizer's trace is. Parameters: the DiT and its EMA,
fp32; gradients and AdamW's moments of the DiT. The EMA is only updated, never run, so FSDP2 (modelled) would not
gather it. train-dit runs DDP only: FSDP2 rows are shown for comparison and never recommended. The latent shape and
class count are the latent set's (cfg.latents, when it names a finished set) or the preset's.

Sampling: `flow.sample` itself replayed on the meta device with a stand-in model that counts its calls (so the
solver, the timestep shift and the CFG interval are the sampler's, not a second copy of them); each call is one DiT
forward per sample, two inside the CFG interval (the conditional and unconditional halves of one batch); then one
tokenizer decode per sample. FLOPs of one DiT forward and one decode counted with torch.utils.flop_counter on the
meta device; time at the step model's utilisation of the GPU's bf16 ceiling, for the rank that draws the most
(`vtp-fast sample` deals chunks of SAMPLE_CHUNK round-robin).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vtp_fast.compile import transform_blocks
from vtp_fast.config import ConfigError, load_config, load_yaml
from vtp_fast.data.latents import META
from vtp_fast.measure.planner import (
    GPU,
    STEP_EFFICIENCY,
    USABLE,
    Plan,
    compute_seconds,
    gpu_bf16,
    gpu_kind,
    option,
    options_table,
    recommendation,
    to_stderr,
    why_nothing_fits,
)
from vtp_fast.measure.trace import EmulatedAutocast, LiveBytes, MicroStep
from vtp_fast.models.dit import DiT, DiTConfig
from vtp_fast.models.presets import PRESETS, vtp_config
from vtp_fast.models.pretrained import CONFIG_NAME, read_config
from vtp_fast.models.vtp import VTP, VTPConfig
from vtp_fast.ops.registry import building_for
from vtp_fast.train.config import DiTTrainConfig, PretrainConfig
from vtp_fast.train.dit import dit_loss, dit_model_config
from vtp_fast.train.flops import flops_of
from vtp_fast.train.flow import sample

MODES = ("none", "selective", "per_block")
DIT_ONLY = {f.name for f in dataclasses.fields(DiTTrainConfig)} - {f.name for f in dataclasses.fields(PretrainConfig)}
SAMPLE_CHUNK = 1000  # vtp-fast sample's default --chunk (SampleSpec.chunk)
DEFAULT_TOKENIZER = "vtp-l"  # the paper's gFID tokenizer, when neither --tokenizer nor the latent set names one
_HUB_SIZES = {"small": "vtp-s", "base": "vtp-b", "large": "vtp-l"}  # VTP-{Small,Base,Large}-f16d64


def job_of(files: Sequence[str | Path], overrides: Sequence[str] = ()) -> str:
    """"dit" when the config files or overrides set a key only DiTTrainConfig has (preset, latents, ema, ...), else
    "tokenizer"."""
    keys = {k for f in files for k in load_yaml(f)} | {o.split("=", 1)[0].split(".", 1)[0] for o in overrides}
    return "dit" if keys & DIT_ONLY else "tokenizer"


def load_dit_config(files: Sequence[str | Path], overrides: Sequence[str] = ()) -> DiTTrainConfig:
    """The DiT training config of `files` and `overrides`; a plan needs no latent set (latents stays "" if none
    is named)."""
    named = (any("latents" in load_yaml(f) for f in files)
             or any(o.split("=", 1)[0] == "latents" for o in overrides))
    cfg = load_config(DiTTrainConfig, files, [*overrides, *([] if named else ["latents=(planning)"])])
    if not named:
        cfg.latents = ""
    return cfg


def latent_meta(cfg: DiTTrainConfig) -> dict | None:
    """The meta.json of the latent set cfg.latents, when it names a finished one (None otherwise)."""
    path = Path(cfg.latents) / META if cfg.latents else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def meta_dit(config: DiTConfig, checkpointing: str = "none") -> DiT:
    """The DiT of `config` on the meta device (no storage; the CPU backends: the reference maths) with its blocks
    transformed for `checkpointing` as DiTJob does. The RNG streams are left as they were."""
    with torch.random.fork_rng(devices=[]), building_for("cpu"), torch.device("meta"):
        model = DiT(config)
    return transform_blocks(model, checkpointing)


def trace_dit_step(cfg: DiTTrainConfig, config: DiTConfig, per_rank: int, checkpointing: str,
                   bf16: bool) -> MicroStep:
    """One rank's forward + backward of `dit_loss` at `per_rank` latents, traced on the meta device."""
    model = meta_dit(config, checkpointing).train()
    for p in model.parameters():  # gradients allocated, as after a first step, and counted apart
        p.grad = torch.zeros_like(p)
    s = config.input_size
    x0 = torch.empty(per_rank, config.in_channels, s, s, device="meta")  # LatentBatches: float32, normalised
    y = torch.zeros(per_rank, dtype=torch.long, device="meta")
    live = LiveBytes([*LiveBytes.state_of(model), x0, y])
    with live, (EmulatedAutocast() if bf16 else contextlib.nullcontext()):
        dit_loss(cfg, model, x0, y)["total"].backward()
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    blocks = model.transformer_blocks()
    n = count(model.parameters())
    return MicroStep(activation_bytes=live.peak, flops=live.flops, student_params=n, trainable_params=n,
                     teacher_params=n, block_params=max(count(b.parameters()) for b in blocks),
                     root_params=n - sum(count(b.parameters()) for b in blocks), clip_width=0, pairs=per_rank,
                     teacher_runs=False)


@dataclass
class DiTPlan(Plan):
    model: DiTConfig | None = None
    latents: str = ""  # where the latent shape came from


def plan_dit(cfg: DiTTrainConfig, gpus: int, gpu: str = "h200",
             progress: Callable[[str], None] | None = to_stderr) -> DiTPlan:
    """DDP (and, modelled only, FSDP2) x each activation checkpointing mode at the per-rank batch."""
    g = gpu_kind(gpu, gpus)
    if cfg.batch % gpus:
        raise ConfigError(f"batch: {cfg.batch} is not divisible by the {gpus} GPUs")
    meta = latent_meta(cfg)
    config = dit_model_config(cfg, meta)
    source = f"the latent set {cfg.latents}" if meta is not None else (
        f"the preset's; {cfg.latents} holds no finished latent set" if cfg.latents else "the preset's")
    per_rank, bf16 = cfg.batch // gpus, gpu_bf16(cfg)
    strategies = ("ddp", "fsdp") if gpus > 1 else ("ddp",)
    options, start = [], time.perf_counter()
    for ac in MODES:
        if progress is not None:
            progress(f"plan: [{time.perf_counter() - start:5.1f} s] tracing {per_rank} latents per GPU, activation "
                     f"checkpointing {ac}, on the meta device")
        micro = trace_dit_step(cfg, config, per_rank, ac, bf16)
        options += [option(bf16, g, gpus, s, ac, 1, micro) for s in strategies]
    if progress is not None:
        progress(f"plan: {len(MODES)} batches traced in {time.perf_counter() - start:.1f} s")
    return DiTPlan(cfg, g, gpus, options, name=cfg.preset, unit="latents", runnable=("ddp",), model=config,
                   latents=source)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def report_dit(p: DiTPlan) -> str:
    """The DiT training options as a markdown table, the recommendation (or why nothing fits), the assumptions."""
    c, m, usable, best = p.cfg, p.model, USABLE * p.gpu.memory_gib, p.best
    params = p.options[0].micro.student_params
    tokens = (m.input_size // m.patch_size) ** 2
    head = (f"# plan: {c.preset} ({params / 1e6:.1f}M parameters) on {p.gpus} x {p.gpu.name}\n\n"
            f"global batch {c.batch} latents, {c.batch // p.gpus} per GPU; latents {m.in_channels} x {m.input_size} x "
            f"{m.input_size} ({tokens} tokens at patch {m.patch_size}), {m.num_classes} classes ({p.latents}); "
            f"precision {c.run.precision}; usable memory {usable:.0f} GiB of {p.gpu.memory_gib:.0f}\n")
    rows = options_table(p, c.batch, "latents/s")
    if best is not None:
        verdict = (recommendation(p, c.batch, "latents/s") + f"; run.steps {c.run.steps:,}: about "
                   f"{_duration(c.run.steps * best.step_s)}\n  run.activation_checkpointing={best.checkpointing}")
    else:
        verdict = "nothing fits: " + why_nothing_fits(p, usable)
    notes = (f"Modelled, not measured: activations traced on the meta device with the reference ops (the DiT's "
             f"forward and backward and the flow loss); parameters are the DiT and its EMA (fp32); step time at "
             f"{STEP_EFFICIENCY:.0%} of {p.gpu.peak_flops / 1e12:.0f} TFLOP/s, the optimizer step and EMA update "
             f"not counted; {p.gpu.source}. train-dit runs DDP only: FSDP2 is modelled for comparison (its EMA "
             f"sharded, never gathered), not runnable.")
    return "\n".join([head, *rows, "", verdict, "", notes]) + "\n"


class _CountCalls(nn.Module):
    """A stand-in velocity model for flow.sample that counts its calls (plain and guided) and returns x."""

    def __init__(self):
        super().__init__()
        self.plain = self.guided = 0

    def forward(self, x, t, y):
        self.plain += 1
        return x

    def forward_with_cfg(self, x, t, y, scale, interval):
        self.guided += 1
        return x


def model_calls(steps: int, solver: str = "euler", shift: float = 1.0, cfg_scale: float = 1.0,
                cfg_interval: tuple[float, float] = (0.0, 1.0)) -> tuple[int, int]:
    """(model calls, of them guided) per sample of flow.sample at these settings: the sampler run on the meta
    device with a model that counts its calls. A guided call is a DiT forward at twice the batch."""
    counter, x = _CountCalls(), torch.empty(1, 1, 1, 1, device="meta")
    sample(counter, tuple(x.shape), torch.zeros(1, dtype=torch.long, device="meta"), steps=steps, solver=solver,
           shift=shift, cfg_scale=cfg_scale, cfg_interval=cfg_interval, noise=x)
    return counter.plain + counter.guided, counter.guided


def tokenizer_config(name: str) -> VTPConfig:
    """A tokenizer's architecture from a preset name (vtp-s, vtp-b, vtp-l, ...), a checkpoint directory (its
    config.json) or a published Hub id (VTP-{Small,Base,Large}-f16d64, with or without MiniMaxAI/ and @REVISION)."""
    if name in PRESETS:
        return vtp_config(name)
    if (Path(name) / CONFIG_NAME).is_file():
        return read_config(Path(name) / CONFIG_NAME)
    hub = name.split("@", 1)[0].rsplit("/", 1)[-1].lower()
    for size, preset in _HUB_SIZES.items():
        if hub == f"vtp-{size}-f16d64":
            return vtp_config(preset)
    raise ConfigError(f"--tokenizer {name}: not a preset ({', '.join(PRESETS)}), a checkpoint directory "
                      f"({CONFIG_NAME}) nor a published VTP-{{Small,Base,Large}}-f16d64 id")


def dit_forward_flops(config: DiTConfig) -> int:
    """FLOPs of one DiT forward of one sample (torch.utils.flop_counter, on the meta device)."""
    model, s = meta_dit(config).eval(), config.input_size
    x = torch.empty(1, config.in_channels, s, s, device="meta")
    t, y = torch.empty(1, device="meta"), torch.zeros(1, dtype=torch.long, device="meta")
    with torch.no_grad():
        return flops_of(lambda: model(x, t, y))


def decode_flops(config: VTPConfig, grid: int) -> int:
    """FLOPs of one tokenizer decode of a (C, grid, grid) latent (torch.utils.flop_counter, on the meta device)."""
    with torch.random.fork_rng(devices=[]), building_for("cpu"), torch.device("meta"):
        model = VTP(config).eval()
    z = torch.empty(1, config.vision_feature_bottleneck, grid, grid, device="meta")
    with torch.no_grad():
        return flops_of(lambda: model.decode(z))


@dataclass
class SamplePlan:
    name: str  # the DiT preset
    model: DiTConfig
    tokenizer: str  # its name and where it came from
    patch: int  # the tokenizer's patch size
    gpu: GPU
    gpus: int
    samples: int
    steps: int
    solver: str
    shift: float
    cfg_scale: float
    cfg_interval: tuple[float, float]
    calls: int  # model calls per sample
    guided: int  # of them guided (two DiT forwards each)
    forward_flops: int  # one DiT forward of one sample
    decode_flops: int  # one decode of one sample
    slowest: int  # samples the busiest rank draws
    chunk: int

    @property
    def flops_per_sample(self) -> int:
        return self.forward_flops * (self.calls + self.guided) + self.decode_flops

    @property
    def seconds(self) -> float:
        return compute_seconds(self.slowest * self.flops_per_sample, self.gpu)


def busiest_rank(samples: int, gpus: int, chunk: int) -> int:
    """Samples drawn by the busiest of `gpus` ranks when chunks of `chunk` are dealt round-robin."""
    chunks = -(-samples // chunk)
    return max(sum(min(samples, (k + 1) * chunk) - k * chunk for k in range(r, chunks, gpus))
               for r in range(min(gpus, chunks)))


def plan_sampling(cfg: DiTTrainConfig, samples: int, gpus: int, gpu: str = "h200", *, steps: int = 50,
                  solver: str = "euler", shift: float = 1.0, cfg_scale: float = 1.0,
                  cfg_interval: tuple[float, float] = (0.0, 1.0), tokenizer: str | None = None,
                  chunk: int = SAMPLE_CHUNK) -> SamplePlan:
    """The modelled time of `vtp-fast sample` with these options for the DiT of `cfg` on `gpus` GPUs."""
    g = gpu_kind(gpu, gpus)
    for key, value in (("--samples", samples), ("--sample-steps", steps), ("chunk", chunk)):
        if value < 1:
            raise ConfigError(f"{key} {value}: must be >= 1")
    if shift <= 0:
        raise ConfigError(f"--shift {shift}: must be > 0")
    if not 0.0 <= cfg_interval[0] <= cfg_interval[1] <= 1.0:
        raise ConfigError(f"--cfg-interval {cfg_interval[0]} {cfg_interval[1]}: must be 0 <= T_LO <= T_HI <= 1")
    meta = latent_meta(cfg)
    config = dit_model_config(cfg, meta)
    named = tokenizer or (meta or {}).get("tokenizer") or DEFAULT_TOKENIZER
    how = ("--tokenizer" if tokenizer else f"the latent set {cfg.latents}" if (meta or {}).get("tokenizer")
           else "the default: --tokenizer names another")
    vtp = tokenizer_config(named)
    if vtp.vision_feature_bottleneck != config.in_channels:
        raise ConfigError(f"--tokenizer {named}: makes {vtp.vision_feature_bottleneck}-channel latents, the DiT "
                          f"models {config.in_channels}")
    calls, guided = model_calls(steps, solver, shift, cfg_scale, cfg_interval)
    return SamplePlan(cfg.preset, config, f"{named} ({how})", vtp.vision_patch_size, g, gpus, samples, steps,
                      solver, shift, cfg_scale, cfg_interval, calls, guided, dit_forward_flops(config),
                      decode_flops(vtp, config.input_size), busiest_rank(samples, gpus, chunk), chunk)


def report_sampling(s: SamplePlan) -> str:
    """The sampling cost by part, the modelled time and the assumptions."""
    m, px = s.model, s.model.input_size * s.patch
    guidance = (f"CFG {s.cfg_scale} for t in [{s.cfg_interval[0]}, {s.cfg_interval[1]}]: {s.guided} of {s.calls} "
                f"model calls per sample guided (conditional and unconditional in one batch of twice the size)"
                if s.cfg_scale != 1.0 else "no CFG")
    head = (f"# sampling: {s.name} on {s.gpus} x {s.gpu.name}\n\n{s.samples:,} samples, {m.in_channels} x "
            f"{m.input_size} x {m.input_size} latents decoded by {s.tokenizer} to {px} x {px} images; {s.solver}, "
            f"{s.steps} steps (shift {s.shift}), {guidance}\n")
    total = s.flops_per_sample
    parts = [("DiT forward, conditional", s.calls, s.forward_flops),
             ("DiT forward, unconditional (CFG)", s.guided, s.forward_flops), ("tokenizer decode", 1, s.decode_flops)]
    rows = ["| part | per sample | GFLOP each | TFLOP per sample | share |", "|---|---|---|---|---|"]
    rows += [f"| {name} | {n} | {f / 1e9:.1f} | {n * f / 1e12:.2f} | {n * f / total:.1%} |" for name, n, f in parts]
    rows.append(f"| total | | | {total / 1e12:.2f} | 100% |")
    verdict = (f"about {_duration(s.seconds)} for {s.samples:,} samples on {s.gpus} x {s.gpu.name} "
               f"({s.samples / s.seconds:,.1f} images/s): the busiest rank draws {s.slowest:,} (vtp-fast sample "
               f"deals chunks of {s.chunk:,} round-robin; {s.samples / s.gpus:,.0f} each if they divided evenly)")
    notes = (f"Modelled, not measured: FLOPs counted with torch.utils.flop_counter on the meta device, at "
             f"{STEP_EFFICIENCY:.0%} of {s.gpu.peak_flops / 1e12:.0f} TFLOP/s as the training step model, in bf16 "
             f"(vtp-fast sample --precision auto; its default fp32 is slower); {s.gpu.source}. Not counted: the "
             f"solver's element-wise updates, noise, writing the .npz and PNGs, and FID's Inception features.")
    return "\n".join([head, *rows, "", verdict, "", notes]) + "\n"
