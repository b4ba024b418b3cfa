"""Benchmark: one DiT training step (rectified-flow loss, backward, AdamW), eager against per-block
torch.compile, with images/s and MFU on a GPU of known peak (on the CPU: ceiling_share, the fraction of the
machine's measured fp32 matmul ceiling, benchmark.cpu_ceilings).

    python bench/bench_dit.py [--device cuda] [--out rows.jsonl] [--quick]

GPU: DiT-XL/1 on 16x16x64 latents (VTP f16d64 at 256 px), bf16 autocast, batch 256. CPU: dit-tiny on 4x4x64.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from vtp_fast.benchmark import Emit, RowLog, bench_cli, measure, peak_tflops, resolved_backends
from vtp_fast.models.dit import DiT, dit_config
from vtp_fast.ops import building_for
from vtp_fast.train.flow import flow_loss

TABLE_COLUMNS = ["mode", "preset", "batch", "grid", "median_ms", "images_per_s", "tflop_per_s", "mfu",
                 "ceiling_share", "speedup_vs_eager"]
SETUP = {"cpu": ("dit-tiny", 64, 4), "cuda": ("dit-xl/1", 256, 16)}
QUICK = {"cpu": ("dit-nano", 8, 4), "cuda": ("dit-b/1", 64, 16)}


def run(device: str = "cpu", quick: bool = False, emit: Emit | None = None) -> list[dict]:
    """Eager, then compiled; each row is emitted when its mode is measured. "backend": the op backends the built
    DiT's layers resolved to (for `device`)."""
    preset, batch, grid = (QUICK if quick else SETUP)[device]
    rows = RowLog(emit)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        with building_for(device):
            model = DiT(dit_config(preset, in_channels=64, input_size=grid)).to(device)
        if mode == "compiled":
            for block in model.blocks:
                block.compile()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device == "cuda" or None)
        x0 = torch.randn(batch, 64, grid, grid, device=device)
        y = torch.randint(0, model.config.num_classes, (batch,), device=device)

        def step():
            with amp:
                loss = flow_loss(model, x0, y)["total"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()
        with FlopCounterMode(display=False) as counter, amp:
            flow_loss(model, x0, y)["total"].backward()
        flops = counter.get_total_flops()
        t = measure(step, device, warmup=1 if quick else 3, repeat=2 if quick else 10)
        achieved = flops / (t["median_ms"] / 1e3) / 1e12
        peak = peak_tflops(torch.device(device))
        eager_ms = rows.rows[0]["median_ms"] if rows.rows else t["median_ms"]
        rows.add({"bench": "dit", "mode": mode, "device": device, "backend": resolved_backends(model),
                  "preset": preset, "batch": batch, "grid": grid,
                  "dtype": "bfloat16" if device == "cuda" else "float32",  # autocast on CUDA only
                  **t, "images_per_s": batch * 1e3 / t["median_ms"],
                  "tflop_per_s": achieved, "mfu": achieved / peak if peak else None,
                  "speedup_vs_eager": eager_ms / t["median_ms"]})
    return rows.rows


def main() -> None:
    bench_cli(run, TABLE_COLUMNS, __doc__)


if __name__ == "__main__":
    main()
