"""Triton kernels (installed as `vtp_fast.kernels`); each op's semantics live in `vtp_fast/ops`.

Every launcher in this package follows one convention, so that the ahead-of-time compile gate
(`vtp-fast kernels check`, vtp_fast/measure/gate.py) sees exactly the launches a GPU would get:

  - configuration choices (tiles, warps, stages, splits) depend on `gpu_arch(tensor)` (None: CPU tensors under
    the interpreter; else the compute capability, e.g. 90) and `sm_count(device)`, never on `tensor.is_cuda`;
  - every kernel is started through `launch(kernel, grid, *args, **meta)`.

Inside `offline(arch, sms)` the launchers run on `meta` tensors of the real shapes: `gpu_arch` reports `arch`,
`sm_count` reports `sms`, and `launch` records each launch instead of running it. Launchers must therefore not
read tensor values on the host.

Kernels share `loop_bound` (a runtime loop bound that works under Triton 3.6's interpreter as well as 3.8's) and
`SMEM_LIMIT` (the shared memory a block may use per arch, which autotune pruning and the gate both hold to).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import triton
import triton.language as tl
from triton import knobs

# Shared memory a block may use (bytes, the opt-in maximum) per compute capability.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_INTERPRETED = tl.constexpr(knobs.runtime.interpret)  # the kernels run through Triton's CPU interpreter


@triton.jit
def loop_bound(x):
    """x as a `range` bound: x itself when compiled. Under the interpreter a kernel's integer argument, or a value
    derived from a program id or a load, is a (1,) array, which Triton 3.6's `range` converts with int(), an
    error since NumPy 2.4 (3.8 squeezes it first): there the Python number is returned (returned directly: the
    interpreter would wrap an assigned one again)."""
    if _INTERPRETED:
        if hasattr(x, "handle"):
            return x.handle.data.item()
    return x


@dataclass
class Launch:
    """One recorded kernel launch: the kernel object (JIT function, heuristics or autotuner), grid, arguments."""
    kernel: Any
    grid: tuple
    args: tuple
    meta: dict


@dataclass
class Offline:
    arch: int
    sms: int
    launches: list[Launch] = field(default_factory=list)


_offline: list[Offline] = []


@contextmanager
def offline(arch: int, sms: int) -> Iterator[Offline]:
    """Launchers called inside the block on meta tensors compile-plan for compute capability `arch` with `sms`
    SMs; their launches are recorded in the yielded object's `launches`."""
    state = Offline(arch, sms)
    _offline.append(state)
    try:
        yield state
    finally:
        _offline.pop()


def gpu_arch(x) -> int | None:
    """The compute capability a launch on tensor x compiles for (e.g. 90 for H100/H200, 80 for A100); None when
    x is a CPU tensor (the Triton interpreter)."""
    if x.device.type == "meta" and _offline:
        return _offline[-1].arch
    if x.device.type == "cuda":
        major, minor = _capability(x.device.index if x.device.index is not None else _current())
        return 10 * major + minor
    return None


def sm_count(device) -> int:
    """Streaming multiprocessors of `device` (grid sizing); the planned SM count inside `offline`."""
    if _offline and device.type == "meta":
        return _offline[-1].sms
    return _sm_count(device.index if device.index is not None else _current())


def launch(kernel, grid: tuple, *args, **meta) -> None:
    """Start `kernel` on `grid` (or record the launch inside `offline`)."""
    if _offline:
        _offline[-1].launches.append(Launch(kernel, tuple(grid), args, meta))
        return
    kernel[grid](*args, **meta)


def split_reduction(programs: int, length: int, granule: int, x) -> tuple[int, int]:
    """Split a reduced dimension of `length` into ranges so that `programs` x splits programs fill the device
    (2 per SM; 4 in all under the interpreter, so that tests reach the merge of the partial results).

    Returns (splits, span): ranges [j * span, (j + 1) * span), each non-empty, span a multiple of `granule`."""
    target = 4 if gpu_arch(x) is None else 2 * sm_count(x.device)
    splits = max(1, min(triton.cdiv(target, programs), triton.cdiv(length, granule)))
    span = triton.cdiv(triton.cdiv(length, splits), granule) * granule
    return triton.cdiv(length, span), span


def _current() -> int:
    import torch

    return torch.cuda.current_device()


@cache
def _capability(index: int) -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability(index)


@cache
def _sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count
