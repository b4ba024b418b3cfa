"""Triton FlashAttention (forward and backward) with the 2-D RoPE rotation of q and k fused in.

One kernel family serves two layouts:
  dense   q, k, v: (B, H, N, D) views (any batch/head/token strides, unit stride on D)
  varlen  q, k, v: (T, H, D) packed sequences of different lengths (multi-crop views), `seq_start` / `seq_len`
          (S,) int32 per sequence; one launch covers all of them.
RoPE is given per token as sin/cos rows of D values (prefix tokens carry sin 0, cos 1). The rotation is computed
in halves of D: for x = [x1, x2], rot(x) = [x1 c - x2 s, x2 c + x1 s], so no register permutation is needed; with
ROUND = 1 (bf16) or 2 (fp16) every intermediate is rounded to that dtype exactly as the PyTorch reference rounds
it (cast, product, product, sum), which makes the published bf16 numerics reproducible inside the kernel. The
softmax runs in base 2 (exp2) with the log-sum-exp saved for the backward; all accumulation is fp32.
"""

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _round(x, ROUND: tl.constexpr):
    if ROUND == 1:
        x = x.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _load_halves(ptr, rows, row_ok, stride_t, HALF: tl.constexpr):
    """Two (BLOCK, HALF) fp32 tiles: columns [0, HALF) and [HALF, 2 * HALF) of the given rows."""
    cols = tl.arange(0, HALF)
    p = ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :]
    x1 = tl.load(p, mask=row_ok[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(p + HALF, mask=row_ok[:, None], other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _load_rope(sin_ptr, cos_ptr, rope_rows, row_ok, HALF: tl.constexpr):
    """sin, cos halves (the tables repeat after HALF columns, so one half serves both)."""
    cols = tl.arange(0, HALF)
    off = rope_rows[:, None].to(tl.int64) * (2 * HALF) + cols[None, :]
    s = tl.load(sin_ptr + off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + off, mask=row_ok[:, None], other=1.0).to(tl.float32)
    return s, c


@triton.jit
def _rotate(x1, x2, s, c, ROUND: tl.constexpr):
    """Forward rotation with the reference's rounding sequence."""
    x1 = _round(x1, ROUND)
    x2 = _round(x2, ROUND)
    y1 = _round(_round(x1 * c, ROUND) + _round(-x2 * s, ROUND), ROUND)
    y2 = _round(_round(x2 * c, ROUND) + _round(x1 * s, ROUND), ROUND)
    return y1, y2


@triton.jit
def _load_qk(ptr, rows, row_ok, s_t, SIN, COS, start, dt, HALF: tl.constexpr, HAS_ROPE: tl.constexpr,
             ROUND: tl.constexpr):
    """q or k rows as two (BLOCK, HALF) halves in dtype dt, rotated when HAS_ROPE; also the rows' sin/cos."""
    x1, x2 = _load_halves(ptr, rows, row_ok, s_t, HALF)
    if HAS_ROPE:
        s, c = _load_rope(SIN, COS, start + rows, row_ok, HALF)
        x1, x2 = _rotate(x1, x2, s, c, ROUND)
    else:  # placeholders of the right shape, never read
        s, c = x1, x2
    return x1.to(dt), x2.to(dt), s, c


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """fp32 inputs stay fp32 (ieee; no tf32), as torch computes them."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _scores(q1, q2, k1, k2, IEEE: tl.constexpr):
    """q k^T from halves: (BM, HALF) x 2, (BN, HALF) x 2 -> (BM, BN)."""
    return _dot(q1, tl.trans(k1), IEEE) + _dot(q2, tl.trans(k2), IEEE)


@triton.jit
def _unrotate(g1, g2, s, c):
    """Adjoint of the rotation (the roundings pass gradients straight through, as autograd does)."""
    return g1 * c + g2 * s, g2 * c - g1 * s


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, SIN, COS, SEQ_START, SEQ_LEN,
              s_b, s_h, s_t, o_b, o_h, o_t, H, LMAX, qk_scale,
              CAUSAL: tl.constexpr, HAS_ROPE: tl.constexpr, ROUND: tl.constexpr, IEEE: tl.constexpr,
              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    HALF: tl.constexpr = D // 2
    pid_m, pid_sh = tl.program_id(0), tl.program_id(1)
    seq, head = pid_sh // H, pid_sh % H
    start = tl.load(SEQ_START + seq)
    n = tl.load(SEQ_LEN + seq)
    if pid_m * BLOCK_M >= n:
        return
    base = seq.to(tl.int64) * s_b + head.to(tl.int64) * s_h + start.to(tl.int64) * s_t
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    dt = Q.dtype.element_ty
    q1, q2, _, _ = _load_qk(Q + base, rows, row_ok, s_t, SIN, COS, start, dt, HALF, HAS_ROPE, ROUND)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    d_cols = tl.arange(0, D)
    end = tl.minimum(n, (pid_m + 1) * BLOCK_M) if CAUSAL else n
    for col0 in range(0, end, BLOCK_N):
        cols = col0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        k1, k2, _, _ = _load_qk(K + base, cols, col_ok, s_t, SIN, COS, start, dt, HALF, HAS_ROPE, ROUND)
        qk = _scores(q1, q2, k1, k2, IEEE) * qk_scale  # log2 domain
        keep = col_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + base + cols[:, None].to(tl.int64) * s_t + d_cols[None, :], mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(dt), v, IEEE)
        m_i = m_new
    out = acc / l_i[:, None]
    o_base = seq.to(tl.int64) * o_b + head.to(tl.int64) * o_h + start.to(tl.int64) * o_t
    tl.store(O + o_base + rows[:, None].to(tl.int64) * o_t + d_cols[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + pid_sh.to(tl.int64) * LMAX + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, SIN, COS, SEQ_START, SEQ_LEN,
                   s_b, s_h, s_t, do_b, do_h, do_t, g_b, g_h, g_t, H, LMAX, qk_scale, sm_scale,
                   CAUSAL: tl.constexpr, HAS_ROPE: tl.constexpr, ROUND: tl.constexpr, IEEE: tl.constexpr,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One block of keys/values against every query block: dV = P^T dO, dK = dS^T Q (then un-rotated)."""
    HALF: tl.constexpr = D // 2
    pid_n, pid_sh = tl.program_id(0), tl.program_id(1)
    seq, head = pid_sh // H, pid_sh % H
    start = tl.load(SEQ_START + seq)
    n = tl.load(SEQ_LEN + seq)
    if pid_n * BLOCK_N >= n:
        return
    base = seq.to(tl.int64) * s_b + head.to(tl.int64) * s_h + start.to(tl.int64) * s_t
    do_base = seq.to(tl.int64) * do_b + head.to(tl.int64) * do_h + start.to(tl.int64) * do_t
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n
    d_cols = tl.arange(0, D)
    dt = Q.dtype.element_ty
    k1, k2, ks, kc = _load_qk(K + base, cols, col_ok, s_t, SIN, COS, start, dt, HALF, HAS_ROPE, ROUND)
    v = tl.load(V + base + cols[:, None].to(tl.int64) * s_t + d_cols[None, :], mask=col_ok[:, None], other=0.0)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    dk1 = tl.zeros([BLOCK_N, HALF], tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF], tl.float32)
    first = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for row0 in range(first, n, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n
        q1, q2, _, _ = _load_qk(Q + base, rows, row_ok, s_t, SIN, COS, start, dt, HALF, HAS_ROPE, ROUND)
        qk = _scores(q1, q2, k1, k2, IEEE)
        lse = tl.load(LSE + pid_sh.to(tl.int64) * LMAX + rows, mask=row_ok, other=float("inf"))
        p = tl.exp2(qk * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
        keep = col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        p = tl.where(keep, p, 0.0)
        do = tl.load(DO + do_base + rows[:, None].to(tl.int64) * do_t + d_cols[None, :], mask=row_ok[:, None],
                     other=0.0)
        delta = tl.load(DELTA + pid_sh.to(tl.int64) * LMAX + rows, mask=row_ok, other=0.0)
        dv += _dot(tl.trans(p.to(dt)), do, IEEE)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = (p * (dp - delta[:, None])).to(dt)
        dk1 += _dot(tl.trans(ds), q1, IEEE)
        dk2 += _dot(tl.trans(ds), q2, IEEE)
    dk1, dk2 = dk1 * sm_scale, dk2 * sm_scale
    if HAS_ROPE:
        dk1, dk2 = _unrotate(dk1, dk2, ks, kc)
    g_base = seq.to(tl.int64) * g_b + head.to(tl.int64) * g_h + start.to(tl.int64) * g_t
    half_cols = tl.arange(0, HALF)
    ptr = g_base + cols[:, None].to(tl.int64) * g_t + half_cols[None, :]
    tl.store(DK + ptr, dk1.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DK + ptr + HALF, dk2.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + g_base + cols[:, None].to(tl.int64) * g_t + d_cols[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None])


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, SIN, COS, SEQ_START, SEQ_LEN,
                 s_b, s_h, s_t, do_b, do_h, do_t, g_b, g_h, g_t, H, LMAX, qk_scale, sm_scale,
                 CAUSAL: tl.constexpr, HAS_ROPE: tl.constexpr, ROUND: tl.constexpr, IEEE: tl.constexpr,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One block of queries against every key block: dQ = dS K (then un-rotated)."""
    HALF: tl.constexpr = D // 2
    pid_m, pid_sh = tl.program_id(0), tl.program_id(1)
    seq, head = pid_sh // H, pid_sh % H
    start = tl.load(SEQ_START + seq)
    n = tl.load(SEQ_LEN + seq)
    if pid_m * BLOCK_M >= n:
        return
    base = seq.to(tl.int64) * s_b + head.to(tl.int64) * s_h + start.to(tl.int64) * s_t
    do_base = seq.to(tl.int64) * do_b + head.to(tl.int64) * do_h + start.to(tl.int64) * do_t
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    d_cols = tl.arange(0, D)
    dt = Q.dtype.element_ty
    q1, q2, s, c = _load_qk(Q + base, rows, row_ok, s_t, SIN, COS, start, dt, HALF, HAS_ROPE, ROUND)
    do = tl.load(DO + do_base + rows[:, None].to(tl.int64) * do_t + d_cols[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + pid_sh.to(tl.int64) * LMAX + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_sh.to(tl.int64) * LMAX + rows, mask=row_ok, other=0.0)
    dq1 = tl.zeros([BLOCK_M, HALF], tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF], tl.float32)
    end = tl.minimum(n, (pid_m + 1) * BLOCK_M) if CAUSAL else n
    for col0 in range(0, end, BLOCK_N):
        cols = col0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        k1, k2, _, _ = _load_qk(K + base, cols, col_ok, s_t, SIN, COS, start, dt, HALF, HAS_ROPE, ROUND)
        v = tl.load(V + base + cols[:, None].to(tl.int64) * s_t + d_cols[None, :], mask=col_ok[:, None], other=0.0)
        qk = _scores(q1, q2, k1, k2, IEEE)
        dp = _dot(do, tl.trans(v), IEEE)
        p = tl.exp2(qk * qk_scale - lse[:, None])
        keep = col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        p = tl.where(keep, p, 0.0)
        ds = (p * (dp - delta[:, None])).to(dt)
        dq1 += _dot(ds, k1, IEEE)
        dq2 += _dot(ds, k2, IEEE)
    dq1, dq2 = dq1 * sm_scale, dq2 * sm_scale
    if HAS_ROPE:
        dq1, dq2 = _unrotate(dq1, dq2, s, c)
    g_base = seq.to(tl.int64) * g_b + head.to(tl.int64) * g_h + start.to(tl.int64) * g_t
    half_cols = tl.arange(0, HALF)
    ptr = g_base + rows[:, None].to(tl.int64) * g_t + half_cols[None, :]
    tl.store(DQ + ptr, dq1.to(DQ.dtype.element_ty), mask=row_ok[:, None])
    tl.store(DQ + ptr + HALF, dq2.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ------------------------------------------------------------------------------------------------ launchers
ROUND_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _blocks(device: torch.device) -> tuple[int, int]:
    return (64, 64) if device.type == "cuda" else (16, 16)


def _strides3(x: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """(batch, head, token) strides: dense (B, H, N, D) or varlen (T, H, D) (batch stride 0)."""
    if layout == "dense":
        return x.stride(0), x.stride(1), x.stride(2)
    return 0, x.stride(1), x.stride(0)


def forward(q, k, v, sin, cos, seq_start, seq_len, lmax: int, causal: bool, layout: str):
    """Returns (out, lse). out: (B, H, N, D) view of a (B, N, H, D) buffer (dense) or (T, H, D) (varlen)."""
    d = q.shape[-1]
    if layout == "dense":
        b, h, n, _ = q.shape
        out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)
    else:
        h = q.shape[1]
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    n_seq = seq_len.shape[0]
    lse = torch.empty(n_seq * h, max(lmax, 1), dtype=torch.float32, device=q.device)
    block_m, block_n = _blocks(q.device)
    has_rope = sin is not None
    grid = (triton.cdiv(max(lmax, 1), block_m), n_seq * h)
    _attn_fwd[grid](q, k, v, out, lse, sin if has_rope else q, cos if has_rope else q, seq_start, seq_len,
                    *_strides3(q, layout), *_strides3(out, layout), h, max(lmax, 1), d ** -0.5 * LOG2E,
                    CAUSAL=causal, HAS_ROPE=has_rope, ROUND=ROUND_CODES[sin.dtype] if has_rope else 0,
                    IEEE=q.dtype == torch.float32, D=d, BLOCK_M=block_m, BLOCK_N=block_n)
    return out, lse


def backward(do, q, k, v, out, lse, sin, cos, seq_start, seq_len, lmax: int, causal: bool, layout: str):
    """Returns (dq, dk, dv), each shaped like q (fresh contiguous buffers)."""
    d = q.shape[-1]
    h = q.shape[1]
    n_seq = seq_len.shape[0]
    # delta = rowsum(dO * O), laid out like the log-sum-exp: (sequences * heads, lmax)
    if layout == "dense":
        delta = (do.float() * out.float()).sum(-1).reshape(n_seq * h, -1)  # (B, H, N) -> (B * H, N)
    else:
        rowsum = (do.float() * out.float()).sum(-1)  # (T, H)
        delta = torch.zeros(n_seq * h, max(lmax, 1), dtype=torch.float32, device=q.device)
        seq_of = torch.repeat_interleave(torch.arange(n_seq, device=q.device), seq_len.long(),
                                         output_size=rowsum.shape[0])  # (T,)
        pos = torch.arange(rowsum.shape[0], device=q.device) - seq_start.long()[seq_of]
        heads = torch.arange(h, device=q.device)
        delta[seq_of[:, None] * h + heads[None, :], pos[:, None]] = rowsum
    delta = delta.contiguous()
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    block_m, block_n = _blocks(q.device)
    has_rope = sin is not None
    args = dict(CAUSAL=causal, HAS_ROPE=has_rope, ROUND=ROUND_CODES[sin.dtype] if has_rope else 0,
                IEEE=q.dtype == torch.float32, D=d, BLOCK_M=block_m, BLOCK_N=block_n)
    common = (sin if has_rope else q, cos if has_rope else q, seq_start, seq_len, *_strides3(q, layout),
              *_strides3(do, layout), *_strides3(dq, layout), h, max(lmax, 1), d ** -0.5 * LOG2E, d ** -0.5)
    grid = (triton.cdiv(max(lmax, 1), block_n), n_seq * h)
    _attn_bwd_dkdv[grid](q, k, v, do, lse, delta, dk, dv, *common, **args)
    grid = (triton.cdiv(max(lmax, 1), block_m), n_seq * h)
    _attn_bwd_dq[grid](q, k, v, do, lse, delta, dq, *common, **args)
    return dq, dk, dv
