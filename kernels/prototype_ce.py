"""Triton kernels for the prototype cross-entropy (semantics: vtp_fast/ops/prototype_ce.py).

Per row i and prototype k, with x = student, y = teacher, w = the prototype weight, c = the centre:
  s_ik = x_i . w_k / student_temp,   t_ik = (y_i . w_k - c_k) / teacher_temp,
  loss_i = LSE_k(s_i) - sum_k softmax(t_i)_k s_ik.
The kernels hold logits in base 2 (s2 = log2(e) s) so that every softmax is an exp2. Per row the forward saves
stats (4, n) = (m_s, l_s, m_t, l_t): the maximum of the base-2 logits and the sum of exp2(logit - maximum), from
which the backward rebuilds p = exp2(logit - m) / l (keeping m and l apart, rather than one log-sum-exp, keeps
logit - m exact near the maximum). With P = p_s - p_t (n, K), the loss's gradient w.r.t. s:
  grad x_i = (g_i / student_temp) sum_k P_ik w_k,   grad w_k = (1 / student_temp) sum_i g_i P_ik x_i.

Work, in GEMM units of n x K x d multiply-adds (WORK below): the forward streams over K once with online
rescaling (s and t: 2 units). The backward recomputes s and t once (2 units) in a kernel that owns a prototype
block and walks the rows: it accumulates grad w in registers (1 unit) and writes P^T, 16-bit for 16-bit inputs,
into a buffer of at most CHUNK_ELEMENTS elements; a second kernel finishes grad x = P w from it (1 unit). K is
processed in chunks so that the buffer stays bounded (64 MiB in bf16 on a GPU, whatever n and K). Doing grad x
in the first kernel instead would need either atomics (non-deterministic) or per-prototype-block partial sums of
(n, d), d / BLOCK_N times larger than P itself.

Launchers take contiguous tensors: x, y (n, d) and w, v (K, d) of one dtype (fp16, bf16, fp32), c (K,) float32.
  forward(x, y, w, v, c, student_temp, teacher_temp)               -> loss (n,), stats (4, n): float32
  backward(g (n,) f32, x, y, w, v, c, stats, student_temp, teacher_temp, need_x, need_w)
                                                  -> grad x (n, d) or None, grad w (K, d) or None, input dtype
Both gradients are reduced deterministically (no atomics): when the grid would be too small to fill the GPU, the
reduced dimension is split into ranges whose fp32 partial results are summed in a fixed order afterwards.
"""

import math

import torch
import triton
import triton.language as tl
from vtp_fast.kernels import SMEM_LIMIT, gpu_arch, launch, loop_bound, split_reduction

LOG2E = math.log2(math.e)
# Split ranges and K chunks are multiples of every loop block a launch may use, so only the tensor's end is ragged.
GRANULE = {"gpu": 128, "cpu": 32}
# Elements of the backward's P^T buffer (chunk of K, n); tiny under the interpreter so that tests cross chunks.
CHUNK_ELEMENTS = {"gpu": 1 << 25, "cpu": 1 << 12}
# Under the interpreter (CPU tensors) there is no autotuning: 32 x 32 blocks.
INTERPRETER_BLOCK = 32

# The kernels' work for vtp_fast.measure.perf_model (its schema): GEMM units of n x K x d multiply-adds, tile padding
# n x K, DRAM passes over the prototype weights, launches (PyTorch glue included). Backward: s and t rebuilt once,
# grad w, grad x; its launches at the iBOT shape (n = 4096: 8 chunks of 8192 prototypes, each the grad-w kernel,
# the sum of its row-range partials into grad w, the grad-x kernel and the sum of its partials, then 3 to scale
# grad x); a single chunk (n <= 512) takes 6. "scratch_bytes": bytes per row and prototype through the P^T buffer
# (written once, read once, 16-bit).
WORK = {
    "fwd": {"gemms": 2, "tile": (64, 64), "passes": 1, "launches": 2},
    "bwd": {"gemms": 4, "tile": (64, 64), "passes": 2, "launches": 50, "scratch_bytes": 4},
}


def _configs(name: str, shapes: list[tuple[int, int, int]]) -> list[triton.Config]:
    return [triton.Config({name: b}, num_warps=w, num_stages=s) for b, w, s in shapes]


def _smem_fits(resident, streamed, scratch=lambda blocks, size: 0):
    """early_config_prune from a kernel's shared memory, in bytes given the blocks and the element size:
    `resident` tiles loaded once per program, `streamed` per pipeline buffer of its loop, `scratch` for operands
    staged from registers. As ptxas reports it (`vtp-fast kernels check`), the loop gets num_stages buffers where
    wgmma consumes them (sm_90, 16-bit inputs) and num_stages - 1 otherwise."""
    def prune(configs, named_args, **kwargs):
        w = named_args["w_ptr"]
        arch, size = gpu_arch(w), w.element_size()
        limit = SMEM_LIMIT.get(arch, SMEM_LIMIT[80]) - 2048  # barriers and row statistics

        def need(c):
            blocks = {**kwargs, **c.kwargs}
            buffers = c.num_stages if arch is not None and arch >= 90 and size == 2 else c.num_stages - 1
            return resident(blocks, size) + max(1, buffers) * streamed(blocks, size) + scratch(blocks, size)

        ok = [c for c in configs if need(c) <= limit]
        if not ok:
            raise ValueError(f"prototype_ce: no configuration fits sm_{arch}'s shared memory at d={kwargs['D']}")
        return ok
    return prune


def _row_tiles(blocks, size):  # an x and a y tile, (BLOCK_M, BLOCK_D) each
    return 2 * blocks["BLOCK_M"] * blocks["BLOCK_D"] * size


def _proto_tiles(blocks, size):  # a w and a v tile, (BLOCK_N, BLOCK_D) each
    return 2 * blocks["BLOCK_N"] * blocks["BLOCK_D"] * size


def _p_tile(blocks, size):  # P^T (BLOCK_N, BLOCK_M)
    return blocks["BLOCK_N"] * blocks["BLOCK_M"] * size


def _p_and_w_tiles(blocks, size):
    return _p_tile(blocks, size) + blocks["BLOCK_N"] * blocks["BLOCK_D"] * size


def _tuned(kernel, key: list[str], name: str, configs: dict[int, list[tuple[int, int, int]]], prune):
    """One autotuner per input element size (2: fp16 / bf16 on the tensor cores, 4: fp32 on the FMA units), each
    over its own (block, num_warps, num_stages) set, tuned once per `key` (never per row count, which changes
    every iBOT step)."""
    return {size: triton.autotune(_configs(name, shapes), key=key, prune_configs_by={"early_config_prune": prune})(
        kernel) for size, shapes in configs.items()}

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
    for k0 in range(loop_bound(k_lo), loop_bound(k_hi), BLOCK_N):
        ks = k0 + tl.arange(0, BLOCK_N)
        w = _load_tile(w_ptr, ks, K, D, BLOCK_D, not EVEN_K)
        v = _load_tile(v_ptr, ks, K, D, BLOCK_D, not EVEN_K)
        if EVEN_K:
            c = tl.load(c_ptr + ks)
        else:
            c = tl.load(c_ptr + ks, mask=ks < K, other=0.0)
        s = tl.dot(x, tl.trans(w), input_precision=PRECISION) * qs  # (BLOCK_M, BLOCK_N)
        t = (tl.dot(y, tl.trans(v), input_precision=PRECISION) - c[None, :]) * qt
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
    for j in range(loop_bound(splits)):
        big_s = tl.maximum(big_s, tl.load(part_ptr + j * n + rows, mask=ok, other=0.0))
        big_t = tl.maximum(big_t, tl.load(part_ptr + 2 * stride + j * n + rows, mask=ok, other=0.0))
    l_s = tl.zeros([BLOCK], tl.float32)
    l_t = tl.zeros([BLOCK], tl.float32)
    a = tl.zeros([BLOCK], tl.float32)
    for j in range(loop_bound(splits)):
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
def _grad_w_kernel(g_ptr, x_ptr, y_ptr, w_ptr, v_ptr, c_ptr, stats_ptr, dw_ptr, p_ptr, n, k0, kc, span, qs, qt,
                   g_scale, D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                   GRAD_W: tl.constexpr, WRITE_P: tl.constexpr):
    # Prototypes k0 + j, j in this program's block of the chunk [0, kc), against rows [split * span, ...):
    #   GRAD_W:  dw[split, j] = sum over the rows of (g / student_temp) P^T[j, rows] x[rows]   dw (splits, kc, D)
    #   WRITE_P: p[j, rows] = P^T[j, rows]                                                     p (>= kc, n)
    # The tiles are transposed, logits (BLOCK_N, BLOCK_M) = w x^T and grad w^T (BLOCK_D, BLOCK_N) += x^T (P^T g)^T,
    # so that both operands of the grad-w dot come from shared memory: with P^T as a register operand
    # (grad w += (P^T g) x) ptxas serialises the wgmma (C7515).
    split = tl.program_id(1)
    js = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = k0 + js
    k_ok = js < kc
    w = _load_tile(w_ptr, ks, k0 + kc, D, BLOCK_D, True)
    v = _load_tile(v_ptr, ks, k0 + kc, D, BLOCK_D, True)
    # Prototypes past the chunk (their results are dropped) get logits -inf, so exp2 cannot overflow there: t
    # through an infinite centre, s below.
    c = tl.load(c_ptr + ks, mask=k_ok, other=float("inf"))
    acc = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)  # grad w^T
    r_lo = split * span
    r_hi = tl.minimum(r_lo + span, n)
    for r0 in range(loop_bound(r_lo), loop_bound(r_hi), BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        x = _load_tile(x_ptr, rows, n, D, BLOCK_D, not EVEN_N)
        y = _load_tile(y_ptr, rows, n, D, BLOCK_D, not EVEN_N)
        # per-row softmax statistics; rows past n read m = +inf, so both of their probabilities are exactly 0
        # (their logits, from the centre alone, may be huge)
        if EVEN_N:
            m_s = tl.load(stats_ptr + rows)
            l_s = tl.load(stats_ptr + n + rows)
            m_t = tl.load(stats_ptr + 2 * n + rows)
            l_t = tl.load(stats_ptr + 3 * n + rows)
        else:
            row_ok = rows < n
            m_s = tl.load(stats_ptr + rows, mask=row_ok, other=float("inf"))
            l_s = tl.load(stats_ptr + n + rows, mask=row_ok, other=1.0)
            m_t = tl.load(stats_ptr + 2 * n + rows, mask=row_ok, other=float("inf"))
            l_t = tl.load(stats_ptr + 3 * n + rows, mask=row_ok, other=1.0)
        inv_s = 1.0 / l_s
        inv_t = 1.0 / l_t
        s = tl.dot(w, tl.trans(x), input_precision=PRECISION) * qs  # (BLOCK_N, BLOCK_M)
        t = (tl.dot(v, tl.trans(y), input_precision=PRECISION) - c[:, None]) * qt
        if not EVEN_K:
            s = tl.where(k_ok[:, None], s, float("-inf"))
        p = tl.exp2(s - m_s[None, :]) * inv_s[None, :] - tl.exp2(t - m_t[None, :]) * inv_t[None, :]
        if WRITE_P:
            out = p_ptr + js.to(tl.int64)[:, None] * n + rows[None, :]
            if EVEN_N and EVEN_K:
                tl.store(out, p.to(p_ptr.dtype.element_ty))
            else:
                tl.store(out, p.to(p_ptr.dtype.element_ty), mask=k_ok[:, None] & (rows < n)[None, :])
        if GRAD_W:
            if EVEN_N:
                g = tl.load(g_ptr + rows) * g_scale
            else:
                g = tl.load(g_ptr + rows, mask=rows < n, other=0.0) * g_scale
            acc = tl.dot(tl.trans(x), tl.trans((p * g[None, :]).to(x.dtype)), acc, input_precision=PRECISION)
    if GRAD_W:
        cols = tl.arange(0, BLOCK_D)
        out = dw_ptr + split.to(tl.int64) * kc * D + js.to(tl.int64)[None, :] * D + cols[:, None]
        tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=(cols < D)[:, None] & k_ok[None, :])


@triton.jit
def _grad_x_kernel(p_ptr, w_ptr, part_ptr, n, k0, kc, span, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
                   EVEN_K: tl.constexpr):
    # part[split, rows] = sum over j in [split * span, ...) of the chunk of P^T[j, rows]^T w[k0 + j]:
    # p (>= kc, n), w (K, D), part (splits, n, D) fp32
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    j_lo = split * span
    j_hi = tl.minimum(j_lo + span, kc)
    for j0 in range(loop_bound(j_lo), loop_bound(j_hi), BLOCK_N):
        js = j0 + tl.arange(0, BLOCK_N)
        ptrs = p_ptr + js.to(tl.int64)[:, None] * n + rows[None, :]
        if EVEN_N and EVEN_K:
            p = tl.load(ptrs)
        else:
            p = tl.load(ptrs, mask=(js < kc)[:, None] & (rows < n)[None, :], other=0.0)
        w = _load_tile(w_ptr, k0 + js, k0 + kc, D, BLOCK_D, not EVEN_K)
        acc = tl.dot(tl.trans(p), w, acc, input_precision=PRECISION)
    cols = tl.arange(0, BLOCK_D)
    out = part_ptr + split.to(tl.int64) * n * D + rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out, acc, mask=(rows < n)[:, None] & (cols < D)[None, :])


# EVEN_K / EVEN_N: the prototypes (K, or the chunk's kc) / rows divide into whole blocks: no masks in the loops.
_even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_N"] == 0})
_even_kc = triton.heuristics({"EVEN_K": lambda args: args["kc"] % args["BLOCK_N"] == 0})
_even_n = triton.heuristics({"EVEN_N": lambda args: args["n"] % args["BLOCK_M"] == 0})
_forward_plain = _even_k(_forward_kernel)
_grad_w_plain = _even_n(_even_kc(_grad_w_kernel))
_grad_x_plain = _even_n(_even_kc(_grad_x_kernel))
# A program's own block (rows for the forward and grad-x kernels, prototypes for the grad-w kernel) is fixed by
# the launcher, which must know the grid; the block it loops over is tuned: (size, num_warps, num_stages). The sets
# are sized for d = 256 (the DINO head's bottleneck) and the pruning keeps what fits the arch's shared memory
# (`vtp-fast kernels check` lists the survivors), which at smaller d leaves room for more stages.
_forward_tuned = _tuned(_forward_plain, ["D"], "BLOCK_N", {
    2: [(32, 4, 3), (32, 8, 4), (64, 4, 2), (64, 8, 2), (64, 8, 3), (128, 8, 2)],
    4: [(32, 4, 3), (32, 8, 2), (64, 8, 2)]}, _smem_fits(_row_tiles, _proto_tiles))
_grad_w_tuned = _tuned(_grad_w_plain, ["D", "GRAD_W", "WRITE_P"], "BLOCK_M", {
    2: [(32, 8, 3), (32, 8, 4), (64, 8, 2), (64, 8, 3)],
    4: [(16, 4, 3), (16, 8, 3), (32, 8, 2)]}, _smem_fits(_proto_tiles, _row_tiles, _p_tile))
_grad_x_tuned = _tuned(_grad_x_plain, ["D"], "BLOCK_N", {
    2: [(64, 8, 3), (64, 8, 4), (128, 8, 2), (32, 4, 4)],
    4: [(64, 8, 3), (64, 4, 3), (32, 4, 4)]}, _smem_fits(lambda blocks, size: 0, _p_and_w_tiles))


def _own_block(x: torch.Tensor, block_d: int) -> int:
    """Rows (or prototypes) per program: 64 for 16-bit inputs of d <= 256, fewer for fp32 (whose ieee dots run on
    the FMA units, with the operands in registers) and for wider rows."""
    if gpu_arch(x) is None:
        return INTERPRETER_BLOCK
    if x.element_size() == 4:
        return 32 if block_d <= 64 else 16
    return 64 if block_d <= 256 else 32 if block_d <= 512 else 16


def _where(x: torch.Tensor) -> str:
    return "cpu" if gpu_arch(x) is None else "gpu"


def _split(blocks: int, length: int, x: torch.Tensor) -> tuple[int, int]:
    """(splits, span) of a reduced dimension of `length` for `blocks` programs (kernels.split_reduction)."""
    return split_reduction(blocks, length, GRANULE[_where(x)], x)


def _launch(plain, tuned, grid: tuple[int, int], args: tuple, x: torch.Tensor, meta: dict, tuned_name: str) -> None:
    d = x.shape[1]
    meta = {"D": d, "BLOCK_D": max(16, triton.next_power_of_2(d)),
            "PRECISION": "ieee" if x.dtype == torch.float32 else "tf32", **meta}  # fp32 stays fp32, as in torch
    if gpu_arch(x) is not None:
        launch(tuned[x.element_size()], grid, *args, **meta)
    else:
        launch(plain, grid, *args, **meta, **{tuned_name: INTERPRETER_BLOCK})


def forward(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, v: torch.Tensor, c: torch.Tensor,
            student_temp: float, teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y: student / teacher embeddings (n, d); w, v: student / teacher prototype weights (K, d); c: (K,)."""
    n, k = x.shape[0], w.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    stats = torch.empty((4, n), dtype=torch.float32, device=x.device)
    if n == 0:
        return loss, stats
    rows = _own_block(x, max(16, triton.next_power_of_2(x.shape[1])))
    splits, span = _split(triton.cdiv(n, rows), k, x)
    part = torch.empty((5, splits, n), dtype=torch.float32, device=x.device)
    _launch(_forward_plain, _forward_tuned, (triton.cdiv(n, rows), splits),
            (x, y, w, v, c, part, n, k, span, LOG2E / student_temp, LOG2E / teacher_temp), x, {"BLOCK_M": rows},
            "BLOCK_N")
    block = 128
    launch(_combine_kernel, (triton.cdiv(n, block),), part, loss, stats, n, splits, BLOCK=block)
    return loss, stats


def backward(g: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, v: torch.Tensor, c: torch.Tensor,
             stats: torch.Tensor, student_temp: float, teacher_temp: float, need_x: bool = True,
             need_w: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """g (n,) f32 and the forward's inputs and stats (4, n) -> d(sum g * loss) / dx (n, d) if need_x and
    / dw (K, d) if need_w, in the inputs' dtype (None for a gradient not asked for)."""
    (n, d), k = x.shape, w.shape[0]
    if n == 0:
        return torch.empty_like(x) if need_x else None, torch.zeros_like(w) if need_w else None
    where, arch = _where(x), gpu_arch(x)
    rows = _own_block(x, max(16, triton.next_power_of_2(d)))  # per grad-x program
    # prototypes per grad-w program: their w and v tiles stay resident, in shared memory for wgmma (sm_90) but in
    # registers for mma.sync (sm_80), where 64 of them spill
    protos = rows // 2 if arch is not None and arch < 90 and x.element_size() == 2 else rows
    granule = GRANULE[where]
    # prototypes per pass, and their P^T (chunk, n): needed only for grad x
    chunk = min(k, max(granule, CHUNK_ELEMENTS[where] // n // granule * granule)) if need_x else k
    p = torch.empty((chunk, n), dtype=x.dtype, device=x.device) if need_x else w  # w: a placeholder, never written
    acc_x = None  # (n, d) fp32: sum of P w over the chunks so far
    grad_w = torch.empty_like(w) if need_w else None
    scales = (LOG2E / student_temp, LOG2E / teacher_temp, 1.0 / student_temp)
    for k0 in range(0, k, chunk):
        kc = min(chunk, k - k0)
        splits, span = _split(triton.cdiv(kc, protos), n, x)
        # grad w of this chunk: straight into grad_w when one row range covers n, else fp32 partials summed below
        dw = w  # a placeholder when grad w is not needed
        if need_w:
            dw = grad_w[k0:k0 + kc] if splits == 1 else torch.empty((splits, kc, d), dtype=torch.float32,
                                                                    device=x.device)
        _launch(_grad_w_plain, _grad_w_tuned, (triton.cdiv(kc, protos), splits),
                (g, x, y, w, v, c, stats, dw, p, n, k0, kc, span, *scales), x,
                {"BLOCK_N": protos, "GRAD_W": need_w, "WRITE_P": need_x}, "BLOCK_M")
        if need_w and splits > 1:
            grad_w[k0:k0 + kc] = dw.sum(0)
        if need_x:
            splits, span = _split(triton.cdiv(n, rows), kc, x)
            part = torch.empty((splits, n, d), dtype=torch.float32, device=x.device)
            _launch(_grad_x_plain, _grad_x_tuned, (triton.cdiv(n, rows), splits), (p, w, part, n, k0, kc, span), x,
                    {"BLOCK_M": rows}, "BLOCK_N")
            acc_x = part.sum(0) if acc_x is None else acc_x + part.sum(0)
    grad_x = (acc_x * (g / student_temp)[:, None]).to(x.dtype) if need_x else None
    return grad_x, grad_w
