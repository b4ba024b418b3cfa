"""The encoder trunk: a DINOv3-style ViT with 2-D RoPE, one CLS token, a mask token and a linear bottleneck."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from vtp_fast.nn.block import Block, Views
from vtp_fast.nn.mlp import swiglu_hidden
from vtp_fast.nn.norms import make_norm
from vtp_fast.nn.rope import Rope2D
from vtp_fast.ops.attention import PackedViews


class PatchEmbed(nn.Module):
    """Conv2d(3, D, p, stride p): (B, 3, H, W) -> (B, H/p * W/p, D), plus the grid (H/p, W/p)."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, D, h, w)
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid  # (B, hw, D)

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.proj.in_channels * self.proj.kernel_size[0] ** 2)
        nn.init.uniform_(self.proj.weight, -bound, bound)
        nn.init.uniform_(self.proj.bias, -bound, bound)


class TrunkOutput(NamedTuple):
    """One view's trunk output: final-normed tokens before the bottleneck."""

    cls: Tensor  # (B, D)
    patch: Tensor  # (B, h * w, D)
    grid: tuple[int, int]  # (h, w)


class VisionTrunk(nn.Module):
    """Pre-norm ViT; outputs the final-normed CLS and patch tokens (pre-bottleneck) of each input view.

    `forward(images, masks)` takes one batch (B, 3, H, W) or a list of batches of different sizes (multi-crop:
    global and local views in one call), each with an optional (B, h * w) bool mask whose True tokens are
    replaced by the mask token (iBOT).
    """

    def __init__(self, *, patch_size: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, norm: str,
                 bottleneck: int, rope_dtype: str = "bf16"):
        super().__init__()
        self.patch_size, self.dim = patch_size, dim
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.rope_embed = Rope2D(dim // num_heads, dtype=rope_dtype)
        hidden = swiglu_hidden(dim, mlp_ratio)
        self.blocks = nn.ModuleList(Block(dim, num_heads, hidden, norm) for _ in range(depth))
        self.packs_views = self.blocks[0].attn.packs_views if depth else False  # resolved at construction
        self.norm = make_norm(norm, dim)
        # As published: no bottleneck layer when it would keep the width (the latents are the normed tokens).
        self.feature_bottleneck = nn.Linear(dim, bottleneck, bias=False) if bottleneck != dim else nn.Identity()

    def init_weights(self) -> None:
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.patch_embed.reset_parameters()

    def tokens(self, images: Tensor, mask: Tensor | None) -> tuple[Tensor, tuple[int, int]]:
        """(B, 3, H, W), mask (B, hw) | None -> tokens (B, 1 + hw, D) with CLS first, and the grid."""
        x, grid = self.patch_embed(images)
        if mask is not None:
            if mask.shape != x.shape[:2]:
                raise ValueError(f"mask must be (B, h*w) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
            cls = self.cls_token
        else:
            cls = self.cls_token + 0 * self.mask_token  # keeps mask_token in the graph (DDP), value unchanged
        return torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1), grid

    def last_blocks(self, images: Tensor, n: int) -> list[TrunkOutput]:
        """One view (B, 3, H, W) -> the outputs of its last n blocks, each through the final norm, the deepest last
        (DINOv2's intermediate layers with norm, what its linear evaluation reads); the last equals `forward`."""
        depth = len(self.blocks)
        if not 1 <= n <= depth:
            raise ValueError(f"last_blocks: n must be in [1, {depth}] (the trunk's depth), got {n}")
        x, grid = self.tokens(images, None)  # (B, 1 + hw, D)
        views = Views([self.rope_embed(*grid)], None)
        xs, outs = [x], []
        for i, block in enumerate(self.blocks):
            xs = block(xs, views)
            if i >= depth - n:
                y = self.norm(xs[0])  # (B, 1 + hw, D)
                outs.append(TrunkOutput(y[:, 0], y[:, 1:], grid))
        return outs

    def forward(self, images: Tensor | list[Tensor], masks: Tensor | list[Tensor | None] | None = None):
        """One view -> its TrunkOutput; a list of views -> a list of them."""
        single = isinstance(images, Tensor)
        views = [images] if single else list(images)
        masks = [masks] if single else (list(masks) if masks is not None else [None] * len(views))
        if len(masks) != len(views):
            raise ValueError(f"got {len(views)} views but {len(masks)} masks")
        xs, grids = zip(*(self.tokens(v, m) for v, m in zip(views, masks, strict=True)), strict=True)
        xs = list(xs)
        ropes = [self.rope_embed(*g) for g in grids]
        packed = None
        if self.packs_views and len(xs) > 1:  # one varlen attention launch per block for all views
            packed = PackedViews.build([x.shape[:2] for x in xs], ropes, xs[0].device)
        views = Views(ropes, packed)
        for block in self.blocks:
            xs = block(xs, views)
        outs = []
        for x, grid in zip(xs, grids, strict=True):
            x = self.norm(x)
            outs.append(TrunkOutput(x[:, 0], x[:, 1:], grid))
        return outs[0] if single else outs
