"""DINOv2 self-distillation losses: DINO on CLS tokens, iBOT on masked patch tokens, KoLeo.

The DINO head ends in a weight-normalised prototype layer (K up to 65,536). Teacher targets are probabilities
over the prototypes, from the teacher's logits either centred (softmax of (logits - centre) / teacher
temperature, with an EMA centre) or balanced by Sinkhorn-Knopp. In centring mode, where the prototype
cross-entropy's backend streams the logits (`vtp_fast.ops.prototype_ce`, Triton), the losses hand it head
embeddings and prototype weights, so the (rows, K) logits of student and teacher are never materialised; with a
backend that materialises them anyway (the reference) the teacher's probabilities are made once per batch and
each student view's log-softmax once, from one matmul over all views, as DINOv2 does. Centres and Sinkhorn sums
are all-reduced over ranks, so a multi-process run computes what one process would on the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtp_fast.distributed import all_gather_with_grad, all_reduce_max, all_reduce_sum, rank
from vtp_fast.ops import prototype_ce as prototype_ce_op
from vtp_fast.ops.prototype_ce import STREAMS_LOGITS, teacher_probs

Centering = Literal["centering", "sinkhorn_knopp"]


class _SoftTargetCE(torch.autograd.Function):
    """-sum_k targets_k log_q_k per row, log_q = log_softmax(student @ weight.T / temp); backward
    dz = (mass * exp(log_q) - targets) * grad / temp with mass = sum_k targets_k. Autograd through the same ops
    makes a new (n, K) tensor at each of them (four forward, three backward); here the logits are scaled in place
    and the backward makes one, dz, and works on it in place."""

    @staticmethod
    def forward(ctx, student: Tensor, weight: Tensor, targets: Tensor, temp: float) -> Tensor:
        acc = torch.promote_types(student.dtype, torch.float32)
        log_q = torch.log_softmax((student @ weight.T).to(acc).div_(temp), dim=-1)  # (n, K)
        targets = targets.to(acc)
        ctx.save_for_backward(student, weight, targets, log_q)
        ctx.temp = temp
        return -torch.linalg.vecdot(targets, log_q)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        student, weight, targets, log_q = ctx.saved_tensors
        mass = targets.sum(-1, keepdim=True)
        dz = torch.exp(log_q).mul_(mass).sub_(targets).mul_((grad / ctx.temp)[:, None]).to(student.dtype)
        return (dz @ weight if ctx.needs_input_grad[0] else None,
                dz.T @ student if ctx.needs_input_grad[1] else None, None, None)


def soft_target_ce(student: Tensor, weight: Tensor, targets: Tensor, student_temp: float) -> Tensor:
    """Student head embeddings (n, d) through the prototypes (K, d) against target mass (n, K) (probabilities, or
    sums of them) -> (n,): -sum_k targets_k log softmax(student @ weight.T / student_temp)_k, in fp32 (float64 for
    float64 inputs). Linear in the targets: against the sum of several targets it is the sum of the
    cross-entropies. No gradient reaches the targets."""
    return _SoftTargetCE.apply(student, weight, targets.detach(), student_temp)


def _global_row_logsumexp(x: Tensor) -> Tensor:
    """(K, n) per rank -> (K, 1): log sum_j exp(x[k, j]) over the columns of every rank, stable at any scale (the
    row maximum over all ranks is subtracted before exponentiating)."""
    m = x.amax(dim=1, keepdim=True) if x.shape[1] else x.new_full((x.shape[0], 1), float("-inf"))  # (K, 1)
    m = all_reduce_max(m)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # no rows anywhere: nothing to shift
    return all_reduce_sum(torch.exp(x - m).sum(dim=1, keepdim=True)).log() + m


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temp: float, iterations: int = 3) -> Tensor:
    """Balanced assignment of rows to prototypes: (n, K) -> (n, K), rows sum to 1, columns near-uniform over the
    global batch (all ranks).

    DINOv2's algorithm (exp(logits / temp), normalise the whole, then `iterations` times: each prototype to 1/K of
    the mass over the global batch, each row to 1/B), computed in the log domain: every normalisation is a
    log-sum-exp with its maximum subtracted, so logits of any scale give finite probabilities where DINOv2's
    fp32 exp overflows to inf/NaN, and the same numbers (to rounding) wherever DINOv2's are finite. The global
    normalisation and the 1/K, 1/B, x B factors of DINOv2 are constants that the following normalisation removes,
    so they are left out: each iteration is "rows (prototypes) sum to one over the global batch", then "columns
    (samples) sum to one".
    """
    lq = logits.float().T / temp  # (K, n) log q, unnormalised
    for _ in range(iterations):
        lq = lq - _global_row_logsumexp(lq)  # each prototype gets the same mass over the global batch
        lq = torch.log_softmax(lq, dim=0)  # each sample's column sums to one
    if iterations == 0:
        lq = torch.log_softmax(lq, dim=0)
    return lq.exp().T  # (n, K)


@dataclass
class Targets:
    """What the teacher hands the student for one set of rows.

    Centring mode with a backend that streams the logits: the teacher's head embeddings (n, d), its prototype
    weights (K, d) and the centre (K,) in force when the targets were made; the target
    softmax((emb @ weight.T - centre) / temp) is computed inside the prototype cross-entropy, fused with the
    student's logits. Otherwise (Sinkhorn-Knopp, or centring with the reference backend): the target
    probabilities (n, K) themselves.
    """

    temp: float
    emb: Tensor | None = None
    weight: Tensor | None = None
    center: Tensor | None = None
    probs: Tensor | None = None
    next_center: Tensor | None = None  # centring mode: the centre after this batch (not carried by chunks)

    def chunk(self, n: int) -> list[Targets]:
        """Split the rows into n equal parts (one per view)."""
        if self.probs is not None:
            return [Targets(self.temp, probs=p) for p in self.probs.chunk(n)]
        return [Targets(self.temp, e, self.weight, self.center) for e in self.emb.chunk(n)]


class _TeacherTargets(nn.Module):
    """Shared by DINO and iBOT: the EMA centre, the target rule, and the prototype cross-entropy (resolved from
    the op registry at construction)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: Centering = "centering", sinkhorn_iterations: int = 3):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.ce = prototype_ce_op.OP.resolve()
        self.streams = STREAMS_LOGITS in self.ce.capabilities  # else the targets are made as probabilities

    @torch.no_grad()
    def teacher_targets(self, emb: Tensor, weight: Tensor, temp: float, center: Tensor | None = None) -> Targets:
        """Teacher head embeddings (n, d) and prototype weights (K, d) -> Targets, made with `center` (K,) in force
        (default: this module's). In centring mode `next_center` is where the centre moves after this batch, the
        EMA of its mean teacher logits (W @ mean(emb): no logits needed); the caller applies it
        (`self.center.copy_`) once the step is taken, so a skipped step leaves the centre as it was."""
        if self.centering == "sinkhorn_knopp":
            return Targets(temp, probs=sinkhorn_knopp(emb @ weight.T, temp, self.sinkhorn_iterations))
        center = self.center[0] if center is None else center
        count = all_reduce_sum(torch.tensor(float(emb.shape[0]), device=emb.device))
        mean_emb = all_reduce_sum(emb.float().sum(0)) / count.clamp_min(1)  # (d,)
        keep = torch.where(count > 0, self.center_momentum, 1.0)  # no rows on any rank: the centre stays
        next_center = center * keep + (weight.float() @ mean_emb) * (1 - keep)
        if not self.streams:
            return Targets(temp, probs=teacher_probs(emb, weight, center, temp), center=center.clone(),
                           next_center=next_center)
        return Targets(temp, emb, weight, center.clone(), next_center=next_center)

    def cross_entropy(self, student: Tensor, weight: Tensor, target: Targets) -> Tensor:
        """Student head embeddings (n, d) through the student's prototypes (K, d) against `target` -> (n,)."""
        if target.probs is not None:
            return soft_target_ce(student, weight, target.probs, self.student_temp)
        return self.ce.impl.prototype_ce(student, target.emb, weight, target.center, self.student_temp, target.temp,
                                         teacher_weight=target.weight)


class DINOLoss(_TeacherTargets):
    """forward(student_global, student_local, teacher, weight) -> scalar.

    student_global: n_global tensors (n, d), head embeddings of the student's global views; student_local:
    n_local tensors (n, d); teacher: n_global Targets, view i of the same crops as student_global[i]; weight:
    the student's prototype weights (K, d). Cross-view pairing as DINOv2: each student global view against every
    *other* teacher view, each local view against every teacher view; the result is the mean over those pairs
    of the per-sample cross-entropy, averaged over samples.
    """

    def forward(self, student_global: list[Tensor], student_local: list[Tensor], teacher: list[Targets],
                weight: Tensor) -> Tensor:
        if len(student_global) != len(teacher):
            raise ValueError(f"{len(student_global)} student global views but {len(teacher)} teacher views")
        views = [(s, [t for j, t in enumerate(teacher) if j != i])  # a global view is never matched with itself
                 for i, s in enumerate(student_global + student_local)]
        views = [(s, ts) for s, ts in views if ts]
        pairs = sum(len(ts) for _, ts in views)
        if views and all(t.probs is not None for t in teacher):
            # each view against the sum of its teacher views' probabilities: the sum of those cross-entropies;
            # one matmul and one pass over the logits for all views
            mass = torch.cat([sum(t.probs for t in ts) for _, ts in views])
            rows = soft_target_ce(torch.cat([s for s, _ in views]), weight, mass, self.student_temp)
            total = sum(r.mean() for r in rows.split([len(s) for s, _ in views]))
        else:
            total = sum(self.cross_entropy(s, weight, t).mean() for s, ts in views for t in ts)
        return total / max(pairs, 1)


class IBOTPatchLoss(_TeacherTargets):
    """forward(student (M, d), teacher Targets of M rows, weight (K, d), weights (M,), n_images) -> scalar.

    Rows are the masked patch tokens of the global crops (packed); weights[m] = 1 / (masked tokens in the crop of
    row m), so each masked crop counts once; the sum is divided by the number of global crops `n_images` (masked
    or not), as DINOv2.
    """

    def forward(self, student: Tensor, teacher: Targets, weight: Tensor, weights: Tensor, n_images: int) -> Tensor:
        if student.shape[0] == 0:  # no masked token in this batch
            return student.sum() * 0.0
        return (self.cross_entropy(student, weight, teacher) * weights).sum() / max(n_images, 1)


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



