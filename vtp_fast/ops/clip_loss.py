"""CLIP softmax contrastive loss of this rank's pairs against every rank's features.

  clip_loss(image (n, E), text (n, E), all_image (N, E), all_text (N, E), scale (), offset) -> () fp32

    = (CE(scale * image @ all_text.T, labels) + CE(scale * text @ all_image.T, labels)) / 2,
      labels = offset + arange(n), each cross-entropy the mean over the n rows.

This rank's rows are all_*[offset:offset + n]; `scale` is exp(logit_scale) (capped on the parameter after each
optimizer step, as open_clip does, never in this graph). The loss is differentiable w.r.t. all five tensors; on
one process the caller passes all_image=image, all_text=text, offset=0 and autograd sums both paths. The
reference builds both (n, N) logits matrices; the Triton backend computes them in tiles with an online
log-sum-exp, and its backward keeps d loss / d logits for at most a bounded chunk of columns (64 MiB in bf16), so
its extra memory is O(n + N) plus that constant (kernels/clip_loss.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from vtp_fast import optional
from vtp_fast.ops.registry import new_op

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(image: Tensor, text: Tensor, all_image: Tensor, all_text: Tensor, scale: Tensor, offset: int) -> None:
    named = {"image": image, "text": text, "all_image": all_image, "all_text": all_text}
    for name, t in named.items():
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"clip_loss: {name} must be a 2-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"clip_loss: {name} must be floating point, got {t.dtype}")
        if t.dtype != image.dtype or t.device != image.device:
            raise ValueError(f"clip_loss: {name} is {t.dtype} on {t.device} but image is {image.dtype} on "
                             f"{image.device}")
    if text.shape != image.shape or image.numel() == 0:
        raise ValueError(f"clip_loss: image and text must both be (n >= 1, E >= 1), got {tuple(image.shape)} and "
                         f"{tuple(text.shape)}")
    if all_image.shape != all_text.shape or all_image.shape[1] != image.shape[1]:
        raise ValueError(f"clip_loss: all_image and all_text must both be (N, E={image.shape[1]}), got "
                         f"{tuple(all_image.shape)} and {tuple(all_text.shape)}")
    if not isinstance(scale, Tensor) or scale.dim() != 0 or not scale.is_floating_point():
        raise ValueError(f"clip_loss: scale must be a 0-dim floating tensor, got "
                         f"{tuple(scale.shape) if isinstance(scale, Tensor) else type(scale).__name__}")
    if scale.device != image.device:
        raise ValueError(f"clip_loss: scale is on {scale.device} but the features are on {image.device}")
    n, big_n = image.shape[0], all_image.shape[0]
    # a SymInt when torch.compile traces with dynamic shapes (offset = n * rank)
    if isinstance(offset, bool) or not isinstance(offset, (int, torch.SymInt)) or offset < 0 or offset + n > big_n:
        raise ValueError(f"clip_loss: need an int offset with 0 <= offset and offset + n <= N (n={n}, N={big_n}), "
                         f"got {offset!r}")


def clip_loss_ref(image: Tensor, text: Tensor, all_image: Tensor, all_text: Tensor, scale: Tensor,
                  offset: int) -> Tensor:
    """image, text: (n, E); all_image, all_text: (N, E); scale: (); offset: int -> () fp32.

    Logits are built in the input dtype (what an unfused training step does), the cross-entropy in fp32.
    """
    _check(image, text, all_image, all_text, scale, offset)
    labels = torch.arange(offset, offset + image.shape[0], device=image.device)
    logits_image = scale * image @ all_text.T  # (n, N)
    logits_text = scale * text @ all_image.T  # (n, N)
    return (F.cross_entropy(logits_image.float(), labels) + F.cross_entropy(logits_text.float(), labels)) / 2


OP = new_op("clip_loss", SimpleNamespace(clip_loss=clip_loss_ref))


if optional.available("triton"):
    from vtp_fast.kernels import clip_loss as _triton

    @torch.library.custom_op("vtp_fast::clip_loss_triton", mutates_args=())
    def _forward_op(image: Tensor, text: Tensor, all_image: Tensor, all_text: Tensor, scale: Tensor,
                    offset: int) -> tuple[Tensor, Tensor, Tensor]:
        """-> loss (), the softmax normalisers norm (2, 2, n) fp32 for the backward (kernels/clip_loss.py), and
        dloss/dscale () = sum over directions and rows of (E_softmax[u] - u_target) / (2n), u = logits / scale."""
        norm, target_u, expected_u = _triton.combine(
            _triton.forward(image, text, all_image, all_text, scale, offset))
        top, log_total = norm.unbind(1)  # (2, n) each
        count = 2 * image.shape[0]
        # the kernels' fp32 product, so top - target is exactly 0 where the target is the row's largest logit
        target = scale.float() * target_u
        loss = ((top - target) + log_total).sum() / count
        return loss, norm, (expected_u - target_u).sum() / count

    @torch.library.custom_op("vtp_fast::clip_loss_triton_backward", mutates_args=())
    def _backward_op(grad: Tensor, image: Tensor, text: Tensor, all_image: Tensor, all_text: Tensor, scale: Tensor,
                     norm: Tensor, offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """grad: () fp32, norm: (2, 2, n) -> grads of image, text, all_image, all_text (their shapes and dtype)."""
        return _triton.backward(image, text, all_image, all_text, scale, norm, grad, offset)

    @_forward_op.register_fake
    def _(image, text, all_image, all_text, scale, offset):
        scalar = image.new_empty((), dtype=torch.float32)
        return scalar, image.new_empty((2, 2, image.shape[0]), dtype=torch.float32), torch.empty_like(scalar)

    @_backward_op.register_fake
    def _(grad, image, text, all_image, all_text, scale, norm, offset):
        return (torch.empty_like(image), torch.empty_like(text), torch.empty_like(all_image),
                torch.empty_like(all_text))

    def _setup(ctx, inputs, output):
        image, text, all_image, all_text, scale, offset = inputs
        _, norm, dscale = output
        ctx.mark_non_differentiable(norm, dscale)
        ctx.save_for_backward(image, text, all_image, all_text, scale, norm, dscale)
        ctx.offset = offset

    def _backward(ctx, grad, _grad_norm, _grad_dscale):
        image, text, all_image, all_text, scale, norm, dscale = ctx.saved_tensors
        grad = grad.float().contiguous()
        grads = _backward_op(grad, image, text, all_image, all_text, scale, norm, ctx.offset)
        return *grads, (grad * dscale).to(scale.dtype), None

    torch.library.register_autograd("vtp_fast::clip_loss_triton", _backward, setup_context=_setup)

    def clip_loss_triton(image: Tensor, text: Tensor, all_image: Tensor, all_text: Tensor, scale: Tensor,
                         offset: int) -> Tensor:
        """The reference's signature and value; (n, N) logits are never materialised."""
        _check(image, text, all_image, all_text, scale, offset)
        if image.dtype not in KERNEL_DTYPES:
            raise ValueError(f"clip_loss (triton): features must be float32, float16 or bfloat16, got {image.dtype}")
        loss, _, _ = _forward_op(image.contiguous(), text.contiguous(), all_image.contiguous(),
                                 all_text.contiguous(), scale.contiguous(), offset)
        return loss

    OP.register_triton(SimpleNamespace(clip_loss=clip_loss_triton))
else:
    OP.register_triton(None)
