"""Feed-forward layers: SwiGLU (vision trunk and decoder) and the GELU MLP of the text tower."""

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn


def swiglu_hidden(dim: int, ratio: float = 4.0, align: int = 8) -> int:
    """Published rule: d = int(dim * ratio * 2 / 3) rounded up to a multiple of `align`."""
    d = int(int(dim * ratio) * 2 / 3)
    return d + (-d % align)


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x), all with bias. (..., D) -> (..., D)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * (1.702 * x).sigmoid()


def gelu_mlp(dim: int, hidden: int, quick_gelu: bool = False) -> nn.Sequential:
    """OpenCLIP text MLP with keys c_fc / c_proj. (..., D) -> (..., D)."""
    return nn.Sequential(OrderedDict([
        ("c_fc", nn.Linear(dim, hidden)),
        ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
        ("c_proj", nn.Linear(hidden, dim)),
    ]))
