"""Pixel metrics on images in [0, 1]."""

import torch
from torch import Tensor


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image: (B, C, H, W) x 2 in [0, 1] -> (B,).

    Inputs are clamped to [0, 1] first (what a saved 8-bit image would hold, before rounding).
    """
    mse = (a.float().clamp(0, 1) - b.float().clamp(0, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))
