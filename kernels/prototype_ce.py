"""Triton kernels for the prototype cross-entropy (semantics: vtp_fast/ops/prototype_ce.py).

Per row i and prototype k, with x = student, y = teacher, w = the prototype weight, c = the centre:
  s_ik = x_i . w_k / student_temp,   t_ik = (y_i . w_k - c_k) / teacher_temp,
  loss_i = LSE_k(s_i) - sum_k softmax(t_i)_k s_ik.
The kernels hold logits in base 2 (s2 = log2(e) s) so that every softmax is an exp2. Per row the forward saves
stats (4, n) = (m_s, l_s, m_t, l_t): the maximum of the base-2 logits and the sum of exp2(logit - maximum), from
which the backward rebuilds p = exp2(logit - m) / l (keeping m and l apart, rather than one log-sum-exp, keeps
logit - m exact near the maximum). No (n, K) tensor is ever written: the forward streams over K once with online
rescaling, the backward recomputes the logits chunk by chunk:
  d loss_i / d s_ik = p_s,ik - p_t,ik,   grad x_i = (g_i / student_temp) sum_k (p_s - p_t)_ik w_k,
                                         grad w_k = (1 / student_temp) sum_i g_i (p_s - p_t)_ik x_i.

Launchers take contiguous tensors: x, y (n, d) and w (K, d) of one dtype (fp16, bf16, fp32), c (K,) float32.
  forward(x, y, w, c, student_temp, teacher_temp)                  -> loss (n,), stats (4, n): float32
  grad_student(g (n,) f32, x, y, w, c, stats, student_temp, teacher_temp) -> (n, d) in x's dtype
  grad_weight(same arguments)                                            -> (K, d) in w's dtype
Both gradients are reduced deterministically (no atomics): when the grid would be too small to fill the GPU, the
reduced dimension is split into ranges whose fp32 partial results are summed in a fixed order afterwards.
"""

import math

import torch
import triton
import triton.language as tl
from vtp_fast.kernels import sm_count

LOG2E = math.log2(math.e)
# Split ranges are multiples of every loop block a launch may use, so only the tensor's end is ever ragged.
GRANULE = {"cuda": 128, "cpu": 32}
# Under the interpreter (CPU tensors) there is no autotuning: 32 x 32 blocks.
INTERPRETER_BLOCK = 32


def _configs(name: str, shapes: list[tuple[int, int, int]]) -> list[triton.Config]:
    return [triton.Config({name: b}, num_warps=w, num_stages=s) for b, w, s in shapes]


def _fits(configs, named_args, **kwargs):
    """Drop configurations whose tiles cannot fit in shared memory (fp32 inputs, wide d); keep at least one."""
    size = named_args["x_ptr"].element_size() * kwargs["BLOCK_D"]

    def tiles(c):  # one block size comes from the launcher, the other from the configuration
        blocks = {**kwargs, **c.kwargs}
        return 2 * (blocks["BLOCK_M"] + blocks["BLOCK_N"]) * size

    ok = [c for c in configs if tiles(c) <= 160 * 1024]
    return ok or [min(configs, key=tiles)]


# A program's own block (rows for the forward and grad-student kernels, prototypes for grad-weight) is fixed by
# the launcher, which must know the grid; the block a program loops over is tuned: (size, num_warps, num_stages).
_ROW_CONFIGS = _configs("BLOCK_N", [(64, 4, 3), (64, 8, 3), (128, 8, 3), (128, 8, 2), (128, 4, 3), (32, 4, 3),
                                    (32, 8, 3), (64, 8, 4)])
_PROTO_CONFIGS = _configs("BLOCK_M", [(64, 4, 3), (64, 8, 3), (128, 8, 3), (128, 8, 2), (32, 4, 3), (32, 8, 3),
                                      (64, 8, 4)])


@triton.jit
def _load_tile(ptr, idx, limit, D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """Rows idx (BLOCK,) of a row-major (limit, D) matrix as a (BLOCK, BLOCK_D) tile, zeros outside."""
    cols = tl.arange(0, BLOCK_D)
    ptrs = ptr + idx.to(tl.int64)[:, None] * D + cols[None, :]
    if MASK_ROWS:
        if D == BLOCK_D:
            tile = tl.load(ptrs, mask=(idx < limit)[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=(idx < limit)[:, None] & (cols < D)[None, :], other=0.0)
    else:
        if D == BLOCK_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(cols < D)[None, :], other=0.0)
    return tile


@triton.jit
def _logits(x, y, wt, vt, c, qs, qt, PRECISION: tl.constexpr):
    """Base-2 student and teacher logits of a row block against a prototype block, through the student's (wt) and
    the teacher's (vt) prototype weights: (BM, BD), (BD, BN) -> (BM, BN)."""
    s = tl.dot(x, wt, input_precision=PRECISION) * qs
    t = (tl.dot(y, vt, input_precision=PRECISION) - c[None, :]) * qt
    return s, t


@triton.jit
def _row_stats(stats_ptr, g_ptr, rows, n, g_scale, MASK: tl.constexpr):
    """Per-row softmax statistics (m_s, 1 / l_s, m_t, 1 / l_t) and the scaled upstream gradient. Rows past n read
    m = +inf, so both of their probabilities are exactly 0 (their logits, from the centre alone, may be huge)."""
    if MASK:
        ok = rows < n
        m_s = tl.load(stats_ptr + rows, mask=ok, other=float("inf"))
        l_s = tl.load(stats_ptr + n + rows, mask=ok, other=1.0)
        m_t = tl.load(stats_ptr + 2 * n + rows, mask=ok, other=float("inf"))
        l_t = tl.load(stats_ptr + 3 * n + rows, mask=ok, other=1.0)
        g = tl.load(g_ptr + rows, mask=ok, other=0.0)
    else:
        m_s = tl.load(stats_ptr + rows)
        l_s = tl.load(stats_ptr + n + rows)
        m_t = tl.load(stats_ptr + 2 * n + rows)
        l_t = tl.load(stats_ptr + 3 * n + rows)
        g = tl.load(g_ptr + rows)
    return m_s, 1.0 / l_s, m_t, 1.0 / l_t, g * g_scale


@triton.jit
def _forward_kernel(x_ptr, y_ptr, w_ptr, v_ptr, c_ptr, part_ptr, n, K, span, qs, qt,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr):
    # One row block against prototypes [split * span, (split + 1) * span). Writes the online-softmax state
    # (m_s, l_s, m_t, l_t, a) of this range to part (5, splits, n): running maxima m, sums of exp2(logit - m) l,
    # and a = sum_k exp2(t_k - m_t) s_k.
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    x = _load_tile(x_ptr, rows, n, D, BLOCK_D, True)
    y = _load_tile(y_ptr, rows, n, D, BLOCK_D, True)
    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    a = tl.zeros([BLOCK_M], tl.float32)
    k_lo = split * span
    k_hi = tl.minimum(k_lo + span, K)
    for k0 in range(k_lo, k_hi, BLOCK_N):
        ks = k0 + tl.arange(0, BLOCK_N)
        w = _load_tile(w_ptr, ks, K, D, BLOCK_D, not EVEN_K)
        v = _load_tile(v_ptr, ks, K, D, BLOCK_D, not EVEN_K)
        if EVEN_K:
            c = tl.load(c_ptr + ks)
        else:
            c = tl.load(c_ptr + ks, mask=ks < K, other=0.0)
        s, t = _logits(x, y, tl.trans(w), tl.trans(v), c, qs, qt, PRECISION)
        s_in_a = s  # finite: prototypes past K have zero weight rows, so s = 0 there (and their e_t = 0 below)
        if not EVEN_K:  # prototypes past K carry no mass in either softmax
            k_ok = (ks < K)[None, :]
            s = tl.where(k_ok, s, float("-inf"))
            t = tl.where(k_ok, t, float("-inf"))
        m_s_new = tl.maximum(m_s, tl.max(s, 1))
        l_s = l_s * tl.exp2(m_s - m_s_new) + tl.sum(tl.exp2(s - m_s_new[:, None]), 1)
        m_s = m_s_new
        m_t_new = tl.maximum(m_t, tl.max(t, 1))
        alpha = tl.exp2(m_t - m_t_new)
        e_t = tl.exp2(t - m_t_new[:, None])
        l_t = l_t * alpha + tl.sum(e_t, 1)
        a = a * alpha + tl.sum(e_t * s_in_a, 1)
        m_t = m_t_new
    row_ok = rows < n
    out = part_ptr + split * n + rows
    stride = tl.num_programs(1) * n
    tl.store(out, m_s, mask=row_ok)
    tl.store(out + stride, l_s, mask=row_ok)
    tl.store(out + 2 * stride, m_t, mask=row_ok)
    tl.store(out + 3 * stride, l_t, mask=row_ok)
    tl.store(out + 4 * stride, a, mask=row_ok)


@triton.jit
def _combine_kernel(part_ptr, loss_ptr, stats_ptr, n, splits, BLOCK: tl.constexpr):
    # Merge the per-range states of part (5, splits, n) in a fixed order; every range holds >= 1 prototype,
    # so every m is finite.
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n
    stride = splits * n
    big_s = tl.full([BLOCK], float("-inf"), tl.float32)
    big_t = tl.full([BLOCK], float("-inf"), tl.float32)
    for j in range(splits):
        big_s = tl.maximum(big_s, tl.load(part_ptr + j * n + rows, mask=ok, other=0.0))
        big_t = tl.maximum(big_t, tl.load(part_ptr + 2 * stride + j * n + rows, mask=ok, other=0.0))
    l_s = tl.zeros([BLOCK], tl.float32)
    l_t = tl.zeros([BLOCK], tl.float32)
    a = tl.zeros([BLOCK], tl.float32)
    for j in range(splits):
        at = part_ptr + j * n + rows
        # rows past n read l = 1, m = 0 (their results are dropped) to keep log2 and the division finite
        l_s += tl.load(at + stride, mask=ok, other=1.0) * tl.exp2(tl.load(at, mask=ok, other=0.0) - big_s)
        scale_t = tl.exp2(tl.load(at + 2 * stride, mask=ok, other=0.0) - big_t)
        l_t += tl.load(at + 3 * stride, mask=ok, other=1.0) * scale_t
        a += tl.load(at + 4 * stride, mask=ok, other=0.0) * scale_t
    loss = (big_s - a / l_t + tl.log2(l_s)) * 0.6931471805599453  # base 2 -> natural units
    tl.store(loss_ptr + rows, loss, mask=ok)
    tl.store(stats_ptr + rows, big_s, mask=ok)
    tl.store(stats_ptr + n + rows, l_s, mask=ok)
    tl.store(stats_ptr + 2 * n + rows, big_t, mask=ok)
    tl.store(stats_ptr + 3 * n + rows, l_t, mask=ok)


@triton.jit
def _grad_student_kernel(g_ptr, x_ptr, y_ptr, w_ptr, v_ptr, c_ptr, stats_ptr, out_ptr, n, K, span, qs, qt,
                         g_scale, D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr):
    # out[split, rows] = sum over prototypes of range `split` of (g / student_temp) (p_s - p_t) w
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    x = _load_tile(x_ptr, rows, n, D, BLOCK_D, True)
    y = _load_tile(y_ptr, rows, n, D, BLOCK_D, True)
    m_s, inv_s, m_t, inv_t, g = _row_stats(stats_ptr, g_ptr, rows, n, g_scale, True)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_lo = split * span
    k_hi = tl.minimum(k_lo + span, K)
    for k0 in range(k_lo, k_hi, BLOCK_N):
        ks = k0 + tl.arange(0, BLOCK_N)
        w = _load_tile(w_ptr, ks, K, D, BLOCK_D, not EVEN_K)
        v = _load_tile(v_ptr, ks, K, D, BLOCK_D, not EVEN_K)
        if EVEN_K:
            c = tl.load(c_ptr + ks)
        else:
            c = tl.load(c_ptr + ks, mask=ks < K, other=0.0)
        s, t = _logits(x, y, tl.trans(w), tl.trans(v), c, qs, qt, PRECISION)
        if not EVEN_K:  # padded prototypes have zero weight rows, but their logit 0 may overflow exp2: inf * 0 = nan
            k_ok = (ks < K)[None, :]
            s = tl.where(k_ok, s, float("-inf"))
            t = tl.where(k_ok, t, float("-inf"))
        p = (tl.exp2(s - m_s[:, None]) * inv_s[:, None] - tl.exp2(t - m_t[:, None]) * inv_t[:, None]) * g[:, None]
        acc = tl.dot(p.to(w.dtype), w, acc, input_precision=PRECISION)
    out = out_ptr + split.to(tl.int64) * n * D + rows.to(tl.int64)[:, None] * D + tl.arange(0, BLOCK_D)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (tl.arange(0, BLOCK_D) < D)[None, :])


@triton.jit
def _grad_weight_kernel(g_ptr, x_ptr, y_ptr, w_ptr, v_ptr, c_ptr, stats_ptr, out_ptr, n, K, span, qs, qt,
                        g_scale, D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    # out[split, ks] = sum over rows of range `split` of (g / student_temp) (p_s - p_t)^T x
    split = tl.program_id(1)
    ks = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < K
    w = _load_tile(w_ptr, ks, K, D, BLOCK_D, True)
    wt = tl.trans(w)
    vt = tl.trans(_load_tile(v_ptr, ks, K, D, BLOCK_D, True))
    # Prototypes past K (their results are dropped) get logits -inf, so exp2 cannot overflow there: t through an
    # infinite centre, s below.
    c = tl.load(c_ptr + ks, mask=k_ok, other=float("inf"))
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    r_lo = split * span
    r_hi = tl.minimum(r_lo + span, n)
    for r0 in range(r_lo, r_hi, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        x = _load_tile(x_ptr, rows, n, D, BLOCK_D, not EVEN_N)
        y = _load_tile(y_ptr, rows, n, D, BLOCK_D, not EVEN_N)
        m_s, inv_s, m_t, inv_t, g = _row_stats(stats_ptr, g_ptr, rows, n, g_scale, not EVEN_N)
        s, t = _logits(x, y, wt, vt, c, qs, qt, PRECISION)
        if not EVEN_K:
            s = tl.where(k_ok[None, :], s, float("-inf"))
        p = (tl.exp2(s - m_s[:, None]) * inv_s[:, None] - tl.exp2(t - m_t[:, None]) * inv_t[:, None]) * g[:, None]
        acc = tl.dot(tl.trans(p.to(x.dtype)), x, acc, input_precision=PRECISION)
    out = out_ptr + split.to(tl.int64) * K * D + ks.to(tl.int64)[:, None] * D + tl.arange(0, BLOCK_D)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=k_ok[:, None] & (tl.arange(0, BLOCK_D) < D)[None, :])


# EVEN_K / EVEN_N: K / n divide into whole blocks, so the loops need no masks.
_even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_N"] == 0})
_even_n = triton.heuristics({"EVEN_N": lambda args: args["n"] % args["BLOCK_M"] == 0})
_forward_plain = _even_k(_forward_kernel)
_grad_student_plain = _even_k(_grad_student_kernel)
_grad_weight_plain = _even_n(_even_k(_grad_weight_kernel))
_PRUNE = {"early_config_prune": _fits}
# Tuned once per (d, dtype): the row count changes every iBOT step and must not trigger a re-tune.
_forward_tuned = triton.autotune(_ROW_CONFIGS, key=["D"], prune_configs_by=_PRUNE)(_forward_plain)
_grad_student_tuned = triton.autotune(_ROW_CONFIGS, key=["D"], prune_configs_by=_PRUNE)(_grad_student_plain)
_grad_weight_tuned = triton.autotune(_PROTO_CONFIGS, key=["D"], prune_configs_by=_PRUNE)(_grad_weight_plain)


def _own_block(x: torch.Tensor, block_d: int) -> int:
    """Rows (or prototypes) per program: 64 for 16-bit inputs of d <= 256, fewer for fp32 (whose ieee dots run on
    the FMA units, with the operands in registers) and for wider rows."""
    if not x.is_cuda:
        return INTERPRETER_BLOCK
    if x.element_size() == 4:
        return 32 if block_d <= 64 else 16
    return 64 if block_d <= 256 else 32 if block_d <= 512 else 16


def _split(blocks: int, length: int, device: torch.device) -> tuple[int, int]:
    """Split a reduced dimension of `length` so that `blocks` x splits programs fill the device.

    Returns (splits, span): ranges [j * span, (j + 1) * span), each non-empty, span a multiple of the granule."""
    granule = GRANULE[device.type]
    target = 2 * sm_count(device.index or 0) if device.type == "cuda" else 4  # 4 on CPU: tests reach the merge
    splits = max(1, min(triton.cdiv(target, blocks), triton.cdiv(length, granule)))
    span = triton.cdiv(triton.cdiv(length, splits), granule) * granule
    return triton.cdiv(length, span), span


def _launch(plain, tuned, grid: tuple[int, int], args: tuple, x: torch.Tensor, own: dict, tuned_name: str) -> None:
    meta = {"D": x.shape[1], "BLOCK_D": max(16, triton.next_power_of_2(x.shape[1])),
            "PRECISION": "ieee" if x.dtype == torch.float32 else "tf32", **own}  # fp32 stays fp32, as in torch
    if x.is_cuda:
        tuned[grid](*args, **meta)
    else:
        plain[grid](*args, **meta, **{tuned_name: INTERPRETER_BLOCK})


def forward(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, v: torch.Tensor, c: torch.Tensor,
            student_temp: float, teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y: student / teacher embeddings (n, d); w, v: student / teacher prototype weights (K, d); c: (K,)."""
    n, k = x.shape[0], w.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    stats = torch.empty((4, n), dtype=torch.float32, device=x.device)
    if n == 0:
        return loss, stats
    rows = _own_block(x, max(16, triton.next_power_of_2(x.shape[1])))
    splits, span = _split(triton.cdiv(n, rows), k, x.device)
    part = torch.empty((5, splits, n), dtype=torch.float32, device=x.device)
    _launch(_forward_plain, _forward_tuned, (triton.cdiv(n, rows), splits),
            (x, y, w, v, c, part, n, k, span, LOG2E / student_temp, LOG2E / teacher_temp), x, {"BLOCK_M": rows},
            "BLOCK_N")
    block = 128
    _combine_kernel[(triton.cdiv(n, block),)](part, loss, stats, n, splits, BLOCK=block)
    return loss, stats


def _scales(student_temp: float, teacher_temp: float) -> tuple[float, float, float]:
    return LOG2E / student_temp, LOG2E / teacher_temp, 1.0 / student_temp


def grad_student(g: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, v: torch.Tensor,
                 c: torch.Tensor, stats: torch.Tensor, student_temp: float, teacher_temp: float) -> torch.Tensor:
    n, k, d = x.shape[0], w.shape[0], x.shape[1]
    if n == 0:
        return torch.empty_like(x)
    rows = _own_block(x, max(16, triton.next_power_of_2(d)))
    splits, span = _split(triton.cdiv(n, rows), k, x.device)
    out = torch.empty((splits, n, d), dtype=x.dtype if splits == 1 else torch.float32, device=x.device)
    _launch(_grad_student_plain, _grad_student_tuned, (triton.cdiv(n, rows), splits),
            (g, x, y, w, v, c, stats, out, n, k, span, *_scales(student_temp, teacher_temp)), x, {"BLOCK_M": rows},
            "BLOCK_N")
    return out[0] if splits == 1 else out.sum(0).to(x.dtype)


def grad_weight(g: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, v: torch.Tensor,
                c: torch.Tensor, stats: torch.Tensor, student_temp: float, teacher_temp: float) -> torch.Tensor:
    n, k, d = x.shape[0], w.shape[0], x.shape[1]
    if n == 0:
        return torch.zeros_like(w)
    protos = _own_block(x, max(16, triton.next_power_of_2(d)))
    splits, span = _split(triton.cdiv(k, protos), n, x.device)
    out = torch.empty((splits, k, d), dtype=w.dtype if splits == 1 else torch.float32, device=x.device)
    _launch(_grad_weight_plain, _grad_weight_tuned, (triton.cdiv(k, protos), splits),
            (g, x, y, w, v, c, stats, out, n, k, span, *_scales(student_temp, teacher_temp)), x,
            {"BLOCK_N": protos},
            "BLOCK_M")
    return out[0] if splits == 1 else out.sum(0).to(w.dtype)
