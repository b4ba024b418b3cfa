"""The CPU roofline: on the CPU there is no published peak to state MFU against, so the machine's own ceilings are
measured (`cpu_ceilings`: fp32 and bf16 matmul throughput and copy bandwidth at the threads torch uses), where a
GPU has its peak (vtp_fast.train.flops.PEAK_TFLOPS). A CPU benchmark row that states `tflop_per_s` gets
`ceiling_share`, its fraction of the ceiling of its dtype (vtp_fast.measure.rows.RowLog)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from vtp_fast.measure.timing import cpu_name, measure

MATMUL_SIZE = 2048  # square matmul of the ceilings; halved while one call takes longer than SLOW_MATMUL_S
SLOW_MATMUL_S = 0.5
COPY_MIB = 256  # the copy of the bandwidth ceiling: src -> dst, far beyond any cache
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 matmul (AMX tiles, AVX512-BF16 dot)


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags of the first "flags" line of `cpuinfo` (text in /proc/cpuinfo's format; default: this
    machine's /proc/cpuinfo); empty where there is none (not Linux, or an ARM "Features" line)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def native_bf16(flags: frozenset[str] | set[str]) -> tuple[str, ...]:
    """The flags among `flags` that give native bf16 matmul (BF16_FLAGS); empty: bf16 is emulated (converted to
    fp32), so its ceiling is at best the fp32 one."""
    return tuple(f for f in BF16_FLAGS if f in flags)


@dataclass(frozen=True)
class Ceilings:
    """One CPU's measured ceilings at `threads` torch threads. GFLOP/s counts 2 n^3 per n x n x n matmul; copy GB/s
    counts the bytes read plus the bytes written (10^9 bytes a GB)."""

    fp32_gflops: float
    bf16_gflops: float
    copy_gbps: float
    threads: int
    cpu: str
    native_bf16: tuple[str, ...]  # the flags behind native bf16 (BF16_FLAGS present); empty: emulated
    fp32_size: int  # the matmul sizes used (MATMUL_SIZE, or smaller where it was slow)
    bf16_size: int
    fp32_ms: float  # median ms of one matmul / one copy
    bf16_ms: float
    copy_ms: float
    copy_mib: int
    method: str

    def gflops(self, dtype: torch.dtype | str) -> float:
        """The matmul ceiling of `dtype` (torch.float32 / "float32" / "fp32", torch.bfloat16 / "bfloat16" / "bf16")."""
        name = str(dtype).removeprefix("torch.")
        if name in ("float32", "fp32", "float"):
            return self.fp32_gflops
        if name in ("bfloat16", "bf16"):
            return self.bf16_gflops
        raise ValueError(f"no measured CPU ceiling for dtype {name!r} (measured: float32, bfloat16)")

    def describe(self) -> str:
        bf16 = f"native: {', '.join(self.native_bf16)}" if self.native_bf16 else "emulated: no avx512_bf16/amx_bf16"
        return (f"CPU ceilings, measured ({self.threads} thread(s), {self.cpu}): fp32 matmul {self.fp32_gflops:.1f} "
                f"GFLOP/s, bf16 matmul {self.bf16_gflops:.1f} GFLOP/s ({bf16}), copy {self.copy_gbps:.1f} GB/s "
                f"(read + write)")


def _matmul(dtype: torch.dtype, size: int) -> tuple[int, dict]:
    """(size used, measure() of one size x size matmul in `dtype`); the size halves (down to 128) while a first
    call takes longer than SLOW_MATMUL_S, so a CPU without fast `dtype` still answers in seconds."""
    gen = torch.Generator().manual_seed(0)
    while True:
        a, b = (torch.randn(size, size, generator=gen).to(dtype) for _ in range(2))  # (size, size) each
        c = torch.empty(size, size, dtype=dtype)
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        if time.perf_counter() - t0 <= SLOW_MATMUL_S or size <= 128:
            break
        size //= 2
    return size, measure(lambda: torch.mm(a, b, out=c), "cpu", warmup=1, repeat=5)


@cache
def _cpu_ceilings(threads: int, size: int, copy_mib: int) -> Ceilings:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fp32_size, fp32 = _matmul(torch.float32, size)
        bf16_size, bf16 = _matmul(torch.bfloat16, size)
        src = torch.ones(copy_mib * 2**20 // 4)  # (copy_mib MiB of fp32,), every page touched
        dst = torch.empty_like(src)
        copy = measure(lambda: dst.copy_(src), "cpu", warmup=1, repeat=5)  # src, dst freed on return
    finally:
        torch.set_num_threads(before)
    return Ceilings(
        fp32_gflops=2 * fp32_size**3 / fp32["median_ms"] / 1e6, bf16_gflops=2 * bf16_size**3 / bf16["median_ms"] / 1e6,
        copy_gbps=2 * copy_mib * 2**20 / copy["median_ms"] / 1e6, threads=threads, cpu=cpu_name(),
        native_bf16=native_bf16(cpu_flags()), fp32_size=fp32_size, bf16_size=bf16_size, fp32_ms=fp32["median_ms"],
        bf16_ms=bf16["median_ms"], copy_ms=copy["median_ms"], copy_mib=copy_mib,
        method=(f"torch.mm of {fp32_size}^2 (fp32) and {bf16_size}^2 (bf16) matrices, Tensor.copy_ of {copy_mib} "
                f"MiB; median of {fp32['repeats']} after warm-up"))


def cpu_ceilings(threads: int | None = None, size: int = MATMUL_SIZE, copy_mib: int = COPY_MIB) -> Ceilings:
    """This CPU's measured ceilings at `threads` torch threads (default: the count torch uses now; restored after):
    square matmul throughput in fp32 and bf16 (`size`, halved while slow; median of 5 after warm-up) and the
    bandwidth of a `copy_mib` MiB copy. Measured once per process and arguments (a few seconds), then cached."""
    return _cpu_ceilings(threads or torch.get_num_threads(), size, copy_mib)


def share_of_ceiling(flops: float, seconds: float, dtype: torch.dtype | str, ceilings: Ceilings) -> float:
    """The fraction of the `dtype` matmul ceiling that `flops` done in `seconds` reach."""
    return flops / seconds / 1e9 / ceilings.gflops(dtype)
