"""Reconstruction-only training of a VTP tokenizer (L1 through the 64-d latent), the first main job.

Trains a tiny tokenizer on the emoji set on the CPU in minutes, evaluates PSNR on a held-out emoji style, and
writes into `run.out_dir`: the checkpoint in the published layout (`checkpoint/`), `reconstructions.png`
(held-out and training images, each row of originals followed by its reconstructions), `loss.png`,
`metrics.jsonl` and the resolved `config.yaml`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vtp_fast.config import ConfigError, save_config
from vtp_fast.data.emoji import STYLES, default_cache_dir, load_emoji, prepare_emoji
from vtp_fast.eval.metrics import psnr
from vtp_fast.eval.plots import image_grid, plot_curves
from vtp_fast.models.presets import vtp_config
from vtp_fast.models.pretrained import save_pretrained
from vtp_fast.models.vtp import VTP
from vtp_fast.train.common import MetricsLog, OptimConfig, RunConfig, pick_device, seed_everything
from vtp_fast.train.optim import cosine_schedule, make_adamw, param_groups


@dataclass
class EmojiDataConfig:
    root: str | None = None  # a prepared emoji dir; null: prepare it in the cache ($VTP_FAST_CACHE)
    image_size: int = 64
    train_styles: tuple[str, ...] = ("google", "twitter", "fluent")
    eval_styles: tuple[str, ...] = ("openmoji",)  # held out: never trained on
    eval_images: int = 256

    def validate(self) -> None:
        for key in ("train_styles", "eval_styles"):
            bad = [s for s in getattr(self, key) if s not in STYLES]
            if bad or not getattr(self, key):
                raise ConfigError(f"data.{key}: {list(getattr(self, key))} must be a non-empty subset of "
                                  f"{list(STYLES)}")
        if set(self.train_styles) & set(self.eval_styles):
            raise ConfigError("data.eval_styles: must not overlap data.train_styles (held-out evaluation)")


@dataclass
class AEConfig:
    model: str = "vtp-tiny"  # a preset of vtp_fast.models.presets
    model_overrides: dict[str, Any] = field(default_factory=dict)  # VTPConfig fields
    rope_dtype: Literal["bf16", "fp32"] = "bf16"
    data: EmojiDataConfig = field(default_factory=EmojiDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def emoji_root(cfg: EmojiDataConfig) -> Path:
    return Path(cfg.root) if cfg.root else prepare_emoji(default_cache_dir(), size=cfg.image_size)


def to_model_space(model: VTP, images_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) normalised floats on `device`."""
    x = images_u8.to(device).permute(0, 3, 1, 2).float().div_(255)
    return model.normalize(x)


@torch.no_grad()
def reconstruct(model: VTP, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Normalised (B, 3, H, W) -> reconstructions in [0, 1] pixel space."""
    out = [model.denormalize(model.decode(model.encode(images[i:i + batch]))) for i in range(0, len(images), batch)]
    return torch.cat(out).clamp(0, 1)


def train_ae(cfg: AEConfig) -> dict[str, Path]:
    """Run the job; returns the paths it wrote."""
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    device = pick_device(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    gen = seed_everything(cfg.run.seed)

    root = emoji_root(cfg.data)
    train_set, eval_set = load_emoji(root, cfg.data.train_styles), load_emoji(root, cfg.data.eval_styles)
    if train_set.images.shape[1] != cfg.data.image_size:
        raise ConfigError(f"data.image_size: {cfg.data.image_size} but {root} holds "
                          f"{train_set.images.shape[1]} px images")
    eval_idx = torch.randperm(len(eval_set), generator=torch.Generator().manual_seed(0))[: cfg.data.eval_images]

    model = VTP(vtp_config(cfg.model, **{**cfg.model_overrides, "train_clip": False,
                                         "image_size": cfg.data.image_size}),
                rope_dtype=cfg.rope_dtype).to(device)
    eval_images = to_model_space(model, eval_set.images[eval_idx], device)
    opt = make_adamw(param_groups({"model": model}, cfg.optim.weight_decay), cfg.optim.lr, cfg.optim.betas)
    log = MetricsLog(out / "metrics.jsonl")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vtp-fast train-ae: {cfg.model} ({n_params / 1e6:.2f}M params) on {device}, "
          f"{len(train_set)} training images ({', '.join(cfg.data.train_styles)}), held-out "
          f"{', '.join(cfg.data.eval_styles)}; writing to {out}")

    def evaluate(step: int) -> float:
        model.eval()
        value = psnr(reconstruct(model, eval_images), model.denormalize(eval_images).clamp(0, 1)).mean().item()
        model.train()
        log.write(step=step, eval_psnr=value)
        return value

    eval_psnr = evaluate(0)
    bar = tqdm(range(cfg.run.steps), desc="train-ae", unit="step", dynamic_ncols=True)
    tic, seen = time.perf_counter(), 0
    for step in bar:
        lr = cosine_schedule(step, cfg.run.steps, cfg.optim.warmup_steps, cfg.optim.lr, cfg.optim.min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(train_set), (cfg.run.batch_size,), generator=gen)
        x = to_model_space(model, train_set.images[idx], device)
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
        loss = F.l1_loss(model.decode(model.encode(x)), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        opt.step()
        seen += x.shape[0]
        if (step + 1) % cfg.run.log_every == 0 or step + 1 == cfg.run.steps:
            ips = seen / (time.perf_counter() - tic)
            log.write(step=step + 1, loss=loss.item(), lr=lr, grad_norm=grad_norm.item(), images_per_s=ips)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{ips:.0f}", psnr=f"{eval_psnr:.2f}")
        if (step + 1) % cfg.run.eval_every == 0 or step + 1 == cfg.run.steps:
            eval_psnr = evaluate(step + 1)
    bar.close()

    model.eval()
    train_images = to_model_space(model, train_set.images[:12], device)
    shown = eval_images[:12]
    paths = {
        "checkpoint": save_pretrained(model, out / "checkpoint"),
        "reconstructions": image_grid([model.denormalize(shown).clamp(0, 1), reconstruct(model, shown),
                                       model.denormalize(train_images).clamp(0, 1), reconstruct(model, train_images)],
                                      out / "reconstructions.png"),
        "loss_curve": plot_curves({"train L1": log.series("loss")}, out / "loss.png",
                                  title=f"train-ae {cfg.model}: reconstruction loss"),
        "psnr_curve": plot_curves({"held-out PSNR (dB)": log.series("eval_psnr")}, out / "psnr.png",
                                  title="held-out reconstruction PSNR", ylabel="dB", log_y=False),
        "metrics": log.path,
        "config": out / "config.yaml",
    }
    first = log.series("eval_psnr")[1]
    print(f"held-out PSNR: {first[0]:.2f} dB at step 0 -> {first[-1]:.2f} dB at step {cfg.run.steps}")
    for name, path in paths.items():
        print(f"  {name:16s} {path}")
    return paths
