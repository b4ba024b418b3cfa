"""The pixel decoder's output as an image, and the L1 reconstruction loss fused with that rearrangement.

The pixel decoder ends in tokens (B, h*w, 3*p*p); PixelShuffle(p) on token layout makes them the image
(B, 3, h*p, w*p): channel c*p*p + i*p + j of token (y, x) is pixel (c, y*p + i, x*p + j) (as
`nn.PixelShuffle` on the (B, 3*p*p, h, w) layout).

  pixel_shuffle(tokens (B, h*w, 3*p*p), grid (h, w), patch p)            -> image (B, 3, h*p, w*p)
  pixel_shuffle_l1(tokens (B, h*w, 3*p*p), target (B, 3, h*p, w*p), p)  -> () mean |image - target|

In training the fused backends never write the full-size reconstruction: the loss reads tokens and target once
(fixed per-block partial sums added in order: deterministic), and its backward reads them again to write
grad_tokens = sign(tokens - unshuffled target) * grad / numel (sign(0) = 0, as torch) and, only when the target
needs one, grad_target = minus that, in image layout. `pixel_shuffle` is for inference: it writes the image
once. Accumulation and the loss are float32 (float64 for float64 inputs); inputs may be float16, bfloat16,
float32 or float64. Backends: pure-PyTorch reference, native C++ (CPU) / CUDA (`vtp_fast._C`), Triton.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from vtp_fast import optional
from vtp_fast.ops.registry import new_op

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALVES = (torch.float16, torch.bfloat16)


def _check_tokens(fn: str, tokens: Tensor, patch: int) -> None:
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ValueError(f"{fn}: patch must be a positive int, got {patch!r}")
    if tokens.dim() != 3 or tokens.shape[2] != 3 * patch * patch:
        raise ValueError(f"{fn}: tokens must be (B, h*w, 3*p*p = {3 * patch * patch}) for patch {patch}, got "
                         f"{tuple(tokens.shape)}")
    if tokens.dtype not in FLOATS:
        raise ValueError(f"{fn}: tokens must be float16, bfloat16, float32 or float64, got {tokens.dtype}")


def _check_shuffle(tokens: Tensor, grid: tuple[int, int], patch: int) -> tuple[int, int]:
    _check_tokens("pixel_shuffle", tokens, patch)
    if len(grid) != 2 or any(isinstance(s, bool) or not isinstance(s, (int, torch.SymInt)) or s < 0 for s in grid):
        raise ValueError(f"pixel_shuffle: grid must be (h, w) non-negative ints, got {grid!r}")
    h, w = grid
    if h * w != tokens.shape[1]:
        raise ValueError(f"pixel_shuffle: grid {h}x{w} = {h * w} tokens, but tokens has {tokens.shape[1]}")
    return h, w


def _check_l1(tokens: Tensor, target: Tensor, patch: int) -> tuple[int, int]:
    """The token grid (h, w), from the target's size."""
    _check_tokens("pixel_shuffle_l1", tokens, patch)
    b, n = tokens.shape[:2]
    if (target.dim() != 4 or target.shape[0] != b or target.shape[1] != 3 or target.shape[2] % patch
            or target.shape[3] % patch or (target.shape[2] // patch) * (target.shape[3] // patch) != n):
        raise ValueError(f"pixel_shuffle_l1: target must be (B={b}, 3, h*p, w*p) with h*w = {n} tokens for patch "
                         f"{patch}, got {tuple(target.shape)}")
    if target.dtype not in FLOATS:
        raise ValueError(f"pixel_shuffle_l1: target must be a float tensor, got {target.dtype}")
    if target.device != tokens.device:
        raise ValueError(f"pixel_shuffle_l1: target is on {target.device} but the tokens are on {tokens.device}")
    return target.shape[2] // patch, target.shape[3] // patch


def _loss_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def pixel_shuffle_ref(tokens: Tensor, grid: tuple[int, int], patch: int) -> Tensor:
    """(B, h*w, 3*p*p) -> (B, 3, h*p, w*p)."""
    h, w = _check_shuffle(tokens, grid, patch)
    b = tokens.shape[0]
    x = tokens.reshape(b, h, w, 3, patch, patch)  # (B, h, w, 3, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, h * patch, w * patch)  # (B, 3, h, p, w, p) -> image


def pixel_shuffle_l1_ref(tokens: Tensor, target: Tensor, patch: int) -> Tensor:
    """tokens (B, h*w, 3*p*p), target (B, 3, h*p, w*p) -> () mean |pixel_shuffle(tokens) - target|, float32
    (float64 when an input is), differentiable w.r.t. tokens and target. Materialises the image."""
    grid = _check_l1(tokens, target, patch)
    dtype = _loss_dtype(tokens.dtype, target.dtype)
    return F.l1_loss(pixel_shuffle_ref(tokens, grid, patch).to(dtype), target.to(dtype))


OP = new_op("pixel_shuffle_l1", SimpleNamespace(pixel_shuffle=pixel_shuffle_ref, pixel_shuffle_l1=pixel_shuffle_l1_ref))


def _kernel_dtypes(tokens: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The kernels take a target of the tokens' dtype, or float32 with half tokens (bf16 decoder output against
    an fp32 image). Other mixes are cast to their promoted dtype first (exact; one copy, differentiable)."""
    if target.dtype == tokens.dtype or (target.dtype == torch.float32 and tokens.dtype in _HALVES):
        return tokens, target
    common = torch.promote_types(tokens.dtype, target.dtype)
    return tokens.to(common), target.to(common)


def _unshuffle(image: Tensor, patch: int) -> Tensor:
    """(B, 3, h*p, w*p) -> (B, h*w, 3*p*p): the inverse of pixel_shuffle (its backward)."""
    b, _, hp, wp = image.shape
    h, w = hp // patch, wp // patch
    x = image.reshape(b, 3, h, patch, w, patch)  # (B, 3, h, p, w, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, 3 * patch * patch)  # (B, h, w, 3, p, p) -> tokens


def _wrap(shuffle_op, l1_op, l1_backward_op) -> SimpleNamespace:
    """Give the custom ops (contiguous inputs, grid as ints) the reference's signatures and autograd."""

    def shuffle_setup(ctx, inputs, output):
        ctx.patch = inputs[3]

    def shuffle_backward(ctx, grad):
        return _unshuffle(grad, ctx.patch).contiguous(), None, None, None

    def l1_setup(ctx, inputs, output):
        tokens, target, patch = inputs
        ctx.save_for_backward(tokens, target)  # the inputs themselves: the backward re-reads, saves no image
        ctx.patch = patch

    def l1_backward(ctx, grad):
        tokens, target = ctx.saved_tensors
        need_tokens, need_target = ctx.needs_input_grad[:2]
        grad_tokens, grad_target = l1_backward_op(grad, tokens, target, ctx.patch, need_tokens, need_target)
        return grad_tokens if need_tokens else None, grad_target if need_target else None, None

    torch.library.register_autograd(shuffle_op, shuffle_backward, setup_context=shuffle_setup)
    torch.library.register_autograd(l1_op, l1_backward, setup_context=l1_setup)

    def pixel_shuffle(tokens: Tensor, grid: tuple[int, int], patch: int) -> Tensor:
        h, w = _check_shuffle(tokens, grid, patch)
        return shuffle_op(tokens.contiguous(), h, w, patch)

    def pixel_shuffle_l1(tokens: Tensor, target: Tensor, patch: int) -> Tensor:
        _check_l1(tokens, target, patch)
        tokens, target = _kernel_dtypes(tokens, target)
        return l1_op(tokens.contiguous(), target.contiguous(), patch)

    return SimpleNamespace(pixel_shuffle=pixel_shuffle, pixel_shuffle_l1=pixel_shuffle_l1)


def _fake_shuffle(tokens: Tensor, h: int, w: int, patch: int) -> Tensor:
    return tokens.new_empty((tokens.shape[0], 3, h * patch, w * patch))


def _fake_l1(tokens: Tensor, target: Tensor, patch: int) -> Tensor:
    return tokens.new_empty((), dtype=_loss_dtype(tokens.dtype))


def _fake_l1_backward(grad: Tensor, tokens: Tensor, target: Tensor, patch: int, need_tokens: bool,
                      need_target: bool) -> tuple[Tensor, Tensor]:
    return (torch.empty_like(tokens) if need_tokens else tokens.new_empty((0,)),
            torch.empty_like(target) if need_target else target.new_empty((0,)))


if optional.available("native"):
    for _name, _fake in (("pixel_shuffle", _fake_shuffle), ("pixel_shuffle_l1", _fake_l1),
                         ("pixel_shuffle_l1_backward", _fake_l1_backward)):
        torch.library.register_fake(f"vtp_fast::{_name}")(_fake)
    _ops = torch.ops.vtp_fast
    OP.register_native(_wrap(_ops.pixel_shuffle.default, _ops.pixel_shuffle_l1.default,
                             _ops.pixel_shuffle_l1_backward.default))
else:
    OP.register_native(None)

if optional.available("triton"):
    from vtp_fast.kernels import pixel_shuffle_l1 as _triton

    @torch.library.custom_op("vtp_fast::pixel_shuffle_triton", mutates_args=())
    def _shuffle_triton(tokens: Tensor, h: int, w: int, patch: int) -> Tensor:
        return _triton.shuffle(tokens, h, w, patch)

    @torch.library.custom_op("vtp_fast::pixel_shuffle_l1_triton", mutates_args=())
    def _l1_triton(tokens: Tensor, target: Tensor, patch: int) -> Tensor:
        return _triton.l1(tokens, target, patch)

    @torch.library.custom_op("vtp_fast::pixel_shuffle_l1_backward_triton", mutates_args=())
    def _l1_backward_triton(grad: Tensor, tokens: Tensor, target: Tensor, patch: int, need_tokens: bool,
                            need_target: bool) -> tuple[Tensor, Tensor]:
        return _triton.l1_backward(grad, tokens, target, patch, need_tokens, need_target)

    _shuffle_triton.register_fake(_fake_shuffle)
    _l1_triton.register_fake(_fake_l1)
    _l1_backward_triton.register_fake(_fake_l1_backward)
    OP.register_triton(_wrap(_shuffle_triton, _l1_triton, _l1_backward_triton))
else:
    OP.register_triton(None)
