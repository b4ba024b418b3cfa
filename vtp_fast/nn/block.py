"""Transformer blocks: the pre-norm ViT block (trunk and pixel decoder) and the OpenCLIP text block."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from vtp_fast.nn.attention import Rope, SelfAttention, TextAttention
from vtp_fast.nn.mlp import SwiGLU, gelu_mlp
from vtp_fast.nn.norms import LayerNorm, make_norm
from vtp_fast.ops.attention import PackedViews


class Views(NamedTuple):
    """How a Block attends within each of a list of token sets (views: multi-crop, or one image): each view's
    rotary tables, and for a backend that packs views (`SelfAttention.packs_views`) their packed layout, built once
    per forward and shared by every block."""

    ropes: list[Rope | None]
    packed: PackedViews | None = None


class Block(nn.Module):
    """x + attn(norm1(x)), then + mlp(norm2(x)); SwiGLU MLP; no LayerScale, no QK-norm (as published).

    It takes a list of token sets (B_i, N_i, D) (multi-crop views, or one) and runs them at once: norms, qkv, the
    output projection and the MLP on all tokens concatenated, attention per view or, packed, in one varlen call.
    One forward for every caller, so a compiled block (`torch.compile` of the module) covers them all.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, norm: str):
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = make_norm(norm, dim)
        self.mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, xs: list[Tensor], views: Views) -> list[Tensor]:
        """A list of (B_i, N_i, D) -> a list of the same shapes."""
        if len(xs) == 1 and views.packed is None:
            x = xs[0]
            x = x + self.attn(self.norm1(x), views.ropes[0])
            return [x + self.mlp(self.norm2(x))]
        shapes = [x.shape for x in xs]
        sizes = [s[0] * s[1] for s in shapes]
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])  # (sum B_i N_i, D)
        qkv = self.attn.qkv(self.norm1(flat))  # (sum B_i N_i, 3D)
        if views.packed is not None:  # every view's sequences in one varlen launch
            attended = self.attn.attend_packed(qkv, *views.packed)
        else:
            attended = torch.cat([self.attn.attend(q.view(*s[:2], -1), r).reshape(n, -1)
                                  for q, s, r, n in zip(qkv.split(sizes), shapes, views.ropes, sizes, strict=True)])
        flat = flat + self.attn.proj(attended)
        flat = flat + self.mlp(self.norm2(flat))
        return [t.view(s) for t, s in zip(flat.split(sizes), shapes, strict=True)]


class TextBlock(nn.Module):
    """OpenCLIP ResidualAttentionBlock: ln_1, causal attn, ln_2, GELU mlp (c_fc, c_proj)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, causal: bool = True,
                 quick_gelu: bool = False):
        super().__init__()
        self.ln_1 = LayerNorm(dim)
        self.attn = TextAttention(dim, num_heads, causal=causal)
        self.ln_2 = LayerNorm(dim)
        self.mlp = gelu_mlp(dim, int(dim * mlp_ratio), quick_gelu)

    def forward(self, x: Tensor) -> Tensor:  # (B, L, D) -> (B, L, D)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))
