"""Benchmark: the CLIP contrastive loss, every backend vs the reference and torch.compile of it.

    python bench/bench_clip_loss.py [--device cuda] [--out bench/results/rows.jsonl] [--quick]

Shapes are (n, N, E): this rank's n pairs against the N gathered pairs of width E, this rank's rows last
(offset N - n). "fwd" runs the loss with autograd recording, as in training, so its peak memory includes what
the backward keeps; "fwd+bwd" adds the gradients of all five inputs. TFLOP/s counts the model's matmuls: 2nNE
per direction for the logits and twice that in the backward (6nNE per direction, 12nNE for fwd+bwd);
recomputation inside a fused kernel is not credited. Peak memory is the CUDA allocator's peak above the inputs
(None on the CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtp_fast.measure.rows import Emit, RowLog, bench_cli, timed_backends
from vtp_fast.measure.timing import measure
from vtp_fast.ops.clip_loss import OP, clip_loss_ref

SHAPES = {"cpu": [(256, 2048, 256)], "cuda": [(4096, 32768, 768), (1024, 32768, 768)]}
QUICK = {"cpu": [(32, 128, 64)], "cuda": [(1024, 8192, 768)]}

TABLE_COLUMNS = ["op", "backend", "shape", "dtype", "median_ms", "tflop_per_s", "ceiling_share",
                 "peak_mem_mb"]


def run(device: str = "cpu", quick: bool = False, dtype: torch.dtype | None = None,
        emit: Emit | None = None) -> list[dict]:
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    fns = {label: b.impl.clip_loss for label, b in timed_backends(OP, device)}
    fns["compiled_reference"] = torch.compile(clip_loss_ref)
    rows = RowLog(emit)
    for n, big_n, dim in (QUICK if quick else SHAPES)[device]:
        gen = torch.Generator(device=device).manual_seed(0)
        all_image = F.normalize(torch.randn(big_n, dim, device=device, generator=gen), dim=-1)
        all_text = F.normalize(all_image + torch.randn(big_n, dim, device=device, generator=gen), dim=-1)
        all_image, all_text = all_image.to(dtype), all_text.to(dtype)
        offset = big_n - n
        image, text = all_image[offset:].clone(), all_text[offset:].clone()
        leaves = [t.requires_grad_() for t in (image, text, all_image, all_text)]
        scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
        for name, fn in fns.items():
            def forward(fn=fn):
                return fn(*leaves, scale, offset)

            def forward_backward(fn=fn):
                return torch.autograd.grad(fn(*leaves, scale, offset), (*leaves, scale))

            for op_name, call, flops in (("fwd", forward, 4 * n * big_n * dim),
                                         ("fwd+bwd", forward_backward, 12 * n * big_n * dim)):
                t = measure(call, device, warmup=2 if quick else 5, repeat=3 if quick else 20)
                rows.add({"bench": "clip_loss", "op": op_name, "device": device, "backend": name,
                          "shape": [n, big_n, dim], "offset": offset, "dtype": str(dtype).removeprefix("torch."), **t,
                          "tflop_per_s": flops / t["median_ms"] / 1e9})
    return rows.rows


def main() -> None:
    bench_cli(run, TABLE_COLUMNS, __doc__)


if __name__ == "__main__":
    main()
