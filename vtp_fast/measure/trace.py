"""One rank's micro-batch traced on the meta device (vtp_fast.train.flops.meta_step): the peak of the bytes alive
during its forward and backward, its model FLOPs and its parameter counts, for the planners
(vtp_fast.measure.planner, vtp_fast.measure.plan_dit). bf16 runs are traced with autocast's casts emulated, since
the meta device has no autocast."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import flop_registry

from vtp_fast.train.config import PretrainConfig
from vtp_fast.train.flops import meta_step
from vtp_fast.train.trainer import forward_backward, schedules


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages that ops inside it create, while they live; `peak` is the most alive at
    once. Storages are followed through weak references, so views and tensors autograd saves count once, as long
    as they exist. The storages of `existing` (parameters, gradients, the batch: tensors that outlive the block)
    are not counted when ops view or update them. `flops`: the model FLOPs of the ops (torch.utils.flop_counter's
    formulas: matmuls, convolutions, attention), counted on the way at no cost in memory (FlopCounterMode keeps
    recomputed activations alive)."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.live = self.peak = self.flops = 0
        self._sizes: dict[int, int] = {id(t.untyped_storage()): 0 for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (formula := flop_registry.get(func._overloadpacket)) is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._sizes:
                    self._sizes[key] = storage.nbytes()
                    self.live += self._sizes[key]
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    @staticmethod
    def state_of(*modules: torch.nn.Module) -> list[torch.Tensor]:
        """The parameters, their gradients and the buffers of `modules`."""
        params = [p for m in modules for p in m.parameters()]
        return [*params, *(p.grad for p in params if p.grad is not None), *(b for m in modules for b in m.buffers())]


class EmulatedAutocast(TorchFunctionMode):
    """bf16 autocast where the device has none (the meta device): matmul and attention inputs cast to bf16, norms,
    softmax, exponentials and losses to fp32, above autograd as autocast is (so the casts are what it saves)."""

    LOW = {F.linear, F.conv2d, F.scaled_dot_product_attention, torch.matmul, torch.Tensor.matmul,
           torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.baddbmm, torch.addmm, torch.einsum}
    HIGH = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, F.cross_entropy, F.mse_loss, F.l1_loss,
            torch.softmax, torch.log_softmax, torch.logsumexp, torch.exp, torch.log, torch.Tensor.softmax,
            torch.Tensor.log_softmax, torch.Tensor.logsumexp, torch.Tensor.exp, torch.Tensor.log}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to = torch.bfloat16 if func in self.LOW else torch.float32 if func in self.HIGH else None
        if to is not None:
            cast = lambda x: x.to(to) if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
            args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
        return func(*args, **kwargs)


@dataclass
class MicroStep:
    """One rank's micro-batch traced on the meta device."""

    activation_bytes: int  # peak of the tensors alive in forward + backward, gradients excluded
    flops: int  # forward + backward, teacher and recomputation included
    student_params: int
    trainable_params: int
    teacher_params: int
    block_params: int  # the largest transformer block
    root_params: int  # student parameters outside the transformer blocks
    clip_width: int  # 0 without CLIP
    pairs: int  # the micro-batch
    teacher_runs: bool = True  # the teacher's forward runs in the step (an EMA that is only updated does not)


def trace_micro_step(cfg: PretrainConfig, bf16: bool) -> MicroStep:
    """`cfg` (one rank's micro-batch: see vtp_fast.train.flops.micro_config) traced with its
    run.activation_checkpointing, with bf16 autocast emulated when `bf16`."""
    autocast = EmulatedAutocast if bf16 else contextlib.nullcontext
    t, batch = meta_step(cfg)
    for p in t.student.parameters():  # gradients allocated, as after a first step, and counted apart
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    modules = [t.student] + ([t.teacher] if t.teacher is not None else [])
    existing = [x for x in (*LiveBytes.state_of(*modules), *tree_leaves(vars(batch))) if isinstance(x, torch.Tensor)]
    live = LiveBytes(existing)
    with live, autocast():
        forward_backward(t, [batch], schedules(cfg, 0))
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    blocks = t.model.transformer_blocks()
    return MicroStep(
        activation_bytes=live.peak, flops=live.flops,
        student_params=count(t.student.parameters()),
        trainable_params=count(p for p in t.student.parameters() if p.requires_grad),
        teacher_params=count(t.teacher.parameters()) if t.teacher is not None else 0,
        block_params=max(count(b.parameters()) for b in blocks),
        root_params=count(t.student.parameters()) - sum(count(b.parameters()) for b in blocks),
        clip_width=t.model.config.text_embed_dim if t.student.uses_clip else 0, pairs=cfg.batch.size)

