"""Triton FlashAttention (forward and backward) with the 2-D RoPE rotation of q and k.

One kernel family serves two layouts:
  dense   q, k, v: (B, H, N, D) views (any batch/head/token strides, unit stride on D)
  varlen  q, k, v: (T, H, D) packed sequences of different lengths (multi-crop views), `seq_start` / `seq_len`
          (S,) int32 per sequence; one launch covers all of them.
Every kernel finds token t of sequence s, head h at  s * stride_b + h * stride_h + (seq_start[s] + t) * stride_t
(dense: seq_start 0; varlen: stride_b 0), and keeps per-row statistics (log-sum-exp, delta) in (S * H, LMAX) fp32.

RoPE is given per token as sin/cos rows of D values (prefix tokens carry sin 0, cos 1). The rotation works on
halves of D: for x = [x1, x2], rot(x) = [x1 c - x2 s, x2 c + x1 s]; with ROUND = 1 (bf16 tables) or 2 (fp16)
every intermediate is rounded to that dtype exactly as the PyTorch reference rounds it (cast, product, product,
sum), which makes the published bf16 numerics reproducible. `_rope` rotates q and k once, in a pre-pass, into
contiguous copies that the forward reads and the backward reuses (saved in place of q and k). The backward works
in rotated coordinates and rotates dk back in its epilogue, dq in the pass that converts its fp32 accumulator
(the adjoint; the roundings pass gradients straight through, as autograd does).

Why a pre-pass, at VTP-B (B64 H12 N257 D64 bf16, one layer, 12.6 M elements per tensor): it reads q, k and
writes the copies, 101 MB, ~24 us at 4.3 TB/s: as much DRAM traffic as the forward's own (q, k, v, out), which at
257 tokens is memory-bound, so it about doubles the forward's memory time; the backward costs nothing more.
Rotating on load moves no extra bytes but rotates a row for every program that streams it: with these tiles
4 N rows per head in the forward (k once per query block, q once) and 6 N in the backward, 126 M rotations where
25 M suffice, ~12 instructions each (a rounding is two conversions): ~1.5 G instructions, ~45 us of FP32 issue on
132 SMs, taken from the softmax, which already limits these kernels at D = 64. Not done, a middle way: the forward
rotates and stores its own q rows (once) and a pre-pass only k (76 MB instead of 101 MB). The price of the
copies is memory: v, a view of the fused qkv projection, keeps that buffer (and the original q, k) alive, so a
layer holds two q-sized tensors more.

Forward: one program per (BLOCK_M queries, sequence * head), online softmax in base 2 (exp2) with the log-sum-exp
saved for the backward; 2 GEMM units (S = q k^T, O = P v). Backward: FlashAttention-2's 5 units (S, dV = P^T dO,
dP = dO v^T, dK = dS^T q, dQ = dS k); one program per (BLOCK_N keys, sequence * head) loops over the queries and
adds its dQ share into an fp32 buffer with atomics. Deterministic mode (the launcher's flag, from
torch.are_deterministic_algorithms_enabled()) launches the same kernel once per key block column, in order, so
every dQ element receives its additions in a fixed order. delta = rowsum(dO * O) comes from a small kernel. All
accumulation is fp32.

Ragged ends: full BLOCK-wide tiles run unmasked; what remains of a sequence is covered by TAIL-wide tiles, both in
the loops over keys / queries and for a program's own block (its rows, or its keys, in TAIL-wide pieces). At 257
tokens the MMA work is padded to 272^2 instead of 320^2 with 64-wide tiles (10.7% waste instead of 35.5%).
"""

import torch
import triton
import triton.language as tl
from vtp_fast.kernels import gpu_arch, launch, loop_bound

LOG2E = 1.4426950408889634
TAIL = tl.constexpr(16)  # width of the tiles that cover a sequence's ragged end (the smallest MMA tile)

# The work each pass does, read by vtp_fast.measure.perf_model (schema there). tile: the padding granularity of both
# GEMM dimensions (the full tiles are larger, see _config; the ragged end is TAIL-wide, so a sequence pads to a
# multiple of TAIL). glue_bytes, per element of q, bf16, outside the attention kernels proper: forward, the RoPE
# pre-pass (read q, k, write the copies: 8); backward, delta (read O, dO: 4) and the fp32 dQ buffer (zeroed, its
# atomics written back, read by the last pass: 12). launches with RoPE; the backward's 4 include the zero fill.
WORK = {
    "fwd": {"gemms": 2, "tile": (16, 16), "rope": "once", "passes": 1, "launches": 2, "glue_bytes": 8},
    "bwd": {"gemms": 5, "tile": (16, 16), "rope": "once", "passes": 1, "launches": 4, "glue_bytes": 16},
}


@triton.jit
def _sequence(SEQ_START, SEQ_LEN, H):
    """(sequence, head, first token, length) of this program; grid axis 1 runs over sequences * heads."""
    pid = tl.program_id(1)
    seq = pid // H
    return seq, pid % H, tl.load(SEQ_START + seq), tl.load(SEQ_LEN + seq)


@triton.jit
def _base(seq, head, start, s_b, s_h, s_t):
    """Offset of token 0 of (seq, head)."""
    return seq.to(tl.int64) * s_b + head.to(tl.int64) * s_h + start.to(tl.int64) * s_t


@triton.jit
def _rows_ptr(ptr, rows, s_t, D: tl.constexpr):
    """(BLOCK, D) pointers to the given rows."""
    return ptr + rows[:, None].to(tl.int64) * s_t + tl.arange(0, D)[None, :]


@triton.jit
def _load(ptr, rows, n, s_t, D: tl.constexpr, MASK: tl.constexpr):
    """(BLOCK, D) tile of the given rows; rows >= n read as 0 when MASK (else all rows must be < n)."""
    if MASK:
        x = tl.load(_rows_ptr(ptr, rows, s_t, D), mask=(rows < n)[:, None], other=0.0)
    else:
        x = tl.load(_rows_ptr(ptr, rows, s_t, D))
    return x


@triton.jit
def _round(x, ROUND: tl.constexpr):
    if ROUND == 1:
        x = x.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _tables(SIN, COS, table_rows, ok, HALF: tl.constexpr):
    """sin, cos (BLOCK, HALF) fp32 for the given table rows (the tables repeat after HALF columns)."""
    off = table_rows[:, None].to(tl.int64) * (2 * HALF) + tl.arange(0, HALF)[None, :]
    s = tl.load(SIN + off, mask=ok[:, None], other=0.0).to(tl.float32)
    c = tl.load(COS + off, mask=ok[:, None], other=1.0).to(tl.float32)
    return s, c


@triton.jit
def _unrotate(g1, g2, s, c):
    """Adjoint of the rotation on (BLOCK, HALF) halves."""
    return g1 * c + g2 * s, g2 * c - g1 * s


@triton.jit
def _rope_rows(X, Y, x_off, y_off, ok, s, c, scale, ADJOINT: tl.constexpr, ROUND: tl.constexpr,
               HALF: tl.constexpr):
    """Y[rows] = rot(X[rows]) or its adjoint; x_off, y_off: (BLOCK, HALF) offsets of the first halves."""
    x1 = tl.load(X + x_off, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + HALF, mask=ok, other=0.0).to(tl.float32)
    if ADJOINT:
        y1, y2 = _unrotate(x1 * scale, x2 * scale, s, c)
    else:  # the reference's rounding sequence: cast to the rope dtype, two products, their sum
        x1, x2 = _round(x1, ROUND), _round(x2, ROUND)
        y1 = _round(_round(x1 * c, ROUND) + _round(-x2 * s, ROUND), ROUND)
        y2 = _round(_round(x2 * c, ROUND) + _round(x1 * s, ROUND), ROUND)
    tl.store(Y + y_off, y1.to(Y.dtype.element_ty), mask=ok)
    tl.store(Y + y_off + HALF, y2.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _rope(X, Y, X2, Y2, SIN, COS, SEQ_START, SEQ_LEN, x_b, x_h, x_t, y_b, y_h, y_t, H, scale,
          PAIR: tl.constexpr, ADJOINT: tl.constexpr, HAS_ROPE: tl.constexpr, ROUND: tl.constexpr,
          HALF: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK rows of X -> Y (and X2 -> Y2 with the same strides when PAIR): rotated (q, k before the forward), or
    with ADJOINT scaled by `scale` and rotated back (dq after the backward; HAS_ROPE False: only scaled)."""
    seq, head, start, n = _sequence(SEQ_START, SEQ_LEN, H)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n
    half = tl.arange(0, HALF)[None, :]
    x_off = _base(seq, head, start, x_b, x_h, x_t) + rows[:, None].to(tl.int64) * x_t + half
    y_off = _base(seq, head, start, y_b, y_h, y_t) + rows[:, None].to(tl.int64) * y_t + half
    if HAS_ROPE:
        s, c = _tables(SIN, COS, start + rows, ok, HALF)
    else:
        s, c = tl.zeros([BLOCK, HALF], tl.float32), tl.full([BLOCK, HALF], 1.0, tl.float32)
    _rope_rows(X, Y, x_off, y_off, ok[:, None], s, c, scale, ADJOINT, ROUND, HALF)
    if PAIR:
        _rope_rows(X2, Y2, x_off, y_off, ok[:, None], s, c, scale, ADJOINT, ROUND, HALF)


@triton.jit
def _delta(O, DO, DELTA, SEQ_START, SEQ_LEN, o_b, o_h, o_t, do_b, do_h, do_t, H, LMAX,
           D: tl.constexpr, BLOCK: tl.constexpr):
    """delta = rowsum(dO * O) for BLOCK query rows, stored like the log-sum-exp."""
    seq, head, start, n = _sequence(SEQ_START, SEQ_LEN, H)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    o = _load(O + _base(seq, head, start, o_b, o_h, o_t), rows, n, o_t, D, True).to(tl.float32)
    do = _load(DO + _base(seq, head, start, do_b, do_h, do_t), rows, n, do_t, D, True).to(tl.float32)
    tl.store(DELTA + tl.program_id(1).to(tl.int64) * LMAX + rows, tl.sum(o * do, 1), mask=rows < n)


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_tile(q, K, V, k_t, v_t, rows, col0, n, m_i, l_i, acc, qk_scale,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """One online-softmax step over keys col0 .. col0 + BLOCK_N; q (BLOCK_M, D), acc (BLOCK_M, D) fp32."""
    cols = col0 + tl.arange(0, BLOCK_N)
    k = _load(K, cols, n, k_t, D, MASK)  # (BLOCK_N, D)
    v = _load(V, cols, n, v_t, D, MASK)
    s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
    if MASK:
        keep = (cols < n)[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _fwd_rows(Q, K, V, O, LSE, row0, n, qk_t, v_t, o_t, qk_scale,
              ROW_MASK: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """Queries row0 .. row0 + BLOCK_M against their keys -> O rows and log2-sum-exp (Q, K, V, O, LSE at the
    sequence's token 0)."""
    rows = row0 + tl.arange(0, BLOCK_M)
    q = _load(Q, rows, n, qk_t, D, ROW_MASK)  # (BLOCK_M, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # keys no row of the block masks: all of them, or (causal) those up to the block's first row
    full = (tl.minimum(n, row0 + 1) if CAUSAL else n) // BLOCK_N * BLOCK_N
    end = tl.minimum(n, row0 + BLOCK_M) if CAUSAL else n
    for col0 in range(0, loop_bound(full), BLOCK_N):
        m_i, l_i, acc = _fwd_tile(q, K, V, qk_t, v_t, rows, col0, n, m_i, l_i, acc, qk_scale,
                                  False, CAUSAL, D, BLOCK_N)
    for col0 in range(loop_bound(full), loop_bound(end), TAIL):
        m_i, l_i, acc = _fwd_tile(q, K, V, qk_t, v_t, rows, col0, n, m_i, l_i, acc, qk_scale,
                                  True, CAUSAL, D, TAIL)
    out = (acc / l_i[:, None]).to(O.dtype.element_ty)
    if ROW_MASK:
        tl.store(_rows_ptr(O, rows, o_t, D), out, mask=(rows < n)[:, None])
        tl.store(LSE + rows, m_i + tl.log2(l_i), mask=rows < n)
    else:
        tl.store(_rows_ptr(O, rows, o_t, D), out)
        tl.store(LSE + rows, m_i + tl.log2(l_i))


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, SEQ_START, SEQ_LEN, qk_b, qk_h, qk_t, v_b, v_h, v_t, o_b, o_h, o_t, H, LMAX,
              qk_scale, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Queries pid * BLOCK_M .. + BLOCK_M of one (sequence, head); a block cut by the sequence's end runs in
    TAIL-row pieces."""
    seq, head, start, n = _sequence(SEQ_START, SEQ_LEN, H)
    row0 = tl.program_id(0) * BLOCK_M
    if row0 >= n:
        return
    Q += _base(seq, head, start, qk_b, qk_h, qk_t)
    K += _base(seq, head, start, qk_b, qk_h, qk_t)
    V += _base(seq, head, start, v_b, v_h, v_t)
    O += _base(seq, head, start, o_b, o_h, o_t)
    LSE += tl.program_id(1).to(tl.int64) * LMAX
    if row0 + BLOCK_M <= n:
        _fwd_rows(Q, K, V, O, LSE, row0, n, qk_t, v_t, o_t, qk_scale, False, CAUSAL, D, BLOCK_M, BLOCK_N)
    else:
        for r0 in range(loop_bound(row0), loop_bound(n), TAIL):
            _fwd_rows(Q, K, V, O, LSE, r0, n, qk_t, v_t, o_t, qk_scale, True, CAUSAL, D, TAIL, BLOCK_N)


# ------------------------------------------------------------------------------------------------ backward
@triton.jit
def _bwd_tile(Q, DO, LSE, DELTA, DQ, k, v, dk, dv, cols, row0, n, qk_t, do_t, g_t, qk_scale,
              ROW_MASK: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Queries row0 .. row0 + BLOCK_M against the program's keys (k, v: (BLOCK_N, D)): accumulates dk, dv
    (BLOCK_N, D) fp32 and adds the rows' dq share into DQ. Padded rows (q, dO 0, lse +inf) and padded keys (k, v 0)
    give P = 0 or a zero dQ share, so only causality needs a mask."""
    rows = row0 + tl.arange(0, BLOCK_M)
    q = _load(Q, rows, n, qk_t, D, ROW_MASK)  # (BLOCK_M, D)
    do = _load(DO, rows, n, do_t, D, ROW_MASK)
    if ROW_MASK:
        lse = tl.load(LSE + rows, mask=rows < n, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=rows < n, other=0.0)
    else:
        lse = tl.load(LSE + rows)
        delta = tl.load(DELTA + rows)
    # transposed scores: keys x queries, so that dV and dK take P^T and dS^T without a transpose
    p = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
    if CAUSAL:
        p = tl.where(cols[:, None] <= rows[None, :], p, 0.0)
    dv = tl.dot(p.to(do.dtype), do, dv)
    dp = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M)
    ds = (p * (dp - delta[None, :])).to(q.dtype)
    dk = tl.dot(ds, q, dk)
    dq = tl.dot(tl.trans(ds), k)  # (BLOCK_M, D), unscaled
    if ROW_MASK:
        tl.atomic_add(_rows_ptr(DQ, rows, g_t, D), dq, mask=(rows < n)[:, None], sem="relaxed")
    else:
        tl.atomic_add(_rows_ptr(DQ, rows, g_t, D), dq, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_cols(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, SIN, COS, start, col0, n, qk_t, v_t, do_t, g_t, qk_scale,
              sm_scale, COL_MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_ROPE: tl.constexpr, D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of keys col0 .. col0 + BLOCK_N (all pointers at the sequence's token 0)."""
    cols = col0 + tl.arange(0, BLOCK_N)
    k = _load(K, cols, n, qk_t, D, COL_MASK)  # (BLOCK_N, D)
    v = _load(V, cols, n, v_t, D, COL_MASK)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    first = col0 if CAUSAL else 0  # earlier queries see none of these keys
    full = first + (n - first) // BLOCK_M * BLOCK_M
    for row0 in range(loop_bound(first), loop_bound(full), BLOCK_M):
        dk, dv = _bwd_tile(Q, DO, LSE, DELTA, DQ, k, v, dk, dv, cols, row0, n, qk_t, do_t, g_t, qk_scale,
                           False, CAUSAL, D, BLOCK_M)
    for row0 in range(loop_bound(full), loop_bound(n), TAIL):
        dk, dv = _bwd_tile(Q, DO, LSE, DELTA, DQ, k, v, dk, dv, cols, row0, n, qk_t, do_t, g_t, qk_scale,
                           True, CAUSAL, D, TAIL)
    ok = (cols < n)[:, None]
    tl.store(_rows_ptr(DV, cols, g_t, D), dv.to(DV.dtype.element_ty), mask=ok)
    dk = dk * sm_scale
    if HAS_ROPE:  # back from rotated coordinates: split D into its halves
        HALF: tl.constexpr = D // 2
        dk1, dk2 = tl.split(tl.permute(tl.reshape(dk, (BLOCK_N, 2, HALF)), (0, 2, 1)))  # 2 x (BLOCK_N, HALF)
        s, c = _tables(SIN, COS, start + cols, cols < n, HALF)
        dk1, dk2 = _unrotate(dk1, dk2, s, c)
        ptr = DK + cols[:, None].to(tl.int64) * g_t + tl.arange(0, HALF)[None, :]
        tl.store(ptr, dk1.to(DK.dtype.element_ty), mask=ok)
        tl.store(ptr + HALF, dk2.to(DK.dtype.element_ty), mask=ok)
    else:
        tl.store(_rows_ptr(DK, cols, g_t, D), dk.to(DK.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["block0"])  # one compiled kernel for every block0 of a deterministic backward
def _attn_bwd(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, SIN, COS, SEQ_START, SEQ_LEN,
              qk_b, qk_h, qk_t, v_b, v_h, v_t, do_b, do_h, do_t, g_b, g_h, g_t, H, LMAX, block0, qk_scale, sm_scale,
              CAUSAL: tl.constexpr, HAS_ROPE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """Keys (block0 + pid) * BLOCK_N .. + BLOCK_N of one (sequence, head); a block cut by the sequence's end runs
    in TAIL-key pieces. Q, K: rotated; DQ: fp32 accumulator of dS k (unscaled, rotated coordinates); DQ, DK, DV
    share the g_* strides."""
    seq, head, start, n = _sequence(SEQ_START, SEQ_LEN, H)
    col0 = (block0 + tl.program_id(0)) * BLOCK_N
    if col0 >= n:
        return
    Q += _base(seq, head, start, qk_b, qk_h, qk_t)
    K += _base(seq, head, start, qk_b, qk_h, qk_t)
    V += _base(seq, head, start, v_b, v_h, v_t)
    DO += _base(seq, head, start, do_b, do_h, do_t)
    DQ += _base(seq, head, start, g_b, g_h, g_t)
    DK += _base(seq, head, start, g_b, g_h, g_t)
    DV += _base(seq, head, start, g_b, g_h, g_t)
    LSE += tl.program_id(1).to(tl.int64) * LMAX
    DELTA += tl.program_id(1).to(tl.int64) * LMAX
    if col0 + BLOCK_N <= n:
        _bwd_cols(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, SIN, COS, start, col0, n, qk_t, v_t, do_t, g_t, qk_scale,
                  sm_scale, False, CAUSAL, HAS_ROPE, D, BLOCK_M, BLOCK_N)
    else:
        for c0 in range(loop_bound(col0), loop_bound(n), TAIL):
            _bwd_cols(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, SIN, COS, start, c0, n, qk_t, v_t, do_t, g_t, qk_scale,
                      sm_scale, True, CAUSAL, HAS_ROPE, D, BLOCK_M, TAIL)


# ------------------------------------------------------------------------------------------------ launchers
ROUND_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ROWS = 64  # rows per program of the row-wise passes (_rope, _delta)


# (arch >= 90, head_dim <= 64) -> (BLOCK_M, BLOCK_N, num_warps, num_stages) of the backward; chosen with the
# compile gate (vtp-fast kernels check) for no spills and no serialised wgmma. The forward runs 128 x 64 tiles
# on 8 warps everywhere.
_BWD = {(True, True): (64, 64, 4, 2), (True, False): (32, 64, 8, 2),
        (False, True): (32, 64, 8, 2), (False, False): (32, 64, 8, 2)}


def _config(q: torch.Tensor) -> tuple[dict, dict]:
    """Tiles, warps and stages of the forward and the backward for q's target, dtype and head_dim."""
    arch = gpu_arch(q)
    if arch is None:  # the CPU interpreter: small tiles keep it fast; 32 > TAIL exercises both tile widths
        return dict(BLOCK_M=32, BLOCK_N=32), dict(BLOCK_M=32, BLOCK_N=32)
    if q.dtype == torch.float32:
        raise NotImplementedError("fp32 attention is not offered on CUDA (fp32 tiles exceed the register file; "
                                  "the op runs fp32 through SDPA)")
    fwd = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    bm, bn, warps, stages = _BWD[arch >= 90, q.shape[-1] <= 64]
    return fwd, dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)


def _strides3(x: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """(batch, head, token) strides: dense (B, H, N, D) or varlen (T, H, D) (batch stride 0)."""
    if layout == "dense":
        return x.stride(0), x.stride(1), x.stride(2)
    return 0, x.stride(1), x.stride(0)


def _row_grid(lmax: int, n_seq: int, h: int, rows: int) -> tuple[int, int]:
    return triton.cdiv(lmax, rows), n_seq * h


def _rows_per_program(q: torch.Tensor) -> int:
    return 32 if gpu_arch(q) is None else ROWS


def forward(q, k, v, sin, cos, seq_start, seq_len, lmax: int, causal: bool, layout: str):
    """q, k, v: (B, H, N, D) (dense) or (T, H, D) (varlen), q and k with the same strides; sin, cos: (N or T, D)
    or None.
    Returns (out, lse, qs, ks): out (B, H, N, D) view of a (B, N, H, D) buffer (dense) or (T, H, D); lse
    (S * H, lmax) fp32 (base 2); qs, ks: what `backward` takes as q, k (contiguous rotated copies with RoPE,
    else q and k themselves)."""
    fwd, _ = _config(q)
    d, h, n_seq, lmax = q.shape[-1], q.shape[1], seq_len.shape[0], max(lmax, 1)
    if sin is not None:
        qs, ks = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(2))
        rows = _rows_per_program(q)
        launch(_rope, _row_grid(lmax, n_seq, h, rows), q, qs, k, ks, sin, cos, seq_start, seq_len,
               *_strides3(q, layout), *_strides3(qs, layout), h, 1.0, PAIR=True, ADJOINT=False, HAS_ROPE=True,
               ROUND=ROUND_CODES[sin.dtype], HALF=d // 2, BLOCK=rows)
        q, k = qs, ks
    if layout == "dense":
        b, _, n, _ = q.shape
        out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)
    else:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(n_seq * h, lmax, dtype=torch.float32, device=q.device)
    launch(_attn_fwd, (triton.cdiv(lmax, fwd["BLOCK_M"]), n_seq * h), q, k, v, out, lse, seq_start, seq_len,
           *_strides3(q, layout), *_strides3(v, layout), *_strides3(out, layout), h, lmax, d ** -0.5 * LOG2E,
           CAUSAL=causal, D=d, **fwd)
    return out, lse, q, k


def backward(do, q, k, v, out, lse, sin, cos, seq_start, seq_len, lmax: int, causal: bool, layout: str,
             deterministic: bool = False):
    """do, v, out: like the forward's; q, k: the forward's qs, ks (rotated with RoPE). deterministic: dQ summed
    in a fixed order (one launch per key block column). Returns (dq, dk, dv), each a fresh contiguous tensor of
    q's shape."""
    _, bwd = _config(q)
    d, h, n_seq, lmax = q.shape[-1], q.shape[1], seq_len.shape[0], max(lmax, 1)
    rows = _rows_per_program(q)
    delta = torch.empty_like(lse)  # (S * H, lmax)
    launch(_delta, _row_grid(lmax, n_seq, h, rows), out, do, delta, seq_start, seq_len, *_strides3(out, layout),
           *_strides3(do, layout), h, lmax, D=d, BLOCK=rows)
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    has_rope = sin is not None
    args = (q, k, v, do, lse, delta, dq_acc, dk, dv, sin if has_rope else dq, cos if has_rope else dq, seq_start,
            seq_len, *_strides3(q, layout), *_strides3(v, layout), *_strides3(do, layout), *_strides3(dk, layout), h,
            lmax)
    meta = dict(CAUSAL=causal, HAS_ROPE=has_rope, D=d, **bwd)
    blocks = triton.cdiv(lmax, bwd["BLOCK_N"])
    if deterministic:  # one key block column per launch: the dQ additions land in launch order
        for block0 in range(blocks):
            launch(_attn_bwd, (1, n_seq * h), *args, block0, d ** -0.5 * LOG2E, d ** -0.5, **meta)
    else:
        launch(_attn_bwd, (blocks, n_seq * h), *args, 0, d ** -0.5 * LOG2E, d ** -0.5, **meta)
    launch(_rope, _row_grid(lmax, n_seq, h, rows), dq_acc, dq, dq_acc, dq, sin if has_rope else dq,
           cos if has_rope else dq, seq_start, seq_len, *_strides3(dq_acc, layout), *_strides3(dq, layout), h,
           d ** -0.5, PAIR=False, ADJOINT=True, HAS_ROPE=has_rope, ROUND=0, HALF=d // 2, BLOCK=rows)
    return dq, dk, dv
