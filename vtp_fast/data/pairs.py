"""Image-text pairs for pretraining: what every source of them provides (`PairSource`), the sets held decoded in
memory (`PairSet`: the emoji set, synthetic pairs), and bad samples.

Two kinds of source follow the protocol: `PairSet` here and `vtp_fast.data.shard_source.ShardSource` (WebDataset
shards, decoded per sample). `vtp_fast.data.step_batches.StepBatches` draws the batches of every step from either,
through the decoder chosen for the run (`vtp_fast.data.decoders`). A sample that cannot be used (corrupt image,
missing, empty or non-UTF-8 caption) raises `BadSample` where it is read; it is then replaced, reported once and
named in the batch's `bad_ids` / `bad_kinds`, which `BadSampleCount` turns into counts of distinct bad samples.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor

from vtp_fast.data.batch import Batch
from vtp_fast.data.emoji import load_emoji
from vtp_fast.text import tokenize

BAD_KINDS = ("no_image", "no_caption", "empty_caption", "caption_not_utf8", "corrupt_image", "decoder_error")


class BadSample(Exception):
    """A sample that cannot be used; the message is the reason (one of BAD_KINDS, a metrics key)."""


class BadSampleCount:
    """Distinct bad samples met by a run, by kind: fed each batch's `bad_ids` / `bad_kinds`, kept in the
    checkpoint (`state_dict`), so a resumed run continues the count. A bad sample met again (a later epoch, a
    retry) counts once."""

    def __init__(self):
        self.kind_of: dict[int, int] = {}  # sample id -> index into BAD_KINDS

    def update(self, batch: Batch) -> None:
        """Count a batch's bad samples (bad_ids, bad_kinds)."""
        for i, k in zip(batch.bad_ids.tolist(), batch.bad_kinds.tolist(), strict=True):
            self.kind_of.setdefault(i, k)

    def __len__(self) -> int:
        return len(self.kind_of)

    def metrics(self) -> dict[str, int]:
        """data/bad_samples and data/bad_samples/<kind> for every kind met."""
        by_kind = Counter(BAD_KINDS[k] for k in self.kind_of.values())
        return {"data/bad_samples": len(self), **{f"data/bad_samples/{k}": by_kind[k] for k in sorted(by_kind)}}

    def sync(self) -> None:
        """Merge every rank's bad samples (collective: call on every rank); a no-op in a single process."""
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            parts: list = [None] * tdist.get_world_size()
            tdist.all_gather_object(parts, self.kind_of)
            for part in parts:
                for i, k in part.items():
                    self.kind_of.setdefault(i, k)

    def state_dict(self) -> dict[str, Tensor]:
        ids = sorted(self.kind_of)
        return {"ids": torch.tensor(ids, dtype=torch.long),
                "kinds": torch.tensor([self.kind_of[i] for i in ids], dtype=torch.long)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.kind_of = dict(zip(state["ids"].tolist(), state["kinds"].tolist(), strict=True))


class Pair(NamedTuple):
    """One sample as a source hands it to a decoder."""

    image: bytes | Tensor  # encoded bytes (`PairSource.encoded`) or decoded (3, H, W) uint8 (`PairSource.pixels`)
    size: tuple[int, int]  # (H, W) of the full image
    text: str | Tensor  # the caption, or its (L,) token ids; `PairSource.tokenize` makes a batch's (B, L)


class PairSource(Protocol):
    """What pretraining draws image-text pairs from: samples 0 .. len - 1 in shards (`offsets`), each read as a
    `Pair` or found bad (`BadSample`)."""

    image_size: int  # S: the side of the plain images
    in_memory: bool  # pixels held decoded: nothing for a decoder to do (read by `pixels`, never `encoded`)
    known_bad: dict[int, str]  # sample id -> kind (BAD_KINDS) as found, shared by everything that reads the source

    def __len__(self) -> int: ...

    @property
    def offsets(self) -> Sequence[int]:
        """(shards + 1,): the first sample id of every shard, then the total (the resampled mode's units)."""

    @property
    def skipped(self) -> dict[str, int]:
        """What was left out before training (samples, shards), by reason: for the run header."""

    def where(self, i: int) -> str:
        """Sample i, for messages."""

    def describe(self) -> str:
        """'N usable pairs' (or what is known of it), for the run header."""

    def pixels(self, i: int) -> Pair:
        """Sample i with its full image decoded: (3, H, W) uint8; BadSample when it cannot be used."""

    def encoded(self, i: int) -> Pair:
        """Sample i with its image encoded (for DALI, nvJPEG); BadSample when it cannot be used (sources that are
        not `in_memory`)."""

    def tokenize(self, texts: list) -> Tensor:
        """A batch's `Pair.text`s -> (B, L) token ids."""

    def plain_images(self, n: int) -> tuple[list[int], Tensor]:
        """The first `n` usable samples (bad ones skipped): their ids and (k, S, S, 3) uint8 plain images, k <= n."""


@dataclass
class PairSet:
    """Decoded pairs in memory (the emoji set, synthetic pairs): a `PairSource` whose samples are never bad."""

    images: Tensor  # (N, S, S, 3) uint8
    tokens: Tensor  # (N, L) int64 CLIP BPE ids
    captions: list[str]
    labels: Tensor  # (N,) int64 category ids (for probes)
    skipped: dict[str, int] = field(default_factory=dict)  # dropped samples by reason
    known_bad: dict[int, str] = field(default_factory=dict)  # stays empty
    in_memory: ClassVar[bool] = True

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[1]

    @property
    def offsets(self) -> list[int]:
        """One "shard" holding every sample (the resampled mode's unit)."""
        return [0, len(self)]

    def where(self, i: int) -> str:
        return f"sample {i}"

    def describe(self) -> str:
        return f"{len(self)} pairs"

    def pixels(self, i: int) -> Pair:
        s = self.image_size
        return Pair(self.images[i].permute(2, 0, 1), (s, s), self.tokens[i])  # (S, S, 3) -> (3, S, S)

    def tokenize(self, texts: list[Tensor]) -> Tensor:
        return torch.stack(texts)  # (B, L): the ids are held already

    def plain_images(self, n: int) -> tuple[list[int], Tensor]:
        return list(range(min(n, len(self)))), self.images[:n]


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
