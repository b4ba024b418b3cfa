"""Normalisation layers with the published model's numerics."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, weight only; computed in fp32, cast back, then scaled (as published)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # (..., D) -> (..., D)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose output keeps the input's dtype (also under autocast)."""

    def forward(self, x: Tensor) -> Tensor:  # (..., D) -> (..., D)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


def make_norm(kind: str, dim: int) -> nn.Module:
    """The block norms of the published configs: 'rmsnorm' (eps 1e-5) or 'layernorm' (eps 1e-6, with bias)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=1e-5)
    if kind == "layernorm":
        return LayerNorm(dim, eps=1e-6)
    raise ValueError(f"unknown norm layer {kind!r} (choices: rmsnorm, layernorm)")
