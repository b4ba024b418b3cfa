"""The op registry: every fast op has named backends; one is resolved once, when a layer is built, for the
device the model is built for (`building_for`; default: the process's default device).

Auto mode picks the available backend with the highest priority for the device and falls back silently. An
explicit request, by environment variable (`VTP_FAST_BACKEND_<OP>=triton`) or by `use_backend(op, name)` in
code and tests, must be honoured: a requested backend that cannot run raises `BackendUnavailable`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from vtp_fast import optional
from vtp_fast.config import UserError

DEVICES = ("cpu", "cuda")


class BackendUnavailable(UserError, RuntimeError):
    """An explicitly requested backend cannot run here."""


@dataclass(frozen=True)
class Backend:
    """One implementation of an op. `impl` exposes the op's functions with the reference's signatures."""

    name: str
    impl: SimpleNamespace
    priority: int
    devices: tuple[str, ...]
    available: bool = True
    reason: str = ""  # why it is unavailable
    capabilities: frozenset[str] = frozenset()  # what it can do beyond the reference's signatures ("packs_views")


@dataclass
class Op:
    name: str
    backends: dict[str, Backend] = field(default_factory=dict)

    def register(self, name: str, impl: SimpleNamespace, *, priority: int, devices: tuple[str, ...] = DEVICES,
                 available: bool = True, reason: str = "", capabilities: tuple[str, ...] = ()) -> None:
        if name in self.backends:
            raise ValueError(f"op {self.name}: backend {name!r} registered twice")
        self.backends[name] = Backend(name, impl, priority, tuple(devices), available, reason, frozenset(capabilities))

    def register_native(self, impl: SimpleNamespace | None) -> None:
        """The native extension's backend (`vtp_fast._C`), above every other: on the CPU, and on CUDA when the
        extension was compiled with its CUDA sources. None: the extension is missing (registered unavailable, with
        the reason)."""
        if impl is None:
            self.register("native", SimpleNamespace(), priority=30, available=False, reason=optional.reason("native"))
        else:
            self.register("native", impl, priority=30,
                          devices=("cpu", "cuda") if optional.native_cuda_compiled() else ("cpu",))

    def register_triton(self, impl: SimpleNamespace | None, *, priority: int = 20,
                        capabilities: tuple[str, ...] = ()) -> None:
        """The Triton backend at `priority` on CUDA; under TRITON_INTERPRET=1 on CPU tensors instead, at -1: never
        chosen automatically there (too slow), only when requested. None: Triton is missing (registered
        unavailable, with the reason)."""
        if impl is None:
            self.register("triton", SimpleNamespace(), priority=priority, available=False,
                          reason=optional.reason("triton"))
        else:
            interp = optional.triton_interpreter()
            self.register("triton", impl, priority=-1 if interp else priority,
                          devices=("cpu",) if interp else ("cuda",), capabilities=capabilities)

    @property
    def env_var(self) -> str:
        return f"VTP_FAST_BACKEND_{self.name.upper()}"

    def requested(self) -> str | None:
        """The backend asked for by `use_backend` or the environment, None in auto mode."""
        name = _overrides.get(self.name) or os.environ.get(self.env_var, "").strip() or None
        return None if name == "auto" else name

    def runnable(self, device: str) -> list[Backend]:
        """Available backends for `device`, best first."""
        ok = [b for b in self.backends.values() if b.available and device in b.devices]
        return sorted(ok, key=lambda b: -b.priority)

    def timed(self, device: str) -> list[Backend]:
        """The runnable backends worth benchmarking on `device`: not those that only run interpreted (Triton under
        TRITON_INTERPRET=1, registered with a negative priority)."""
        return [b for b in self.runnable(device) if b.priority >= 0]

    def resolve(self, device: str | torch.device | None = None) -> Backend:
        """The backend to use on `device` (default: the process's default device, see `default_device`)."""
        device = torch.device(device).type if device is not None else default_device()
        name = self.requested()
        if name is None:
            runnable = self.runnable(device)
            if not runnable:
                runs_on = sorted({d for b in self.backends.values() if b.available for d in b.devices})
                raise BackendUnavailable(f"op {self.name}: nothing runs on {device!r} (its backends run on: "
                                         f"{', '.join(runs_on) or 'no device'})")
            return runnable[0]
        backend = self.backends.get(name)
        if backend is None:
            raise BackendUnavailable(
                f"op {self.name}: unknown backend {name!r} (requested via {self.env_var} or use_backend); "
                f"choices: {', '.join(self.backends)}")
        if not backend.available:
            raise BackendUnavailable(f"op {self.name}: backend {name!r} was requested but is unavailable: "
                                     f"{backend.reason}")
        if device not in backend.devices:
            raise BackendUnavailable(f"op {self.name}: backend {name!r} was requested but does not run on "
                                     f"{device} (it runs on: {', '.join(backend.devices) or 'nothing here'})")
        return backend


REGISTRY: dict[str, Op] = {}
_overrides: dict[str, str] = {}


def new_op(name: str, reference: SimpleNamespace) -> Op:
    """Create and register an op whose lowest-priority backend is the pure-PyTorch `reference`."""
    if name in REGISTRY:
        raise ValueError(f"op {name} defined twice")
    op = REGISTRY[name] = Op(name)
    op.register("reference", reference, priority=0)
    return op


@contextmanager
def use_backend(op_name: str, backend: str) -> Iterator[None]:
    """Request `backend` for `op_name` inside the block (layers built inside resolve to it, or raise)."""
    if op_name not in REGISTRY:
        raise KeyError(f"unknown op {op_name!r}; ops: {', '.join(REGISTRY)}")
    previous = _overrides.get(op_name)
    _overrides[op_name] = backend
    try:
        yield
    finally:
        if previous is None:
            _overrides.pop(op_name, None)
        else:
            _overrides[op_name] = previous


_building_for: list[str] = []


@contextmanager
def building_for(device: str | torch.device) -> Iterator[None]:
    """Layers built inside the block resolve their backends for `device` (a model built on a GPU machine to run
    on its CPU, e.g. `load_pretrained(path, device="cpu")`)."""
    _building_for.append(torch.device(device).type)
    try:
        yield
    finally:
        _building_for.pop()


def default_device() -> str:
    """The device layers resolve their backends for: the innermost `building_for`, else $VTP_FAST_DEVICE, else
    'cuda' when a GPU is visible, else 'cpu'."""
    if _building_for:
        return _building_for[-1]
    forced = os.environ.get("VTP_FAST_DEVICE")
    if forced:
        return torch.device(forced).type
    return "cuda" if torch.cuda.is_available() else "cpu"


def summary(device: str | None = None) -> list[dict]:
    """One row per op: the backend it resolves to on `device` and every registered backend's state."""
    device = device or default_device()
    rows = []
    for op in REGISTRY.values():
        try:
            chosen = op.resolve(device).name
        except BackendUnavailable as e:
            chosen = f"ERROR: {e}"
        rows.append({
            "op": op.name, "device": device, "resolved": chosen,
            "backends": {b.name: ("ok" if b.available and device in b.devices
                                  else (b.reason or f"not on {device}"))
                         for b in op.backends.values()},
            # what a backend does differently from its name, e.g. dtypes it hands to another backend
            "notes": {b.name: b.impl.note for b in op.backends.values() if getattr(b.impl, "note", "")},
        })
    return rows
