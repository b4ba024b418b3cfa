"""Transformer blocks: the pre-norm ViT block (trunk and pixel decoder) and the OpenCLIP text block."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from vtp_fast.nn.attention import Rope, SelfAttention, TextAttention
from vtp_fast.nn.mlp import SwiGLU, gelu_mlp
from vtp_fast.nn.norms import LayerNorm, make_norm


class Block(nn.Module):
    """x + attn(norm1(x)), then + mlp(norm2(x)); SwiGLU MLP; no LayerScale, no QK-norm (as published).

    Given a list of token sets of different lengths (multi-crop views), it runs them at once: norms, qkv, the
    output projection and the MLP on all tokens concatenated, attention per view. Lists go through `forward`
    too, so a compiled block (`torch.compile` of the module) covers both.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, norm: str):
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = make_norm(norm, dim)
        self.mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, x: Tensor | list[Tensor], rope: Rope | None | list[Rope | None] | PackedViews = None):
        """(B, N, D) -> (B, N, D); or a list of (B_i, N_i, D) with a list of ropes (or, for a backend that packs
        views, their `PackedViews`) -> a list of the same shapes."""
        if isinstance(x, list):
            return self._forward_list(x, rope)
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))

    def _forward_list(self, xs: list[Tensor], ropes: list[Rope | None] | PackedViews) -> list[Tensor]:
        if len(xs) == 1 and not isinstance(ropes, PackedViews):
            return [self(xs[0], ropes[0])]
        shapes = [x.shape for x in xs]
        sizes = [s[0] * s[1] for s in shapes]
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])  # (sum B_i N_i, D)
        qkv = self.attn.qkv(self.norm1(flat))  # (sum B_i N_i, 3D)
        if isinstance(ropes, PackedViews):  # every view's sequences in one varlen launch
            attended = self.attn.attend_packed(qkv, *ropes)
        else:
            attended = torch.cat([self.attn.attend(q.view(*s[:2], -1), r).reshape(n, -1)
                                  for q, s, r, n in zip(qkv.split(sizes), shapes, ropes, sizes, strict=True)])
        flat = flat + self.attn.proj(attended)
        flat = flat + self.mlp(self.norm2(flat))
        return [t.view(s) for t, s in zip(flat.split(sizes), shapes, strict=True)]


class PackedViews(NamedTuple):
    """Views xs[i] (B_i, N_i, D) laid out back to back as S = sum B_i sequences: seq_start, seq_len (S,) int32,
    max_len, and per-token rope tables (T, hd) (prefix rows: sin 0, cos 1). Built once per trunk forward."""

    seq_start: Tensor
    seq_len: Tensor
    max_len: int
    rope: Rope | None

    @classmethod
    def build(cls, shapes: list[tuple[int, int]], ropes: list[Rope], device: torch.device) -> PackedViews:
        from vtp_fast.ops.attention import full_rope

        lens = torch.cat([torch.full((b,), n, dtype=torch.int32) for b, n in shapes])
        starts = torch.cumsum(lens, 0, dtype=torch.int32) - lens
        tables = [full_rope(r, n) for r, (_, n) in zip(ropes, shapes, strict=True)]  # each (N_i, hd)
        rope = tuple(torch.cat([t[j].repeat(b, 1) for t, (b, _) in zip(tables, shapes, strict=True)]) for j in (0, 1))
        return cls(starts.to(device), lens.to(device), max(n for _, n in shapes), rope)


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
