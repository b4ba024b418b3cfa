"""How far a CPU workload can get by removing everything but its matrix multiplies: the time its GEMMs take (torch
profiler, self time of mm / addmm / bmm / baddbmm / convolution), their achieved GFLOP/s against the machine's
fp32 ceiling, and the speedup the workload would have if all its other work (attention, norms, elementwise,
optimizer, Python) took no time at all.

    python bench/matmul_bound.py [--workloads codec-s,codec-b,dit-b,tiny-step] [--out rows.jsonl]

Workloads, at the shapes of the peer benchmarks (bench/peers.py) and of `make train` (bench/bench_step.py), fp32,
random weights: VTP-S / VTP-B encode + decode (256 px, batch 4, no grad); a DiT-B/1 training step (16x16x64
latents, batch 8, velocity MSE, AdamW); the tiny pretraining step (vtp-tiny, 64 pairs, SSL 16, reconstruction
32). The step time is the median of `--repeats` unprofiled calls after warm-up; the GEMM time the median over
the same number of profiled calls. A target above `max_speedup_if_rest_free` times today's ratio cannot be met
with these GEMMs: it needs faster matrix multiplies at these shapes, not less work around them.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
GEMMS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
         "aten::_convolution", "aten::convolution_backward"}


def codec(preset: str) -> Callable[[], object]:
    from vtp_fast import vtp_config
    from vtp_fast.models.vtp import VTP

    torch.manual_seed(0)
    model = VTP(vtp_config(preset, image_size=256, train_clip=False)).eval()
    x = torch.randn(4, 3, 256, 256)

    @torch.no_grad()
    def call():
        return model.decode(model.encode(x))
    return call


def dit_step() -> Callable[[], object]:
    from vtp_fast.models.dit import DiT, dit_config

    torch.manual_seed(0)
    model = DiT(dit_config("dit-b/1", in_channels=64, input_size=16)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(8, 64, 16, 16, generator=g), torch.randn(8, 64, 16, 16, generator=g)
    t, y = torch.rand(8, generator=g), torch.randint(0, 1000, (8,), generator=g)
    x_t, target = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise, noise - x0

    def call():
        loss = (model(x_t, t, y) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return call


def tiny_step() -> Callable[[], object]:
    from bench.bench_step import CPU, step_setup

    return step_setup(CPU, "cpu")[3]


WORKLOADS = {"codec-s": lambda: codec("vtp-s"), "codec-b": lambda: codec("vtp-b"), "dit-b": dit_step,
             "tiny-step": tiny_step}


def measure(name: str, call: Callable[[], object], repeats: int, warmup: int, ceiling: float) -> dict:
    for _ in range(warmup):
        call()
    totals, gemm_s, gemm_flops = [], [], 0
    for _ in range(repeats):  # unprofiled and profiled calls interleaved
        t0 = time.perf_counter()
        call()
        totals.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            call()
        events = [e for e in prof.events() if e.name in GEMMS]
        gemm_s.append(sum(e.self_cpu_time_total for e in events) / 1e6)
        gemm_flops = sum(e.flops or 0 for e in events)
    total, gemm = statistics.median(totals), statistics.median(gemm_s)
    return {"bench": "matmul_bound", "workload": name, "dtype": "float32", "total_ms": total * 1e3,
            "gemm_ms": gemm * 1e3, "gemm_share_of_time": gemm / total, "gemm_gflop": gemm_flops / 1e9,
            "gemm_gflop_per_s": gemm_flops / gemm / 1e9, "gemm_ceiling_share": gemm_flops / gemm / 1e9 / ceiling,
            "max_speedup_if_rest_free": total / gemm, "repeats": repeats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", help="append the JSON rows to this file")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))  # bench.bench_step
    from vtp_fast.measure.ceilings import cpu_ceilings
    from vtp_fast.measure.rows import write_rows
    from vtp_fast.measure.timing import env_info

    ceilings = cpu_ceilings()
    ceiling = ceilings.fp32_gflops
    rows = []
    for name in args.workloads.split(","):
        row = {**measure(name, WORKLOADS[name](), args.repeats, args.warmup, ceiling),
               "cpu_ceilings": dataclasses.asdict(ceilings), **env_info("cpu")}
        print(f"{name}: {row['total_ms']:.0f} ms, GEMMs {row['gemm_ms']:.0f} ms ({row['gemm_share_of_time']:.0%}) "
              f"at {row['gemm_gflop_per_s']:.0f} GFLOP/s ({row['gemm_ceiling_share']:.0%} of the fp32 ceiling); "
              f"at most {row['max_speedup_if_rest_free']:.2f}x with nothing else", flush=True)
        rows.append(row)
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
