"""Honest timing for the benchmarks in bench/: synchronised, warm-up excluded, median of repeats, with the
device, library versions and git revision recorded in every JSONL row.

A benchmark's `run(device, quick, ..., emit=None)` returns its rows and also hands each one to `emit` the moment
it is measured (through `RowLog`), so a run stopped at a time limit keeps every row it finished. Every row names
the `device` ("cpu" / "cuda") and the `backend` that actually ran it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vtp_fast import optional

if TYPE_CHECKING:
    from vtp_fast.ops.registry import Backend, Op

Emit = Callable[[dict], None]  # receives each benchmark row as soon as it is measured


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
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info(device: str | None = None) -> dict:
    """Where a row was measured: the device it ran on ("cpu" / "cuda"; default: cuda when one is visible) and its
    name, the CPU threads torch uses now, versions, git revision, date."""
    return {**_static_env(device), "cpu_threads": torch.get_num_threads()}


# Dense bf16 peak (TFLOP/s) by GPU name fragment, for MFU.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1,
               "B200": 2250.0, "GH200": 989.4}


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, for MFU; None for a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


@cache
def _static_env(device: str | None) -> dict:
    triton_version = optional.module("triton").__version__ if optional.available("triton") else None
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = kind == "cuda" and torch.cuda.is_available()
    return {
        "device": kind,
        "device_name": torch.cuda.get_device_name(0) if on_gpu else f"CPU ({_cpu_name()})",
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
    # inclusive: quartiles within the measured range (the default extrapolates below the fastest repeat)
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    return {"median_ms": statistics.median(times), "q1_ms": q[0], "q3_ms": q[2], "repeats": len(times),
            "peak_mem_mb": peak}


def write_rows(rows: Sequence[dict], path: str | Path | None) -> None:
    """Append rows to a JSONL file, each over env_info() of the device it names (the row's own keys win)."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({**env_info(row.get("device")), **row}, default=str) + "\n")
            f.flush()


class RowLog:
    """The rows of one benchmark run, each handed to `emit` (if any) as soon as it is added.

    Rows must name the `device` ("cpu" / "cuda") and the `backend` that produced them; `add` refuses a row that
    does not, so no row can be filed under a device or backend it did not run on by omission.
    """

    def __init__(self, emit: Emit | None = None):
        self.rows: list[dict] = []
        self.emit = emit

    def add(self, row: dict) -> dict:
        missing = [k for k in ("device", "backend") if not row.get(k)]
        if missing:
            raise ValueError(f"benchmark row without {' and '.join(missing)}: {row}")
        self.rows.append(row)
        if self.emit is not None:
            self.emit(row)
        return row


def row_writer(path: str | Path | None, columns: Sequence[str] = ()) -> Emit:
    """An `emit` for RowLog: appends each row to the JSONL file at `path` (when given) and prints one line."""
    def emit(row: dict) -> None:
        write_rows([row], path)
        shown = [c for c in ("bench", *columns, "device", "backend") if c in row]
        cells = [f"{c}={row[c]:.4g}" if isinstance(row[c], float) else f"{c}={row[c]}" for c in dict.fromkeys(shown)]
        print("row: " + " ".join(cells), flush=True)

    return emit


def timed_backends(op: Op, device: str) -> list[tuple[str, Backend]]:
    """(row label, backend) for every backend of registry op `op` worth timing on `device` (op.timed).

    With VTP_FAST_BENCH_INTERPRETED=1 (bench/device_check.sh --dry-run) the backends that only run interpreted
    (Triton under TRITON_INTERPRET=1) are included too, labelled "<name> (interpreter)": that exercises the
    benchmark's code path on the CPU; their times say nothing about a GPU.
    """
    chosen = op.timed(device)
    if os.environ.get("VTP_FAST_BENCH_INTERPRETED") == "1":
        chosen = op.runnable(device)
    return [(b.name if b.priority >= 0 else f"{b.name} (interpreter)", b) for b in chosen]


def resolved_backends(*modules: torch.nn.Module) -> str:
    """The op backends the layers of `modules` resolved to when they were built, e.g. "attention=sdpa,
    clip_loss=triton" (an op whose layers resolved differently lists each backend)."""
    from vtp_fast.ops.registry import REGISTRY, Backend

    found: dict[str, set[str]] = {}
    for module in modules:
        for m in module.modules():
            for value in vars(m).values():
                if isinstance(value, Backend):
                    op = next((o.name for o in REGISTRY.values() if o.backends.get(value.name) is value), "?")
                    found.setdefault(op, set()).add(value.name)
    return ", ".join(f"{op}={'/'.join(sorted(names))}" for op, names in sorted(found.items())) or "no registry ops"


def read_rows(paths: Sequence[str | Path]) -> tuple[list[dict], int]:
    """(JSONL rows of the files, lines skipped): a line that is not a JSON object (the last line of a run stopped
    while writing it) is skipped and counted."""
    rows, skipped = [], 0
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                skipped += 1
    return rows, skipped


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
    from vtp_fast.plots import plt

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
    """The command line of a bench/bench_<name>.py module: --device, --out (append JSONL rows, each as soon as it
    is measured), --quick, plus the module's own options (`extra`), of which `run_args` are passed to
    run(device, quick, ..., emit=...)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="append JSONL rows here")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (a smoke run)")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    rows = run(args.device, args.quick, *(getattr(args, a) or None for a in run_args),
               emit=row_writer(args.out, columns))
    print(markdown_table(rows, columns))
    return rows, args
