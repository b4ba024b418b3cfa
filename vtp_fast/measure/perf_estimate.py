"""The performance model's rows (vtp_fast.measure.perf_model: terms, ceilings, the kernels' WORK): per op, the
FLOPs and DRAM bytes of one pass at one shape, the minimal work against the kernel's declared work, the bound and
the modelled time; passes and views that run one after another add up."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from vtp_fast.measure.perf_model import (
    ALU_OPS,
    EFFICIENCY,
    ELEM,
    LAUNCH_US,
    MIN_GEMMS,
    OPS,
    PASSES,
    PEAK_BYTES,
    PEAK_FLOPS,
    ROPE_OPS,
    SHAPES,
    kernel_work,
    merge_work,
)


# ----------------------------------------------------------------------------------------------- op models
def _pad(x: int, block: int) -> int:
    return math.ceil(x / block) * block


def _next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1))))


def _attention(s: dict, p: str, w: dict, e: int) -> dict:
    """Per (sequence, head) of n tokens: unit 2 n^2 D FLOPs. Bytes: forward reads q, k, v and writes out (+ the
    fp32 log-sum-exp); backward reads q, k, v, out, dO and writes dq, dk, dv (+ lse, delta)."""
    d, h = s["d"], s["h"]
    bm, bn = w["tile"]
    out = dict(flops=0.0, bytes=0.0, kflops=0.0, kbytes=0.0, glue=0.0, useful=0.0, padded=0.0, rope_min=0.0,
               rope_kernel=0.0)
    for count, n in s["seqs"]:
        heads = count * h
        nm, nn = math.ceil(n / bm), math.ceil(n / bn)
        pm, pn = nm * bm, nn * bn
        out["flops"] += heads * MIN_GEMMS["attention"][p] * 2 * n * n * d
        out["kflops"] += heads * w["gemms"] * 2 * pm * pn * d
        out["useful"] += heads * n * n
        out["padded"] += heads * pm * pn
        elems = heads * n * d
        if p == "fwd":
            out["bytes"] += 4 * elems * e + 4 * heads * n
            out["kbytes"] += (3 * w["passes"] + 1) * elems * e + 4 * heads * n
        else:
            out["bytes"] += 8 * elems * e + 8 * heads * n
            out["kbytes"] += (4 * w["passes"] + 3) * elems * e + 8 * w["passes"] * heads * n
            out["glue"] += w.get("glue_bytes", 0) * elems
        if s.get("rope"):
            out["rope_min"] += heads * 2 * n
            if w.get("rope") == "per_tile":  # each program rotates its own tile once and every tile it streams
                rows = pm + nm * pn if p == "fwd" else (pn + nn * pm) + (pm + nm * pn)
            else:
                rows = 2 * n
            out["rope_kernel"] += heads * rows
    extra_rows = max(0.0, out["rope_kernel"] - out["rope_min"])
    return dict(flops=out["flops"], bytes=out["bytes"], kernel_flops=out["kflops"], kernel_bytes=out["kbytes"],
                glue_bytes=out["glue"], gemms_min=MIN_GEMMS["attention"][p], gemms_kernel=w["gemms"],
                padding=1 - out["useful"] / out["padded"], alu_extra_s=extra_rows * d * ROPE_OPS / ALU_OPS,
                note=(f"rope rows x{out['rope_kernel'] / out['rope_min']:.1f}" if s.get("rope") and extra_rows else ""))


def _clip_loss(s: dict, p: str, w: dict, e: int) -> dict:
    """Two directions of n x N logits over E. Bytes: forward reads image, text (n, E) and the gathered all_image,
    all_text (N, E); backward reads them and writes the four gradients."""
    n, big_n, dim = s["n"], s["N"], s["E"]
    bm, bn = w["tile"]
    unit = 2 * n * big_n * dim
    padded = 2 * _pad(n, bm) * _pad(big_n, bn) * dim
    units = w["gemms"]
    if p == "bwd" and w.get("recomputes"):
        block_d = min(w["block_d"], max(16, _next_pow2(dim))) if w.get("block_d") else dim
        units += w["recomputes"] * (math.ceil(dim / block_d) - 1)
    small, big = 2 * n * dim * e, 2 * big_n * dim * e
    if p == "fwd":
        nbytes, kbytes = small + big, small + w["passes"] * big
    else:
        nbytes, kbytes = 2 * (small + big), small + w["passes"] * big + small + big
    return dict(flops=2 * MIN_GEMMS["clip_loss"][p] * unit, bytes=nbytes, kernel_flops=2 * units * padded,
                kernel_bytes=kbytes, gemms_min=MIN_GEMMS["clip_loss"][p], gemms_kernel=units,
                padding=1 - unit / padded, alu_extra_s=0.0, note="")


def _prototype_ce(s: dict, p: str, w: dict, e: int) -> dict:
    """n rows against K prototypes of width d, student and teacher (distinct EMA weights). Bytes: x, y (n, d),
    w, v (K, d), the centre (K,) fp32; backward adds the row stats and writes dx (n, d), dw (K, d)."""
    n, k, d = s["n"], s["K"], s["d"]
    bm, bn = w["tile"]
    unit = 2 * n * k * d
    padded = 2 * _pad(n, bm) * _pad(k, bn) * d
    rows, protos = 2 * n * d * e + 20 * n, 2 * k * d * e + 4 * k
    if p == "fwd":
        nbytes, kbytes = rows + protos, rows + w["passes"] * protos
    else:
        writes = n * d * e + k * d * e
        nbytes, kbytes = rows + protos + writes, w["passes"] * (rows + protos) + writes
    return dict(flops=MIN_GEMMS["prototype_ce"][p] * unit, bytes=nbytes, kernel_flops=w["gemms"] * padded,
                kernel_bytes=kbytes, gemms_min=MIN_GEMMS["prototype_ce"][p], gemms_kernel=w["gemms"],
                padding=1 - unit / padded, alu_extra_s=0.0, note="")


def _masked_gather(s: dict, p: str, w: dict, e: int) -> dict:
    """fwd: gather M of R rows of width d (read + write M rows, the int64 index); bwd: scatter them into R rows,
    the others zero (read M rows, write R rows)."""
    rows, m, d = s["rows"], s["m"], s["d"]
    moved = 2 * m * d * e if p == "fwd" else (m + rows) * d * e
    return dict(flops=0.0, bytes=moved + 8 * m, kernel_flops=0.0, kernel_bytes=w["passes"] * moved + 8 * m,
                gemms_min=None, gemms_kernel=None, padding=None, alu_extra_s=0.0,
                note="scatter" if p == "bwd" else "gather")


def _pixel_shuffle_l1(s: dict, p: str, w: dict, e: int) -> dict:
    """B h w tokens of 3 p^2 channels = the B x 3 x hp x wp image. fwd: read tokens and target; bwd: read both
    again, write the tokens' gradient; shuffle (no loss): read tokens, write the image."""
    elems = s["b"] * s["h"] * s["w"] * 3 * s["p"] ** 2
    read = elems * (e + s.get("target_elem", e))
    if p == "shuffle":
        nbytes = kbytes = 2 * elems * e
    else:
        writes = elems * e if p == "bwd" else 0
        nbytes, kbytes = read + writes, w["passes"] * read + writes
    return dict(flops=0.0, bytes=nbytes, kernel_flops=0.0, kernel_bytes=kbytes, gemms_min=None, gemms_kernel=None,
                padding=None, alu_extra_s=0.0, note="")


_MODELS = {"attention": _attention, "clip_loss": _clip_loss, "prototype_ce": _prototype_ce,
           "masked_gather": _masked_gather, "pixel_shuffle_l1": _pixel_shuffle_l1}


# -------------------------------------------------------------------------------------------------- rows
def estimate(op: str, shape: dict, pass_: str, *, dtype: str = "bfloat16", work: dict | None = None,
             shape_name: str = "") -> dict:
    """One model row: op at `shape` (a dict as in SHAPES) for pass "fwd", "bwd" or "fwd+bwd" (pixel_shuffle_l1 also
    "shuffle"). `work`: a WORK dict to model instead of the kernel module's (merged over DEFAULT_WORK)."""
    if pass_ == "fwd+bwd":
        return add_up([estimate(op, shape, p, dtype=dtype, work=work, shape_name=shape_name) for p in PASSES])
    if op not in _MODELS:
        raise ValueError(f"unknown op {op!r}; modelled: {', '.join(OPS)}")
    if pass_ not in PASSES and (pass_, op) != ("shuffle", "pixel_shuffle_l1"):
        raise ValueError(f"{op}: unknown pass {pass_!r}; modelled: fwd, bwd, fwd+bwd")
    e = ELEM[dtype]
    if work is None:
        merged, source = kernel_work(op)
    else:
        merged, source = merge_work(op, work), "given"
    w = {"passes": 1, "launches": 1} if pass_ == "shuffle" else merged[pass_]  # the plain shuffle: one kernel
    m = _MODELS[op](shape, pass_, w, e)
    eff_c, eff_m, _ = EFFICIENCY[(op, "fwd" if pass_ == "shuffle" else pass_)]
    t_flops, t_bytes = m["flops"] / PEAK_FLOPS, m["bytes"] / PEAK_BYTES
    bound = max(t_flops, t_bytes)

    def modelled(flops: float, nbytes: float, launches: float, extra: float) -> float:
        compute = flops / (PEAK_FLOPS * eff_c) if flops else 0.0
        return max(compute, nbytes / (PEAK_BYTES * eff_m)) + extra + launches * LAUNCH_US * 1e-6

    t_min = modelled(m["flops"], m["bytes"], 1, 0.0)
    # PyTorch glue runs as kernels of its own, before or after the main ones: its traffic adds, as does the ALU
    # time of RoPE rotations beyond one per row (on the path to each tile's first MMA)
    glue_s = m.get("glue_bytes", 0.0) / (PEAK_BYTES * eff_m)
    t_kernel = modelled(m["kernel_flops"], m["kernel_bytes"], w.get("launches", 1), m["alu_extra_s"] + glue_s)
    return {
        "op": op, "shape": shape_name, "pass": pass_, "dtype": dtype,
        "gflop": m["flops"] / 1e9, "mb": m["bytes"] / 1e6,
        "kernel_gflop": m["kernel_flops"] / 1e9, "kernel_mb": (m["kernel_bytes"] + m.get("glue_bytes", 0.0)) / 1e6,
        "bound_us": bound * 1e6, "bound": "compute" if t_flops >= t_bytes else "memory",
        "gemms_min": m["gemms_min"], "gemms_kernel": m["gemms_kernel"], "padding": m["padding"],
        "passes_min": 1, "passes_kernel": w.get("passes", 1), "launches": w.get("launches", 1),
        "efficiency": (eff_c, eff_m), "expected_min": bound / t_min, "expected": bound / t_kernel,
        "model_min_us": t_min * 1e6, "model_us": t_kernel * 1e6, "note": m["note"], "work": source,
        "_flop_s": t_flops, "_byte_s": t_bytes,
    }


def add_up(parts: Sequence[dict]) -> dict:
    """Passes (or views) run one after another: FLOPs, bytes, bounds and modelled times add up."""
    first = parts[0]

    def total(key):
        values = [r[key] for r in parts]
        return None if any(v is None for v in values) else sum(values)

    out = dict(first)
    for key in ("gflop", "mb", "kernel_gflop", "kernel_mb", "bound_us", "gemms_min", "gemms_kernel",
                "launches", "model_min_us", "model_us", "_flop_s", "_byte_s"):
        out[key] = total(key)
    kinds = {r["bound"] for r in parts}
    out["bound"] = kinds.pop() if len(kinds) == 1 else "mixed"
    if all(r["padding"] is not None for r in parts) and out["kernel_gflop"]:
        useful = sum(r["kernel_gflop"] * (1 - r["padding"]) for r in parts)
        out["padding"] = 1 - useful / out["kernel_gflop"]
    out["passes_kernel"] = max(r["passes_kernel"] for r in parts)
    if len({r["efficiency"] for r in parts}) > 1:
        out["efficiency"] = None
    out["pass"] = "+".join(dict.fromkeys(r["pass"] for r in parts)) if len({r["pass"] for r in parts}) > 1 \
        else first["pass"]
    out["expected_min"] = out["bound_us"] / out["model_min_us"]
    out["expected"] = out["bound_us"] / out["model_us"]
    several = len({r["pass"] for r in parts}) > 1
    out["note"] = "; ".join(dict.fromkeys(f"{r['pass']} {r['note']}" if several else r["note"]
                                          for r in parts if r["note"]))
    return out


def model_rows(passes: Iterable[str] = PASSES) -> list[dict]:
    """One row per (op, shape name, pass) at the real shapes of SHAPES, bf16."""
    return [estimate(op, shape, p, shape_name=name) for op in OPS for name, shape in SHAPES[op].items()
            for p in passes]

