"""Honest timing for the benchmarks in bench/: synchronised, warm-up excluded, median of repeats, with the
device, library versions and git revision recorded in every JSONL row.

A benchmark's `run(device, quick, ..., emit=None)` returns its rows and also hands each one to `emit` the moment
it is measured (through `RowLog`), so a run stopped at a time limit keeps every row it finished. Every row names
the `device` ("cpu" / "cuda") and the `backend` that actually ran it.

On the CPU there is no published peak to state MFU against, so the machine's own ceilings are measured
(`cpu_ceilings`: fp32 and bf16 matmul throughput and copy bandwidth at the threads torch uses) and a CPU row that
states `tflop_per_s` gets `ceiling_share`, its fraction of the ceiling of its dtype (`RowLog.add`).
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
from dataclasses import dataclass
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


# The CPU roofline: the machine's measured ceilings, where a GPU has PEAK_TFLOPS.
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
        copy_gbps=2 * copy_mib * 2**20 / copy["median_ms"] / 1e6, threads=threads, cpu=_cpu_name(),
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


def _with_ceiling_share(row: dict) -> dict:
    """A CPU row that states tflop_per_s in float32 or bfloat16 gets ceiling_share: its fraction of the measured
    ceiling of that dtype at the threads torch uses now (the benchmark's threads)."""
    tflops, dtype = row.get("tflop_per_s"), str(row.get("dtype", "")).removeprefix("torch.")
    if (row.get("device") == "cpu" and isinstance(tflops, (int, float)) and "ceiling_share" not in row
            and dtype in ("float32", "bfloat16")):
        row["ceiling_share"] = share_of_ceiling(tflops * 1e12, 1.0, dtype, cpu_ceilings())
    return row


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
    does not, so no row can be filed under a device or backend it did not run on by omission. A CPU row with
    `tflop_per_s` and a float32/bfloat16 `dtype` gains `ceiling_share` (of `cpu_ceilings()`, measured at the first
    such row).
    """

    def __init__(self, emit: Emit | None = None):
        self.rows: list[dict] = []
        self.emit = emit

    def add(self, row: dict) -> dict:
        missing = [k for k in ("device", "backend") if not row.get(k)]
        if missing:
            raise ValueError(f"benchmark row without {' and '.join(missing)}: {row}")
        self.rows.append(_with_ceiling_share(row))
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
              run_args: Sequence[str] = (), ceilings: bool = True) -> tuple[list[dict], argparse.Namespace]:
    """The command line of a bench/bench_<name>.py module: --device, --out (append JSONL rows, each as soon as it
    is measured), --quick, plus the module's own options (`extra`), of which `run_args` are passed to
    run(device, quick, ..., emit=...). On the CPU (and `ceilings`) the CPU's measured ceilings come first."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="append JSONL rows here")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (a smoke run)")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    if ceilings and torch.device(args.device).type == "cpu":  # the roofline of the rows' ceiling_share
        print(cpu_ceilings().describe(), flush=True)
    rows = run(args.device, args.quick, *(getattr(args, a) or None for a in run_args),
               emit=row_writer(args.out, columns))
    print(markdown_table(rows, columns))
    return rows, args
