"""Triton kernels for the tiled CLIP softmax contrastive loss (semantics: vtp_fast/ops/clip_loss.py).

The loss has two directions, each with queries q (n, E) and keys k (N, E): direction 0 is image vs all_text,
direction 1 is text vs all_image; logits are scale * q @ k.T, targets offset + arange(n). Both directions share
every launch (the last grid axis picks one). The (n, N) logits never exist: each kernel rebuilds
(BLOCK_M, BLOCK_N) tiles of u = q @ k.T in fp32 from E-chunks of the inputs. Launchers take contiguous tensors:

  forward(image, text (n, E), all_image, all_text (N, E), scale (), offset) -> partials (2, 4, splits, n)
  combine(partials)              -> norm (2, 2, n), target u (2, n), expected u under the softmax (2, n), fp32
  backward(image, text, all_image, all_text, scale, norm, grad (), offset)
                                 -> d_image, d_text (n, E), d_all_image, d_all_text (N, E), input dtype

A row's softmax normaliser is kept as two numbers, norm = (max_j z_j, log sum_j exp(z_j - max)) for the logits
z = u * scale, not as their sum: the backward rebuilds z from the same fp32 u, and p = exp((z - max) - logsum)
keeps the relative precision of 1 - p_target when the target dominates (a sum rounded at the logits' magnitude,
~4e-6 at scale 100, would not). With dlogits = (p - onehot) * grad / (2n): dq = scale * dlogits @ k and
dk = scale * dlogits.T @ q.

Work, in GEMM units of n x N x E multiply-adds per direction (WORK below): the forward builds u once (1 unit).
The backward rebuilds u once (1 unit), writing p - onehot (in the input dtype, which is what the tensor cores
would consume anyway) for a chunk of columns into a buffer of at most CHUNK_ELEMENTS elements, then finishes
with two matmuls over it, dq += chunk @ k[chunk] and dk[chunk] = chunk.T @ q (1 unit each). The buffer bound keeps
the extra memory O(n + N) plus a constant (64 MiB in bf16 on a GPU); at the real shapes (n <= 512 pairs, N <= 32k)
one chunk covers all N. Every gradient element is reduced by one program in a fixed order (no atomics); dq's
contraction over N may be split to fill the GPU, its fp32 partials summed in a fixed order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from vtp_fast.kernels import gpu_arch, launch, loop_bound, sm_count, split_reduction


@dataclass(frozen=True)
class Config:
    block_m: int  # u tiles: rows of q; matmuls: rows of the output
    block_n: int  # u tiles: rows of k; matmuls: the contraction's chunk
    block_k: int  # u tiles: E-chunk of the u = q @ k.T contraction
    block_d: int  # matmuls: E-chunk (columns) of the output
    num_warps: int
    num_stages: int
    max_splits: int = 1  # forward: column splits per row tile (a flash-decoding combine keeps small n busy)


@dataclass(frozen=True)
class Configs:
    forward: Config  # u tiles with an online log-sum-exp
    dlogits: Config  # u tiles written out as p - onehot
    dq: Config  # chunk (n, cols) @ k (cols, E): few output rows, a long contraction
    dk: Config  # chunk.T (cols, n) @ q (n, E): many output rows, a short contraction


# Under the interpreter the tiles are tiny so that small test shapes cross every tile, chunk and split boundary.
_TINY = Config(block_m=16, block_n=16, block_k=32, block_d=32, num_warps=1, num_stages=1, max_splits=2)
INTERPRETER = Configs(_TINY, _TINY, _TINY, _TINY)
# GPU tiles by input element size, for per-GPU batches n = 64-512 against N = 16k-32k gathered pairs at E = 512-1024.
# A u tile's q chunks are reloaded for every column tile, so the dlogits kernel takes 128 x 128 tiles (half the L2
# traffic of 128 x 64); the forward, which also carries per-row softmax state, stays at 128 x 64 (128 x 128 spills
# on sm_80). `vtp-fast kernels check` compiles each for sm_90 and sm_80 (given the launch-time hint E % 16 == 0):
# no register spills, cp.async-pipelined loads, wgmma for 16-bit inputs on sm_90. fp32 takes the exact "ieee" dot
# (FMA, never tf32), whose operands live in registers: smaller tiles.
GPU = {
    2: Configs(forward=Config(128, 64, 64, 0, num_warps=8, num_stages=3, max_splits=64),
               dlogits=Config(128, 128, 64, 0, num_warps=8, num_stages=3),
               dq=Config(64, 64, 0, 128, num_warps=4, num_stages=4),
               dk=Config(128, 64, 0, 128, num_warps=8, num_stages=3)),
    4: Configs(forward=Config(64, 64, 32, 0, num_warps=4, num_stages=2, max_splits=64),
               dlogits=Config(64, 64, 32, 0, num_warps=4, num_stages=2),
               dq=Config(32, 32, 0, 64, num_warps=4, num_stages=2),
               dk=Config(32, 32, 0, 64, num_warps=4, num_stages=2)),
}
# Elements of the backward's p - onehot buffer (2, n, columns of a chunk); tiny under the interpreter so that tests
# cross chunks. A chunk's width and a split's range are multiples of the granule (of every column block).
CHUNK_ELEMENTS = {"gpu": 1 << 25, "cpu": 1 << 9}
GRANULE = {"gpu": 128, "cpu": 16}
# The kernels' work for vtp_fast.measure.perf_model (its schema): GEMM units of n x N x E multiply-adds per direction,
# of which "recomputes" rebuild u (over all of E at once: block_d 0), the tile padding n x N, DRAM passes over the
# gathered features, launches (PyTorch glue included: the forward's combine; the backward's coefficient, dq's
# partial sum and scaling). The backward's u, dq and dk; at the real shapes (n <= 512) one chunk. "scratch_bytes":
# bytes per logit through the p - onehot buffer (written once, read twice, 16-bit).
WORK = {
    "fwd": {"gemms": 1, "tile": (128, 64), "passes": 1, "launches": 13},
    "bwd": {"gemms": 3, "recomputes": 1, "block_d": 0, "tile": (128, 128), "passes": 2, "launches": 10,
            "scratch_bytes": 6},
}


def _configs(x: torch.Tensor) -> Configs:
    return INTERPRETER if gpu_arch(x) is None else GPU[x.element_size()]


def _precision(dtype: torch.dtype) -> str:
    # fp32 must not silently drop to tf32 (the reference does not); 16-bit inputs ignore the setting
    return "ieee" if dtype == torch.float32 else "tf32"

@triton.jit
def _u_tile(q_ptr, k_ptr, rows, cols, row_ok, col_ok, E, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """u[r, c] = q[rows[r]] . k[cols[c]] in fp32, (BLOCK_M, BLOCK_N), contracted over E in BLOCK_K chunks."""
    u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    q_row = rows.to(tl.int64)[:, None] * E
    k_col = cols.to(tl.int64)[None, :] * E
    for k0 in range(0, loop_bound(E), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < E
        q = tl.load(q_ptr + q_row + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        kt = tl.load(k_ptr + k_col + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        u = tl.dot(q, kt, u, input_precision=PRECISION)
    return u


@triton.jit
def _operands(image_ptr, text_ptr, all_image_ptr, all_text_ptr, direction):
    """(queries, keys) of a direction: 0, this rank's images against every text; 1, its texts against every
    image."""
    if direction == 0:
        q_ptr = image_ptr
        k_ptr = all_text_ptr
    else:
        q_ptr = text_ptr
        k_ptr = all_image_ptr
    return q_ptr, k_ptr


@triton.jit(do_not_specialize=["offset"])  # one compiled kernel for every rank's offset
def _forward_kernel(image_ptr, text_ptr, all_image_ptr, all_text_ptr, scale_ptr, part_ptr, n, N, E, offset,
                    cols_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Online log-sum-exp of one row tile over one split of the columns, grid (row tiles, splits, 2).

    part: (2, 4, splits, n) fp32 <- per direction: running max of z, sum of exp(z - max), sum of exp(z - max) * u,
    and the target's u (0 when the target column is in another split).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    direction = tl.program_id(2)
    q_ptr, k_ptr = _operands(image_ptr, text_ptr, all_image_ptr, all_text_ptr, direction)
    row_ok = rows < n
    c_lo = split * cols_per_split
    c_hi = tl.minimum(c_lo + cols_per_split, N)
    scale = tl.load(scale_ptr).to(tl.float32)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    w = tl.zeros((BLOCK_M,), dtype=tl.float32)
    tgt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(loop_bound(c_lo), loop_bound(c_hi), BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < c_hi
        u = _u_tile(q_ptr, k_ptr, rows, cols, row_ok, col_ok, E, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        z = tl.where(col_ok[None, :], u * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile holds at least one real column
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        l = l * alpha + tl.sum(e, axis=1)
        w = w * alpha + tl.sum(e * u, axis=1)
        tgt += tl.sum(tl.where(cols[None, :] == rows[:, None] + offset, u, 0.0), axis=1)
        m = m_new
    plane = tl.num_programs(1) * n  # one statistic of one direction
    out = part_ptr + direction * 4 * plane + split * n + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + plane, l, mask=row_ok)
    tl.store(out + 2 * plane, w, mask=row_ok)
    tl.store(out + 3 * plane, tgt, mask=row_ok)


@triton.jit(do_not_specialize=["offset", "c0"])
def _dlogits_kernel(image_ptr, text_ptr, all_image_ptr, all_text_ptr, norm_ptr, scale_ptr, out_ptr, n, N, E, offset,
                    c0, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr):
    """out[direction, rows, j] = p - onehot at column c0 + j of the chunk, out (2, n, cols) in the input dtype;
    grid (row tiles, column tiles of the chunk, 2)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    js = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    direction = tl.program_id(2)
    q_ptr, k_ptr = _operands(image_ptr, text_ptr, all_image_ptr, all_text_ptr, direction)
    row_ok = rows < n
    col_ok = js < cols
    scale = tl.load(scale_ptr).to(tl.float32)
    top = tl.load(norm_ptr + direction * 2 * n + rows, mask=row_ok, other=0.0)
    log_total = tl.load(norm_ptr + (direction * 2 + 1) * n + rows, mask=row_ok, other=0.0)
    u = _u_tile(q_ptr, k_ptr, rows, c0 + js, row_ok, col_ok, E, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    p = tl.exp((u * scale - top[:, None]) - log_total[:, None])
    # grad * inv_count * scale is applied by the matmuls: p - onehot lies in [-1, 1], so its 16-bit copy loses
    # relative precision only, and never underflows as p / (2n) would
    dlogits = p - tl.where(c0 + js[None, :] == rows[:, None] + offset, 1.0, 0.0)
    out = out_ptr + direction.to(tl.int64) * n * cols + rows.to(tl.int64)[:, None] * cols + js[None, :]
    tl.store(out, dlogits.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _matmul_kernel(a_ptr, b0_ptr, b1_ptr, out0_ptr, out1_ptr, coef_ptr, M, R, E, span, stride_am, stride_ar,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                   SCALE: tl.constexpr):
    """out_dir[split, m, e] = sum over r in [split * span, ...) of A_dir[m, r] b_dir[r, e]  (times coef if SCALE),
    grid (output tiles, splits, 2). A_dir[m, r] = a[dir * M * R + m * stride_am + r * stride_ar] (a chunk of p -
    onehot, or its transpose), b_dir (R, E), out_dir (splits, M, E): fp32 partials, or the gradient itself."""
    d_tiles = tl.cdiv(E, BLOCK_D)
    ms = (tl.program_id(0) // d_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    es = (tl.program_id(0) % d_tiles) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(1)
    direction = tl.program_id(2)
    if direction == 0:
        b_ptr = b0_ptr
        out_ptr = out0_ptr
    else:
        b_ptr = b1_ptr
        out_ptr = out1_ptr
    m_ok = ms < M
    e_ok = es < E
    a_rows = a_ptr + direction.to(tl.int64) * M * R + ms.to(tl.int64)[:, None] * stride_am
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    r_lo = split * span
    r_hi = tl.minimum(r_lo + span, R)
    for r0 in range(loop_bound(r_lo), loop_bound(r_hi), BLOCK_N):
        rs = r0 + tl.arange(0, BLOCK_N)
        r_ok = rs < r_hi
        a = tl.load(a_rows + rs.to(tl.int64)[None, :] * stride_ar, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rs.to(tl.int64)[:, None] * E + es[None, :], mask=r_ok[:, None] & e_ok[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if SCALE:
        acc = acc * tl.load(coef_ptr)
    out = out_ptr + split.to(tl.int64) * M * E + ms.to(tl.int64)[:, None] * E + es[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & e_ok[None, :])


def forward(image: torch.Tensor, text: torch.Tensor, all_image: torch.Tensor, all_text: torch.Tensor,
            scale: torch.Tensor, offset: int) -> torch.Tensor:
    """image, text: (n, E); all_image, all_text: (N, E); scale: () -> partials (2, 4, splits, n) fp32: per
    direction and column split, max z, sum of exp(z - max), sum of exp(z - max) * u, target u."""
    (n, dim), big_n = image.shape, all_image.shape[0]
    cfg = _configs(image).forward
    row_tiles, col_tiles = triton.cdiv(n, cfg.block_m), triton.cdiv(big_n, cfg.block_n)
    splits = min(col_tiles, cfg.max_splits)
    if gpu_arch(image) is not None:
        # about 8 programs per SM over both directions keeps the last wave's idle tail short; a split costs only
        # its (4, n) partials, since every column tile reloads its q chunks anyway
        splits = min(splits, max(1, triton.cdiv(4 * sm_count(image.device), row_tiles)))
    tiles_per_split = triton.cdiv(col_tiles, splits)
    splits = triton.cdiv(col_tiles, tiles_per_split)  # no split without columns
    part = torch.empty((2, 4, splits, n), dtype=torch.float32, device=image.device)
    launch(_forward_kernel, (row_tiles, splits, 2),
           image, text, all_image, all_text, scale, part, n, big_n, dim, offset, tiles_per_split * cfg.block_n,
           BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=_precision(image.dtype),
           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return part


def combine(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """part: (2, 4, splits, n) -> norm (2, 2, n) = (max z, log sum exp(z - max)) per direction and row, the
    target's u (2, n) and the expected u under the softmax (2, n), all fp32."""
    m, l, w, tgt = part.unbind(1)  # each (2, splits, n)
    top = m.amax(1, keepdim=True)  # (2, 1, n)
    weight = torch.exp(m - top)  # (2, splits, n)
    total = (l * weight).sum(1)  # (2, n)
    return torch.stack([top.squeeze(1), total.log()], 1), tgt.sum(1), (w * weight).sum(1) / total


def backward(image: torch.Tensor, text: torch.Tensor, all_image: torch.Tensor, all_text: torch.Tensor,
             scale: torch.Tensor, norm: torch.Tensor, grad: torch.Tensor,
             offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """norm: (2, 2, n) fp32 from `combine`, grad: () fp32 -> d_image, d_text (n, E), d_all_image, d_all_text
    (N, E)."""
    (n, dim), big_n = image.shape, all_image.shape[0]
    cfg = _configs(image)
    where = "cpu" if gpu_arch(image) is None else "gpu"
    granule = GRANULE[where]
    chunk = min(big_n, max(granule, CHUNK_ELEMENTS[where] // (2 * n) // granule * granule))  # columns
    buf = torch.empty(2 * n * chunk, dtype=image.dtype, device=image.device)  # per chunk: (2, n, cols)
    coef = grad * scale.float() / (2 * n)  # () fp32: d loss / d logits = (p - onehot) * grad / (2n), times scale
    d_all_image, d_all_text = torch.empty_like(all_image), torch.empty_like(all_text)
    acc = None  # (2, n, E) fp32: dq over the chunks so far, before coef
    precision = _precision(image.dtype)
    for c0 in range(0, big_n, chunk):
        cols = min(chunk, big_n - c0)
        c = cfg.dlogits
        launch(_dlogits_kernel, (triton.cdiv(n, c.block_m), triton.cdiv(cols, c.block_n), 2),
               image, text, all_image, all_text, norm, scale, buf, n, big_n, dim, offset, c0, cols,
               BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, PRECISION=precision,
               num_warps=c.num_warps, num_stages=c.num_stages)
        # dk[c0:c0 + cols] = coef * chunk.T @ q, straight into the gradients
        c = cfg.dk
        tiles = triton.cdiv(cols, c.block_m) * triton.cdiv(dim, c.block_d)
        launch(_matmul_kernel, (tiles, 1, 2), buf, image, text, d_all_text[c0:c0 + cols],
               d_all_image[c0:c0 + cols], coef, cols, n, dim, n, 1, cols,
               BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=c.block_d, PRECISION=precision, SCALE=True,
               num_warps=c.num_warps, num_stages=c.num_stages)
        # dq += chunk @ k[c0:c0 + cols], the contraction split into ranges that fill the GPU, fp32 partials
        c = cfg.dq
        tiles = triton.cdiv(n, c.block_m) * triton.cdiv(dim, c.block_d)
        splits, span = split_reduction(2 * tiles, cols, granule, image)  # 2 * tiles: both directions
        dq = torch.empty((2, splits, n, dim), dtype=torch.float32, device=image.device)
        launch(_matmul_kernel, (tiles, splits, 2), buf, all_text[c0:c0 + cols], all_image[c0:c0 + cols], dq[0],
               dq[1], coef, n, cols, dim, span, cols, 1,
               BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=c.block_d, PRECISION=precision, SCALE=False,
               num_warps=c.num_warps, num_stages=c.num_stages)
        acc = dq.sum(1) if acc is None else acc + dq.sum(1)
    d_image, d_text = ((a * coef).to(image.dtype) for a in acc)  # two tensors: the op's outputs may not alias
    return d_image, d_text, d_all_image, d_all_text
