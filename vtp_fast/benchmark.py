"""Honest timing for the benchmarks in bench/: synchronised, warm-up excluded, median of repeats, with the
device, library versions and git revision recorded in every JSONL row."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import torch


@cache
def env_info() -> dict:
    """Where a row was measured: device, versions, git revision, date."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        rev = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "device_name": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None, "triton": triton_version,
        "python": platform.python_version(), "git": rev,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: str | torch.device, *, warmup: int = 3, repeat: int = 10,
            min_time_s: float = 0.0) -> dict:
    """Median wall time of fn() in ms (synchronised around each call), plus quartiles and peak memory.

    On CUDA the peak is torch's allocator peak during the timed calls; on the CPU it is not measured (None).
    """
    device = torch.device(device)
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
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    return {"median_ms": statistics.median(times), "q1_ms": q[0], "q3_ms": q[2], "repeats": len(times),
            "peak_mem_mb": peak}


def write_rows(rows: Sequence[dict], path: str | Path | None) -> None:
    """Append rows (each merged with env_info()) to a JSONL file."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({**row, **env_info()}) + "\n")


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_scaling(rows: Sequence[dict], x: str, y: str, series: str, path: str | Path, *, title: str,
                 xlabel: str, ylabel: str) -> Path:
    """One line per `series` value: rows' `y` against `x` (log-scaled x), e.g. TFLOP/s against sequence length."""
    from vtp_fast.eval.plots import plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name in sorted({r[series] for r in rows}):
        pts = sorted((r[x], r[y]) for r in rows if r[series] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def bench_cli(run: Callable[..., list[dict]], columns: Sequence[str], doc: str,
              extra: Callable[[argparse.ArgumentParser], None] | None = None,
              run_args: Sequence[str] = ()) -> tuple[list[dict], argparse.Namespace]:
    """The command line of a bench/bench_<name>.py module: --device, --out (append JSONL rows), --quick, plus
    the module's own options (`extra`), of which `run_args` are passed to run(device, quick, ...)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="append JSONL rows here")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (a smoke run)")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    rows = run(args.device, args.quick, *(getattr(args, a) or None for a in run_args))
    write_rows(rows, args.out)
    print(markdown_table(rows, columns))
    return rows, args
