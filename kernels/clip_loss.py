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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from vtp_fast.kernels import sm_count


@dataclass(frozen=True)
class Config:
    block_m: int  # rows of q per tile
    block_n: int  # rows of k per tile
    block_k: int  # E-chunk of the u = q @ k.T contraction
    block_d: int  # backward: E-chunk of a gradient accumulator; each chunk recomputes u, so wider is cheaper
    num_warps: int
    num_stages: int
    max_splits: int = 1  # forward: column splits per row tile (a flash-decoding combine keeps small n busy)


# Under the interpreter the tiles are tiny so that small test shapes cross every tile, chunk and split boundary.
INTERPRETER = Config(block_m=16, block_n=16, block_k=32, block_d=32, num_warps=1, num_stages=1, max_splits=2)
# GPU tiles (forward, backward) by input element size. Checked offline for sm_90a with ptxas, given the
# launch-time hint E % 16 == 0: no register spills, cp.async-pipelined loads, wgmma for 16-bit inputs. fp32 takes
# the exact "ieee" dot (FMA, never tf32), whose operands live in registers, hence the smaller tiles.
GPU = {
    2: (Config(block_m=128, block_n=64, block_k=64, block_d=0, num_warps=8, num_stages=3, max_splits=64),
        Config(block_m=64, block_n=64, block_k=64, block_d=256, num_warps=8, num_stages=2)),
    4: (Config(block_m=64, block_n=64, block_k=32, block_d=0, num_warps=4, num_stages=2, max_splits=64),
        Config(block_m=32, block_n=32, block_k=32, block_d=128, num_warps=4, num_stages=2)),
}


def _configs(x: torch.Tensor) -> tuple[Config, Config]:
    return (INTERPRETER, INTERPRETER) if x.device.type == "cpu" else GPU[x.element_size()]


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
    for k0 in range(0, E, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < E
        q = tl.load(q_ptr + q_row + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        kt = tl.load(k_ptr + k_col + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        u = tl.dot(q, kt, u, input_precision=PRECISION)
    return u


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
    if direction == 0:
        q_ptr = image_ptr
        k_ptr = all_text_ptr
    else:
        q_ptr = text_ptr
        k_ptr = all_image_ptr
    row_ok = rows < n
    c_lo = split * cols_per_split
    c_hi = tl.minimum(c_lo + cols_per_split, N)
    scale = tl.load(scale_ptr).to(tl.float32)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    w = tl.zeros((BLOCK_M,), dtype=tl.float32)
    tgt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(c_lo, c_hi, BLOCK_N):
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


@triton.jit(do_not_specialize=["offset"])
def _backward_rows_kernel(image_ptr, text_ptr, all_image_ptr, all_text_ptr, norm_ptr, scale_ptr, grad_ptr,
                          d_image_ptr, d_text_ptr, n, N, E, offset, inv_count, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                          PRECISION: tl.constexpr):
    """dq[rows, d-chunk] = scale * grad * inv_count * sum_j (p_ij - onehot_ij) k[j, d-chunk],
    grid (row tiles, E-chunks, 2)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    direction = tl.program_id(2)
    if direction == 0:
        q_ptr = image_ptr
        k_ptr = all_text_ptr
        dq_ptr = d_image_ptr
    else:
        q_ptr = text_ptr
        k_ptr = all_image_ptr
        dq_ptr = d_text_ptr
    row_ok = rows < n
    d_ok = ds < E
    scale = tl.load(scale_ptr).to(tl.float32)
    top = tl.load(norm_ptr + direction * 2 * n + rows, mask=row_ok, other=0.0)
    log_total = tl.load(norm_ptr + (direction * 2 + 1) * n + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        u = _u_tile(q_ptr, k_ptr, rows, cols, row_ok, col_ok, E, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        # padding columns load k = 0, but exp(0 - max - logsum) overflows when every logit of the row is below
        # about -88, and inf * 0 would poison the dot
        p = tl.exp(tl.where(col_ok[None, :], (u * scale - top[:, None]) - log_total[:, None], float("-inf")))
        # grad * inv_count * scale is applied once at the end: p - onehot lies in [-1, 1], so casting it to fp16
        # or bf16 for the tensor cores loses relative precision only, and never underflows as p / (2n) would
        dlogits = p - tl.where(cols[None, :] == rows[:, None] + offset, 1.0, 0.0)
        kd = tl.load(k_ptr + cols.to(tl.int64)[:, None] * E + ds[None, :], mask=col_ok[:, None] & d_ok[None, :],
                     other=0.0)
        acc = tl.dot(dlogits.to(kd.dtype), kd, acc, input_precision=PRECISION)
    coef = tl.load(grad_ptr).to(tl.float32) * inv_count * scale
    out = dq_ptr + rows.to(tl.int64)[:, None] * E + ds[None, :]
    tl.store(out, (acc * coef).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["offset"])
def _backward_cols_kernel(image_ptr, text_ptr, all_image_ptr, all_text_ptr, norm_ptr, scale_ptr, grad_ptr,
                          d_all_image_ptr, d_all_text_ptr, n, N, E, offset, inv_count, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                          PRECISION: tl.constexpr):
    """dk[cols, d-chunk] = scale * grad * inv_count * sum_i (p_ij - onehot_ij) q[i, d-chunk],
    grid (column tiles, E-chunks, 2).

    Each program owns its columns and walks every row tile, so no two programs write the same gradient
    (deterministic, no atomics); tiles are built transposed, (BLOCK_N, BLOCK_M), to feed the dot directly.
    """
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    direction = tl.program_id(2)
    if direction == 0:
        q_ptr = image_ptr
        k_ptr = all_text_ptr
        dk_ptr = d_all_text_ptr
    else:
        q_ptr = text_ptr
        k_ptr = all_image_ptr
        dk_ptr = d_all_image_ptr
    col_ok = cols < N
    d_ok = ds < E
    scale = tl.load(scale_ptr).to(tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for r0 in range(0, n, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n
        ut = _u_tile(k_ptr, q_ptr, cols, rows, col_ok, row_ok, E, BLOCK_N, BLOCK_M, BLOCK_K, PRECISION)
        # padding rows load q = 0 (u = 0, norm = 0, so p = 1) and contribute nothing; padding columns are never
        # stored, but their p is zeroed as in the rows kernel so that no inf or nan is ever made
        top = tl.load(norm_ptr + direction * 2 * n + rows, mask=row_ok, other=0.0)
        log_total = tl.load(norm_ptr + (direction * 2 + 1) * n + rows, mask=row_ok, other=0.0)
        p = tl.exp(tl.where(col_ok[:, None], (ut * scale - top[None, :]) - log_total[None, :], float("-inf")))
        dlogits = p - tl.where(cols[:, None] == rows[None, :] + offset, 1.0, 0.0)
        qd = tl.load(q_ptr + rows.to(tl.int64)[:, None] * E + ds[None, :], mask=row_ok[:, None] & d_ok[None, :],
                     other=0.0)
        acc = tl.dot(dlogits.to(qd.dtype), qd, acc, input_precision=PRECISION)
    coef = tl.load(grad_ptr).to(tl.float32) * inv_count * scale
    out = dk_ptr + cols.to(tl.int64)[:, None] * E + ds[None, :]
    tl.store(out, (acc * coef).to(dk_ptr.dtype.element_ty), mask=col_ok[:, None] & d_ok[None, :])


def forward(image: torch.Tensor, text: torch.Tensor, all_image: torch.Tensor, all_text: torch.Tensor,
            scale: torch.Tensor, offset: int) -> torch.Tensor:
    """image, text: (n, E); all_image, all_text: (N, E); scale: () -> partials (2, 4, splits, n) fp32: per
    direction and column split, max z, sum of exp(z - max), sum of exp(z - max) * u, target u."""
    (n, dim), big_n = image.shape, all_image.shape[0]
    cfg, _ = _configs(image)
    row_tiles, col_tiles = triton.cdiv(n, cfg.block_m), triton.cdiv(big_n, cfg.block_n)
    splits = min(col_tiles, cfg.max_splits)
    if image.device.type == "cuda":
        # about 8 programs per SM over both directions keeps the last wave's idle tail short; a split costs only
        # its (4, n) partials, since every column tile reloads its q chunks anyway
        splits = min(splits, max(1, triton.cdiv(4 * sm_count(image.device.index or 0), row_tiles)))
    tiles_per_split = triton.cdiv(col_tiles, splits)
    splits = triton.cdiv(col_tiles, tiles_per_split)  # no split without columns
    part = torch.empty((2, 4, splits, n), dtype=torch.float32, device=image.device)
    _forward_kernel[(row_tiles, splits, 2)](
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
    _, cfg = _configs(image)
    block_d = min(cfg.block_d, max(16, triton.next_power_of_2(dim)))
    d_chunks = triton.cdiv(dim, block_d)
    grads = [torch.empty_like(t) for t in (image, text, all_image, all_text)]
    args = (image, text, all_image, all_text, norm, scale, grad)
    sizes = (n, big_n, dim, offset, 1.0 / (2 * n))
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=block_d,
                PRECISION=_precision(image.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _backward_rows_kernel[(triton.cdiv(n, cfg.block_m), d_chunks, 2)](*args, grads[0], grads[1], *sizes, **meta)
    _backward_cols_kernel[(triton.cdiv(big_n, cfg.block_n), d_chunks, 2)](*args, grads[2], grads[3], *sizes,
                                                                          **meta)
    return grads[0], grads[1], grads[2], grads[3]
