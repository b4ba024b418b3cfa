"""Pieces every training job shares: device, precision and seeding, RNG state, metric logs, the EMA update."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vtp_fast.config import ConfigError


def pick_device(name: str, option: str = "run.device") -> torch.device:
    """"auto" (CUDA when visible), "cpu", "cuda" or "cuda:N"; errors name `option` (the config key or the CLI
    flag the value came from)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{option}: {name!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}: {name} requested but no CUDA device is visible")
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for the job's own sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG a job draws from, in a form `torch.load(weights_only=True)` reads back: torch CPU, every
    CUDA device (when CUDA is initialised), Python's `random`, NumPy's legacy global generator."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved; a key that is absent (a checkpoint from before it saved every stream) leaves
    that generator alone; CUDA states only when this process has CUDA."""
    torch.set_rng_state(state["torch_cpu"])
    if "python" in state:
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])


class MetricsLog:
    """Append-only JSONL metrics (one object per line, flushed), read back for plots."""

    def __init__(self, path: str | Path, resume_at: int = 0):
        """resume_at: the step a resumed run continues from; rows logged after it are dropped (those steps are
        redone). 0: a fresh log."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_at == 0:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            keep = [row for row in self.read() if row.get("step", 0) <= resume_at]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in keep))
        self.start = time.perf_counter()

    def write(self, **row: Any) -> None:
        row = {"time": round(time.perf_counter() - self.start, 3), **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        """The rows logged; a torn line (the run was killed while writing it) is skipped."""
        rows = []
        for line in self.path.read_text().splitlines() if self.path.exists() else []:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def series(self, key: str) -> tuple[list[float], list[float]]:
        rows = [r for r in self.read() if key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]


@torch.no_grad()
def ema_update(ema_params: Iterable[Tensor], params: Iterable[Tensor], decay: float) -> None:
    """In place: ema = decay * ema + (1 - decay) * param over matching tensors, one fused foreach; FSDP-sharded
    parameters (DTensors, sharded alike on both sides) update their local shards."""
    ema_params, params = list(ema_params), list(params)
    if len(ema_params) != len(params):
        raise ValueError(f"ema_update: {len(ema_params)} EMA tensors for {len(params)} parameters")
    if not ema_params:
        return
    local = lambda p: getattr(p, "_local_tensor", p).detach()  # noqa: E731 - DTensor -> its shard
    torch._foreach_lerp_([local(e) for e in ema_params], [local(p) for p in params], 1.0 - decay)
