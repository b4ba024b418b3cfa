"""Benchmark rows: what every bench/bench_<name>.py writes and reads, with the device, library versions and git
revision recorded in every JSONL row (vtp_fast.measure.timing.env_info).

A benchmark's `run(device, quick, ..., emit=None)` returns its rows and also hands each one to `emit` the moment
it is measured (through `RowLog`), so a run stopped at a time limit keeps every row it finished. Every row names
the `device` ("cpu" / "cuda") and the `backend` that actually ran it. A CPU row that states `tflop_per_s` gets
`ceiling_share`, its fraction of the CPU's measured ceiling of its dtype (vtp_fast.measure.ceilings).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vtp_fast.allocator import prepare_allocator
from vtp_fast.measure.ceilings import cpu_ceilings, share_of_ceiling
from vtp_fast.measure.timing import env_info

if TYPE_CHECKING:
    from vtp_fast.ops.registry import Backend, Op

Emit = Callable[[dict], None]  # receives each benchmark row as soon as it is measured


def _with_ceiling_share(row: dict) -> dict:
    """A CPU row that states tflop_per_s in float32 or bfloat16 gets ceiling_share: its fraction of the measured
    ceiling of that dtype at the threads torch uses now (the benchmark's threads)."""
    tflops, dtype = row.get("tflop_per_s"), str(row.get("dtype", "")).removeprefix("torch.")
    if (row.get("device") == "cpu" and isinstance(tflops, (int, float)) and "ceiling_share" not in row
            and dtype in ("float32", "bfloat16")):
        row["ceiling_share"] = share_of_ceiling(tflops * 1e12, 1.0, dtype, cpu_ceilings())
    return row


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
              run_args: Sequence[str] = ()) -> tuple[list[dict], argparse.Namespace]:
    """The command line of a bench/bench_<name>.py module: --device, --out (append JSONL rows, each as soon as it
    is measured), --quick, plus the module's own options (`extra`), of which `run_args` are passed to
    run(device, quick, ..., emit=...). On the CPU, for a table with `ceiling_share`, the CPU's measured ceilings
    come first."""
    prepare_allocator()  # what the command line does: rows measure the engine as its commands run it
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="append JSONL rows here")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (a smoke run)")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    if "ceiling_share" in columns and torch.device(args.device).type == "cpu":  # the roofline of the rows' shares
        print(cpu_ceilings().describe(), flush=True)
    rows = run(args.device, args.quick, *(getattr(args, a) or None for a in run_args),
               emit=row_writer(args.out, columns))
    print(markdown_table(rows, columns))
    return rows, args
