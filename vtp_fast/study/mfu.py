"""Measured MFU of the study plan's stage kinds (vtp_fast.study.plan), from whole-step H200 benchmark rows."""

from __future__ import annotations

from pathlib import Path

from vtp_fast.measure.perf_model import PEAK_FLOPS
from vtp_fast.study.config import ROOT

MEASURED = "bench/results/h200"


def measured_mfu(folder: str | Path | None = None) -> dict[str, tuple[float, str]]:
    """kind -> (MFU against PEAK_FLOPS, source) from whole-step H200 rows: `bench dit` rows (DiT training) and
    rows of whole tokenizer steps that carry achieved TFLOP/s (bench step / profile). Empty when none exist."""
    from vtp_fast.measure.rows import read_rows

    folder = Path(folder) if folder else ROOT / MEASURED
    files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if not files:
        return {}
    rows, _ = read_rows(files)
    found: dict[str, tuple[float, str]] = {}
    for row in rows:
        if "H200" not in str(row.get("device_name", "")) and row.get("device") != "cuda":
            continue
        tflops = row.get("tflop_per_s", row.get("achieved_tflop_per_s"))
        if not isinstance(tflops, (int, float)) or tflops <= 0:
            continue
        kind = {"dit": "dit_train", "step": "tokenizer", "profile": "tokenizer"}.get(row.get("bench"))
        if kind is None:
            continue
        mfu = tflops * 1e12 / PEAK_FLOPS
        if mfu > found.get(kind, (0.0, ""))[0]:  # the best measured mode (e.g. compiled)
            found[kind] = (mfu, f"measured: {row.get('bench')} {row.get('mode', '')} {row.get('preset', '')} "
                                f"({row.get('date', '?')})".replace("  ", " "))
    return found
