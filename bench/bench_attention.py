"""Benchmark: attention backends (forward + backward) vs the reference and torch.compile of it.

    python bench/bench_attention.py [--device cuda] [--out rows.jsonl] [--quick]

TFLOP/s counts 4 * B * H * N^2 * hd for the forward and 2.5x that for forward + backward.
"""

from __future__ import annotations

import argparse

import torch

from vtp_fast.benchmark import markdown_table, measure, write_rows
from vtp_fast.ops.attention import OP, attention_ref

SHAPES = {"cpu": [(8, 6, 197, 64)], "cuda": [(64, 16, 257, 64), (16, 16, 1024, 64)]}
QUICK = {"cpu": [(1, 2, 17, 32)], "cuda": [(8, 16, 257, 64)]}


TABLE_COLUMNS = ["pass", "backend", "shape", "dtype", "median_ms", "tflop_per_s", "peak_mem_mb"]


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    impls = {b.name: b.impl.attention for b in OP.runnable(device) if b.priority >= 0}
    impls["compiled_reference"] = torch.compile(attention_ref)
    rows = []
    for shape in (QUICK if quick else SHAPES)[device]:
        b, h, n, d = shape
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(shape, device=device, dtype=dtype)
        flops = 4 * b * h * n * n * d
        for name, fn in impls.items():
            for pass_name, call, f in (("fwd", lambda fn=fn: fn(q, k, v), flops),
                                       ("fwd+bwd", lambda fn=fn: fn(q, k, v).backward(grad), 3.5 * flops)):
                t = measure(call, device, warmup=1 if quick else 3, repeat=2 if quick else 10)
                rows.append({"bench": "attention", "pass": pass_name, "backend": name, "shape": list(shape),
                             "dtype": str(dtype).removeprefix("torch."), **t,
                             "tflop_per_s": f / t["median_ms"] / 1e9})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    rows = run(args.device, args.quick)
    write_rows(rows, args.out)
    print(markdown_table(rows, TABLE_COLUMNS))


if __name__ == "__main__":
    main()
