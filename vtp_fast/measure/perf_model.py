"""Performance model of the fast ops on one H200: FLOPs and DRAM bytes at the real shapes, the lower bound from the
ceilings measured in GPU.md, what each Triton kernel does beyond the minimal work, and the time to expect.

    vtp-fast bench --model [--report rows.jsonl ...]    (default rows: the newest JSONL under bench/results/h200/)
    python -m vtp_fast.measure.perf_report

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

This module holds the model's inputs (ceilings, the kernels' work, efficiencies, the real shapes);
vtp_fast.measure.perf_estimate turns them into rows, vtp_fast.measure.perf_report sets them beside measured ones.
"""

from __future__ import annotations

import importlib
from functools import cache

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

