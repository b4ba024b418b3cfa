"""`vtp-fast train-dit` and `vtp-fast sample`: a DiT trained on a tokenizer's latents, and images from it.

Training: rectified flow (vtp_fast.train.flow) with the cosine term, logit-normal timesteps, AdamW (beta2 0.95),
EMA, on the latent set's per-channel normalised latents, run by the loop every job shares (vtp_fast.train.loop):
atomic checkpoints and `run.resume=auto`, DDP under torchrun, torch.compile (per block or whole), metrics, progress.
The exported model (`<out>/dit/`: config.json with the DiT config and the latent set's statistics, EMA weights
in model.safetensors) is what `sample` and the evaluation read.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from vtp_fast import distributed as dist
from vtp_fast.compile import transform_blocks
from vtp_fast.config import ConfigError, InputError, from_dict
from vtp_fast.constants import autocast
from vtp_fast.data.latents import LatentBatches, LatentSet, load_latents
from vtp_fast.data.views import sample_seed
from vtp_fast.io import atomic_dir
from vtp_fast.models.dit import DiT, DiTConfig, dit_config
from vtp_fast.models.pretrained import check_tokenizer, load_state_strict, read_safetensors
from vtp_fast.ops import building_for
from vtp_fast.plots import plot_curves
from vtp_fast.train import loop
from vtp_fast.train.common import MetricsLog, ema_update
from vtp_fast.train.config import DiTTrainConfig
from vtp_fast.train.flow import flow_loss, sample
from vtp_fast.train.loop import Job, StepOutput, skipped, start_process
from vtp_fast.train.optim import clip_grad_norm, cosine_schedule, make_adamw, param_groups, set_lr


def ema_decay(decay: float, step: int) -> float:
    """The EMA decay at (0-based) optimizer step `step`, warmed up as is standard (timm's ModelEmaV2 warm-up,
    DiT/SiT-style trainers): min(decay, (1 + step) / (10 + step)) = 0.1 at the first step, 0.5 at step 8, 0.9 at
    step 80, `decay` from step (10 * decay - 1) / (1 - decay) on (8,990 for 0.999). Without it an EMA of decay 0.999
    still holds exp(-steps / 1000) of its initial, untrained weights: 14% after 2,000 steps."""
    return min(decay, (1 + step) / (10 + step))


def dit_model_config(cfg: DiTTrainConfig, meta: dict | None) -> DiTConfig:
    """The DiT architecture of `cfg` on the latent set described by `meta` (its meta.json: channels, grid and
    classes; None: the preset's own, e.g. 64 x 16 x 16 and 1000 classes for the ImageNet presets)."""
    shape = ({} if meta is None else {"in_channels": meta["channels"], "input_size": meta["grid"][0],
                                      "num_classes": len(meta["class_names"])})
    config = dit_config(cfg.preset, **{**shape, **cfg.overrides})
    if meta is not None and config.in_channels != meta["channels"]:
        raise ConfigError(f"overrides.in_channels: {config.in_channels} but the latents have {meta['channels']}")
    return config


def build_dit(cfg: DiTTrainConfig, latents: LatentSet) -> DiT:
    return DiT(dit_model_config(cfg, latents.meta))


def dit_loss(cfg: DiTTrainConfig, model: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The training step's loss terms (flow_loss with cfg's timestep and cosine settings) of `model` on latents
    x0 (B, C, h, w) with labels y (B,): what DiTJob.step backpropagates and `vtp-fast plan` traces."""
    return flow_loss(model, x0, y, mu=cfg.mu, sigma=cfg.sigma, cos_weight=cfg.cos_weight, cos_over=cfg.cos_over,
                     generator=generator)


def export_dit(ema: DiT, meta: dict, path: Path) -> Path:
    """config.json (DiT config + latent statistics) and model.safetensors (EMA weights), atomically."""
    config = {"dit": dataclasses.asdict(ema.config),
              "latents": {k: meta[k] for k in ("channels", "grid", "mean", "std", "class_names", "data", "tokenizer",
                                               "tokenizer_fingerprint", "image_size")}}
    with atomic_dir(path) as tmp:  # a published model: the umask decides who reads it
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
    if config["dit"].pop("learn_sigma", False):  # exports made before the field went carry it, always false
        raise InputError(f"{path}: learn_sigma is true; rectified flow predicts the velocity only")
    model = DiT(from_dict(DiTConfig, config["dit"]))
    load_state_strict(model, read_safetensors(path / "model.safetensors"), str(path / "model.safetensors"))
    return model.to(device).eval(), config["latents"]


class DiTJob(Job[tuple[torch.Tensor, torch.Tensor]]):
    """Rectified flow on a latent set: the raw weights train, the EMA (warmed up) is what is exported."""

    name, unit = "train-dit", "latents"
    data_hint = ("the latents are read from memory-mapped shards: slow storage or a cold page cache (the loader "
                 "workers come from the thread budget: vtp-fast info)")

    def __init__(self, cfg: DiTTrainConfig):
        self.cfg, self.run = cfg, cfg.run
        # model init: the same on every rank; loader workers from the thread budget (0 on 2 CPUs)
        self.device, self.gen, self.threads = start_process(cfg.run, None)
        world = dist.world_size()
        if cfg.batch % world:
            raise ConfigError(f"batch: {cfg.batch} is not divisible by the {world} ranks")
        self.latents = load_latents(cfg.latents)
        with building_for(self.device):
            self.model = build_dit(cfg, self.latents).to(self.device)
            self.ema = build_dit(cfg, self.latents).to(self.device).requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        transform_blocks(self.model, cfg.run.activation_checkpointing, cfg.run.compile_as)
        self.wrapped = dist.apply_ddp(self.model, self.device)
        o = cfg.optim
        self.opt = make_adamw(param_groups({"dit": self.model}, o.weight_decay), o.lr, o.betas,
                              fused=o.fused)
        self.samples_per_step, self.per_rank = cfg.batch, cfg.batch // world
        self.amp = autocast(cfg.run.precision, self.device)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"dit": self.model, "ema": self.ema}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": self.opt}

    def begin(self, start: int, resumed_from: Path | None) -> dict:
        data = LatentBatches(self.latents, self.cfg.batch, self.cfg.run.seed, dist.rank(), dist.world_size())
        loader = DataLoader(data, batch_size=None, sampler=range(start, self.run.end),
                            num_workers=self.threads.loader_workers, pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(self.run.seed))  # not from the global RNG
        self.batches = iter(loader)  # steps start, start + 1, ...: the loop asks for them in order
        if dist.rank() == 0:
            lat, cfg = self.latents, self.cfg
            print(f"vtp-fast train-dit: {cfg.preset} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M "
                  f"params) on {len(lat)} latents {lat.shape[1:]} of {lat.meta['data']}, "
                  f"{len(lat.meta['class_names'])} classes, {self.device} x{dist.world_size()}; "
                  f"{'resuming at ' + str(start) if start else 'from scratch'} -> {self.run.out_dir}")
        return {}

    def next_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        # the batch is the rank's share of the step's global batch, drawn from (seed, step) (LatentBatches: the
        # same global batch on any number of ranks); the step's other draws (noise, t, label dropout) are seeded by
        # (seed, rank, step): a resumed run continues exactly
        z, y = next(self.batches)  # (per_rank, C, h, w) normalised, (per_rank,)
        step_seed = sample_seed(self.cfg.run.seed, dist.rank(), step)
        self.gen.manual_seed(step_seed)
        torch.manual_seed(step_seed)
        return z.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def step(self, step: int, batch: tuple[torch.Tensor, torch.Tensor]) -> StepOutput:
        cfg, o, gen, (x0, y) = self.cfg, self.cfg.optim, self.gen, batch
        lr = cosine_schedule(step, cfg.run.steps, o.warmup_steps, o.lr, o.final_lr)
        set_lr(self.opt, lr)
        with self.amp:
            losses = dit_loss(cfg, self.wrapped, x0, y, gen)
        self.opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        terms = {k: v.detach() for k, v in losses.items()}
        if (skip := skipped(terms)) is not None:
            return skip
        grad_norm = clip_grad_norm(self.model.parameters(), o.grad_clip)
        self.opt.step()
        ema_update(list(self.ema.parameters()), list(self.model.parameters()), ema_decay(cfg.ema, step))
        return StepOutput(terms, {"grad_norm": grad_norm}, {"lr": lr})

    def finish(self, log: MetricsLog | None) -> dict[str, Path]:
        self.batches = None  # the loader's workers stop here, not when the job is collected
        if dist.rank() != 0:
            return {}
        out = Path(self.run.out_dir)
        paths = {"dit": export_dit(self.ema, self.latents.meta, out / "dit"), "metrics": log.path,
                 "config": out / "config.yaml"}
        paths["loss_curve"] = plot_curves({"flow loss (total)": log.series("loss/total"),
                                           "velocity MSE": log.series("loss/mse")},
                                          out / "loss.png", title=f"train-dit {self.cfg.preset}")
        for name, p in paths.items():
            print(f"  {name:12s} {p}")
        return paths


def train_dit(cfg: DiTTrainConfig) -> dict[str, Path]:
    """Train (or resume) a DiT on cfg.latents; export its EMA to <run.out_dir>/dit."""
    return loop.run(DiTJob(cfg))


@torch.no_grad()
def generate(dit: DiT, meta: dict, tokenizer, labels: torch.Tensor, *, steps: int = 50, solver: str = "euler",
             shift: float = 1.0, cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
             batch: int = 64, seed: int = 0, progress: bool = False, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for `labels` (N,): DiT samples (latent space) decoded by the tokenizer.

    noise: the starting latents (N, C, h, w) (default: drawn in batches from one generator seeded by `seed`)."""
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
                   cfg_scale=cfg_scale, cfg_interval=cfg_interval, generator=gen,
                   noise=None if noise is None else noise[i:i + batch].to(device))
        x = tokenizer.decode((z * std + mean).to(next(tokenizer.parameters()).dtype))
        images.append(tokenizer.denormalize(x).clamp(0, 1).float().cpu())
    return torch.cat(images)
