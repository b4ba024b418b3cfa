"""Triton kernels for the pixel-shuffle and the fused pixel-shuffle + L1 loss (semantics:
vtp_fast/ops/pixel_shuffle_l1.py).

Launchers take contiguous tensors; target has the tokens' dtype or is float32 with half/bfloat16 tokens:
  shuffle(tokens (B, h*w, 3*p*p), h, w, p)                           -> image (B, 3, h*p, w*p)
  l1(tokens, target (B, 3, h*p, w*p), p)                               -> () mean |image - target|, fp32 (fp64
                                                                          for fp64 inputs)
  l1_backward(grad (), tokens, target, p, need_tokens, need_target)  -> (grad_tokens or (0,), grad_target or (0,))

A program takes BLOCK_T consecutive tokens and walks their channels BLOCK_C at a time: tokens are read
contiguously, the matching pixels of the target (or image) are addressed as token base + channel offset. The
loss writes one partial sum per program (their number fixed by the shape), added afterwards: deterministic, no
atomics, and the image is never written.
"""

import torch
import triton
import triton.language as tl
from vtp_fast.kernels import launch, loop_bound

_TILE = 2048  # elements a program touches per channel step
# The work these kernels do, read by vtp_fast.measure.perf_model (`vtp-fast bench --model`); update it with the kernels.
# "fwd" = l1 (partials kernel, their sum, the mean), "bwd" = l1_backward (the scale, the kernel); "passes" = DRAM
# passes over tokens and target; "launches" = kernels started here, PyTorch glue included.
WORK = {"fwd": {"passes": 1, "launches": 3}, "bwd": {"passes": 1, "launches": 2}}


def _blocks(channels: int) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(channels), 256)
    return max(1, _TILE // block_c), block_c


@triton.jit
def _tile(pid, c0, n_tokens, hw, w, p, C, H, W, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Token-layout and image-layout offsets of a (BLOCK_T tokens, BLOCK_C channels) tile, and its mask."""
    tok = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ch = c0 + tl.arange(0, BLOCK_C)
    b = tok // hw
    n = tok % hw
    y = n // w
    x = n % w
    tok_base = (b * 3 * H + y * p) * W + x * p  # pixel (0, 0, 0) of each token
    c = ch // (p * p)
    r = ch % (p * p)
    i = r // p
    ch_off = (c * H + i) * W + r % p  # pixel (c, i, j) relative to the token's pixel (0, 0, 0)
    mask = (tok < n_tokens)[:, None] & (ch < C)[None, :]
    return tok[:, None] * C + ch[None, :], tok_base[:, None] + ch_off[None, :], mask


@triton.jit
def _shuffle_kernel(tok_ptr, img_ptr, n_tokens, hw, w, p, C, H, W, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    for c0 in range(0, loop_bound(C), BLOCK_C):
        tok_off, img_off, mask = _tile(pid, c0, n_tokens, hw, w, p, C, H, W, BLOCK_T, BLOCK_C)
        tl.store(img_ptr + img_off, tl.load(tok_ptr + tok_off, mask=mask), mask=mask)


@triton.jit
def _l1_partials_kernel(tok_ptr, tgt_ptr, part_ptr, n_tokens, hw, w, p, C, H, W, ACC: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK_T, BLOCK_C), ACC)
    for c0 in range(0, loop_bound(C), BLOCK_C):
        tok_off, img_off, mask = _tile(pid, c0, n_tokens, hw, w, p, C, H, W, BLOCK_T, BLOCK_C)
        a = tl.load(tok_ptr + tok_off, mask=mask, other=0).to(ACC)
        t = tl.load(tgt_ptr + img_off, mask=mask, other=0).to(ACC)
        acc += tl.abs(a - t)
    tl.store(part_ptr + pid, tl.sum(acc))


@triton.jit
def _l1_backward_kernel(tok_ptr, tgt_ptr, scale_ptr, gtok_ptr, gtgt_ptr, n_tokens, hw, w, p, C, H, W,
                        NEED_TOKENS: tl.constexpr, NEED_TARGET: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr)
    for c0 in range(0, loop_bound(C), BLOCK_C):
        tok_off, img_off, mask = _tile(pid, c0, n_tokens, hw, w, p, C, H, W, BLOCK_T, BLOCK_C)
        d = tl.load(tok_ptr + tok_off, mask=mask, other=0).to(ACC) - tl.load(tgt_ptr + img_off, mask=mask,
                                                                              other=0).to(ACC)
        v = tl.where(d > 0, scale, tl.where(d < 0, -scale, 0.0))  # sign(0) = sign(NaN) = 0, as torch
        if NEED_TOKENS:
            tl.store(gtok_ptr + tok_off, v.to(gtok_ptr.dtype.element_ty), mask=mask)
        if NEED_TARGET:
            tl.store(gtgt_ptr + img_off, (-v).to(gtgt_ptr.dtype.element_ty), mask=mask)


def _acc_dtype(tokens: torch.Tensor) -> torch.dtype:
    return torch.float64 if tokens.dtype == torch.float64 else torch.float32


def _geometry(tokens: torch.Tensor, h: int, w: int, p: int) -> tuple:
    """(grid, kernel shape arguments, block sizes) for B * h * w tokens of 3 * p * p channels."""
    n_tokens, channels = tokens.shape[0] * h * w, 3 * p * p
    block_t, block_c = _blocks(channels)
    return (triton.cdiv(n_tokens, block_t),), (n_tokens, h * w, w, p, channels, h * p, w * p), (block_t, block_c)


def shuffle(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    image = torch.empty((tokens.shape[0], 3, h * p, w * p), dtype=tokens.dtype, device=tokens.device)
    if image.numel():
        grid, shape, (block_t, block_c) = _geometry(tokens, h, w, p)
        launch(_shuffle_kernel, grid, tokens, image, *shape, BLOCK_T=block_t, BLOCK_C=block_c)
    return image


def l1(tokens: torch.Tensor, target: torch.Tensor, p: int) -> torch.Tensor:
    acc = _acc_dtype(tokens)
    if target.numel() == 0:
        return torch.full((), float("nan"), dtype=acc, device=tokens.device)  # the mean of nothing
    grid, shape, (block_t, block_c) = _geometry(tokens, target.shape[2] // p, target.shape[3] // p, p)
    partials = torch.empty(grid[0], dtype=acc, device=tokens.device)
    launch(_l1_partials_kernel, grid, tokens, target, partials, *shape,
           ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_T=block_t, BLOCK_C=block_c)
    return partials.sum() / target.numel()


def l1_backward(grad: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor, p: int, need_tokens: bool,
                need_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
    grad_tokens = torch.empty_like(tokens) if need_tokens else tokens.new_empty((0,))
    grad_target = torch.empty_like(target) if need_target else target.new_empty((0,))
    if (need_tokens or need_target) and target.numel():
        acc = _acc_dtype(tokens)
        # grad / numel as autograd's mean backward computes it (an IEEE division), bit for bit
        scale = grad.reshape(()).to(acc) / target.numel()
        grid, shape, (block_t, block_c) = _geometry(tokens, target.shape[2] // p, target.shape[3] // p, p)
        launch(_l1_backward_kernel, grid, tokens, target, scale, grad_tokens if need_tokens else tokens,
               grad_target if need_target else target, *shape, NEED_TOKENS=need_tokens, NEED_TARGET=need_target,
               ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_T=block_t, BLOCK_C=block_c)
    return grad_tokens, grad_target
