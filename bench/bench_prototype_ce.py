"""Benchmark: the prototype cross-entropy (DINO/iBOT loss fused with the prototype layer), every backend vs the
reference and torch.compile of it.

    python bench/bench_prototype_ce.py [--device cuda] [--out bench/results/rows.jsonl] [--quick]

Shapes (n rows, K prototypes, d): the GPU target is a DINOv2 head, n = 4096, K = 65,536, d = 256 in bf16, where
the issue asks for at most 1/4 of the reference's peak memory and less time than the compiled reference.
TFLOP/s counts the useful matmuls only: forward 2 of n*K*d multiply-adds (student and teacher logits), forward +
backward 4 (plus grad student and grad weight); the fused kernels' backward recomputes the logits on top.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtp_fast.measure.rows import Emit, RowLog, bench_cli, timed_backends
from vtp_fast.measure.timing import measure
from vtp_fast.ops.prototype_ce import OP, prototype_ce_ref

SHAPES = {"cpu": [(256, 4096, 64)], "cuda": [(4096, 65536, 256), (16384, 65536, 256)]}
QUICK = {"cpu": [(32, 512, 32)], "cuda": [(1024, 65536, 256)]}
TEMPS = (0.1, 0.04)  # DINOv2's student and (final) teacher temperatures

TABLE_COLUMNS = ["op", "backend", "shape", "dtype", "median_ms", "tflop_per_s", "ceiling_share",
                 "peak_mem_mb"]


def _inputs(n: int, k: int, d: int, device: str, dtype: torch.dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    student = F.normalize(torch.randn(n, d, device=device, generator=gen), dim=-1).to(dtype)
    teacher = F.normalize(torch.randn(n, d, device=device, generator=gen), dim=-1).to(dtype)
    weight = F.normalize(torch.randn(k, d, device=device, generator=gen), dim=-1).to(dtype)
    center = 0.1 * torch.randn(k, device=device, generator=gen)
    return student, teacher, weight, center


def run(device: str = "cpu", quick: bool = False, dtype: torch.dtype | None = None,
        emit: Emit | None = None) -> list[dict]:
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    fns = {label: b.impl.prototype_ce for label, b in timed_backends(OP, device)}
    fns["compiled_reference"] = torch.compile(prototype_ce_ref)
    rows = RowLog(emit)
    for n, k, d in (QUICK if quick else SHAPES)[device]:
        student, teacher, weight, center = _inputs(n, k, d, device, dtype)
        x, w = student.clone().requires_grad_(), weight.clone().requires_grad_()
        macs = n * k * d
        for name, fn in fns.items():
            def forward(fn=fn):
                with torch.no_grad():
                    return fn(student, teacher, weight, center, *TEMPS)

            def forward_backward(fn=fn):
                loss = fn(x, teacher, w, center, *TEMPS)
                return torch.autograd.grad(loss.sum(), [x, w])

            for op_name, call, flops in (("fwd", forward, 4 * macs), ("fwd+bwd", forward_backward, 8 * macs)):
                t = measure(call, device, warmup=2 if quick else 5, repeat=3 if quick else 20)
                rows.add({"bench": "prototype_ce", "op": op_name, "device": device, "backend": name,
                          "shape": [n, k, d], "dtype": str(dtype).removeprefix("torch."), **t,
                          "tflop_per_s": flops / t["median_ms"] / 1e9})
            if device == "cuda":
                torch.cuda.empty_cache()  # the reference's (n, K) buffers must not count against the next backend
    return rows.rows


def main() -> None:
    bench_cli(run, TABLE_COLUMNS, __doc__)


if __name__ == "__main__":
    main()
