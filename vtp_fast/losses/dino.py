"""DINOv2 self-distillation losses: DINO on CLS tokens, iBOT on masked patch tokens, KoLeo.

Teacher targets are probabilities over K prototypes, from teacher logits either centred (softmax of
(logits - centre) / teacher temperature, with an EMA centre) or balanced by Sinkhorn-Knopp. Centres and
Sinkhorn sums are all-reduced over ranks, so a multi-process run computes what one process would on the
global batch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtp_fast.distributed import all_gather_with_grad, all_reduce_sum, rank

Centering = Literal["centering", "sinkhorn_knopp"]


def cross_entropy_to_targets(student_logits: Tensor, teacher_probs: Tensor, student_temp: float) -> Tensor:
    """(n, K), (n, K) -> (n,): -sum_k t_k log softmax(s / student_temp)_k, in fp32 (or wider)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    return -(teacher_probs.to(dtype) * F.log_softmax(student_logits.to(dtype) / student_temp, dim=-1)).sum(-1)


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temp: float, n_total: Tensor, iterations: int = 3) -> Tensor:
    """Balanced assignment of rows to prototypes: (n, K) -> (n, K), rows sum to 1, columns near-uniform over the
    global batch of `n_total` rows (a tensor, all ranks)."""
    q = torch.exp(logits.float() / temp).T  # (K, n)
    k = q.shape[0]
    q /= all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))  # each prototype gets 1/K of the mass
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each row gets 1/B
        q /= n_total
    return (q * n_total).T


class _TeacherTargets(nn.Module):
    """Shared by DINO and iBOT: the EMA centre and the teacher-probability rule."""

    def __init__(self, out_dim: int, student_temp: float, center_momentum: float, centering: Centering,
                 sinkhorn_iterations: int = 3):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_targets(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Teacher logits (n, K) -> target probabilities (n, K); updates the centre in centring mode."""
        if self.centering == "sinkhorn_knopp":
            n_total = all_reduce_sum(torch.tensor(float(teacher_logits.shape[0]), device=teacher_logits.device))
            return sinkhorn_knopp(teacher_logits, teacher_temp, n_total, self.sinkhorn_iterations)
        probs = F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)
        batch_sum = all_reduce_sum(teacher_logits.float().sum(0, keepdim=True))
        count = all_reduce_sum(torch.tensor(float(teacher_logits.shape[0]), device=teacher_logits.device))
        self.center.mul_(self.center_momentum).add_(batch_sum / count.clamp_min(1), alpha=1 - self.center_momentum)
        return probs


class DINOLoss(_TeacherTargets):
    """forward(student_global, student_local, teacher) -> scalar.

    student_global: n_global tensors (n, K), logits of the student's global views; student_local: n_local
    tensors (n, K); teacher: n_global tensors (n, K) of target probabilities, view i of the same crops as
    student_global[i]. Cross-view pairing as DINOv2: each student global view against every *other* teacher
    view, each local view against every teacher view; the result is the mean over those pairs of the
    per-sample cross-entropy, averaged over samples.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: Centering = "centering"):
        super().__init__(out_dim, student_temp, center_momentum, centering)

    def forward(self, student_global: list[Tensor], student_local: list[Tensor], teacher: list[Tensor]) -> Tensor:
        if len(student_global) != len(teacher):
            raise ValueError(f"{len(student_global)} student global views but {len(teacher)} teacher views")
        total, terms = 0.0, 0
        for i, s in enumerate(student_global + student_local):
            for j, t in enumerate(teacher):
                if i == j:  # a global view is never matched with itself
                    continue
                total = total + cross_entropy_to_targets(s, t, self.student_temp).mean()
                terms += 1
        return total / max(terms, 1)


class IBOTPatchLoss(_TeacherTargets):
    """forward(student (M, K), teacher (M, K), weights (M,), n_images) -> scalar.

    Rows are the masked patch tokens of the global crops (packed); weights[m] = 1 / (masked tokens in the crop of
    row m), so each masked crop counts once; the sum is divided by the number of global crops `n_images` (masked
    or not), as DINOv2.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: Centering = "centering"):
        super().__init__(out_dim, student_temp, center_momentum, centering)

    def forward(self, student: Tensor, teacher: Tensor, weights: Tensor, n_images: int) -> Tensor:
        return (cross_entropy_to_targets(student, teacher, self.student_temp) * weights).sum() / max(n_images, 1)


def mask_weights(masks: Tensor) -> Tensor:
    """(n, N) bool masks -> (M,) weight 1 / (masked tokens of its row) for each masked token, in row order."""
    per_row = 1.0 / masks.sum(-1).clamp(min=1).float()  # (n,)
    return per_row[:, None].expand_as(masks)[masks]


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator: forward(x (n, D)) -> -mean log(distance to nearest neighbour).

    Rows are L2-normalised; neighbours are searched over the global batch (features gathered with gradient),
    so it does not depend on how the batch is split over ranks (DINOv2 searches within each GPU's batch).
    """

    def forward(self, x: Tensor, eps: float = 1e-8) -> Tensor:
        x = F.normalize(x.float(), dim=-1, eps=eps)
        everyone = all_gather_with_grad(x)  # (world * n, D)
        n = x.shape[0]
        with torch.no_grad():
            dots = x @ everyone.T  # (n, world * n)
            own = torch.arange(n, device=x.device)
            dots[own, own + n * rank()] = -2.0  # never your own neighbour
            nearest = dots.argmax(dim=1)
        distance = F.pairwise_distance(x, everyone[nearest], p=2, eps=eps)
        return -torch.log(distance + eps).mean()



