"""Honest timing for the benchmarks in bench/: synchronised, warm-up excluded, median of repeats; and where a row
was measured (the device, library versions and git revision every JSONL row records, vtp_fast.measure.rows)."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import TypeVar

import torch

from vtp_fast import optional
from vtp_fast.allocator import allocator_setting


@cache
def _git_revision() -> str:
    """$VTP_FAST_GIT_REV (set by bench/device_check.sh, whose copy of the tree may have no .git), else git."""
    if os.environ.get("VTP_FAST_GIT_REV"):
        return os.environ["VTP_FAST_GIT_REV"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@cache
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info(device: str | None = None) -> dict:
    """Where a row was measured: the device it ran on ("cpu" / "cuda"; default: cuda when one is visible) and its
    name, the CPU threads torch uses now and how malloc was set (`vtp_fast.allocator`), versions, git revision,
    date."""
    return {**_static_env(device), "cpu_threads": torch.get_num_threads(), "malloc": allocator_setting()}


@cache
def _static_env(device: str | None) -> dict:
    triton_version = optional.module("triton").__version__ if optional.available("triton") else None
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = kind == "cuda" and torch.cuda.is_available()
    return {
        "device": kind,
        "device_name": torch.cuda.get_device_name(0) if on_gpu else f"CPU ({cpu_name()})",
        "torch": torch.__version__, "cuda": torch.version.cuda if on_gpu else None, "triton": triton_version,
        "python": platform.python_version(), "git": _git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        # torch.compile's backend forced for every graph (the dry run: aot_eager, no Inductor code generation)
        **({"compile_override": os.environ["TORCH_COMPILE_OVERRIDE_BACKENDS"]}
           if os.environ.get("TORCH_COMPILE_OVERRIDE_BACKENDS") else {}),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: str | torch.device, *, warmup: int = 3, repeat: int = 10,
            min_time_s: float = 0.0) -> dict:
    """Median wall time of fn() in ms (synchronised around each call), plus quartiles and peak memory.

    On CUDA the peak is torch's allocator peak during the timed calls; on the CPU it is not measured (None).
    With VTP_FAST_BENCH_TINY=1 (bench/device_check.sh --dry-run) fn runs once, untimed warm-up skipped: the row
    proves the code path runs ("repeats": 1), its time means little.
    """
    device = torch.device(device)
    if os.environ.get("VTP_FAST_BENCH_TINY") == "1":
        warmup, repeat, min_time_s = 0, 1, 0.0
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time_s:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    return _summary(times, peak)


def _summary(times: list[float], peak_mem_mb: float | None) -> dict:
    """Median and quartiles of `times` (ms), the count, the peak memory."""
    # inclusive: quartiles within the measured range (the default extrapolates below the fastest repeat)
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "q1_ms": q[0], "q3_ms": q[2], "repeats": len(times),
            "peak_mem_mb": peak_mem_mb}


T = TypeVar("T")


def alternating(items: Sequence[T], rounds: int) -> Iterator[tuple[int, T]]:
    """(round, item) over `rounds` rounds: A B C in even rounds and C B A in odd ones, so no item always runs first
    or last while the machine's load drifts (time_interleaved's order; the benchmarks that run each item in its
    own process use it too)."""
    for k in range(rounds):
        for item in (items if k % 2 == 0 else items[::-1]):
            yield k, item


def time_interleaved(steps: Sequence[Callable[[], object]], device: str | torch.device, *, rounds: int,
                     warmup: int) -> list[dict]:
    """Side by side: warm every step up (`warmup` calls each), then time each once per round, A B C in even rounds
    and C B A in odd ones, so no step always runs first or last while the machine's load drifts. Per step: median
    and quartiles (ms) over rounds, the rounds, and peak memory (CUDA) over rounds. With VTP_FAST_BENCH_TINY=1
    (as `measure`) one round, no warm-up."""
    if os.environ.get("VTP_FAST_BENCH_TINY") == "1":
        warmup, rounds = 0, 1
    for step in steps:
        for _ in range(warmup):
            step()
    times: list[list[float]] = [[] for _ in steps]
    peaks: list[list[float]] = [[] for _ in steps]
    for _, i in alternating(range(len(steps)), rounds):
        t = measure(steps[i], device, warmup=0, repeat=1)
        times[i].append(t["median_ms"])
        if t["peak_mem_mb"] is not None:
            peaks[i].append(t["peak_mem_mb"])
    return [_summary(ts, max(ps) if ps else None) for ts, ps in zip(times, peaks, strict=True)]
