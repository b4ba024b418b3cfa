"""Performance model of the fast ops on one H200: FLOPs and DRAM bytes at the real shapes, the lower bound from the
ceilings measured in GPU.md, what each Triton kernel does beyond the minimal work, and the time to expect.

    vtp-fast bench --model [--report rows.jsonl ...]    (default rows: the newest JSONL under bench/results/h200/)
    python -m vtp_fast.perf_model

Terms (per op, shape and pass; "fwd+bwd" rows add the two passes):
  bound        max(FLOPs / PEAK_FLOPS, bytes / PEAK_BYTES) of the *minimal* work, the ceilings GPU.md measured
               (bf16 dense matmul 790 TFLOP/s, device copy 4.3 TB/s counting read + write). Minimal work keeps the
               op's memory contract (no (n, N)-sized intermediate in memory) with no padding and one DRAM pass:
               attention as FlashAttention-2 counts it (2 GEMM units forward, 5 backward: Q K^T recomputed),
               clip_loss 1 unit per direction forward and 3 backward (rebuild the logits once, dq, dk),
               prototype_ce 2 forward (student and teacher logits) and 4 backward (both rebuilt once, dx, dw);
               masked_gather and pixel_shuffle_l1 move each byte once.
  kernel work  what kernels/<op>.py does: GEMM units, tile padding, DRAM passes, launches, extra RoPE rotations.
               Each kernel module declares it in a module-level dict WORK (schema below), read here whenever
               triton imports; DEFAULT_WORK (the kernels' counts when this model was written) stands in otherwise,
               per missing key, so the model follows the kernels as they are rewritten.
  efficiency   EFFICIENCY: the fraction of each ceiling a well-made kernel doing exactly the minimal work reaches,
               with the reasoning. Modelled time = max(kernel FLOPs / (PEAK_FLOPS * eff_compute),
               kernel bytes / (PEAK_BYTES * eff_memory)) + the ALU time of RoPE rotations beyond one per row
               + launches * LAUNCH_US.
  expected %   bound / modelled time, for the kernel as declared and for a minimal-work kernel (1 launch a pass).
  achieved %   bound / a measured median (measured rows of backend triton).

WORK schema (kernels/<op>.py): WORK = {"fwd": {...}, "bwd": {...}}, each pass a dict of
  gemms      GEMM units the pass issues, recomputation included. The unit is the op's: attention N x N x D per
             sequence and head; clip_loss n x N x E per direction (two directions); prototype_ce n x K x d.
  tile       (rows, cols) of the GPU tile that pads the unit's two outer dimensions (queries x keys, n x N, n x K)
  passes     DRAM passes over the op's large operands: attention q, k, v (+ dO backward); clip_loss the gathered
             (N, E) features; prototype_ce the (K, d) prototype weights; masked_gather, pixel_shuffle_l1 the data
  launches   kernels the launchers in kernels/<op>.py start (their PyTorch glue included; the op wrapper's in
             vtp_fast/ops is not)
  op-specific: attention "rope" ("per_tile": each program rotates every q/k tile it loads; "once": every row
  rotated once per pass) and "glue_bytes" (bytes per element of q moved by PyTorch outside the kernels, e.g. the
  backward's delta = rowsum(dO * O) through fp32 copies); clip_loss "recomputes" and "block_d" (that many of the
  backward's gemms rebuild the logits, each once per block_d-wide chunk of E; 0: all of E in one chunk).

Nothing here needs a GPU; torch is imported only to read WORK (the kernel modules) and measured rows (`report`).
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

from vtp_fast import optional

# ---------------------------------------------------------------------------------------------------- ceilings
PEAK_FLOPS = 790e12  # bf16 dense matmul, measured on the H200 (GPU.md)
PEAK_BYTES = 4.3e12  # device-to-device copy, bytes read + written per second (GPU.md)
# Non-tensor issue rate, used only for RoPE rotations beyond one per row: 132 SMs x 128 FP32 lanes x 1.98 GHz
# (H200 SXM specification, not measured).
ALU_OPS = 132 * 128 * 1.98e9
ROPE_OPS = 12  # ALU instructions per rotated element in bf16 mode: 2 casts per rounding, 2 products, 1 sum, loads
# Device time per kernel launch when the host keeps ahead (launch gap plus a tiny kernel's own ramp). A guess to be
# calibrated by the first GPU run; the benchmarks' synchronised host timer also sees the Python dispatch of each
# PyTorch call (5-10 us), which the model leaves out.
LAUNCH_US = 2.0

OPS = ("attention", "clip_loss", "prototype_ce", "masked_gather", "pixel_shuffle_l1")
PASSES = ("fwd", "bwd")

# ----------------------------------------------------------------------------------------------- kernel work
# The kernels' work as read from kernels/*.py when this model was written; a module's own WORK overrides it key
# by key. attention: forward Q K^T, P V; backward dK/dV kernel Q K^T, P^T dO, dO V^T, dS^T Q and dQ kernel Q K^T,
# dO V^T, dS K (7), both re-reading q, k, v, dO; delta = rowsum(dO.float() * O.float()) in PyTorch moves 28 bytes
# per element (2 + 4 per cast, 12 for the product, 4 for the sum) in 4 launches. clip_loss: the backward's rows
# and cols kernels each rebuild u once per 256-wide E chunk (2 * (3 + 1) = 8 units at E = 768) and each stream
# the gathered features; the forward's combine is 11 small PyTorch launches. prototype_ce: grad_student and
# grad_weight each rebuild both logits (6 units) and stream the prototypes.
DEFAULT_WORK: dict[str, dict[str, dict]] = {
    "attention": {
        "fwd": {"gemms": 2, "tile": (64, 64), "rope": "per_tile", "passes": 1, "launches": 1},
        "bwd": {"gemms": 7, "tile": (64, 64), "rope": "per_tile", "passes": 2, "launches": 6, "glue_bytes": 28},
    },
    "clip_loss": {
        "fwd": {"gemms": 1, "tile": (128, 64), "passes": 1, "launches": 12},
        "bwd": {"gemms": 4, "recomputes": 2, "block_d": 256, "tile": (64, 64), "passes": 2, "launches": 2},
    },
    "prototype_ce": {
        "fwd": {"gemms": 2, "tile": (64, 64), "passes": 1, "launches": 2},
        "bwd": {"gemms": 6, "tile": (64, 64), "passes": 2, "launches": 4},
    },
    "masked_gather": {  # fwd: the gather; bwd: the scatter into zeros (also masked_scatter's forward)
        "fwd": {"passes": 1, "launches": 1},
        "bwd": {"passes": 1, "launches": 4},
    },
    "pixel_shuffle_l1": {  # fwd: the loss (partials kernel, their sum, the mean); bwd: sign(image - target) / count
        "fwd": {"passes": 1, "launches": 3},
        "bwd": {"passes": 1, "launches": 2},
    },
}
# The minimal design's GEMM units per pass (see the module docstring); clip_loss per direction.
MIN_GEMMS = {"attention": {"fwd": 2, "bwd": 5}, "clip_loss": {"fwd": 1, "bwd": 3},
             "prototype_ce": {"fwd": 2, "bwd": 4}}

# ------------------------------------------------------------------------------------------------ efficiency
# (op, pass) -> (fraction of PEAK_FLOPS, fraction of PEAK_BYTES, why): what a well-made kernel doing the minimal
# work reaches at these shapes on Hopper.
EFFICIENCY: dict[tuple[str, str], tuple[float | None, float, str]] = {
    ("attention", "fwd"): (0.30, 0.80, "FA2 ~280 and FA3 ~330 TFLOP/s at head dim 64, 512 tokens on H100 "
                           "(35-42% of 790): at d = 64 a tile has 256 MMA FLOPs per exp, so softmax issue, not "
                           "the tensor cores, limits; 257 tokens leave 5-step loops with no steady state"),
    ("attention", "bwd"): (0.25, 0.80, "FA2 ~200 and FA3 ~270 TFLOP/s backward at head dim 64, 512 tokens on "
                           "H100; 5 MMAs and two elementwise passes (P, dS) per tile"),
    ("clip_loss", "fwd"): (0.60, 0.80, "one GEMM with an online-softmax epilogue (2E = 1536 FLOPs per exp at "
                           "E = 768): Triton wgmma GEMMs reach 60-70% of cuBLAS; the gathered features stream once"),
    ("clip_loss", "bwd"): (0.50, 0.75, "two dependent GEMMs per tile (rebuild u, then dq or dk) with an exp "
                           "between: FA-backward-like structure, but E large so exp is cheap"),
    ("prototype_ce", "fwd"): (0.55, 0.80, "two d = 256 GEMMs into two online softmaxes, 512 FLOPs per exp: "
                              "MUFU has headroom, the softmax bookkeeping takes ~1/3 of the ALU issue"),
    ("prototype_ce", "bwd"): (0.50, 0.75, "two GEMMs rebuild the logits, a third accumulates, per tile"),
    ("masked_gather", "fwd"): (None, 0.70, "1.5-2 KB rows in random order fill whole sectors, but 6-17 MB per "
                               "call is 2-4 us of traffic: ramp-up and tail are a large share"),
    ("masked_gather", "bwd"): (None, 0.75, "as the gather, plus the zero rows written contiguously"),
    ("pixel_shuffle_l1", "fwd"): (None, 0.80, "streaming reads; the image side is 16-pixel (32/64 B) runs, "
                                  "tokens contiguous"),
    ("pixel_shuffle_l1", "bwd"): (None, 0.80, "streaming: read tokens and target, write the tokens' gradient"),
}


# ---------------------------------------------------------------------------------------------------- shapes
# The real shapes (bf16). attention: ViT at 256 px = CLS + 16 x 16 patches = 257 tokens, heads of 64; multi-crop
# = 2 global 257-token + 8 local 37-token (96 px) views per image, one varlen launch. clip_loss: this GPU's n
# pairs against N gathered, embed E. prototype_ce: 65,536 prototypes at d = 256, n rows (iBOT masked tokens, DINO
# CLS rows). masked_gather: M masked of R tokens (2 global crops x 64 images x 256 patches) of width D.
# pixel_shuffle_l1: decoder tokens (B, 256, 768) -> (B, 3, 256, 256), target in fp32 or bf16.
SHAPES: dict[str, dict[str, dict]] = {
    "attention": {
        "vit_s b256": {"seqs": ((256, 257),), "h": 6, "d": 64, "rope": True},
        "vit_b b256": {"seqs": ((256, 257),), "h": 12, "d": 64, "rope": True},
        "vit_l b64": {"seqs": ((64, 257),), "h": 16, "d": 64, "rope": True},
        "multicrop vit_b b64": {"seqs": ((128, 257), (512, 37)), "h": 12, "d": 64, "rope": True},
    },
    "clip_loss": {
        "n128 N32k E768": {"n": 128, "N": 32768, "E": 768},
        "n512 N16k E768": {"n": 512, "N": 16384, "E": 768},
        "n512 N32k E1024": {"n": 512, "N": 32768, "E": 1024},
        "n64 N16k E512": {"n": 64, "N": 16384, "E": 512},
    },
    "prototype_ce": {
        "ibot n4096": {"n": 4096, "K": 65536, "d": 256},
        "ibot n2048": {"n": 2048, "K": 65536, "d": 256},
        "dino n512": {"n": 512, "K": 65536, "d": 256},
    },
    "masked_gather": {
        "vit_b M4096": {"rows": 32768, "m": 4096, "d": 768},
        "vit_l M2048": {"rows": 32768, "m": 2048, "d": 1024},
    },
    "pixel_shuffle_l1": {
        "b64 fp32 target": {"b": 64, "h": 16, "w": 16, "p": 16, "target_elem": 4},
        "b64 bf16 target": {"b": 64, "h": 16, "w": 16, "p": 16, "target_elem": 2},
    },
}
ELEM = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


# ------------------------------------------------------------------------------------------- reading WORK
@cache
def kernel_work(op: str) -> tuple[dict, str]:
    """(WORK of kernels/<op>.py merged over DEFAULT_WORK[op], where it came from). Imports the kernel module only
    when triton is importable; any failure to import falls back to the default, with the reason."""
    if optional.package_dir("triton") is None:
        return merge_work(op, None), "default (triton not importable)"
    try:
        module = importlib.import_module(f"vtp_fast.kernels.{op}")
    except Exception as e:  # a kernel file mid-edit must not take the model down
        return merge_work(op, None), f"default (import failed: {type(e).__name__})"
    declared = getattr(module, "WORK", None)
    if declared is None:
        return merge_work(op, None), f"default (kernels/{op}.py has no WORK)"
    return merge_work(op, declared), f"kernels/{op}.py WORK"


def merge_work(op: str, declared: dict | None) -> dict:
    """DEFAULT_WORK[op] with each pass's keys replaced by `declared`'s; checks the common keys."""
    merged = {p: dict(DEFAULT_WORK[op][p]) for p in PASSES}
    for p, keys in (declared or {}).items():
        if p not in merged or not isinstance(keys, dict):
            raise ValueError(f"{op} WORK: passes are {PASSES}, each a dict; got {p!r}: {keys!r}")
        merged[p].update(keys)
    for p, keys in merged.items():
        for k in ("gemms", "passes", "launches", "glue_bytes", "recomputes", "block_d"):
            if k in keys and not (isinstance(keys[k], (int, float)) and keys[k] >= 0):
                raise ValueError(f"{op} WORK[{p!r}][{k!r}] must be a number >= 0, got {keys[k]!r}")
        if "tile" in keys and not (len(keys["tile"]) == 2 and all(isinstance(t, int) and t > 0 for t in keys["tile"])):
            raise ValueError(f"{op} WORK[{p!r}]['tile'] must be two positive ints, got {keys['tile']!r}")
        if keys.get("rope", "once") not in ("per_tile", "once"):
            raise ValueError(f"{op} WORK[{p!r}]['rope'] must be 'per_tile' or 'once', got {keys['rope']!r}")
    return merged


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
        return _add([estimate(op, shape, p, dtype=dtype, work=work, shape_name=shape_name) for p in PASSES])
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


def _add(parts: Sequence[dict]) -> dict:
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
        out = _add([estimate(op, {**spec, "seqs": (seq,)}, pass_, dtype=dtype) for seq in spec["seqs"]])
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
    from vtp_fast.benchmark import read_rows

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
    print(report(folder=Path(__file__).resolve().parents[1] / "bench" / "results" / "h200"))
