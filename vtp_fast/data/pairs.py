"""Image-text pairs for pretraining and the per-step batches built from them.

`StepBatches[step]` is this rank's share of the global batch of `step`: a deterministic function of (seed,
step, rank), so a resumed run continues with exactly the batches it would have seen, and any number of
DataLoader workers produce the same data. The global batch of step s holds positions [s * G, (s + 1) * G) of an
endless stream of per-epoch permutations of the data set; rank r takes its contiguous slice of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vtp_fast.data.emoji import load_emoji
from vtp_fast.data.text import tokenize
from vtp_fast.data.views import ViewConfig, sample_seed, ssl_views
from vtp_fast.ops.masked_gather import mask_to_index

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass
class PairSet:
    images: Tensor  # (N, S, S, 3) uint8
    tokens: Tensor  # (N, L) int64 CLIP BPE ids
    captions: list[str]
    labels: Tensor  # (N,) int64 category ids (for probes)
    skipped: dict[str, int] = field(default_factory=dict)  # dropped samples by reason

    def __len__(self) -> int:
        return self.images.shape[0]


def emoji_pairs(root: Path, styles, context_length: int) -> PairSet:
    """The prepared emoji set as pairs. Samples with an empty caption are dropped and counted; images that were
    corrupt when the set was prepared (skipped then) are counted from its manifest."""
    data = load_emoji(root, styles)
    keep = [i for i, c in enumerate(data.captions) if c.strip()]
    stats = json.loads((Path(root) / "manifest.json").read_text()).get("styles", {})
    skipped = {"empty_caption": len(data) - len(keep),
               "corrupt_image": sum(stats.get(s, {}).get("corrupt", 0) for s in styles)}
    captions = [data.captions[i] for i in keep]
    idx = torch.tensor(keep, dtype=torch.long)
    return PairSet(data.images[idx], tokenize(captions, context_length), captions, data.labels[idx], skipped)


def synthetic_pairs(n: int, size: int, context: int, seed: int = 0) -> PairSet:
    """Random pixels and random token ids shaped like short CLIP captions (start, 3-12 words, end-of-text): for
    benchmarks and profiles that need neither a data set nor the BPE tokenizer."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, context, dtype=torch.long)
    lengths = torch.randint(3, min(12, context - 2) + 1, (n,), generator=g)
    for i, length in enumerate(lengths.tolist()):
        tokens[i, 0], tokens[i, length + 1] = 49406, 49407  # start / end of text
        tokens[i, 1:length + 1] = torch.randint(300, 40000, (length,), generator=g)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    return PairSet(images, tokens, [""] * n, torch.zeros(n, dtype=torch.long))


def normalize_u8(images: Tensor) -> Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 in the ImageNet-normalised space."""
    return (images.permute(0, 3, 1, 2).float() / 255 - MEAN) / STD


@dataclass
class BatchShape:
    """Per-rank sizes of one step's batch: every pair feeds CLIP; SSL views are built for the first `ssl`
    samples, reconstruction uses the first `rec`."""

    size: int
    ssl: int
    rec: int
    patch: int = 16


def trim_tokens(tokens: Tensor, multiple: int = 8) -> Tensor:
    """(B, L) token ids -> (B, L') with L' the batch's longest caption rounded up to `multiple` (at most L).

    Exact for a causal text tower pooled at the end-of-text token: positions after a caption's end never
    influence it. Saves the text tower's work on padding."""
    nonzero = (tokens != 0).any(0).nonzero()
    length = int(nonzero[-1]) + 1 if nonzero.numel() else 1
    return tokens[:, : min(tokens.shape[1], -(-length // multiple) * multiple)]


class StepBatches(Dataset):
    def __init__(self, pairs: PairSet, shape: BatchShape, views: ViewConfig, *, seed: int, rank: int = 0,
                 world: int = 1, steps: int = 1 << 40, trim_text: bool = False):
        """trim_text: cut token padding beyond the batch's longest caption (see `trim_tokens`)."""
        self.pairs, self.shape, self.views, self.trim_text = pairs, shape, views, trim_text
        self.seed, self.rank, self.world, self.steps = seed, rank, world, steps
        if len(pairs) == 0:
            raise ValueError("the pair set is empty")

    def __len__(self) -> int:
        return self.steps

    def positions(self, step: int) -> tuple[Tensor, Tensor]:
        """This rank's (sample ids, epochs) for `step`, each (size,)."""
        n, local = len(self.pairs), self.shape.size
        start = (step * self.world + self.rank) * local
        pos = torch.arange(start, start + local)
        epochs = pos // n
        ids = torch.empty(local, dtype=torch.long)
        for e in epochs.unique().tolist():
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(sample_seed(self.seed, e)))
            sel = epochs == e
            ids[sel] = perm[pos[sel] % n]
        return ids, epochs

    def __getitem__(self, step: int) -> dict[str, Tensor]:
        return self.assemble(*self.positions(step))

    def assemble(self, ids: Tensor, epochs: Tensor) -> dict[str, Tensor]:
        """The batch of samples `ids` (B,) drawn in `epochs` (B,): SSL views for the first `shape.ssl`."""
        tokens = self.pairs.tokens[ids]
        batch = {"images": normalize_u8(self.pairs.images[ids]), "tokens": trim_tokens(tokens) if self.trim_text
                 else tokens, "ids": ids}
        n = self.shape.ssl
        if n:
            grid = (self.views.global_size // self.shape.patch,) * 2
            views = [ssl_views(self.pairs.images[i].permute(2, 0, 1).float() / 255, self.views, grid,
                               torch.Generator().manual_seed(sample_seed(self.seed, int(e), int(i), 1)))
                     for i, e in zip(ids[:n].tolist(), epochs[:n].tolist(), strict=True)]
            g, l, m = (torch.stack(t) for t in zip(*views, strict=True))  # (n, 2, ...), (n, L, ...), (n, 2, N)
            # view-major layouts: all samples' view 0, then view 1, ...
            batch["global_crops"] = ((g.transpose(0, 1).flatten(0, 1)) - MEAN) / STD  # (2n, 3, G, G)
            batch["local_crops"] = ((l.transpose(0, 1).flatten(0, 1)) - MEAN) / STD  # (L n, 3, l, l)
            masks = m.transpose(0, 1).flatten(0, 1)  # (2n, N)
            batch["masks"] = masks
            batch["mask_index"] = mask_to_index(masks)  # (M,)
            counts = masks.sum(-1).clamp(min=1).float()
            batch["mask_weight"] = (1.0 / counts)[:, None].expand_as(masks)[masks]  # (M,)
        return batch
