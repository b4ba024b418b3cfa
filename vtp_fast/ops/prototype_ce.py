"""Prototype cross-entropy: the DINO / iBOT loss fused with the DINO head's last (weight-normalised) linear layer.

  prototype_ce(student (n, d), teacher (n, d), weight (K, d), center (K,), student_temp, teacher_temp,
               teacher_weight (K, d) = weight) -> (n,)
      loss_i = -sum_k softmax((teacher_i . V_k - c_k) / teacher_temp)_k * log_softmax(student_i . W / student_temp)_k
      with W = weight (the student's prototypes) and V = teacher_weight (the EMA teacher's; W when omitted).

student and teacher are the head's L2-normalised bottleneck outputs for the same samples (DINO: CLS tokens;
iBOT: masked patch tokens), weight the prototype layer's effective weight (after weight normalisation), center
the teacher centre. The teacher side is a target: gradients reach `student` and `weight` only. The result is
float32 (float64 for float64 inputs).

With K up to 65,536 prototypes the (n, K) logits dominate a DINOv2 step's memory. The reference materialises
them; the Triton backend never does: one pass over K with online rescaling gives
loss = LSE_k(s) - sum_k softmax(t)_k s_k, and the backward recomputes the logits once, tile by tile, keeping
at most a bounded chunk (64 MiB in bf16) of dloss/dlogits for the student's gradient.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import Tensor

from vtp_fast import optional
from vtp_fast.ops.registry import new_op

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
STREAMS_LOGITS = "streams_logits"  # a backend's capability: it never materialises the (n, K) logits


def _check(student: Tensor, teacher: Tensor, weight: Tensor, center: Tensor, student_temp: float,
           teacher_temp: float, teacher_weight: Tensor | None = None) -> None:
    if teacher_weight is not None and (teacher_weight.shape != weight.shape or teacher_weight.dtype != weight.dtype
                                       or teacher_weight.device != weight.device):
        raise ValueError(f"prototype_ce: teacher_weight must match weight {tuple(weight.shape)} {weight.dtype} on "
                         f"{weight.device}, got {tuple(teacher_weight.shape)} {teacher_weight.dtype}")
    if student.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(f"prototype_ce: student and teacher must share one (n, d) shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    d = student.shape[1]
    if weight.dim() != 2 or weight.shape[1] != d or weight.shape[0] == 0:
        raise ValueError(f"prototype_ce: weight must be (K >= 1, d={d}), got {tuple(weight.shape)}")
    if center.shape != weight.shape[:1]:
        raise ValueError(f"prototype_ce: center must be (K={weight.shape[0]},), got {tuple(center.shape)}")
    if not (student.dtype == teacher.dtype == weight.dtype and student.is_floating_point()
            and center.is_floating_point()):
        raise ValueError(f"prototype_ce: student, teacher and weight must share one floating dtype and center must "
                         f"be floating, got {student.dtype}, {teacher.dtype}, {weight.dtype}, {center.dtype}")
    if not student.device == teacher.device == weight.device == center.device:
        raise ValueError(f"prototype_ce: inputs on different devices: {student.device}, {teacher.device}, "
                         f"{weight.device}, {center.device}")
    for name, temp in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
        if isinstance(temp, Tensor) or not 0 < temp < math.inf:
            raise ValueError(f"prototype_ce: {name} must be a positive finite number, got {temp!r}")


def prototype_ce_ref(student: Tensor, teacher: Tensor, weight: Tensor, center: Tensor, student_temp: float,
                     teacher_temp: float, teacher_weight: Tensor | None = None) -> Tensor:
    """student, teacher: (n, d); weight, teacher_weight: (K, d); center: (K,) -> (n,) float32 per-row
    cross-entropy.

    The unfused computation: logits from a matmul in the inputs' dtype (as the head's linear layer makes them),
    softmaxes in fp32. No gradient reaches teacher or center, even when they require grad.
    """
    _check(student, teacher, weight, center, student_temp, teacher_temp, teacher_weight)
    acc = torch.promote_types(student.dtype, torch.float32)
    log_q = torch.log_softmax((student @ weight.T).to(acc) / student_temp, dim=-1)  # (n, K)
    p = teacher_probs(teacher, weight if teacher_weight is None else teacher_weight, center, teacher_temp)
    return -(p * log_q).sum(-1)


@torch.no_grad()
def teacher_probs(teacher: Tensor, teacher_weight: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """The centred target: teacher (n, d), teacher_weight (K, d), center (K,) -> softmax((teacher @ teacher_weight.T
    - center) / teacher_temp) (n, K), in fp32 (float64 for float64 inputs), with the logits from a matmul in the
    inputs' dtype."""
    acc = torch.promote_types(teacher.dtype, torch.float32)
    return torch.softmax((teacher @ teacher_weight.T).to(acc).sub_(center.to(acc)).div_(teacher_temp), dim=-1)


OP = new_op("prototype_ce", SimpleNamespace(prototype_ce=prototype_ce_ref))


if optional.available("triton"):
    from vtp_fast.kernels import prototype_ce as _triton

    @torch.library.custom_op("vtp_fast::prototype_ce_triton", mutates_args=())
    def _forward_op(student: Tensor, teacher: Tensor, weight: Tensor, teacher_weight: Tensor, center: Tensor,
                    student_temp: float, teacher_temp: float) -> tuple[Tensor, Tensor]:
        """Contiguous (n, d), (n, d), (K, d), (K,) float32 -> loss (n,), stats (4, n), float32: per row the maximum
        and the exp2-sum of the base-2 student and teacher logits, what the backward needs to rebuild both
        softmaxes."""
        return _triton.forward(student, teacher, weight, teacher_weight, center, student_temp, teacher_temp)

    @torch.library.custom_op("vtp_fast::prototype_ce_triton_backward", mutates_args=())
    def _backward_op(grad: Tensor, student: Tensor, teacher: Tensor, weight: Tensor, teacher_weight: Tensor,
                     center: Tensor, stats: Tensor, student_temp: float, teacher_temp: float, need_student: bool,
                     need_weight: bool) -> tuple[Tensor, Tensor]:
        """grad (n,) float32 and the forward's inputs and stats -> d(sum grad * loss) / d student (n, d) and
        / d weight (K, d); one not needed comes back empty, shape (0,). Both from one recomputation of the logits
        (kernels/prototype_ce.py)."""
        grad_student, grad_weight = _triton.backward(grad, student, teacher, weight, teacher_weight, center, stats,
                                                     student_temp, teacher_temp, need_student, need_weight)
        return (student.new_empty(0) if grad_student is None else grad_student,
                weight.new_empty(0) if grad_weight is None else grad_weight)

    @_forward_op.register_fake
    def _(student, teacher, weight, teacher_weight, center, student_temp, teacher_temp):
        n = student.shape[0]
        return student.new_empty(n, dtype=torch.float32), student.new_empty((4, n), dtype=torch.float32)

    @_backward_op.register_fake
    def _(grad, student, teacher, weight, teacher_weight, center, stats, student_temp, teacher_temp, need_student,
          need_weight):
        return (torch.empty_like(student) if need_student else student.new_empty(0),
                torch.empty_like(weight) if need_weight else weight.new_empty(0))

    def _setup(ctx, inputs, output):
        student, teacher, weight, teacher_weight, center, student_temp, teacher_temp = inputs
        _, stats = output
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(student, teacher, weight, teacher_weight, center, stats)
        ctx.temps = (student_temp, teacher_temp)

    def _backward(ctx, grad_loss, _grad_stats):
        saved = ctx.saved_tensors
        grad = grad_loss.float().contiguous()  # (n,); a .sum()'s gradient arrives expanded, with stride 0
        need_student, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_student, grad_weight = _backward_op(grad, *saved, *ctx.temps, need_student, need_weight)
        return (grad_student if need_student else None, None, grad_weight if need_weight else None, None, None,
                None, None)  # the teacher side is a target

    torch.library.register_autograd(_forward_op, _backward, setup_context=_setup)

    def _prototype_ce_triton(student: Tensor, teacher: Tensor, weight: Tensor, center: Tensor, student_temp: float,
                             teacher_temp: float, teacher_weight: Tensor | None = None) -> Tensor:
        """The reference's signature and semantics; fp16, bf16 or fp32 inputs, fp32 accumulation."""
        _check(student, teacher, weight, center, student_temp, teacher_temp, teacher_weight)
        if student.dtype not in TRITON_DTYPES:
            raise ValueError(f"prototype_ce (triton): dtype must be one of {TRITON_DTYPES}, got {student.dtype}")
        v = weight if teacher_weight is None else teacher_weight
        loss, _ = _forward_op(student.contiguous(), teacher.detach().contiguous(), weight.contiguous(),
                              v.detach().contiguous(), center.detach().float().contiguous(), float(student_temp),
                              float(teacher_temp))
        return loss

    OP.register_triton(SimpleNamespace(prototype_ce=_prototype_ce_triton), capabilities=(STREAMS_LOGITS,))
else:
    OP.register_triton(None)
