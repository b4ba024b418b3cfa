"""Scaled dot-product attention over heads.

  attention(q, k, v, causal=False) -> out;  q, k, v, out: (B, H, N, head_dim), scale head_dim ** -0.5.

Backends: PyTorch SDPA (the default everywhere), flash-attn and xformers on CUDA when importable (fp16/bf16),
and the pure-PyTorch reference (fp32 math). Issue-4 kernels register here too.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from vtp_fast import optional
from vtp_fast.ops.registry import new_op


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention: q, k, v must share one (B, H, N, head_dim) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def attention_ref(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(head_dim)) v computed in fp32; (B, H, N, hd) -> (B, H, N, hd) in q's dtype."""
    _check(q, k, v)
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, N, N)
    if causal:
        n = q.shape[-2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    _check(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _attention_flash(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    _check(q, k, v)
    flash = optional.module("flash_attn")
    # flash-attn wants (B, N, H, hd)
    out = flash.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    return out.transpose(1, 2)


def _attention_xformers(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    _check(q, k, v)
    xops = optional.module("xformers")
    bias = xops.LowerTriangularMask() if causal else None
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)  # (B, N, H, hd) -> (B, H, N, hd)


OP = new_op("attention", SimpleNamespace(attention=attention_ref))
OP.register("sdpa", SimpleNamespace(attention=attention_sdpa), priority=10)
for _name, _fn in (("flash_attn", _attention_flash), ("xformers", _attention_xformers)):
    _ok = optional.available(_name) and torch.cuda.is_available()
    OP.register(_name, SimpleNamespace(attention=_fn), priority=5, devices=("cuda",), available=_ok,
                reason="" if _ok else (optional.reason(_name) or "no CUDA device"))
