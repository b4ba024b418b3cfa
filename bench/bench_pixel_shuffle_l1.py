"""Benchmark: pixel-shuffle of decoder tokens, and the fused pixel-shuffle + L1 loss (forward, forward+backward),
every backend vs the reference (shuffle, then F.l1_loss) and torch.compile of it.

    python bench/bench_pixel_shuffle_l1.py [--device cuda] [--out bench/results/rows.jsonl] [--quick]

Shapes are the pixel decoder's output: B images of h x w tokens of patch p (3*p*p channels), against a target of
the tokens' dtype (and, on the GPU, an fp32 target as well). GB/s counts the bytes the op must move at least:
shuffle reads the tokens and writes the image; the loss reads tokens and target; forward+backward reads both
twice and writes the tokens' gradient (the target needs none, as in training).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from vtp_fast.measure.rows import Emit, RowLog, bench_cli, timed_backends
from vtp_fast.measure.timing import measure
from vtp_fast.ops.pixel_shuffle_l1 import OP, pixel_shuffle_l1_ref, pixel_shuffle_ref

# (B, h, w, p, target dtype or None for the tokens' dtype)
SHAPES = {"cpu": [(8, 8, 8, 16, None)], "cuda": [(64, 16, 16, 16, None), (64, 16, 16, 16, torch.float32)]}
QUICK = {"cpu": [(2, 4, 4, 16, None)], "cuda": [(64, 16, 16, 16, None)]}

TABLE_COLUMNS = ["op", "backend", "shape", "dtype", "target_dtype", "median_ms", "gb_per_s", "peak_mem_mb"]


def run(device: str = "cpu", quick: bool = False, dtype: torch.dtype | None = None,
        emit: Emit | None = None) -> list[dict]:
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    impls = {label: b.impl for label, b in timed_backends(OP, device)}
    impls["compiled_reference"] = SimpleNamespace(pixel_shuffle=torch.compile(pixel_shuffle_ref),
                                                  pixel_shuffle_l1=torch.compile(pixel_shuffle_l1_ref))
    rows = RowLog(emit)
    for b, h, w, p, target_dtype in (QUICK if quick else SHAPES)[device]:
        target_dtype = target_dtype or dtype
        gen = torch.Generator(device=device).manual_seed(0)
        tokens = torch.randn(b, h * w, 3 * p * p, device=device, generator=gen).to(dtype).requires_grad_()
        target = torch.randn(b, 3, h * p, w * p, device=device, generator=gen).to(target_dtype)
        tok_bytes, tgt_bytes = tokens.numel() * tokens.element_size(), target.numel() * target.element_size()
        for name, impl in impls.items():
            cases = [
                ("shuffle", lambda i=impl: i.pixel_shuffle(tokens.detach(), (h, w), p), 2 * tok_bytes),
                ("l1_fwd", lambda i=impl: i.pixel_shuffle_l1(tokens.detach(), target, p), tok_bytes + tgt_bytes),
                ("l1_fwd_bwd", lambda i=impl: torch.autograd.grad(i.pixel_shuffle_l1(tokens, target, p), tokens),
                 3 * tok_bytes + 2 * tgt_bytes),
            ]
            for op_name, fn, nbytes in cases:
                if op_name == "shuffle" and target_dtype != dtype:
                    continue  # the shuffle does not see the target: measured once per token dtype
                t = measure(fn, device, warmup=2 if quick else 5, repeat=3 if quick else 20)
                rows.add({"bench": "pixel_shuffle_l1", "op": op_name, "device": device, "backend": name,
                          "shape": [b, h, w, p], "dtype": str(dtype).removeprefix("torch."),
                          "target_dtype": str(target_dtype).removeprefix("torch."), **t,
                          "gb_per_s": nbytes / t["median_ms"] / 1e6})
    return rows.rows


def main() -> None:
    bench_cli(run, TABLE_COLUMNS, __doc__)


if __name__ == "__main__":
    main()
