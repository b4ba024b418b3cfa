"""Numbers that are part of the published model's contract, shared by layers that must not import each other, and
the precisions configs name (`DTYPES`, `autocast`).

The input normalisation is applied by data loading (decoders, views), by the model (`VTP.normalize`) and by the
perceptual loss (LPIPS re-normalisation); its numbers and the one function that applies them (`normalize`, with its
inverse `denormalize`) live here, below all three, so none of them imports another.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

# the published VTP checkpoints' input normalisation (RGB in [0, 1])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# the precisions configs and the command line name ("fp32", "bf16"): RoPE, inference, stored latents
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device):
    """The forward's mixed-precision context for a config's precision: "bf16", "fp32", or "auto" (bf16 on CUDA,
    fp32 elsewhere)."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

Stats = tuple[Tensor, Tensor]  # (mean, std), each (3, 1, 1) float32


def pixel_stats(device: torch.device | str | None = None, scale: float = 1.0) -> Stats:
    """(mean, std) of the normalisation as (3, 1, 1) float32 tensors on `device`, times `scale` (255: for uint8
    pixels). A module that normalises keeps them as buffers, so they follow it to its device."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    return (mean, std) if scale == 1.0 else (mean * scale, std * scale)


def normalize(images: Tensor, stats: Stats | None = None) -> Tensor:
    """(..., 3, H, W) RGB -> float32 in the normalised space, on the images' device: uint8 pixels in [0, 255]
    (converted once, then in place: a third of the time of fresh tensors per step) or floats in [0, 1] (a new
    tensor). stats, for floats: `pixel_stats` on the images' device (a module's buffers), made here when None; uint8
    pixels always use the 255-scaled ones made here."""
    if images.dtype == torch.uint8:
        mean, std = pixel_stats(images.device, 255)
        return images.float().sub_(mean).div_(std)
    mean, std = stats if stats is not None else pixel_stats(images.device)
    return (images - mean) / std


def denormalize(images: Tensor, stats: Stats | None = None) -> Tensor:
    """Inverse of `normalize` for floats: (..., 3, H, W) normalised -> RGB in [0, 1] (not clamped)."""
    mean, std = stats if stats is not None else pixel_stats(images.device)
    return images * std + mean
