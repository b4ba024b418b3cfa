"""Attention layers. The attention itself goes through `vtp_fast.ops.attention`, resolved once at build."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtp_fast.ops import attention as attention_op

Rope = tuple[Tensor, Tensor]  # (sin, cos), each (h * w, head_dim)


class SelfAttention(nn.Module):
    """ViT attention with fused qkv and 2-D RoPE on the patch tokens (prefix tokens unrotated)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.backend = attention_op.OP.resolve()

    @property
    def packs_views(self) -> bool:
        """Whether the resolved backend runs several views of different lengths in one packed call (a capability
        its registration declares)."""
        return "packs_views" in self.backend.capabilities

    def attend(self, qkv: Tensor, rope: Rope | None) -> Tensor:
        """qkv: (B, N, 3 * D) -> attention output (B, N, D), before the output projection."""
        b, n, three_d = qkv.shape
        qkv = qkv.view(b, n, 3, self.num_heads, three_d // (3 * self.num_heads))  # (B, N, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, hd)
        out = self.backend.impl.attention(q, k, v, rope=rope)  # (B, H, N, hd), RoPE applied inside
        return out.transpose(1, 2).reshape(b, n, three_d // 3)

    def attend_packed(self, qkv: Tensor, seq_start: Tensor, seq_len: Tensor, max_len: int,
                      rope: Rope | None) -> Tensor:
        """Packed views: qkv (T, 3 * D) -> (T, D); rope per token (T, hd); one call for all views."""
        t, three_d = qkv.shape
        q, k, v = qkv.view(t, 3, self.num_heads, three_d // (3 * self.num_heads)).unbind(1)  # each (T, H, hd)
        out = self.backend.impl.attention_varlen(q, k, v, seq_start, seq_len, max_len, rope=rope)
        return out.reshape(t, three_d // 3)

    def forward(self, x: Tensor, rope: Rope | None = None) -> Tensor:  # (B, N, D) -> (B, N, D)
        return self.proj(self.attend(self.qkv(x), rope))


class TextAttention(nn.Module):
    """Causal multi-head attention with torch.nn.MultiheadAttention's parameter names (OpenCLIP text)."""

    def __init__(self, dim: int, num_heads: int, causal: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"text width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.causal = num_heads, causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.backend = attention_op.OP.resolve()

    def forward(self, x: Tensor) -> Tensor:  # (B, L, D) -> (B, L, D)
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, hd)
        out = self.backend.impl.attention(q, k, v, causal=self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))
