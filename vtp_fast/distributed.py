"""Process groups and the distributed transforms of a built model (`apply_ddp`, `apply_fsdp`).

Everything here is a no-op on one process, so losses and steps call these helpers unconditionally.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def launched_distributed() -> bool:
    """True under torchrun (or any launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> torch.device:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1); return this rank's device.

    NCCL with one GPU per local rank when CUDA is visible, else gloo on the CPU.
    """
    if launched_distributed() and not is_distributed():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_with_grad(x: Tensor) -> Tensor:
    """(n, ...) per rank -> (world * n, ...) in rank order; the backward sums each rank's gradient slice
    across ranks (so a local loss against gathered features gets the global loss's gradient)."""
    if not is_distributed():
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


def all_reduce_sum(x: Tensor) -> Tensor:
    """In-place sum over ranks (no gradient), returned for chaining."""
    if is_distributed():
        dist.all_reduce(x)
    return x


def broadcast_(x: Tensor, src: int = 0) -> Tensor:
    if is_distributed():
        dist.broadcast(x, src)
    return x


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def apply_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """Wrap in DistributedDataParallel (one device per process). Returns `module` itself on one process."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def apply_fsdp(module: nn.Module, blocks: list[nn.Module], mixed_precision: bool) -> nn.Module:
    """FSDP2: `fully_shard` every transformer block, then the root. Parameters become DTensors sharded over the
    ranks; bf16 compute with fp32 gradient reduction when `mixed_precision`."""
    if not is_distributed():
        return module
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
    return module


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile wrappers (checkpoints never carry wrapper prefixes)."""
    while True:
        if hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module
