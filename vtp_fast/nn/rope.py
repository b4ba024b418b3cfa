"""2-D axial rotary position embedding (DINOv3 style), with the published model's bf16 numerics.

Patch tokens of an (H, W) grid get per-axis coordinates in [-1, 1] ("separate" normalisation, so non-square
grids work); prefix tokens (CLS) are not rotated. `periods[i] = base ** (2i / (head_dim / 2))`, i < head_dim / 4.
In 'bf16' mode (the published numerics, needed for checkpoint parity) the angles, sin/cos and the rotation
are computed in bfloat16 and q/k are cast to bf16 and back, exactly as the reference does. 'fp32' mode does
all of it in float32: more accurate, faster on some devices, not bit-compatible with the published model.
This module makes the sin/cos tables; the rotation itself (`apply_rope`, `rotate_half`) is part of the attention
op's pure-PyTorch reference and lives in vtp_fast.ops.attention (re-exported here).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vtp_fast.constants import DTYPES
from vtp_fast.ops.attention import apply_rope, rotate_half  # the rotation is the attention op's reference

__all__ = ["Rope2D", "apply_rope", "rope_periods", "rotate_half"]


def rope_periods(head_dim: int, base: float, dtype: torch.dtype, device=None) -> Tensor:
    """(head_dim // 4,) periods, computed in `dtype` as the reference does."""
    return base ** (2 * torch.arange(head_dim // 4, dtype=dtype, device=device) / (head_dim // 2))


class Rope2D(nn.Module):
    def __init__(self, head_dim: int, base: float = 100.0, dtype: str = "bf16"):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
        if dtype not in DTYPES:
            raise ValueError(f"rope dtype must be one of {list(DTYPES)}, got {dtype!r}")
        self.head_dim, self.base, self.dtype = head_dim, base, DTYPES[dtype]
        # Stored in bf16, as in the published checkpoints (part of their state dict).
        self.register_buffer("periods", rope_periods(head_dim, base, torch.bfloat16), persistent=True)

    def forward(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        """sin, cos for an (h, w) grid: each (h * w, head_dim) in the rope dtype."""
        dd = {"device": self.periods.device, "dtype": self.dtype}
        # model.to(dtype) converts the stored buffer too; its values are bf16 numbers, so casting back is exact
        periods = (self.periods.to(torch.bfloat16) if self.dtype == torch.bfloat16
                   else rope_periods(self.head_dim, self.base, self.dtype, self.periods.device))
        coords_h = torch.arange(0.5, h, **dd) / h
        coords_w = torch.arange(0.5, w, **dd) / w
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)  # (hw, 2)
        coords = 2.0 * coords - 1.0
        angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]  # (hw, 2, hd/4)
        angles = angles.flatten(1, 2).tile(2)  # (hw, hd): [h-angles, w-angles] twice
        return torch.sin(angles), torch.cos(angles)
