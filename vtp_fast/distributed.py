"""Process groups and the distributed transforms of a built model (`apply_ddp`, `apply_fsdp`).

Everything here is a no-op on one process, so losses and steps call these helpers unconditionally.
"""

from __future__ import annotations

import datetime
import gc
import inspect
import os
import warnings
from contextlib import contextmanager

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


def shutdown() -> None:
    """Leave every process group (the default one and those made from it, like the background checkpoints' gloo
    group), after collecting the garbage that may still hold their pending work (FSDP's and autograd's cycles): a
    process whose groups or work objects are torn down at interpreter exit can abort in gloo's C++ threads
    ("terminate called without an active exception") after a finished run. Called by the command line on every
    exit path; a no-op on one process."""
    if is_distributed():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def all_gather_with_grad(x: Tensor) -> Tensor:
    """(n, ...) per rank -> (world * n, ...) in rank order; the backward sums each rank's gradient slice
    across ranks (so a local loss against gathered features gets the global loss's gradient)."""
    if not is_distributed():
        return x
    from torch.distributed import _functional_collectives as funcol

    # torch >= 2.13 names it all_gather_single_autograd (the older name warns there); torch 2.11 has only the older
    gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    return funcol.wait_tensor(gather(x.contiguous(), 0, dist.group.WORLD))


def all_reduce_sum(x: Tensor) -> Tensor:
    """In-place sum over ranks (no gradient), returned for chaining."""
    if is_distributed():
        dist.all_reduce(x)
    return x


def all_reduce_max(x: Tensor) -> Tensor:
    """In-place maximum over ranks (no gradient), returned for chaining."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's `values` (the same length on all), in rank order; [values] on one process."""
    if not is_distributed():
        return [list(values)]
    # NCCL moves only GPU tensors: the values travel on this rank's GPU there, on the CPU under gloo
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(parts, mine)
    return [p.tolist() for p in parts]


def broadcast_object(obj):
    """The main rank's `obj` (picklable), on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the body first (preparing a shared cache: data, shards), the other ranks after it."""
    if rank() != 0:
        barrier()
    try:
        yield
    finally:  # also when rank 0 fails: the others then run the body themselves and fail with their own error
        if rank() == 0:
            barrier()


def apply_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """Wrap in DistributedDataParallel (one device per process). Returns `module` itself on one process."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # no buffer broadcast at each forward (every rank's buffers are equal: built from one seed, or loaded);
    # torch >= 2.13 says so with forward_sync_buffers (broadcast_buffers warns there), torch 2.11 only with the older
    new = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    return DistributedDataParallel(module, device_ids=ids, **{"forward_sync_buffers" if new else "broadcast_buffers":
                                                              False})


def apply_fsdp(module: nn.Module, blocks: list[nn.Module], mixed_precision: bool,
               reshard_root: bool = False) -> nn.Module:
    """FSDP2: `fully_shard` every transformer block, then the root. Parameters become DTensors sharded over the
    ranks; bf16 compute with fp32 gradient reduction when `mixed_precision`. Scalar parameters (the logit scale)
    cannot be sharded: they stay replicated and `average_replicated_grads` all-reduces their gradients.
    `reshard_root`: free the root's gathered parameters after each forward (for a module that never runs a
    backward, like the EMA teacher)."""
    if not is_distributed():
        return module
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP2 warns of every block that returns a view (an in-place op on it would skip the all-gather): the multi-view
    # blocks return views of one packed tensor, and nothing here modifies a block's output in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for block in blocks:
        fully_shard(block, **kwargs)
    replicated = {p for p in module.parameters() if p.ndim == 0}
    fully_shard(module, ignored_params=replicated, reshard_after_forward=True if reshard_root else None, **kwargs)
    module._replicated_params = sorted(replicated, key=id)
    return module


def average_replicated_grads(module: nn.Module) -> None:
    """Mean over ranks of the gradients of parameters FSDP leaves replicated (no-op otherwise)."""
    for p in getattr(module, "_replicated_params", ()):
        if p.grad is not None:
            all_reduce_sum(p.grad)
            p.grad /= world_size()


def full_tensor(t: Tensor) -> Tensor:
    """A DTensor's whole value (a collective: every rank must call it in the same order); other tensors as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """`module.state_dict()` with whole tensors on the CPU (collective under FSDP)."""
    return {k: full_tensor(v).detach().cpu().contiguous() for k, v in module.state_dict().items()}


def copy_full_(target: Tensor, full: Tensor) -> None:
    """Copy a whole tensor into `target`, or into this rank's shard of it when it is a DTensor."""
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        shard = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements)
        target.to_local().copy_(shard.to_local())
    else:
        target.copy_(full)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with whole state tensors on the CPU (collective under FSDP)."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: full_tensor(v).cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                   for i, s in sd["state"].items()}
    return sd


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Inverse of `full_optimizer_state`: per-parameter states of sharded parameters are re-sharded alike."""
    optimizer.load_state_dict(sd)
    for p, state in optimizer.state.items():
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == p.shape and not hasattr(v, "device_mesh"):
                    state[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
