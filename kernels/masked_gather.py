"""Triton kernels for the masked-token gather/scatter (semantics: vtp_fast/ops/masked_gather.py).

Launchers take 2-D contiguous row buffers:
  gather(x (R, D), index (M,) int64)                         -> (M, D)
  scatter(src (M, D), index (M,) int64, fill (D,) | None, R)  -> (R, D)
"""

import torch
import triton
import triton.language as tl
from vtp_fast.kernels import launch

BLOCK_M = 16
# The work these kernels do, read by vtp_fast.measure.perf_model (`vtp-fast bench --model`); update it with the kernels.
# "fwd" = gather, "bwd" = the scatter (the gather's backward, masked_scatter's forward); "passes" = DRAM passes over
# the moved rows; "launches" = kernels started here (the scatter's position table: full, arange, index_put).
WORK = {"fwd": {"passes": 1, "launches": 1}, "bwd": {"passes": 1, "launches": 4}}


def _block_d(dim: int) -> int:
    return min(triton.next_power_of_2(max(dim, 1)), 256)


@triton.jit
def _gather_rows_kernel(x_ptr, index_ptr, out_ptr, R, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < M
    ok = row_ok[:, None] & (cols < D)[None, :]
    src_rows = tl.load(index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    tl.device_assert((src_rows >= 0) & (src_rows < R), "masked_gather: index out of range")  # TRITON_DEBUG=1
    values = tl.load(x_ptr + src_rows[:, None] * D + cols[None, :], mask=ok)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], values, mask=ok)


@triton.jit
def _scatter_rows_kernel(src_ptr, pos_ptr, fill_ptr, out_ptr, R, D, HAS_FILL: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # out row r = src row pos[r] when pos[r] >= 0, else the fill row (zeros without fill)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    col_ok = cols < D
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    hit = pos >= 0
    values = tl.load(src_ptr + pos[:, None] * D + cols[None, :], mask=hit[:, None] & col_ok[None, :], other=0)
    if HAS_FILL:
        fill = tl.load(fill_ptr + cols, mask=col_ok, other=0)
        values = tl.where(hit[:, None], values, fill[None, :])
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], values,
             mask=row_ok[:, None] & col_ok[None, :])


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    m_rows, dim = index.shape[0], x.shape[1]
    out = torch.empty((m_rows, dim), dtype=x.dtype, device=x.device)
    if m_rows and dim:
        block_d = _block_d(dim)
        grid = (triton.cdiv(m_rows, BLOCK_M), triton.cdiv(dim, block_d))
        launch(_gather_rows_kernel, grid, x, index, out, x.shape[0], m_rows, dim, BLOCK_M=BLOCK_M, BLOCK_D=block_d)
    return out


def scatter(src: torch.Tensor, index: torch.Tensor, fill: torch.Tensor | None, num_rows: int) -> torch.Tensor:
    dim = src.shape[1]
    out = torch.empty((num_rows, dim), dtype=src.dtype, device=src.device)
    if num_rows and dim:
        # pos[r] = m where index[m] == r, else -1, so every output row is written exactly once
        pos = torch.full((num_rows,), -1, dtype=torch.int64, device=src.device)
        pos[index] = torch.arange(index.shape[0], device=src.device)
        block_d = _block_d(dim)
        grid = (triton.cdiv(num_rows, BLOCK_M), triton.cdiv(dim, block_d))
        launch(_scatter_rows_kernel, grid, src, pos, fill if fill is not None else src, out, num_rows, dim,
                                   HAS_FILL=fill is not None, BLOCK_M=BLOCK_M, BLOCK_D=block_d)
    return out
