"""Benchmark: masked-token gather/scatter, every backend vs the reference and torch.compile of it.

    python bench/bench_masked_gather.py [--device cuda] [--out bench/results/rows.jsonl] [--quick]

Shapes are iBOT-like: B samples of N patch tokens of width D, 40% masked. Reported GB/s counts the bytes the
op must move (read + write of the selected rows; scatter also writes the untouched rows).
"""

from __future__ import annotations

import torch

from vtp_fast.data.views import mask_to_index
from vtp_fast.measure.rows import Emit, RowLog, bench_cli, timed_backends
from vtp_fast.measure.timing import measure
from vtp_fast.ops.masked_gather import OP, masked_gather_ref, masked_scatter_ref

SHAPES = {"cpu": [(32, 196, 384)], "cuda": [(256, 256, 768), (64, 1024, 1024)]}
QUICK = {"cpu": [(4, 16, 64)], "cuda": [(64, 256, 768)]}


TABLE_COLUMNS = ["op", "backend", "shape", "dtype", "median_ms", "gb_per_s", "peak_mem_mb"]


def run(device: str = "cpu", quick: bool = False, dtype: torch.dtype | None = None,
        emit: Emit | None = None) -> list[dict]:
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    impls = {label: b.impl for label, b in timed_backends(OP, device)}
    compiled_gather = torch.compile(masked_gather_ref)
    compiled_scatter = torch.compile(masked_scatter_ref)
    rows = RowLog(emit)
    for b, n, d in (QUICK if quick else SHAPES)[device]:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(b, n, d, device=device, generator=gen).to(dtype)
        index = mask_to_index(torch.rand(b, n, device=device, generator=gen) < 0.4)
        packed = x.reshape(-1, d)[index]
        fill = torch.randn(d, device=device, dtype=dtype)
        moved = index.numel() * d * x.element_size()
        cases = {name: (lambda i=impl: i.masked_gather(x, index),
                        lambda i=impl: i.masked_scatter(packed, index, fill, (b, n)))
                 for name, impl in impls.items()}
        cases["compiled_reference"] = (lambda: compiled_gather(x, index),
                                       lambda: compiled_scatter(packed, index, fill, (b, n)))
        for name, (gather, scatter) in cases.items():
            for op_name, fn, nbytes in (("gather", gather, 2 * moved),
                                        ("scatter", scatter, moved + b * n * d * x.element_size())):
                t = measure(fn, device, warmup=2 if quick else 5, repeat=3 if quick else 20)
                rows.add({"bench": "masked_gather", "op": op_name, "device": device, "backend": name,
                          "shape": [b, n, d], "masked": index.numel(), "dtype": str(dtype).removeprefix("torch."), **t,
                          "gb_per_s": nbytes / t["median_ms"] / 1e6})
    return rows.rows


def main() -> None:
    bench_cli(run, TABLE_COLUMNS, __doc__)


if __name__ == "__main__":
    main()
