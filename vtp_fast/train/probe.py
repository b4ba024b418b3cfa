"""Timing probes for the per-objective step profile (`vtp-fast profile`).

The student step marks its regions with `probe.region(name)` and passes each objective's inputs from the
shared trunk through `probe.boundary(name, *tensors)`. The default probe does nothing (returns the tensors as
they are). `TimingProbe` records forward region times and, in the backward, the moment each objective's
gradient has finished flowing back to the trunk: autograd runs nodes in reverse creation order, so an
objective's boundary node (created at the start of its region) runs after all of the objective's own backward
nodes and before the shared trunk's. CUDA events are used on a GPU (no synchronisation inside the step), wall
clock on the CPU.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor


class Probe:
    """No-op probe: the training path."""

    def region(self, name: str):
        return nullcontext()

    def boundary(self, name: str, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tensors


class _Stamp:
    def __init__(self, cuda: bool):
        if cuda:
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        else:
            self.t = time.perf_counter()

    def ms_since(self, earlier: _Stamp) -> float:
        if hasattr(self, "event"):
            return earlier.event.elapsed_time(self.event)
        return (self.t - earlier.t) * 1e3


class _Boundary(torch.autograd.Function):
    """Identity whose backward stamps the time the gradient reached it."""

    @staticmethod
    def forward(ctx, probe: TimingProbe, name: str, *tensors: Tensor):
        ctx.probe, ctx.name = probe, name
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.probe.stamps[f"backward:{ctx.name}"] = ctx.probe.stamp()
        return (None, None, *grads)


class TimingProbe(Probe):
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stamps: dict[str, _Stamp] = {}
        self.forward_ms: dict[str, float] = {}

    def stamp(self) -> _Stamp:
        return _Stamp(self.cuda)

    @contextmanager
    def region(self, name: str):
        start = self.stamp()
        with torch.profiler.record_function(name):
            yield
        self.stamps[f"forward:{name}:start"], self.stamps[f"forward:{name}:end"] = start, self.stamp()

    def boundary(self, name: str, *tensors: Tensor) -> tuple[Tensor, ...]:
        if not any(t.requires_grad for t in tensors):
            return tensors
        return _Boundary.apply(self, name, *tensors)

    def reset(self) -> None:
        self.stamps.clear()

    def backward_split(self, start: _Stamp, end: _Stamp) -> dict[str, float]:
        """Per-objective backward times (ms) between the backward's `start` and `end` stamps: each objective from
        the previous boundary to its own, then the shared trunk from the last boundary to the end."""
        marks = sorted(((k.split(":", 1)[1], s) for k, s in self.stamps.items() if k.startswith("backward:")),
                       key=lambda kv: kv[1].ms_since(start))
        out, prev = {}, start
        for name, s in marks:
            out[name] = s.ms_since(prev)
            prev = s
        out["trunk (shared)"] = end.ms_since(prev)
        return out

    def forward_times(self) -> dict[str, float]:
        names = {k.split(":")[1] for k in self.stamps if k.startswith("forward:")}
        return {n: self.stamps[f"forward:{n}:end"].ms_since(self.stamps[f"forward:{n}:start"]) for n in names}
