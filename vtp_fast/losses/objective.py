"""The weighted multi-objective loss: named terms, zero-weight terms never built, detached values for logs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtp_fast.config import ConfigError

TERMS = ("rec_l1", "rec_mse", "rec_lpips", "clip", "dino", "ibot", "koleo", "gan")


@dataclass
class ObjectiveConfig:
    """Published weighting: 0.1 * L_rec + 1 * L_ssl + 1 * L_clip, with L_rec = L1 + mse * MSE + perceptual * LPIPS
    (published: mse 0) and
    L_ssl = dino * L_dino + ibot * L_ibot + koleo * L_koleo (DINOv2's weights)."""

    rec: float = 0.1
    clip: float = 1.0
    ssl: float = 1.0
    perceptual: float = 1.0  # LPIPS inside L_rec; needs VGG weights (see vtp_fast.losses.reconstruction)
    lpips_vgg_path: str | None = None
    mse: float = 0.0  # a pixel MSE term inside L_rec (not published): reconstruction without LPIPS weights (CPU)
    dino: float = 1.0
    ibot: float = 1.0
    koleo: float = 0.1
    gan: float = 0.0  # stage 2: weight of the adversarial term (on top of VQGAN's adaptive weight)

    def validate(self) -> None:
        for key in ("rec", "clip", "ssl", "perceptual", "mse", "dino", "ibot", "koleo", "gan"):
            if getattr(self, key) < 0:
                raise ConfigError(f"objective.{key}: weights must be >= 0, got {getattr(self, key)}")
        if self.rec == 0:
            raise ConfigError("objective.rec: must be > 0 (a tokenizer needs its decoder; the latent is the point)")

    def term_weights(self) -> dict[str, float]:
        return {"rec_l1": self.rec, "rec_mse": self.rec * self.mse, "rec_lpips": self.rec * self.perceptual,
                "clip": self.clip, "dino": self.ssl * self.dino, "ibot": self.ssl * self.ibot,
                "koleo": self.ssl * self.koleo, "gan": self.gan}


class Objective:
    """total = sum_t w_t * value_t over the terms with w_t != 0. `__contains__` says whether a term is active,
    so the step only builds and computes what counts."""

    def __init__(self, weights: dict[str, float]):
        unknown = set(weights) - set(TERMS)
        if unknown:
            raise ConfigError(f"unknown objective term(s) {sorted(unknown)}; terms: {', '.join(TERMS)}")
        self.weights = {k: float(w) for k, w in weights.items() if w != 0}

    def __contains__(self, term: str) -> bool:
        return term in self.weights

    def __call__(self, values: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """values: term -> scalar tensor (inactive terms may be absent) -> (total, detached values incl. total)."""
        missing = [t for t in self.weights if t not in values]
        if missing:
            raise KeyError(f"objective terms without a value: {missing}")
        total = sum(self.weights[t] * values[t] for t in self.weights)
        logs = {t: v.detach() for t, v in values.items() if t in self.weights}
        logs["total"] = total.detach() if isinstance(total, Tensor) else torch.tensor(total)
        return total, logs
