"""Benchmark: tokenizer inference, encode + decode images/s, per attention backend (SDPA auto, SDPA math,
reference, Triton), eager. On a GPU: VTP-L at 256 px in bf16 (the foundation issue's figure).

    python bench/bench_tokenizer.py [--device cuda] [--out rows.jsonl] [--quick]
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from vtp_fast import VTP, vtp_config
from vtp_fast.measure.rows import Emit, RowLog, bench_cli, resolved_backends, timed_backends
from vtp_fast.measure.timing import measure
from vtp_fast.ops.attention import OP
from vtp_fast.ops.registry import building_for, use_backend

TABLE_COLUMNS = ["preset", "backend", "batch", "image_size", "dtype", "median_ms", "images_per_s"]
SETUP = {"cpu": ("vtp-tiny", 16, 64), "cuda": ("vtp-l", 64, 256)}  # preset, batch, image size
QUICK = {"cpu": ("vtp-nano", 2, 32), "cuda": ("vtp-b", 16, 256)}


def run(device: str = "cpu", quick: bool = False, emit: Emit | None = None) -> list[dict]:
    """One row per attention backend, emitted when measured; "backends" lists what every op of the built model
    resolved to."""
    preset, batch, size = (QUICK if quick else SETUP)[device]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    names = [b.name for _, b in timed_backends(OP, device)]
    variants = [(n, nullcontext()) for n in names]
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        variants.append(("sdpa_math", sdpa_kernel(SDPBackend.MATH)))
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    rows = RowLog(emit)
    for name, ctx in variants:
        backend = "sdpa" if name == "sdpa_math" else name
        with use_backend("attention", backend), building_for(device):
            torch.manual_seed(0)
            model = VTP(vtp_config(preset, image_size=size, train_clip=False)).to(device, dtype).eval()

        @torch.no_grad()
        def step(model=model, ctx=ctx):
            with ctx:
                model.decode(model.encode(x))

        t = measure(step, device, warmup=1 if quick else 3, repeat=2 if quick else 10)
        rows.add({"bench": "tokenizer", "preset": preset, "device": device, "backend": name,
                  "backends": resolved_backends(model), "batch": batch, "image_size": size,
                  "dtype": str(dtype).removeprefix("torch."), **t, "images_per_s": batch * 1e3 / t["median_ms"]})
        del model
    return rows.rows


def main() -> None:
    bench_cli(run, TABLE_COLUMNS, __doc__)


if __name__ == "__main__":
    main()
