"""Reconstruction loss: L1 plus a perceptual term (LPIPS-VGG) in pixel space, and optionally a pixel MSE term.

LPIPS needs two sets of weights: torchvision's VGG16 backbone (`vgg16-397923af.pth`, from a configured path or
the torch hub cache) and the LPIPS linear heads (shipped by the `lpips` package). Neither can be downloaded at
run time here; when the perceptual weight is > 0 and they are missing, `ReconstructionLoss` refuses to build
with an error saying how to provide them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from vtp_fast import optional
from vtp_fast.config import ConfigError
from vtp_fast.constants import denormalize, pixel_stats
from vtp_fast.ops import pixel_shuffle_l1 as pixel_shuffle_op

VGG_FILE = "vgg16-397923af.pth"
# End of each LPIPS stage in torchvision's vgg16().features: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_STAGE_ENDS = (4, 9, 16, 23, 30)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def find_vgg_weights(path: str | None) -> Path | None:
    if path:
        return Path(path) if Path(path).is_file() else None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILE
    return cached if cached.is_file() else None


def find_lpips_heads() -> Path | None:
    lpips = optional.package_dir("lpips")
    heads = lpips / "weights" / "v0.1" / "vgg.pth" if lpips is not None else None
    return heads if heads is not None and heads.is_file() else None


class LPIPS(nn.Module):
    """LPIPS-VGG distance: forward(x, y) with images (n, 3, H, W) in [-1, 1] -> (n,). Frozen."""

    def __init__(self, vgg_weights: Path, heads: Path):
        super().__init__()
        vgg = torchvision.models.vgg16(weights=None)
        state = torch.load(vgg_weights, map_location="cpu", weights_only=True)
        vgg.load_state_dict(state)
        starts = (0, *_STAGE_ENDS[:-1])
        self.stages = nn.ModuleList(vgg.features[a:b] for a, b in zip(starts, _STAGE_ENDS, strict=True))
        head_state = torch.load(heads, map_location="cpu", weights_only=True)
        self.heads = nn.ParameterList(nn.Parameter(head_state[f"lin{i}.model.1.weight"]) for i in range(5))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)  # (2n, 3, H, W)
        total = 0
        for stage, head in zip(self.stages, self.heads, strict=True):
            h = stage(h)
            fx, fy = F.normalize(h, dim=1, eps=1e-10).chunk(2)
            total = total + F.conv2d((fx - fy) ** 2, head).mean(dim=(1, 2, 3))
        return total

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always frozen, whatever the parent does


class ReconstructionLoss(nn.Module):
    """forward(tokens, target, images) -> {'rec_l1': L1 in the model's normalised space, 'rec_mse': MSE in that
    space (with `mse`), 'rec_lpips': LPIPS in pixels (with `perceptual`)}.

    tokens: the pixel decoder's pre-shuffle output (n, h * w, 3 * p * p); target: images (n, 3, h * p, w * p) in
    the ImageNet-normalised input space. The L1 term goes through the fused pixel-shuffle + L1 op on the tokens;
    the MSE and LPIPS terms read the reconstructed images (the model's `tokens_to_images`), needed only when
    `needs_images`.
    """

    def __init__(self, perceptual: bool, vgg_path: str | None = None, patch: int = 16, mse: bool = False):
        super().__init__()
        self.patch, self.mse = patch, mse
        self.fused_l1 = pixel_shuffle_op.OP.resolve()
        self.lpips = None
        if perceptual:
            vgg, heads = find_vgg_weights(vgg_path), find_lpips_heads()
            if vgg is None or heads is None:
                missing = []
                if vgg is None:
                    where = vgg_path or str(Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILE)
                    missing.append(f"the VGG16 backbone ({where}: torchvision's {VGG_FILE}; set "
                                   "objective.lpips_vgg_path or place it in the torch hub cache)")
                if heads is None:
                    missing.append("the LPIPS linear heads (pip install lpips)")
                raise ConfigError("objective.perceptual > 0 needs LPIPS-VGG weights, missing " + " and ".join(missing)
                                  + "; or set objective.perceptual=0 (L1 only)")
            self.lpips = LPIPS(vgg, heads)
        self.register_buffer("mean", pixel_stats()[0], persistent=False)  # (3, 1, 1)
        self.register_buffer("std", pixel_stats()[1], persistent=False)

    @property
    def needs_images(self) -> bool:
        return self.mse or self.lpips is not None

    def forward(self, tokens: Tensor, target: Tensor, recon: Tensor | None = None) -> dict[str, Tensor]:
        out = {"rec_l1": self.fused_l1.impl.pixel_shuffle_l1(tokens, target, self.patch)}
        if not self.needs_images:
            return out
        if recon is None:
            raise ValueError("ReconstructionLoss: the MSE / LPIPS terms need the reconstructed images")
        if self.mse:
            out["rec_mse"] = (recon.float() - target.float()).square().mean()
        if self.lpips is not None:
            to_pm1 = lambda x: denormalize(x, (self.mean, self.std)) * 2 - 1  # noqa: E731 - normalised -> [-1, 1]
            out["rec_lpips"] = self.lpips(to_pm1(recon).float(), to_pm1(target).float()).mean()
        return out
