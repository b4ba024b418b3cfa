"""AdamW with parameter groups, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from vtp_fast import optional

# Parameters that never get weight decay, besides every 1-D tensor (norm weights, biases, logit scale).
_NO_DECAY_NAMES = ("cls_token", "mask_token", "positional_embedding", "token_embedding", "logit_scale")


def param_groups(modules: dict[str, nn.Module], weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters of `modules`, named "decay" (matrices) and "no_decay" (norms,
    biases, tokens, embeddings, logit scale); `set_group` finds them by name."""
    decay, no_decay = [], []
    for prefix, module in modules.items():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.ndim <= 1 or any(part in _NO_DECAY_NAMES for part in f"{prefix}.{name}".split("."))
            (no_decay if skip else decay).append(p)
    return [{"name": "decay", "params": decay, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]


def set_group(optimizer: torch.optim.Optimizer, name: str, **values: float) -> None:
    """Set hyperparameters (e.g. weight_decay) of the parameter group called `name` (see param_groups)."""
    groups = [g for g in optimizer.param_groups if g.get("name") == name]
    if not groups:
        raise KeyError(f"no parameter group named {name!r} (groups: {[g.get('name') for g in optimizer.param_groups]})")
    for g in groups:
        g.update(values)


def make_adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float = 1e-8,
               fused: bool = False) -> torch.optim.Optimizer:
    """NVIDIA apex FusedAdam (AdamW mode) when importable and on CUDA, else torch's fused AdamW (CUDA, or the CPU
    with `fused`) or its foreach AdamW."""
    params = [p for g in groups for p in g["params"]]
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    if on_cuda and optional.available("apex"):
        return optional.module("apex").FusedAdam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    fused = on_cuda or fused
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None, foreach=None if fused else True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of `params` to `max_norm` (0: no clipping); the norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))


def cosine_schedule(step: int, total: int, warmup: int, peak: float, final: float) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay reaching `final` at the last step
    (total - 1)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * progress))
