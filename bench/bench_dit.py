"""Benchmark: one DiT training step (rectified-flow loss, backward, AdamW), eager, per-block torch.compile, bf16
autocast, compiled with fused AdamW (per block and the whole model in fp32, per block in bf16), side by side, with
images/s and MFU on a GPU of known peak (on the CPU: ceiling_share, the fraction of the machine's measured matmul
ceiling of the mode's dtype, vtp_fast.measure.ceilings.cpu_ceilings).

    python bench/bench_dit.py [--device cuda] [--out rows.jsonl] [--quick]

GPU: DiT-XL/1 on 16x16x64 latents (VTP f16d64 at 256 px), bf16 autocast, batch 256. CPU: dit-tiny on 4x4x64, the
study's DiT (configs/dit/study_tiny.yaml).
"""

from __future__ import annotations

import torch

from vtp_fast.compile import transform_blocks
from vtp_fast.constants import autocast
from vtp_fast.measure.rows import Emit, RowLog, bench_cli, resolved_backends
from vtp_fast.measure.timing import time_interleaved
from vtp_fast.models.dit import DiT, dit_config
from vtp_fast.ops import building_for
from vtp_fast.train.flops import flops_of, peak_tflops
from vtp_fast.train.flow import flow_loss
from vtp_fast.train.optim import make_adamw, param_groups

TABLE_COLUMNS = ["mode", "preset", "batch", "grid", "median_ms", "images_per_s", "tflop_per_s", "mfu",
                 "ceiling_share", "speedup_vs_eager"]
SETUP = {"cpu": ("dit-tiny", 64, 4), "cuda": ("dit-xl/1", 256, 16)}
QUICK = {"cpu": ("dit-nano", 8, 4), "cuda": ("dit-b/1", 64, 16)}


# mode -> (run.compile_scope, or None: eager; precision; fused AdamW)
MODES = {"eager": (None, "fp32", False), "compiled": ("blocks", "fp32", False),
         "compiled_fused": ("blocks", "fp32", True), "compiled_whole_fused": ("whole", "fp32", True),
         "bf16": (None, "bf16", False), "compiled_bf16_fused": ("blocks", "bf16", True)}
BRIEF = ("eager", "compiled")  # --quick, and CUDA (where every mode runs bf16 autocast)


def run(device: str = "cpu", quick: bool = False, emit: Emit | None = None) -> list[dict]:
    """Every mode of MODES (BRIEF under --quick and on CUDA) on its own DiT (same seed) through the DiT job's pieces
    (transform_blocks, autocast, make_adamw), warmed up, then one step per mode per round, rounds
    interleaved (A B C D, then D C B A); one row per mode: median over rounds, FLOPs (forward + backward, counted
    once in eager fp32), "speedup_vs_eager". On CUDA every mode runs bf16 autocast, as the job's precision "auto"
    does there."""
    preset, batch, grid = (QUICK if quick else SETUP)[device]
    rounds, warmup = (2, 1) if quick else (9, 3)
    modes = BRIEF if quick or device == "cuda" else tuple(MODES)
    x0 = torch.randn(batch, 64, grid, grid, device=device)
    steps, models = {}, {}
    for mode in modes:
        scope, precision, fused = MODES[mode]
        torch.manual_seed(0)
        with building_for(device):
            model = DiT(dit_config(preset, in_channels=64, input_size=grid)).to(device)
        transform_blocks(model, compile=scope)
        opt = make_adamw(param_groups({"dit": model}, 0.0), 1e-4, (0.9, 0.95), fused=fused)
        amp = autocast("bf16" if device == "cuda" else precision, torch.device(device))
        y = torch.randint(0, model.config.num_classes, (batch,), device=device)

        def step(model=model, opt=opt, amp=amp, y=y):
            with amp:
                loss = flow_loss(model, x0, y)["total"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        steps[mode], models[mode] = step, model
    y0 = torch.zeros(batch, dtype=torch.long, device=device)
    flops = flops_of(lambda: flow_loss(models["eager"], x0, y0)["total"].backward())
    timed = dict(zip(modes, time_interleaved([steps[m] for m in modes], device, rounds=rounds, warmup=warmup),
                     strict=True))
    rows = RowLog(emit)
    peak = peak_tflops(torch.device(device))
    for mode, timing in timed.items():
        scope, precision, fused = MODES[mode]
        ms = timing["median_ms"]
        achieved = flops / (ms / 1e3) / 1e12
        rows.add({"bench": "dit", "mode": mode, "device": device, "backend": resolved_backends(models[mode]),
                  "preset": preset, "batch": batch, "grid": grid, "compiled": scope is not None, "compile_scope": scope,
                  "fused_adamw": fused,
                  "dtype": "bfloat16" if device == "cuda" or precision == "bf16" else "float32",
                  **timing, "flops": flops,
                  "images_per_s": batch * 1e3 / ms, "tflop_per_s": achieved, "mfu": achieved / peak if peak else None,
                  "speedup_vs_eager": timed["eager"]["median_ms"] / ms})
    return rows.rows


def main() -> None:
    bench_cli(run, TABLE_COLUMNS, __doc__)


if __name__ == "__main__":
    main()
