"""Scaled dot-product attention over heads, with the 2-D RoPE rotation of q and k.

  attention(q, k, v, causal=False, rope=None) -> out
      q, k, v, out: (B, H, N, D); scale D ** -0.5. rope = (sin, cos), each (R, D) in the rope dtype, rotates the
      last R tokens of q and k (N - R prefix tokens, e.g. CLS, stay unrotated); q and k pass through the rope
      dtype as in the published model (`apply_rope` below; the sin/cos tables: vtp_fast.nn.rope).
  attention_varlen(q, k, v, seq_start, seq_len, max_len, rope=None) -> out
      Packed sequences of different lengths (multi-crop views) in one call: q, k, v, out (T, H, D); seq_start,
      seq_len (S,) int32 (token offsets and lengths); max_len = max(seq_len) as a Python int; rope = (sin, cos),
      each (T, D) per token (prefix tokens: sin 0, cos 1). Non-causal.

Backends: PyTorch SDPA (the default), flash-attn and xformers on CUDA when importable, the fused Triton kernel
(RoPE inside, one launch for all packed views; bf16/fp16 on CUDA, fp32 there goes to SDPA), and the pure-PyTorch
reference (fp32 math).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vtp_fast import optional
from vtp_fast.ops.registry import new_op

Rope = tuple[Tensor, Tensor]


# The 2-D RoPE rotation (the sin/cos tables come from vtp_fast.nn.rope.Rope2D): part of this op's reference.
def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(q: Tensor, k: Tensor, sin: Tensor, cos: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate the last sin.shape[0] tokens of q and k: (B, H, N, hd) each; the N - hw prefix tokens stay.

    q and k are cast to the rope dtype (all tokens, as the reference does) and back.
    """
    dtype = q.dtype
    q, k = q.to(sin.dtype), k.to(sin.dtype)
    prefix = q.shape[-2] - sin.shape[-2]
    if prefix < 0:
        raise ValueError(f"rope for {sin.shape[-2]} tokens applied to a sequence of {q.shape[-2]}")

    def rotate(x: Tensor) -> Tensor:
        body = x[:, :, prefix:]
        return torch.cat((x[:, :, :prefix], body * cos + rotate_half(body) * sin), dim=-2)

    return rotate(q).to(dtype), rotate(k).to(dtype)


def _check(q: Tensor, k: Tensor, v: Tensor, rope: Rope | None, dims: int = 4) -> None:
    layout = "(B, H, N, head_dim)" if dims == 4 else "(T, H, head_dim)"
    if q.dim() != dims or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention: q, k, v must share one {layout} shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v on different devices ({q.device}, {k.device}, {v.device})")
    if rope is not None:
        sin, cos = rope
        rows = q.shape[-2] if dims == 4 else q.shape[0]
        fits = sin.shape[0] <= rows if dims == 4 else sin.shape[0] == rows  # dense: the last R tokens; packed: all
        if sin.shape != cos.shape or sin.dim() != 2 or sin.shape[1] != q.shape[-1] or not fits:
            raise ValueError(f"attention: rope sin/cos must be (R {'<=' if dims == 4 else '=='} {rows}, "
                             f"{q.shape[-1]}), got {tuple(sin.shape)}, {tuple(cos.shape)}")


def rotate_packed(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Per-token rotation of packed tokens: x (T, H, D), sin/cos (T, D), in the rope dtype and back."""
    xr = x.to(sin.dtype)
    return (xr * cos[:, None] + rotate_half(xr) * sin[:, None]).to(x.dtype)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, rope: Rope | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D)) v in fp32 (or wider); (B, H, N, D) -> (B, H, N, D) in q's dtype."""
    _check(q, k, v, rope)
    if rope is not None:
        q, k = apply_rope(q, k, *rope)
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 math (float64 stays float64)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, N, N)
    if causal:
        n = q.shape[-2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v.to(acc)).to(q.dtype)


def _check_varlen(q: Tensor, seq_start: Tensor, seq_len: Tensor, max_len: int) -> None:
    """Shapes, dtypes and devices. max_len >= max(seq_len) is the caller's contract (checking it here would sync
    with the GPU on every call); the reference checks it."""
    if seq_start.shape != seq_len.shape or seq_start.dim() != 1 or seq_start.dtype != torch.int32 or \
            seq_len.dtype != torch.int32:
        raise ValueError("attention_varlen: seq_start and seq_len must be (S,) int32 tensors")
    if seq_start.device != q.device or seq_len.device != q.device:
        raise ValueError(f"attention_varlen: seq_start / seq_len on {seq_start.device} / {seq_len.device}, "
                         f"q on {q.device}")
    if max_len < 1:
        raise ValueError(f"attention_varlen: max_len must be >= 1, got {max_len}")


def attention_varlen_ref(q: Tensor, k: Tensor, v: Tensor, seq_start: Tensor, seq_len: Tensor, max_len: int,
                         rope: Rope | None = None) -> Tensor:
    """Packed (T, H, D) sequences -> (T, H, D): each sequence attends within itself (the reference: one dense
    call per sequence)."""
    _check(q, k, v, rope, dims=3)
    _check_varlen(q, seq_start, seq_len, max_len)
    if seq_len.numel() and int(seq_len.max()) > max_len:
        raise ValueError(f"attention_varlen: max_len {max_len} < the longest sequence ({int(seq_len.max())})")
    return _per_view(attention_ref, q, k, v, seq_start, seq_len, rope)


def _per_view(fn, q: Tensor, k: Tensor, v: Tensor, seq_start: Tensor, seq_len: Tensor, rope: Rope | None) -> Tensor:
    """Packed (T, H, D) -> (T, H, D) by one dense call fn(q, k, v) per sequence (reads seq_start / seq_len on the
    host)."""
    if rope is not None:
        q, k = rotate_packed(q, *rope), rotate_packed(k, *rope)
    out = torch.empty_like(q)
    for s, n in zip(seq_start.tolist(), seq_len.tolist(), strict=True):
        part = [t[s:s + n].transpose(0, 1)[None] for t in (q, k, v)]  # (1, H, n, D)
        out[s:s + n] = fn(*part)[0].transpose(0, 1)
    return out


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, rope: Rope | None = None) -> Tensor:
    _check(q, k, v, rope)
    if rope is not None:
        q, k = apply_rope(q, k, *rope)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _attention_flash(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, rope: Rope | None = None) -> Tensor:
    _check(q, k, v, rope)
    if rope is not None:
        q, k = apply_rope(q, k, *rope)
    flash = optional.module("flash_attn")
    # flash-attn wants (B, N, H, D)
    out = flash.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    return out.transpose(1, 2)


def _attention_xformers(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, rope: Rope | None = None) -> Tensor:
    _check(q, k, v, rope)
    if rope is not None:
        q, k = apply_rope(q, k, *rope)
    xops = optional.module("xformers")
    bias = xops.LowerTriangularMask() if causal else None
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)  # (B, N, H, D) -> (B, H, N, D)


OP = new_op("attention", SimpleNamespace(attention=attention_ref, attention_varlen=attention_varlen_ref))
OP.register("sdpa", SimpleNamespace(attention=attention_sdpa), priority=10)
for _name, _fn in (("flash_attn", _attention_flash), ("xformers", _attention_xformers)):
    _ok = optional.available(_name) and torch.cuda.is_available()
    OP.register(_name, SimpleNamespace(attention=_fn), priority=5, devices=("cuda",), available=_ok,
                reason="" if _ok else (optional.reason(_name) or "no CUDA device"))


def full_rope(rope: Rope, n: int) -> Rope:
    """(R, D) tables for the last R of n tokens -> (n, D) tables with identity rows (sin 0, cos 1) first."""
    sin, cos = rope
    prefix = n - sin.shape[0]
    if prefix == 0:
        return sin.contiguous(), cos.contiguous()
    return (torch.cat([sin.new_zeros(prefix, sin.shape[1]), sin]).contiguous(),
            torch.cat([cos.new_ones(prefix, cos.shape[1]), cos]).contiguous())


class PackedViews(NamedTuple):
    """Views xs[i] (B_i, N_i, D) laid out back to back as S = sum B_i sequences: seq_start, seq_len (S,) int32,
    max_len, and per-token rope tables (T, hd) (prefix rows: sin 0, cos 1). Built once per trunk forward."""

    seq_start: Tensor
    seq_len: Tensor
    max_len: int
    rope: Rope | None

    @classmethod
    def build(cls, shapes: list[tuple[int, int]], ropes: list[Rope], device: torch.device) -> PackedViews:
        lens = torch.cat([torch.full((b,), n, dtype=torch.int32) for b, n in shapes])
        starts = torch.cumsum(lens, 0, dtype=torch.int32) - lens
        tables = [full_rope(r, n) for r, (_, n) in zip(ropes, shapes, strict=True)]  # each (N_i, hd)
        rope = tuple(torch.cat([t[j].repeat(b, 1) for t, (b, _) in zip(tables, shapes, strict=True)]) for j in (0, 1))
        return cls(starts.to(device), lens.to(device), max(n for _, n in shapes), rope)


if optional.available("triton"):
    from vtp_fast.kernels import attention as _kernels

    _DTYPES = (torch.float32, torch.float16, torch.bfloat16)
    # fp32 tiles exceed the register file on sm_80/sm_90 (the compile gate shows them spilling): the launchers do
    # not offer fp32 on a GPU, and this backend hands fp32 on CUDA to SDPA.
    _FP32_NOTE = "fp32 on CUDA runs through SDPA (the Triton kernel spills at fp32; bf16/fp16 only)"

    def _fake_fwd(q, k, v, sin, cos, seq_start, seq_len, max_len: int, causal: bool, varlen: bool):
        if varlen:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        else:
            b, h, n, d = q.shape
            out = q.new_empty(b, n, h, d).permute(0, 2, 1, 3)
        lse = q.new_empty(seq_len.shape[0] * q.shape[1], max(max_len, 1), dtype=torch.float32)
        rotated = q.new_empty(q.shape if sin is not None else (0,))
        return out, lse, rotated, torch.empty_like(rotated)

    @torch.library.custom_op("vtp_fast::attention_triton", mutates_args=())
    def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, sin: Tensor | None, cos: Tensor | None, seq_start: Tensor,
                       seq_len: Tensor, max_len: int, causal: bool,
                       varlen: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(out, lse, q rotated, k rotated); without RoPE the last two are empty (the backward takes q, k)."""
        out, lse, qs, ks = _kernels.forward(q, k, v, sin, cos, seq_start, seq_len, max_len, causal,
                                            "varlen" if varlen else "dense")
        if sin is None:  # qs, ks are q, k: an output may not alias an input
            qs, ks = q.new_empty(0), q.new_empty(0)
        return out, lse, qs, ks

    @torch.library.custom_op("vtp_fast::attention_triton_backward", mutates_args=())
    def _attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, sin: Tensor | None,
                       cos: Tensor | None, seq_start: Tensor, seq_len: Tensor, max_len: int, causal: bool,
                       varlen: bool, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
        """q, k: rotated with RoPE (the forward's outputs 2, 3)."""
        do = do if do.stride(-1) == 1 else do.contiguous()
        return _kernels.backward(do, q, k, v, out, lse, sin, cos, seq_start, seq_len, max_len, causal,
                                 "varlen" if varlen else "dense", deterministic)

    _attention_fwd.register_fake(_fake_fwd)
    _attention_bwd.register_fake(lambda do, q, k, v, *rest: (q.new_empty(q.shape), q.new_empty(q.shape),
                                                              q.new_empty(q.shape)))  # contiguous, as the kernel

    def _setup(ctx, inputs, output):
        q, k, v, sin, cos, seq_start, seq_len, max_len, causal, varlen = inputs
        out, lse, qs, ks = output
        if sin is None:
            qs, ks = q, k
        ctx.save_for_backward(qs, ks, v, out, lse, sin, cos, seq_start, seq_len)
        ctx.args = (max_len, causal, varlen)

    def _backward(ctx, do, *_unused):
        qs, ks, v, out, lse, sin, cos, seq_start, seq_len = ctx.saved_tensors
        dq, dk, dv = _attention_bwd(do, qs, ks, v, out, lse, sin, cos, seq_start, seq_len, *ctx.args,
                                    torch.are_deterministic_algorithms_enabled())
        return dq, dk, dv, None, None, None, None, None, None, None

    torch.library.register_autograd(_attention_fwd, _backward, setup_context=_setup)

    def _prepare(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
            raise ValueError(f"attention (triton): q, k, v must share one of {_DTYPES}, got {q.dtype}, {k.dtype}, "
                             f"{v.dtype}")
        d = q.shape[-1]
        if d < 32 or d & (d - 1):
            raise ValueError(f"attention (triton): head_dim must be a power of two >= 32, got {d}")
        if q.stride(-1) != 1 or k.stride() != q.stride() or v.stride() != q.stride():
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return q, k, v

    def _to_sdpa(q: Tensor) -> bool:
        return q.dtype == torch.float32 and q.device.type == "cuda"

    def _attention_triton(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, rope: Rope | None = None) -> Tensor:
        _check(q, k, v, rope)
        q, k, v = _prepare(q, k, v)
        if _to_sdpa(q):
            return attention_sdpa(q, k, v, causal=causal, rope=rope)
        b, _, n, _ = q.shape
        sin, cos = full_rope(rope, n) if rope is not None else (None, None)
        seq_start = torch.zeros(b, dtype=torch.int32, device=q.device)
        seq_len = torch.full((b,), n, dtype=torch.int32, device=q.device)
        return _attention_fwd(q, k, v, sin, cos, seq_start, seq_len, n, causal, False)[0]

    def _attention_varlen_triton(q: Tensor, k: Tensor, v: Tensor, seq_start: Tensor, seq_len: Tensor, max_len: int,
                                 rope: Rope | None = None) -> Tensor:
        _check(q, k, v, rope, dims=3)
        _check_varlen(q, seq_start, seq_len, max_len)
        q, k, v = _prepare(q, k, v)
        if _to_sdpa(q):  # one SDPA call per view (reads the lengths on the host)
            return _per_view(F.scaled_dot_product_attention, q, k, v, seq_start, seq_len, rope)
        sin, cos = (rope[0].contiguous(), rope[1].contiguous()) if rope is not None else (None, None)
        return _attention_fwd(q, k, v, sin, cos, seq_start, seq_len, max_len, False, True)[0]

    # Below SDPA on CUDA until H200 measurements show it ahead (bench/bench_attention.py); request it with
    # VTP_FAST_BACKEND_ATTENTION=triton.
    OP.register_triton(SimpleNamespace(attention=_attention_triton, attention_varlen=_attention_varlen_triton,
                                       note=_FP32_NOTE), priority=8, capabilities=("packs_views",))
else:
    OP.register_triton(None, priority=8)
