"""Latent sets: a tokenizer's latents of a labelled image set, the DiT's training data (written by
vtp_fast.eval.latents.extract_latents).

A latent set is a directory: `latents-00000.safetensors`, ... (each `latents` (n, C, h, w) float32 and `labels`
(n,) int64) and `meta.json` (channels, grid, per-channel mean/std, class names, the tokenizer it came from and
its config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from vtp_fast.config import InputError


@dataclass
class LatentSet:
    latents: torch.Tensor  # (N, C, h, w) float32, normalised per channel
    labels: torch.Tensor  # (N,)
    meta: dict

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(self.meta["mean"]).view(1, -1, 1, 1)

    @property
    def std(self) -> torch.Tensor:
        return torch.tensor(self.meta["std"]).view(1, -1, 1, 1)


def load_latents(path: str | Path) -> LatentSet:
    """All shards of a latent set, normalised with its per-channel statistics."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise InputError(f"{path}: not a latent set (no meta.json); make one with vtp-fast extract-latents")
    meta = json.loads(meta_file.read_text())
    parts = [load_file(f) for f in sorted(path.glob("latents-*.safetensors"))]
    if not parts:
        raise InputError(f"{path}: no latent shards")
    z = torch.cat([p["latents"] for p in parts])
    if z.shape[1] != meta["channels"] or list(z.shape[2:]) != meta["grid"]:
        raise InputError(f"{path}: latents {tuple(z.shape[1:])} do not match meta.json ({meta['channels']}, "
                         f"{meta['grid']})")
    labels = torch.cat([p["labels"] for p in parts])
    n_classes = len(meta["class_names"])
    if labels.numel() and (labels.min() < 0 or labels.max() >= max(n_classes, 1)):
        raise InputError(f"{path}: labels up to {int(labels.max())} but {n_classes} class names in meta.json")
    latents = LatentSet(z, labels, meta)
    latents.latents = (z - latents.mean) / latents.std  # normalised with the statistics in meta.json
    return latents
