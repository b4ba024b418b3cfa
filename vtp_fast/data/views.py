"""Multi-crop views (DINOv2 recipe) and iBOT block masks, seeded per sample.

Every random choice for a sample comes from a generator seeded by (seed, epoch, sample id), never from global
RNG state, so views are identical whichever rank, worker or resumed run builds them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from vtp_fast.config import ConfigError
from vtp_fast.constants import Stats, normalize

_MASK64 = (1 << 64) - 1


def sample_seed(*parts: int) -> int:
    """Mix integers into a 63-bit seed (splitmix64 steps)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


@dataclass
class ViewConfig:
    global_size: int = 64  # global crops (pixels); the paper's 224/256 on real data
    local_size: int = 32  # local crops (DINOv2: 96)
    local_crops: int = 4  # local crops per image (DINOv2: 8)
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    jitter_prob: float = 0.8  # colour jitter (brightness 0.4, contrast 0.4, saturation 0.2)
    grayscale_prob: float = 0.2
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # iBOT: fraction of a masked crop's tokens
    mask_probability: float = 0.5  # fraction of global crops that get a mask

    def validate(self) -> None:
        for key in ("global_scale", "local_scale", "mask_ratio"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"ssl.views.{key}: need 0 < low <= high <= 1, got {(lo, hi)}")
        if not 0 <= self.mask_probability <= 1:
            raise ConfigError(f"ssl.views.mask_probability: must be in [0, 1], got {self.mask_probability}")
        if self.local_crops < 0:
            raise ConfigError(f"ssl.views.local_crops: must be >= 0, got {self.local_crops}")


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=gen).item()


class Crop(NamedTuple):
    """One view's parameters: crop box (pixels) of the source image, output size, flip, colour factors (1 = no
    change; saturation 0 = grayscale)."""

    top: int
    left: int
    height: int
    width: int
    size: int
    flip: bool
    brightness: float
    contrast: float
    saturation: float


def crop_box(h: int, w: int, scale: tuple[float, float], gen: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop's box: area fraction in `scale`, aspect in [3/4, 4/3], 10 tries, then the
    whole image. -> (top, left, height, width)."""
    area = h * w
    for _ in range(10):
        target = area * _uniform(gen, *scale)
        ratio = math.exp(_uniform(gen, math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (), generator=gen))
            return top, left, ch, cw
    return 0, 0, h, w


def sample_crop(h: int, w: int, size: int, scale: tuple[float, float], cfg: ViewConfig,
                gen: torch.Generator) -> Crop:
    """All random choices of one view of an (h, w) image, in a fixed order (the PIL/torch and DALI paths
    consume the same parameters)."""
    box = crop_box(h, w, scale, gen)
    flip = bool(torch.rand((), generator=gen) < 0.5)
    b = c = s = 1.0
    if torch.rand((), generator=gen) < cfg.jitter_prob:
        b, c, s = _uniform(gen, 0.6, 1.4), _uniform(gen, 0.6, 1.4), _uniform(gen, 0.8, 1.2)
    if torch.rand((), generator=gen) < cfg.grayscale_prob:
        s = 0.0
    return Crop(*box, size, flip, b, c, s)


def apply_crop(img: Tensor, crop: Crop) -> Tensor:
    """(3, H, W) in [0, 1] -> (3, size, size): resized crop (bilinear, antialiased), flip, colour."""
    out = TF.resized_crop(img, crop.top, crop.left, crop.height, crop.width, [crop.size, crop.size], antialias=True)
    if crop.flip:
        out = out.flip(-1)
    if (crop.brightness, crop.contrast) != (1.0, 1.0):
        out = TF.adjust_contrast(TF.adjust_brightness(out, crop.brightness), crop.contrast)
    if crop.saturation != 1.0:
        out = TF.adjust_saturation(out, crop.saturation)
    return out.clamp(0, 1)


def block_mask(h: int, w: int, count: int, gen: torch.Generator, max_attempts: int = 10) -> Tensor:
    """(h, w) bool with exactly `count` True tokens, grown as random rectangles (iBOT / BEiT block masking):
    rectangles of random area and log-uniform aspect in [0.3, 1/0.3] are added while they fit the remaining
    budget; tokens still missing after that are picked at random."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    count = min(count, h * w)
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    while int(mask.sum()) < count:
        left_to_mask, grew = count - int(mask.sum()), False
        for _ in range(max_attempts):
            area = _uniform(gen, 1, left_to_mask)
            aspect = math.exp(_uniform(gen, *log_aspect))
            bh, bw = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < bh <= h and 0 < bw <= w:
                top = int(torch.randint(0, h - bh + 1, (), generator=gen))
                left = int(torch.randint(0, w - bw + 1, (), generator=gen))
                new = (~mask[top:top + bh, left:left + bw]).sum()
                if 0 < new <= left_to_mask:
                    mask[top:top + bh, left:left + bw] = True
                    grew = True
                    break
        if not grew:
            free = (~mask).flatten().nonzero().squeeze(1)
            pick = free[torch.randperm(free.numel(), generator=gen)[:left_to_mask]]
            mask.view(-1)[pick] = True
    return mask


def mask_to_index(mask: Tensor) -> Tensor:
    """mask: (B, N) bool -> (M,) int64 flat positions of the True tokens, in order.

    Sizes the packed buffer, so it synchronises with the device once; compute it where the mask is made
    (data loading) and reuse it for student, teacher, forward and backward.
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a (B, N) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    return mask.reshape(-1).nonzero().squeeze(1)


def mask_weights(masks: Tensor) -> Tensor:
    """(n, N) bool masks -> (M,) weight 1 / (masked tokens of its row) for each masked token, in the order of
    `mask_to_index` (iBOT: every masked crop counts once)."""
    per_row = 1.0 / masks.sum(-1).clamp(min=1).float()  # (n,)
    return per_row[:, None].expand_as(masks)[masks]


def sample_views(h: int, w: int, cfg: ViewConfig, grid: tuple[int, int], gen: torch.Generator
                 ) -> tuple[list[Crop], Tensor]:
    """One sample's SSL view parameters: 2 global + L local crops, and the (2, gh * gw) iBOT masks of the global
    crops (a crop is masked with probability mask_probability, at a ratio drawn from mask_ratio)."""
    crops = [sample_crop(h, w, cfg.global_size, cfg.global_scale, cfg, gen) for _ in range(2)]
    crops += [sample_crop(h, w, cfg.local_size, cfg.local_scale, cfg, gen) for _ in range(cfg.local_crops)]
    masks = []
    n = grid[0] * grid[1]
    for _ in range(2):
        if torch.rand((), generator=gen) < cfg.mask_probability:
            count = max(1, round(n * _uniform(gen, *cfg.mask_ratio)))
            masks.append(block_mask(*grid, count, gen).flatten())
        else:
            masks.append(torch.zeros(n, dtype=torch.bool))
    return crops, torch.stack(masks)


def view_major(views: list[Tensor]) -> tuple[Tensor, Tensor]:
    """One (n, 3, s, s) tensor per view (2 global, then L local) -> the global crops (2n, 3, G, G) and the local
    crops (L n, 3, l, l), view-major (every sample's view 0, then view 1, ...); (0, 3, 1, 1) without local crops."""
    global_crops = torch.cat(views[:2])
    local = views[2:]
    return global_crops, torch.cat(local) if local else global_crops.new_zeros(0, 3, 1, 1)


def cut_views(images: Sequence[Tensor], crops: Sequence[Sequence[Crop]], stats: Stats | None = None
              ) -> tuple[Tensor, Tensor]:
    """The SSL views cut in PyTorch (the PIL and nvJPEG decoders): (3, H, W) uint8 images, crops[i][v] view v of
    sample i (2 global, then L local: `sample_views`) -> normalised (`normalize`, with `stats` on the images'
    device) global crops (2n, 3, G, G) and local crops (L n, 3, l, l), view-major (`view_major`)."""
    pixels = [x.float() / 255 for x in images]  # (3, H, W) in [0, 1]
    return view_major([normalize(torch.stack([apply_crop(x, c[v]) for x, c in zip(pixels, crops, strict=True)]),
                                 stats) for v in range(len(crops[0]))])  # per view (n, 3, s, s)
