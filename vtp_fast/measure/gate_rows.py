"""The compile gate's rows (vtp_fast.measure.gate): one per compiled kernel configuration, with the resources read
from ptxas's log (registers, spills, stack, shared memory, the MMA instructions, performance warnings), the
limits a row fails on, and the rows as a markdown table or JSONL."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

# SM count of the GPU each arch stands for (A100, A10/A40, L40, H100/H200).
SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132}
SPILL_LIMIT = 256  # bytes (stores + loads) a kernel may spill


@dataclass
class Row:
    """One compiled kernel configuration."""
    arch: int
    op: str
    case: str
    dtype: str
    kernel: str
    config: str
    status: str = "ok"  # ok | FAIL: <why> | not offered: <why>
    smem: int | None = None
    regs: int | None = None
    spill: int | None = None  # bytes stored + loaded
    stack: int | None = None
    mma: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.status.startswith("FAIL")


_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill": re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads"),
    "warning": re.compile(r"ptxas (?:warning|info)\s*:.*?\b(C\d{4})\b.*|ptxas warning\s*:\s*(.*)"),
}


def parse_ptxas(log: str) -> dict:
    """registers, spill bytes (stores + loads), stack bytes and warning codes from a `ptxas -v` log of one
    entry function."""
    regs = _PTXAS["regs"].search(log)
    stack = _PTXAS["stack"].search(log)
    spill = _PTXAS["spill"].search(log)
    warnings = []
    for m in _PTXAS["warning"].finditer(log):
        code = m.group(1) or m.group(2).strip()[:60]
        if code not in warnings:
            warnings.append(code)
    return {"regs": int(regs.group(1)) if regs else None, "stack": int(stack.group(1)) if stack else None,
            "spill": int(spill.group(1)) + int(spill.group(2)) if spill else None, "warnings": warnings}


def mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return "none"


COLUMNS = ["arch", "op", "case", "dtype", "kernel", "config", "status", "smem", "regs", "spill", "stack", "mma",
           "warnings"]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        d = asdict(r)
        d["arch"] = f"sm_{r.arch}"
        d["smem"] = "" if r.smem is None else f"{r.smem / 1024:.1f} KB"
        d["warnings"] = ", ".join(r.warnings)
        lines.append("| " + " | ".join("" if d[c] is None else str(d[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def write_json(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(asdict(r)) + "\n")

