"""The CPU roofline: this machine's measured fp32 and bf16 matmul throughput and copy bandwidth, at the threads torch
uses (vtp_fast.measure.ceilings.cpu_ceilings), as rows.

    python bench/roofline.py [--threads N] [--out bench/results/cpu/roofline.jsonl] [--quick]

The ceilings that `vtp-fast profile` and `vtp-fast bench` state a CPU step's and a CPU row's share of
(`ceiling_share`), in place of MFU. Matmul: torch.mm of two 2048 x 2048 matrices (halved while one call takes over
half a second), 2 n^3 FLOPs, median of 5 after warm-up; "native_bf16" names the /proc/cpuinfo flags (amx_bf16,
avx512_bf16) behind a fast bf16 matmul, empty where bf16 is emulated. Copy: Tensor.copy_ of 256 MiB of fp32, bytes
read plus bytes written. The rows are the CPU's whatever --device says (a GPU's peak is
vtp_fast.train.flops.PEAK_TFLOPS).
"""

from __future__ import annotations

import argparse

from vtp_fast.measure.ceilings import COPY_MIB, MATMUL_SIZE, cpu_ceilings
from vtp_fast.measure.rows import Emit, RowLog, bench_cli

TABLE_COLUMNS = ["case", "dtype", "shape", "threads", "median_ms", "gflop_per_s", "gb_per_s", "native_bf16"]
QUICK = (512, 32)  # (matmul size, copy MiB) of a smoke run


def run(device: str = "cpu", quick: bool = False, threads: int | None = None, emit: Emit | None = None) -> list[dict]:
    """One row per ceiling: fp32 matmul, bf16 matmul, copy; `threads` torch threads (default: those torch uses)."""
    size, copy_mib = QUICK if quick else (MATMUL_SIZE, COPY_MIB)
    c = cpu_ceilings(threads, size, copy_mib)
    rows = RowLog(emit)
    common = {"bench": "roofline", "device": "cpu", "threads": c.threads, "cpu": c.cpu,
              "native_bf16": ",".join(c.native_bf16), "method": c.method}
    for dtype, n, ms, gflops in (("float32", c.fp32_size, c.fp32_ms, c.fp32_gflops),
                                 ("bfloat16", c.bf16_size, c.bf16_ms, c.bf16_gflops)):
        rows.add({**common, "case": "matmul", "backend": "torch.mm", "dtype": dtype, "shape": [n, n, n],
                  "median_ms": ms, "gflop_per_s": gflops})
    rows.add({**common, "case": "copy", "backend": "Tensor.copy_", "dtype": "float32",
              "shape": [c.copy_mib * 2**20 // 4], "median_ms": c.copy_ms, "gb_per_s": c.copy_gbps})
    return rows.rows


def main() -> None:
    def extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("--threads", type=int, help="torch threads (default: the count torch uses now)")

    bench_cli(run, TABLE_COLUMNS, __doc__, extra=extra, run_args=["threads"])


if __name__ == "__main__":
    main()
