"""The compile gate's cases (vtp_fast.measure.gate): each calls an op's real launchers (kernels/<op>.py) on `meta`
tensors of a real training shape, so that the launchers plan the launches a GPU would get."""

from __future__ import annotations

from collections.abc import Callable

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _t(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _attention(b: int, h: int, side: int, d: int, rope: bool, varlen: bool) -> Callable[[torch.dtype], None]:
    """ViT attention over CLS + side^2 patch tokens (dense), or 2 global + 8 local multi-crop views (varlen)."""
    def case(dtype: torch.dtype) -> None:
        from vtp_fast.kernels import attention as k

        if varlen:
            lens = [side * side + 1] * (2 * b) + [37] * (8 * b)  # 16x16 global and 6x6 local views (+ CLS)
            total = sum(lens)
            q = _t(total, h, d, dtype=dtype)
            seq_len = _t(len(lens), dtype=torch.int32)
            args = dict(seq_start=seq_len, seq_len=seq_len, lmax=max(lens), causal=False, layout="varlen")
            rope_rows = total
        else:
            n = side * side + 1
            q = _t(b, h, n, d, dtype=dtype)
            seq_len = _t(b, dtype=torch.int32)
            args = dict(seq_start=seq_len, seq_len=seq_len, lmax=n, causal=False, layout="dense")
            rope_rows = n
        sin = cos = _t(rope_rows, d, dtype=dtype) if rope else None
        out, lse, qs, ks = k.forward(q, q, q, sin, cos, **args)
        k.backward(torch.empty_like(out), qs, ks, q, out, lse, sin, cos, **args)
    return case


def _clip(n: int, big_n: int, e: int) -> Callable[[torch.dtype], None]:
    def case(dtype: torch.dtype) -> None:
        from vtp_fast.kernels import clip_loss as k

        x, big = _t(n, e, dtype=dtype), _t(big_n, e, dtype=dtype)
        scale = _t(dtype=torch.float32)
        k.forward(x, x, big, big, scale, 0)
        norm = _t(2, 2, n, dtype=torch.float32)
        k.backward(x, x, big, big, scale, norm, scale, 0)
    return case


def _prototype_ce(n: int, protos: int, d: int) -> Callable[[torch.dtype], None]:
    def case(dtype: torch.dtype) -> None:
        from vtp_fast.kernels import prototype_ce as k

        x, w, c = _t(n, d, dtype=dtype), _t(protos, d, dtype=dtype), _t(protos, dtype=torch.float32)
        _, stats = k.forward(x, x, w, w, c, 0.1, 0.04)
        k.backward(_t(n, dtype=torch.float32), x, x, w, w, c, stats, 0.1, 0.04)
    return case


def _masked_gather(rows: int, m: int, d: int) -> Callable[[torch.dtype], None]:
    def case(dtype: torch.dtype) -> None:
        from vtp_fast.kernels import masked_gather as k

        x, index = _t(rows, d, dtype=dtype), _t(m, dtype=torch.int64)
        k.gather(x, index)
        k.scatter(_t(m, d, dtype=dtype), index, _t(d, dtype=dtype), rows)
    return case


def _pixel_shuffle_l1(b: int, side: int, p: int) -> Callable[[torch.dtype], None]:
    def case(dtype: torch.dtype) -> None:
        from vtp_fast.kernels import pixel_shuffle_l1 as k

        tokens = _t(b, side * side, 3 * p * p, dtype=dtype)
        target = _t(b, 3, side * p, side * p, dtype=torch.float32)
        k.shuffle(tokens, side, side, p)
        k.l1(tokens, target, p)
        k.l1_backward(_t(dtype=torch.float32), tokens, target, p, True, False)
    return case


# op -> [(case name, dtypes it accepts, case, in the CI subset)]; shapes are the training shapes of VTP-B/L at
# 256 px (257 tokens of 12/16 heads of 64), a 16k-gathered CLIP batch, a 65,536-prototype DINO head.
ALL_DTYPES = tuple(DTYPES)
CASES: dict[str, list[tuple[str, tuple[str, ...], Callable[[torch.dtype], None], bool]]] = {
    "attention": [
        ("B64 H12 N257 d64 rope", ALL_DTYPES, _attention(64, 12, 16, 64, rope=True, varlen=False), True),
        ("B64 H12 N257 d64", ALL_DTYPES, _attention(64, 12, 16, 64, rope=False, varlen=False), False),
        ("B32 H8 N257 d128 rope", ALL_DTYPES, _attention(32, 8, 16, 128, rope=True, varlen=False), True),
        ("multicrop B32 H16 d64 rope", ALL_DTYPES, _attention(32, 16, 16, 64, rope=True, varlen=True), False),
    ],
    "clip_loss": [
        ("n512 N16384 E768", ALL_DTYPES, _clip(512, 16384, 768), True),
        ("n256 N32768 E1024", ALL_DTYPES, _clip(256, 32768, 1024), False),
    ],
    "prototype_ce": [
        ("n4096 K65536 d256", ALL_DTYPES, _prototype_ce(4096, 65536, 256), True),
        ("n512 K65536 d256", ALL_DTYPES, _prototype_ce(512, 65536, 256), False),
    ],
    "masked_gather": [
        ("R65536 M3072 d1024", ALL_DTYPES, _masked_gather(256 * 256, 3072, 1024), True),
    ],
    "pixel_shuffle_l1": [
        ("B64 16x16 p16", ALL_DTYPES, _pixel_shuffle_l1(64, 16, 16), True),
    ],
}

