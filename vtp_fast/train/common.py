"""Pieces every training job shares: the optimiser config, device and seeding, metric logs."""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtp_fast.config import ConfigError


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate after warm-up
    min_lr: float = 1e-5  # end of the cosine decay
    warmup_steps: int = 50
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # cosine schedule to this value (DINOv2: 0.04 -> 0.2); null: constant
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def validate(self) -> None:
        for key in ("lr", "min_lr", "weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optim.{key}: must be >= 0, got {getattr(self, key)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {name} requested but no CUDA device is visible")
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for the job's own sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class MetricsLog:
    """Append-only JSONL metrics (one object per line, flushed), read back for plots."""

    def __init__(self, path: str | Path, fresh: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            self.path.unlink()
        self.start = time.perf_counter()

    def write(self, **row: Any) -> None:
        row = {"time": round(time.perf_counter() - self.start, 3), **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a resumed run logs those steps again)."""
        if self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            self.path.write_text("".join(line + "\n" for line in keep))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def series(self, key: str) -> tuple[list[float], list[float]]:
        rows = [r for r in self.read() if key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]
