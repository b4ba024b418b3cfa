"""The contract between the data pipeline and a pretraining step: what one rank's batch holds (`Batch`) and how
big its parts are (`BatchShape`)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from vtp_fast.data.views import mask_to_index, mask_weights


@dataclass
class BatchShape:
    """Per-rank sizes of one step's batch: every pair feeds CLIP; SSL views are built for the first `ssl`
    samples, reconstruction uses the first `rec`; `patch`: the model's patch size (the iBOT mask grid).

    groups: the rank's share of the global batch is this many equal virtual groups of consecutive positions, each
    holding ssl / groups SSL and rec / groups reconstructed samples (its first ones). The global batch has a fixed
    number of such groups whatever the world size, so 1, 2 or 3 ranks train on the same SSL and reconstruction
    subsets (vtp_fast.data.step_batches.StepBatches.positions)."""

    size: int
    ssl: int
    rec: int
    patch: int
    groups: int = 1


@dataclass
class Batch:
    """One rank's micro-batch of image-text pairs (vtp_fast.data.step_batches.StepBatches). Images are normalised with
    the published statistics. The SSL fields describe the views of the first `ssl` samples, view-major (every
    sample's view 0, then view 1, ...), and are None when the step has no SSL subset."""

    images: Tensor  # (n, 3, H, W) plain images: CLIP for every pair, reconstruction for the first `rec`
    tokens: Tensor  # (n, L) CLIP BPE ids (L cut to the longest caption when the text tower is causal)
    ids: Tensor  # (n,) the sample ids used (a bad sample's replacement in its place)
    bad_ids: Tensor  # (K,) the distinct bad samples this batch met and replaced (vtp_fast.data.pairs.BadSampleCount)
    bad_kinds: Tensor  # (K,) their kinds: indices into vtp_fast.data.pairs.BAD_KINDS
    global_crops: Tensor | None = None  # (2 ssl, 3, G, G)
    local_crops: Tensor | None = None  # (L ssl, 3, l, l); (0, 3, 1, 1) without local crops
    masks: Tensor | None = None  # (2 ssl, N) bool: iBOT's masked tokens of each global crop
    mask_index: Tensor | None = None  # (M,) the masked tokens' flat indices into (2 ssl * N)
    mask_weight: Tensor | None = None  # (M,) each masked token's weight: 1 / (masked tokens of its crop)

    def set_masks(self, masks: Tensor) -> None:
        """masks: (2 ssl, N) view-major iBOT masks -> masks, their packed index (M,) and per-token weights (M,)."""
        self.masks, self.mask_index, self.mask_weight = masks, mask_to_index(masks), mask_weights(masks)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:  # DataLoader(pin_memory=True) calls it
        return self._map(Tensor.pin_memory)

    def _map(self, fn) -> Batch:
        return replace(self, **{f.name: fn(v) for f in fields(self) if (v := getattr(self, f.name)) is not None})
