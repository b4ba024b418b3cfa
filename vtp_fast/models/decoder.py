"""The pixel decoder: latents -> 1x1 projection -> ViT blocks (LayerNorm, RoPE) -> 1x1 projection ->
PixelShuffle(patch) into an image in the normalised input space."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from vtp_fast.nn.block import Block, Views
from vtp_fast.nn.mlp import swiglu_hidden
from vtp_fast.nn.norms import make_norm
from vtp_fast.nn.rope import Rope2D
from vtp_fast.ops import pixel_shuffle_l1 as pixel_shuffle_op


class PixelDecoder(nn.Module):
    def __init__(self, *, in_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, norm: str,
                 patch_size: int, rope_dtype: str = "bf16"):
        super().__init__()
        self.patch_size = patch_size
        self.proj_in = nn.Conv2d(in_dim, dim, kernel_size=1)
        self.rope_embed = Rope2D(dim // num_heads, dtype=rope_dtype)
        hidden = swiglu_hidden(dim, mlp_ratio)
        self.blocks = nn.ModuleList(Block(dim, num_heads, hidden, norm) for _ in range(depth))
        self.norm = make_norm(norm, dim)
        self.proj_out = nn.Conv2d(dim, 3 * patch_size**2, kernel_size=1)
        self.shuffle = pixel_shuffle_op.OP.resolve()  # PixelShuffle(p) on token layout

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_tokens(self, latents: Tensor) -> Tensor:
        """Latents (B, C, h, w) -> pre-shuffle output tokens (B, h * w, 3 * p * p)."""
        grid = latents.shape[2:]
        x = latents.flatten(2).transpose(1, 2)  # (B, hw, C)
        x = F.linear(x, self.proj_in.weight.flatten(1), self.proj_in.bias)  # the 1x1 conv on tokens
        views, xs = Views([self.rope_embed(*grid)]), [x]
        for block in self.blocks:
            xs = block(xs, views)
        x = xs[0]
        x = self.norm(x)
        return F.linear(x, self.proj_out.weight.flatten(1), self.proj_out.bias)

    def tokens_to_images(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """The last step, PixelShuffle(p): tokens (B, h * w, 3 * p * p) -> images (B, 3, h * p, w * p)."""
        return self.shuffle.impl.pixel_shuffle(tokens, grid, self.patch_size)

    def forward(self, latents: Tensor) -> Tensor:
        """Latents (B, C, h, w) -> image (B, 3, h * p, w * p)."""
        return self.tokens_to_images(self.forward_tokens(latents), (latents.shape[2], latents.shape[3]))
