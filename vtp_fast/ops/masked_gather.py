"""Masked-token gather/scatter: the packing that iBOT and MAE-style masking need.

Tokens of a batch, x: (B, N, D), are addressed by flat positions p = b * N + n. For a boolean token mask
(B, N), `mask_to_index(mask)` (vtp_fast.data.views: computed where the masks are made) lists the selected
positions in order (M,) int64, sample by sample, so the packed buffer keeps each sample's selected tokens together.

  masked_gather(x (B, N, D), index (M,))                       -> (M, D)      packed[m] = x.flat[index[m]]
  masked_scatter(src (M, D), index (M,), fill (D,) | None, (B, N)) -> (B, N, D) out.flat[index[m]] = src[m],
                                                                               every other token = fill (or 0)

`masked_scatter` with the mask token as `fill` puts encoded visible tokens back into the full grid with the
mask token at masked positions. Backends: pure-PyTorch reference, native C++ (CPU) / CUDA (`vtp_fast._C`),
Triton. All are differentiable (x, src and fill); the kernels' backward is the other kernel.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from vtp_fast import optional
from vtp_fast.ops.registry import new_op


def _check(op: str, tokens: Tensor, index: Tensor) -> None:
    if index.dim() != 1 or index.dtype != torch.int64:
        raise ValueError(f"{op}: index must be a 1-D int64 tensor, got {tuple(index.shape)} {index.dtype}")
    if index.device != tokens.device:
        raise ValueError(f"{op}: index is on {index.device} but the tokens are on {tokens.device}")


def _check_scatter(src: Tensor, index: Tensor, fill: Tensor | None, shape: tuple[int, int]) -> None:
    _check("masked_scatter", src, index)
    if src.dim() != 2 or src.shape[0] != index.shape[0]:
        raise ValueError(f"masked_scatter: src must be (M={index.shape[0]}, D), got {tuple(src.shape)}")
    if len(shape) != 2 or shape[0] * shape[1] < src.shape[0]:
        raise ValueError(f"masked_scatter: shape {tuple(shape)} holds fewer than {src.shape[0]} tokens")
    if fill is not None and (fill.shape != src.shape[1:] or fill.dtype != src.dtype or fill.device != src.device):
        raise ValueError(f"masked_scatter: fill must be ({src.shape[1]},) {src.dtype} on {src.device}, got "
                         f"{tuple(fill.shape)} {fill.dtype} on {fill.device}")


def masked_gather_ref(x: Tensor, index: Tensor) -> Tensor:
    """x: (B, N, D), index: (M,) int64 -> (M, D)."""
    if x.dim() != 3:
        raise ValueError(f"masked_gather: x must be (B, N, D), got {tuple(x.shape)}")
    _check("masked_gather", x, index)
    return x.reshape(-1, x.shape[-1]).index_select(0, index)


def masked_scatter_ref(src: Tensor, index: Tensor, fill: Tensor | None, shape: tuple[int, int]) -> Tensor:
    """src: (M, D), index: (M,) int64, fill: (D,) or None, shape (B, N) -> (B, N, D)."""
    _check_scatter(src, index, fill, shape)
    rows, dim = shape[0] * shape[1], src.shape[1]
    base = fill.expand(rows, dim) if fill is not None else src.new_zeros(rows, dim)
    return base.index_copy(0, index, src).view(*shape, dim)


OP = new_op("masked_gather", SimpleNamespace(masked_gather=masked_gather_ref, masked_scatter=masked_scatter_ref))


def _wrap(gather_op, scatter_op) -> SimpleNamespace:
    """Give two row-level custom ops (2-D buffers) the reference's (B, N, D) signatures and autograd."""

    def gather_setup(ctx, inputs, output):
        x, index = inputs
        ctx.save_for_backward(index)
        ctx.num_rows = x.shape[0]

    def gather_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return scatter_op(grad.contiguous(), index, None, ctx.num_rows), None

    def scatter_setup(ctx, inputs, output):
        _, index, fill, num_rows = inputs
        ctx.save_for_backward(index)
        ctx.num_rows, ctx.has_fill = num_rows, fill is not None

    def scatter_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        grad = grad.contiguous()
        grad_fill = None
        if ctx.has_fill:  # sum of the gradient rows the fill value went to, accumulated in >= fp32
            kept = torch.ones(ctx.num_rows, 1, dtype=torch.bool, device=grad.device)
            kept[index] = False
            acc = torch.promote_types(grad.dtype, torch.float32)
            grad_fill = torch.where(kept, grad, 0).sum(0, dtype=acc).to(grad.dtype)
        return gather_op(grad, index), None, grad_fill, None

    torch.library.register_autograd(gather_op, gather_backward, setup_context=gather_setup)
    torch.library.register_autograd(scatter_op, scatter_backward, setup_context=scatter_setup)

    def masked_gather(x: Tensor, index: Tensor) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"masked_gather: x must be (B, N, D), got {tuple(x.shape)}")
        _check("masked_gather", x, index)
        return gather_op(x.reshape(-1, x.shape[-1]).contiguous(), index.contiguous())

    def masked_scatter(src: Tensor, index: Tensor, fill: Tensor | None, shape: tuple[int, int]) -> Tensor:
        _check_scatter(src, index, fill, shape)
        fill = fill.contiguous() if fill is not None else None
        out = scatter_op(src.contiguous(), index.contiguous(), fill, shape[0] * shape[1])
        return out.view(*shape, src.shape[1])  # (B * N, D) -> (B, N, D)

    return SimpleNamespace(masked_gather=masked_gather, masked_scatter=masked_scatter)


def _fake_gather(x: Tensor, index: Tensor) -> Tensor:
    return x.new_empty((index.shape[0], x.shape[1]))


def _fake_scatter(src: Tensor, index: Tensor, fill: Tensor | None, num_rows: int) -> Tensor:
    return src.new_empty((num_rows, src.shape[1]))


if optional.available("native"):
    torch.library.register_fake("vtp_fast::masked_gather")(_fake_gather)
    torch.library.register_fake("vtp_fast::masked_scatter")(_fake_scatter)
    OP.register_native(_wrap(torch.ops.vtp_fast.masked_gather.default, torch.ops.vtp_fast.masked_scatter.default))
else:
    OP.register_native(None)

if optional.available("triton"):
    from vtp_fast.kernels import masked_gather as _triton

    @torch.library.custom_op("vtp_fast::masked_gather_triton", mutates_args=())
    def _gather_triton(x: Tensor, index: Tensor) -> Tensor:
        return _triton.gather(x, index)

    @torch.library.custom_op("vtp_fast::masked_scatter_triton", mutates_args=())
    def _scatter_triton(src: Tensor, index: Tensor, fill: Tensor | None, num_rows: int) -> Tensor:
        return _triton.scatter(src, index, fill, num_rows)

    _gather_triton.register_fake(_fake_gather)
    _scatter_triton.register_fake(_fake_scatter)
    OP.register_triton(_wrap(_gather_triton, _scatter_triton))
else:
    OP.register_triton(None)
