"""`vtp-fast train-dit` and `vtp-fast sample`: a DiT trained on a tokenizer's latents, and images from it.

Training: rectified flow (vtp_fast.train.flow) with the cosine term, logit-normal timesteps, AdamW (beta2 0.95),
EMA, on the latent set's per-channel normalised latents; the shared machinery of pretraining: atomic
checkpoints and `run.resume=auto`, DDP under torchrun, per-block torch.compile, JSONL metrics, progress bar.
The exported model (`<out>/dit/`: config.json with the DiT config and the latent set's statistics, EMA weights
in model.safetensors) is what `sample` and the evaluation read.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from vtp_fast import distributed as dist
from vtp_fast.config import ConfigError, InputError, from_dict, save_config, to_dict
from vtp_fast.data.views import sample_seed
from vtp_fast.eval.latents import LatentSet, check_tokenizer, load_latents
from vtp_fast.io import atomic_dir
from vtp_fast.models.dit import DiT, DiTConfig, dit_config
from vtp_fast.models.pretrained import load_state_strict, read_safetensors
from vtp_fast.ops import building_for
from vtp_fast.train.checkpoint import Checkpointer
from vtp_fast.train.common import MetricsLog, autocast, ema_update, pick_device, seed_everything
from vtp_fast.train.flow import flow_loss, sample
from vtp_fast.train.optim import cosine_schedule, make_adamw, param_groups


@dataclass
class DiTTrainConfig:
    latents: str = ""  # a latent set directory (vtp-fast extract-latents)
    preset: str = "dit-tiny"
    overrides: dict = field(default_factory=dict)  # DiTConfig fields
    steps: int = 2000  # the schedule's length
    stop_at: int = 0  # stop (checkpoint and export) at this step; 0: at `steps` (resume to continue)
    batch: int = 128
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    ema: float = 0.999  # the EMA's decay once warmed up: step s uses min(ema, (1 + s) / (10 + s))
    mu: float = 0.0  # logit-normal timestep location (the paper: -0.75 for L)
    sigma: float = 1.0
    cos_weight: float = 1.0
    cos_over: Literal["sample", "position"] = "sample"  # cosine term per sample, or per position (LightningDiT)
    grad_clip: float = 1.0
    out_dir: str = "runs/dit"
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str = "none"
    device: str = "auto"
    compile: bool = False
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU
    eval_every: int = 0  # >0: log EMA flow loss on held-out latents (no sampling)

    def validate(self) -> None:
        if not self.latents:
            raise ConfigError("latents: a latent set directory is required (vtp-fast extract-latents)")
        for key in ("steps", "batch", "log_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema: must be in [0, 1), got {self.ema}")


def ema_decay(decay: float, step: int) -> float:
    """The EMA decay at (0-based) optimizer step `step`, warmed up as is standard (timm's ModelEmaV2 warm-up,
    DiT/SiT-style trainers): min(decay, (1 + step) / (10 + step)) = 0.1 at the first step, 0.5 at step 8, 0.9 at
    step 80, `decay` from step (10 * decay - 1) / (1 - decay) on (8,990 for 0.999). Without it an EMA of decay 0.999
    still holds exp(-steps / 1000) of its initial, untrained weights: 14% after 2,000 steps."""
    return min(decay, (1 + step) / (10 + step))


def build_dit(cfg: DiTTrainConfig, latents: LatentSet) -> DiT:
    meta = latents.meta
    overrides = {"in_channels": meta["channels"], "input_size": meta["grid"][0],
                 "num_classes": len(meta["class_names"]), **cfg.overrides}
    config = dit_config(cfg.preset, **overrides)
    if config.in_channels != meta["channels"]:
        raise ConfigError(f"overrides.in_channels: {config.in_channels} but the latents have {meta['channels']}")
    return DiT(config)


def export_dit(ema: DiT, meta: dict, path: Path) -> Path:
    """config.json (DiT config + latent statistics) and model.safetensors (EMA weights), atomically."""
    config = {"dit": dataclasses.asdict(ema.config),
              "latents": {k: meta[k] for k in ("channels", "grid", "mean", "std", "class_names", "data", "tokenizer",
                                               "tokenizer_fingerprint", "image_size")}}
    with atomic_dir(path, perms=0o700) as tmp:  # 0o700: the mode tempfile.mkdtemp gave it before vtp_fast.io
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
                  str(tmp / "model.safetensors"))
    return path


def load_dit(path: str | Path, device: str | torch.device = "cpu") -> tuple[DiT, dict]:
    """An exported DiT (EMA weights) and its latent statistics."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: not an exported DiT (config.json + model.safetensors)")
    config = json.loads((path / "config.json").read_text())
    model = DiT(from_dict(DiTConfig, config["dit"]))
    load_state_strict(model, read_safetensors(path / "model.safetensors"), str(path / "model.safetensors"))
    return model.to(device).eval(), config["latents"]


def train_dit(cfg: DiTTrainConfig) -> dict[str, Path]:
    device = dist.init_from_env() if dist.launched_distributed() else pick_device(cfg.device)
    main, world = dist.rank() == 0, dist.world_size()
    if cfg.batch % world:
        raise ConfigError(f"batch: {cfg.batch} is not divisible by the {world} ranks")
    gen = seed_everything(cfg.seed)  # model init: the same on every rank
    latents = load_latents(cfg.latents)
    with building_for(device):
        model = build_dit(cfg, latents).to(device)
        ema = build_dit(cfg, latents).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    if cfg.compile:
        for block in model.blocks:
            block.compile()
    wrapped = dist.apply_ddp(model, device)
    opt = make_adamw(param_groups({"dit": model}, cfg.weight_decay), cfg.lr, cfg.betas)
    out = Path(cfg.out_dir)
    ckpt = Checkpointer(out / "checkpoints", cfg.keep_checkpoints)
    start = 0
    resume = ckpt.resolve(cfg.resume)
    if resume is not None:
        state = Checkpointer.load(resume, None, {"dit": model, "ema": ema})
        dist.load_optimizer_state(opt, state["optimizer"])
        start = int(state["step"])
    end = min(cfg.stop_at or cfg.steps, cfg.steps)
    if start > end:
        raise ConfigError(f"stop_at: step {end} is before the checkpoint being resumed ({resume})")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.sweep()
        save_config(cfg, out / "config.yaml")
        print(f"vtp-fast train-dit: {cfg.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) "
              f"on {latents.latents.shape[0]} latents {tuple(latents.latents.shape[1:])} of {latents.meta['data']}, "
              f"{len(latents.meta['class_names'])} classes, {device} x{world}; "
              f"{'resuming at ' + str(start) if start else 'from scratch'} -> {out}")
    log = MetricsLog(out / "metrics.jsonl", resume_at=start) if main else None
    n = latents.latents.shape[0]
    per_rank = cfg.batch // world
    amp = autocast(cfg.precision, device)
    bar = tqdm(total=end, initial=start, desc="train-dit", unit="step", disable=not main, dynamic_ncols=True)
    tic, logged = time.perf_counter(), start
    for step in range(start, end):
        # every random draw of a step (batch, noise, t, label dropout) is seeded by (seed, rank, step): a resumed run
        # continues exactly, with no RNG state to save
        step_seed = sample_seed(cfg.seed, dist.rank(), step)
        gen.manual_seed(step_seed)
        torch.manual_seed(step_seed)
        lr = cosine_schedule(step, cfg.steps, cfg.warmup_steps, cfg.lr, cfg.lr * 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(n, (per_rank,), generator=gen)
        x0, y = latents.latents[idx].to(device), latents.labels[idx].to(device)
        with amp:
            losses = flow_loss(wrapped, x0, y, mu=cfg.mu, sigma=cfg.sigma, cos_weight=cfg.cos_weight,
                               cos_over=cfg.cos_over, generator=gen)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        ema_update(list(ema.parameters()), list(model.parameters()), ema_decay(cfg.ema, step))
        done = step + 1
        if main and (done % cfg.log_every == 0 or done == end):
            rate = (done - logged) * cfg.batch / (time.perf_counter() - tic)
            row = {k: v.item() for k, v in losses.items()} | {"lr": lr, "grad_norm": grad_norm.item(),
                                                              "latents_per_s": rate}
            log.write(step=done, **row)
            bar.set_postfix(loss=f"{row['total']:.4f}", lat_s=f"{rate:.0f}")
            tic, logged = time.perf_counter(), done
        if done % cfg.checkpoint_every == 0 or done == end:
            if main:
                ckpt.save(done, None, None, {"dit": dist.full_state_dict(model), "ema": dist.full_state_dict(ema)},
                          {"step": done, "optimizer": dist.full_optimizer_state(opt), "config": to_dict(cfg)})
            dist.barrier()
        bar.update(1)
    bar.close()
    if not main:
        return {}
    paths = {"dit": export_dit(ema, latents.meta, out / "dit"), "metrics": log.path, "config": out / "config.yaml"}
    from vtp_fast.eval.plots import plot_curves

    paths["loss_curve"] = plot_curves({"flow loss (total)": log.series("total"), "velocity MSE": log.series("mse")},
                                      out / "loss.png", title=f"train-dit {cfg.preset}")
    for name, p in paths.items():
        print(f"  {name:12s} {p}")
    return paths


@torch.no_grad()
def generate(dit: DiT, meta: dict, tokenizer, labels: torch.Tensor, *, steps: int = 50, solver: str = "euler",
             shift: float = 1.0, cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
             batch: int = 64, seed: int = 0, progress: bool = False) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for `labels` (N,): DiT samples (latent space) decoded by the tokenizer."""
    device = next(dit.parameters()).device
    c = dit.config
    h, w = meta["grid"]
    if c.in_channels != meta["channels"]:
        raise InputError(f"the DiT models {c.in_channels}-channel latents but its statistics describe "
                         f"{meta['channels']}")
    check_tokenizer({"channels": meta["channels"], "tokenizer_fingerprint": meta.get("tokenizer_fingerprint"),
                     "tokenizer": meta.get("tokenizer")}, tokenizer)
    if cfg_scale != 1.0 and c.num_classes <= 1:
        raise InputError("classifier-free guidance needs a class-conditional DiT (this one has no classes)")
    mean = torch.tensor(meta["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], device=device).view(1, -1, 1, 1)
    gen = torch.Generator(device=device).manual_seed(seed)
    images = []
    chunks = range(0, len(labels), batch)
    for i in tqdm(chunks, desc="sample", unit="batch", disable=not progress):
        y = labels[i:i + batch].to(device)
        z = sample(dit, (y.shape[0], c.in_channels, h, w), y, steps=steps, solver=solver, shift=shift,
                   cfg_scale=cfg_scale, cfg_interval=cfg_interval, generator=gen)
        x = tokenizer.decode((z * std + mean).to(next(tokenizer.parameters()).dtype))
        images.append(tokenizer.denormalize(x).clamp(0, 1).float().cpu())
    return torch.cat(images)
