"""SSIM (Wang et al. 2004) with the standard Gaussian window, per image.

Conventions: an 11x11 Gaussian window with sigma 1.5 (normalised to sum 1), K1 = 0.01, K2 = 0.03, and, as in
the reference MATLAB code, only windows that fit entirely inside the image ("valid" filtering, no padding).
The SSIM map is averaged over positions and channels, giving one number per image.

Images smaller than the window: the window shrinks to the largest odd size <= min(H, W) (same sigma, the
truncated Gaussian renormalised to sum 1), so a 7x9 image uses a 7x7 window and a 1x1 image reduces to the
luminance term of its single pixel. Inputs are not clamped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA, dtype=torch.float64, device=None) -> Tensor:
    """1-D Gaussian (size,), centred, summing to 1; the 2-D window is its outer product."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: Tensor, g: Tensor) -> Tensor:
    """Separable valid filtering of (B, C, H, W) with the outer product of g (k,): -> (B, C, H-k+1, W-k+1)."""
    c, k = x.shape[1], g.shape[0]
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)  # along H
    return F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)  # along W


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """SSIM per image: (B, C, H, W) x 2 (values in [0, data_range]) -> (B,), mean over channels and positions.

    Computed in float32 (float64 if an input is float64); see the module docstring for the window rule.
    """
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() != 4:
        raise ValueError(f"ssim: expected (B, C, H, W), got shape {tuple(a.shape)}")
    if min(a.shape[2], a.shape[3]) < 1 or a.shape[0] == 0:
        raise ValueError(f"ssim: empty input {tuple(a.shape)}")
    if data_range <= 0:
        raise ValueError(f"ssim: data_range must be > 0, got {data_range}")
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    a, b = a.to(dtype), b.to(dtype)
    size = min(WINDOW, a.shape[2], a.shape[3])
    size -= 1 - size % 2  # largest odd size <= min(11, H, W)
    g = gaussian_window(size, SIGMA, dtype, a.device)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    mu_a, mu_b = _filter(a, g), _filter(b, g)  # (B, C, H', W')
    var_a = _filter(a * a, g) - mu_a**2
    var_b = _filter(b * b, g) - mu_b**2
    cov = _filter(a * b, g) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)
