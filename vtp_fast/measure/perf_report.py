"""The performance model beside measured rows: `vtp-fast bench --model [--report rows.jsonl ...]`, or

    python -m vtp_fast.measure.perf_report

The model table at the real shapes (vtp_fast.measure.perf_estimate), then every measured Triton row of
bench/bench_<op>.py beside the model at its own shape, with the achieved fraction of the bound."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from vtp_fast.measure.perf_estimate import add_up, estimate, model_rows
from vtp_fast.measure.perf_model import (
    EFFICIENCY,
    ELEM,
    LAUNCH_US,
    OPS,
    PASSES,
    PEAK_BYTES,
    PEAK_FLOPS,
    SHAPES,
    kernel_work,
)


# ---------------------------------------------------------------------------------------- measured rows
def bench_case(row: dict) -> tuple[str, dict, str, str, str] | None:
    """A JSONL row of bench/bench_<op>.py measured on the Triton backend -> (op, shape, pass, dtype, how), the
    model's view of what it timed; None for other backends, dtypes the model does not cover (fp32 for the matmul
    ops: no tensor-core ceiling) or rows it cannot read. how = "dense" or "per view" (attention only)."""
    backend, op, dtype = str(row.get("backend", "")), row.get("bench"), row.get("dtype")
    shape = row.get("shape")
    if not backend.startswith("triton") or dtype not in ELEM or "median_ms" not in row or shape is None:
        return None
    try:
        if op == "attention":
            if ELEM[dtype] != 2:
                return None
            views = shape if row.get("case") == "multicrop" else [shape]
            h, d = views[0][1], views[0][3]
            spec = {"seqs": tuple((v[0], v[2]) for v in views), "h": h, "d": d, "rope": row.get("case") != "plain"}
            how = "per view" if "per view" in backend else "dense"
            return op, spec, row["pass"], dtype, how
        if op in ("clip_loss", "prototype_ce"):
            if ELEM[dtype] != 2:
                return None
            keys = ("n", "N", "E") if op == "clip_loss" else ("n", "K", "d")
            return op, dict(zip(keys, shape, strict=True)), row["op"], dtype, "dense"
        if op == "masked_gather":
            b, n, d = shape
            pass_ = {"gather": "fwd", "scatter": "bwd"}[row["op"]]
            return op, {"rows": b * n, "m": row["masked"], "d": d}, pass_, dtype, "dense"
        if op == "pixel_shuffle_l1":
            b, h, w, p = shape
            pass_ = {"shuffle": "shuffle", "l1_fwd": "fwd", "l1_fwd_bwd": "fwd+bwd"}[row["op"]]
            target = ELEM[row.get("target_dtype", dtype)]
            return op, {"b": b, "h": h, "w": w, "p": p, "target_elem": target}, pass_, dtype, "dense"
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return None


def estimate_bench_row(row: dict) -> dict | None:
    """The model at a measured row's own shape and pass, with its measured median and the achieved fraction of
    the bound; None when the row is not a Triton row the model covers."""
    case = bench_case(row)
    if case is None:
        return None
    op, spec, pass_, dtype, how = case
    if pass_ not in ("fwd", "bwd", "fwd+bwd", "shuffle"):
        return None
    if how == "per view":  # one dense call per view, one after another
        out = add_up([estimate(op, {**spec, "seqs": (seq,)}, pass_, dtype=dtype) for seq in spec["seqs"]])
    else:
        out = estimate(op, spec, pass_, dtype=dtype)
    label = row.get("case") or ""
    out["shape"] = f"{label + ' ' if label else ''}{json.dumps(row['shape'], separators=(',', ':'))}"
    if how == "per view":
        out["shape"] += " per view"
    out["measured_ms"] = row["median_ms"]
    out["achieved"] = out["bound_us"] / 1e3 / row["median_ms"]
    out["_spec"] = (op, _key(spec), pass_, dtype, how)
    return out


def _key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def latest_results(folder: str | Path) -> Path | None:
    """The newest JSONL file under `folder` (recursively), by path: results are committed as <date>...jsonl or in
    <date>... folders; None when there is none."""
    folder = Path(folder)
    files = sorted(folder.rglob("*.jsonl")) if folder.is_dir() else []
    return files[-1] if files else None


# ---------------------------------------------------------------------------------------------- the table
def _fmt(v: object, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _gemms(r: dict) -> str:
    return "-" if r["gemms_min"] is None else f"{_fmt(r['gemms_min'])}/{_fmt(r['gemms_kernel'])}"


def markdown(rows: Sequence[dict], columns: Sequence[tuple[str, object]]) -> str:
    """columns: (header, key or function of a row)."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [get(r) if callable(get) else _fmt(r.get(get)) for _, get in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MODEL_COLUMNS = [
    ("op", "op"), ("shape", "shape"), ("pass", "pass"), ("GFLOP", "gflop"), ("MB", "mb"),
    ("bound us", "bound_us"), ("bound", "bound"), ("GEMMs min/kernel", _gemms),
    ("pad", lambda r: _pct(r["padding"])), ("passes min/kernel", lambda r: f"1/{_fmt(r['passes_kernel'])}"),
    ("launches", "launches"),
    ("eff (compute, memory)", lambda r: "/".join(_pct(x) for x in r["efficiency"]) if r["efficiency"] else "-"),
    ("expect min-work", lambda r: _pct(r["expected_min"])), ("expect kernel", lambda r: _pct(r["expected"])),
    ("model us", "model_us"), ("note", "note"),
]
MEASURED_COLUMNS = [("measured ms", "measured_ms"), ("achieved", lambda r: _pct(r.get("achieved")))]


def report(files: Sequence[str | Path] | None = None, folder: str | Path | None = None) -> str:
    """The model table at the real shapes, then every measured Triton row (from `files`, else the newest JSONL
    under `folder`) beside the model at its own shape. Model rows whose shape a measured row matches exactly show
    its median too."""
    paths = list(files or [])
    if not paths and folder is not None:
        latest = latest_results(folder)
        paths = [latest] if latest else []
    from vtp_fast.measure.rows import read_rows

    measured = [m for m in (estimate_bench_row(r) for r in read_rows(paths)[0]) if m is not None]
    by_key = {m["_spec"]: m for m in measured if m["_spec"][4] == "dense"}
    rows = model_rows(PASSES + ("fwd+bwd",))
    for r in rows:
        hit = by_key.get((r["op"], _key(SHAPES[r["op"]][r["shape"]]), r["pass"], r["dtype"], "dense"))
        if hit is not None:
            r["measured_ms"], r["achieved"] = hit["measured_ms"], hit["achieved"]
    out = [f"## Performance model: one H200 (bf16 {PEAK_FLOPS / 1e12:.0f} TFLOP/s, {PEAK_BYTES / 1e12:.1f} TB/s, "
           f"{LAUNCH_US:g} us per launch)", ""]
    out.append("bound = max(FLOPs / peak, bytes / bandwidth) of the minimal work; expect = bound / modelled time "
               "(min-work: a kernel doing only the minimal work; kernel: the kernel's declared WORK); "
               "achieved = bound / measured median.")
    out.append("GEMM units: attention N x N x D per sequence and head, clip_loss n x N x E per direction, "
               "prototype_ce n x K x d; pad = the share of the kernel's MMA work spent on tile padding; passes = "
               "DRAM passes over the large operands.")
    out.append("work read from: " + "; ".join(f"{op}: {kernel_work(op)[1]}" for op in OPS))
    out += ["", markdown(rows, MODEL_COLUMNS + MEASURED_COLUMNS), ""]
    out.append("Efficiency (fraction of the ceilings a minimal-work kernel reaches), why:")
    out += [f"- {op} {p}: {_pct(c)} compute, {_pct(m)} memory: {why}" for (op, p), (c, m, why) in EFFICIENCY.items()]
    out.append("")
    if not paths:
        out.append("No measured rows (no JSONL under bench/results/h200/; pass files with --report).")
    elif not measured:
        out.append(f"No Triton rows the model covers in {', '.join(map(str, paths))}.")
    else:
        out.append(f"## Measured (backend triton) against the model at their own shapes: {', '.join(map(str, paths))}")
        out.append("")
        columns = [("op", "op"), ("shape", "shape"), ("pass", "pass"), ("dtype", "dtype"),
                   ("measured ms", "measured_ms"), ("bound ms", lambda r: _fmt(r["bound_us"] / 1e3)),
                   ("bound", "bound"), ("achieved", lambda r: _pct(r["achieved"])),
                   ("expect kernel", lambda r: _pct(r["expected"])), ("model ms", lambda r: _fmt(r["model_us"] / 1e3))]
        out.append(markdown(measured, columns))
    return "\n".join(out)


if __name__ == "__main__":
    print(report(folder=Path(__file__).resolve().parents[2] / "bench" / "results" / "h200"))
