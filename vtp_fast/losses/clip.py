"""CLIP image-text contrastive loss with the local-loss + all-gather-with-gradient scheme (OpenCLIP)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtp_fast.distributed import all_gather_with_grad, rank
from vtp_fast.ops import clip_loss as clip_loss_op

MAX_LOGIT_SCALE = 100.0


@torch.no_grad()
def clamp_logit_scale_(logit_scale: Tensor) -> Tensor:
    """In place, outside the graph, after the optimizer step (open_clip's `logit_scale.clamp_(0, log(100))`): keeps
    exp(logit_scale) in [1, MAX_LOGIT_SCALE]. The loss uses the parameter unclamped, so at the cap its gradient is
    the true one and the optimizer can bring the scale back down."""
    return logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))


def clip_loss_global(image_features: Tensor, text_features: Tensor, scale: Tensor) -> Tensor:
    """Plain softmax CLIP loss over one (N, E) x (N, E) batch of L2-normalised pairs; `scale` is exp(logit
    scale). The reference the distributed and fused versions must equal."""
    logits = scale * image_features @ text_features.T  # (N, N)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class ClipLoss(nn.Module):
    """forward(image_features (n, E), text_features (n, E), logit_scale ()) -> scalar.

    Features are this rank's L2-normalised pairs; `logit_scale` is the learnable log-scale, exponentiated with no
    clamp in the graph, so its gradient is never cut off; as in open_clip the parameter itself is kept in
    [0, log 100] by `clamp_logit_scale_` after each optimizer step. Each rank gathers every rank's features (the
    gather's backward sums the gradient slices across ranks) and builds only its local x global logits
    (n, world * n); the mean of the local losses, with DDP's gradient averaging, has the value and gradients of
    `clip_loss_global` on the global batch.
    """

    def __init__(self):
        super().__init__()
        self.backend = clip_loss_op.OP.resolve()  # the fused Triton kernel never builds the logits matrix

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
        scale = logit_scale.exp()  # ()
        all_image, all_text = all_gather_with_grad(image_features), all_gather_with_grad(text_features)
        n = image_features.shape[0]  # local x global logits: (n, world * n), this rank's labels at n * rank
        return self.backend.impl.clip_loss(image_features, text_features, all_image, all_text, scale, n * rank())
