"""Adversarial losses for stage 2 (hinge), and the adaptive generator weight of VQGAN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def discriminator_hinge(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """mean(relu(1 - D(real))) + mean(relu(1 + D(fake))), halved."""
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def generator_hinge(fake_logits: Tensor) -> Tensor:
    return -fake_logits.mean()


def adaptive_weight(rec_loss: Tensor, gen_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """||d rec / d W|| / (||d gen / d W|| + 1e-4) at the decoder's last layer W, clamped to [0, max_weight] and
    detached: balances the adversarial gradient against the reconstruction gradient (Esser et al., VQGAN)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gen = torch.autograd.grad(gen_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gen.norm() + 1e-4)).clamp(0, max_weight).detach()
