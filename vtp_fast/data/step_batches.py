"""The per-step batches of pretraining, drawn from any `vtp_fast.data.pairs.PairSource`.

`StepBatches[step]` is this rank's share of the global batch of `step`: a deterministic function of (seed,
step, rank), so a resumed run continues with exactly the batches it would have seen, and any number of
DataLoader workers produce the same data. Two ways to draw it (`data.sampling`):
  epochs     the global batch of step s holds positions [s * G, (s + 1) * G) of an endless stream of per-epoch
             shuffles of the data set (`epoch_order`); rank r takes its contiguous slice of it
  resampled  for data sets too large to go through in epochs: each virtual group of the global batch (BatchShape)
             reads a contiguous run of samples from one shard drawn with replacement, from a random offset
             (wrapping), a function of (seed, step, group) alone: no epoch bookkeeping, reads that stay within a
             shard, and the same global batch on any number of ranks

A bad sample (`vtp_fast.data.pairs.BadSample`) is replaced deterministically (`StepBatches.replacement`), reported
once naming shard and key, and named in the batch's `bad_ids` / `bad_kinds`.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vtp_fast.config import ConfigError, InputError
from vtp_fast.data.batch import Batch, BatchShape
from vtp_fast.data.decoders import Decoder, PilDecoder, pick_decoder
from vtp_fast.data.images import ImageError, open_rgb
from vtp_fast.data.pairs import BAD_KINDS, BadSample, PairSource
from vtp_fast.data.views import ViewConfig, sample_seed, sample_views


def trim_tokens(tokens: Tensor, multiple: int = 8) -> Tensor:
    """(B, L) token ids -> (B, L') with L' the batch's longest caption rounded up to `multiple` (at most L).

    Exact for a causal text tower pooled at the end-of-text token: positions after a caption's end never
    influence it. Saves the text tower's work on padding."""
    nonzero = (tokens != 0).any(0).nonzero()
    length = int(nonzero[-1]) + 1 if nonzero.numel() else 1
    return tokens[:, : min(tokens.shape[1], -(-length // multiple) * multiple)]


FULL_SHUFFLE_MAX = 1 << 24  # larger sets shuffle blocks, then samples within windows of blocks
BLOCK, WINDOW = 1 << 14, 32


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(sample_seed(seed, epoch)))


def epoch_order(seed: int, epoch: int, n: int, positions: Tensor) -> Tensor:
    """Sample ids at `positions` (within one epoch) of the epoch's shuffle of n samples.

    Up to FULL_SHUFFLE_MAX samples: a full permutation. Beyond (hundreds of millions of pairs): blocks of BLOCK
    consecutive samples are permuted, and samples are permuted within each window of WINDOW blocks: a shuffle
    buffer of BLOCK * WINDOW samples that stays a pure function of (seed, epoch, position), so resuming and
    splitting over ranks need no state."""
    if n <= FULL_SHUFFLE_MAX:
        return _permutation(seed, epoch, n)[positions]
    n_blocks = -(-n // BLOCK)
    block_order = _permutation(seed, epoch, n_blocks)
    sizes = torch.clamp(n - block_order * BLOCK, max=BLOCK)  # the last block of the data set may be short
    window_starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(sizes, 0)])[::WINDOW].contiguous()
    window_of = torch.searchsorted(window_starts, positions, right=True) - 1
    out = torch.empty_like(positions)
    for w in window_of.unique().tolist():
        blocks = block_order[w * WINDOW:(w + 1) * WINDOW]
        ids = torch.cat([torch.arange(b * BLOCK, min(n, (b + 1) * BLOCK)) for b in blocks.tolist()])
        inner = _permutation(sample_seed(seed, epoch), w, ids.numel())
        sel = window_of == w
        out[sel] = ids[inner[positions[sel] - window_starts[w]]]
    return out


REPLACE_TRIES = 8  # pseudo-random replacements tried for a bad sample before scanning the ids after it
DECODE_TRIES = 8  # rebuilds of a batch a decoder failed on before PIL decodes it
SAMPLING = ("epochs", "resampled")
_RESAMPLED = 0x5E5A  # tags the resampled mode's seeds


class StepBatches(Dataset):
    def __init__(self, source: PairSource, shape: BatchShape, views: ViewConfig, *, seed: int, rank: int = 0,
                 world: int = 1, steps: int = 1 << 40, trim_text: bool = False, decoder: str = "torchvision",
                 dali_threads: int = 2, dali_device: str | None = None, sampling: str = "epochs"):
        """trim_text: cut token padding beyond the batch's longest caption (see `trim_tokens`); decoder: a
        data.decoder value, resolved by `vtp_fast.data.decoders.pick_decoder` (with dali_threads and dali_device,
        "gpu" or "cpu") into `self.decoder`; see `assemble` for images a decoder fails on."""
        self.decoder: Decoder = pick_decoder(decoder, in_memory=source.in_memory, dali_device=dali_device,
                                             threads=dali_threads, seed=seed, max_batch=shape.size)
        if sampling not in SAMPLING:
            raise ConfigError(f"unknown sampling {sampling!r} (choices: {', '.join(SAMPLING)})")
        self.source, self.shape, self.views, self.trim_text, self.sampling = source, shape, views, trim_text, sampling
        self.seed, self.rank, self.world, self.steps = seed, rank, world, steps
        self._known_bad = source.known_bad  # sample id -> kind; each reported once by the process that finds it
        if len(source) == 0:
            raise InputError("the data set is empty")
        if rank == 0 and len(source) < shape.size * world:
            warnings.warn(f"the data set holds {len(source)} samples, fewer than the global batch of "
                          f"{shape.size * world}: every batch repeats samples", stacklevel=2)

    def __len__(self) -> int:
        return self.steps

    def positions(self, step: int) -> tuple[Tensor, Tensor]:
        """This rank's (sample ids, epochs) for `step`, each (size,): its contiguous slice of the global batch,
        ordered SSL samples first, then the other reconstructed ones, then the rest (see `_local_order`). In the
        resampled mode the "epoch" of every sample is the step (views are drawn afresh at every draw)."""
        if self.sampling == "resampled":
            ids = self._resampled(step)
            return ids, torch.full_like(ids, step)
        n, local = len(self.source), self.shape.size
        start = (step * self.world + self.rank) * local
        pos = (start + self._local_order())
        epochs = pos // n
        ids = torch.empty(local, dtype=torch.long)
        for e in epochs.unique().tolist():
            sel = epochs == e
            ids[sel] = epoch_order(self.seed, e, n, pos[sel] % n)
        return ids, epochs

    def _resampled(self, step: int) -> Tensor:
        """This rank's virtual groups (global indices rank * groups ...), each a run of consecutive samples of one
        shard (drawn uniformly among the non-empty ones) from a random offset, wrapping within the shard."""
        bounds = torch.as_tensor(self.source.offsets)
        starts, lengths = bounds[:-1], bounds[1:] - bounds[:-1]
        starts, lengths = starts[lengths > 0], lengths[lengths > 0]
        g = self.shape.groups
        per = self.shape.size // g
        runs = []
        for group in range(self.rank * g, (self.rank + 1) * g):
            gen = torch.Generator().manual_seed(sample_seed(self.seed, _RESAMPLED, step, group))
            k = int(torch.randint(len(starts), (1,), generator=gen))
            offset = int(torch.randint(int(lengths[k]), (1,), generator=gen))
            runs.append(starts[k] + (offset + torch.arange(per)) % lengths[k])
        return torch.cat(runs)[self._local_order()]

    def _local_order(self) -> Tensor:
        """The slice's positions as `shape.groups` virtual groups of consecutive positions, each with its first
        ssl / groups as SSL samples and its first rec / groups as reconstructed ones; every group's SSL samples,
        then their other reconstructed ones, then the rest. One group: the slice in order."""
        g, size = self.shape.groups, self.shape.size
        lo, hi = sorted((self.shape.ssl // g, self.shape.rec // g))
        idx = torch.arange(size).view(g, size // g)
        return torch.cat([idx[:, :lo].flatten(), idx[:, lo:hi].flatten(), idx[:, hi:].flatten()])

    def __getitem__(self, step: int) -> Batch:
        return self.assemble(*self.positions(step))

    def assemble(self, ids: Tensor, epochs: Tensor) -> Batch:
        """The batch of samples `ids` (B,) drawn in `epochs` (B,): SSL views for the first `shape.ssl`; bad_ids
        and bad_kinds name the distinct bad samples met (see vtp_fast.data.pairs.BadSampleCount).

        PIL meets every image it cannot decode while reading, where the sample is replaced at once. Images whose
        bytes fail PIL's checks never reach the batch decoders (DALI, nvJPEG); when one still fails on a batch,
        it is reset, the culprits are found (a full PIL decode, else the decoder on each image alone), marked bad
        (reported once, naming shard and key) and the batch is rebuilt without them: same decoder, same
        replacements as any later batch that meets them."""
        if isinstance(self.decoder, PilDecoder):
            return self._assemble(ids, epochs, self.decoder)
        for _ in range(DECODE_TRIES):
            try:
                return self._assemble(ids, epochs, self.decoder)
            except (RuntimeError, ImageError) as e:  # ImageError: the nvJPEG path's PIL decode of a non-JPEG
                self.decoder.reset()  # a pipeline that failed is not reused
                if not self._find_undecodable(ids, e):
                    break
        return self._assemble(ids, epochs, PilDecoder())  # it fails on images it decodes alone: PIL, this batch

    def _assemble(self, ids: Tensor, epochs: Tensor, decoder: Decoder) -> Batch:
        """The batch read and decoded by `decoder`; every random choice is made here."""
        used, items, bad = self._first_usable(ids, decoder)
        tokens = self.source.tokenize([x.text for x in items])
        images = decoder.decode([x.image for x in items], self.source.image_size)
        batch = Batch(images, trim_tokens(tokens) if self.trim_text else tokens, torch.tensor(used),
                      **self._bad_fields(bad))
        n = self.shape.ssl
        if n:
            grid = (self.views.global_size // self.shape.patch,) * 2
            params = [sample_views(*items[k].size, self.views, grid,
                                   torch.Generator().manual_seed(sample_seed(self.seed, int(e), used[k], 1)))
                      for k, e in enumerate(epochs[:n].tolist())]
            batch.global_crops, batch.local_crops = decoder.views([x.image for x in items[:n]], [p[0] for p in params])
            batch.set_masks(torch.stack([p[1] for p in params]).transpose(0, 1).flatten(0, 1))  # (2n, N)
        return batch

    def _find_undecodable(self, ids: Tensor, error: Exception) -> bool:
        """After the decoder failed on the batch of `ids`: mark the samples it cannot use bad; False when none
        was found."""
        used, items, _ = self._first_usable(ids, self.decoder)
        found = False
        for i, item in zip(used, items, strict=True):
            try:
                open_rgb(item.image)
            except ImageError:
                self._mark_bad(i, "corrupt_image")
                found = True
        if found:
            return True
        for i, item in zip(used, items, strict=True):
            try:
                self.decoder.decode([item.image], self.source.image_size)
            except (RuntimeError, ImageError):
                self.decoder.reset()
                self._mark_bad(i, "decoder_error", f" ({self.decoder.name}: {str(error).splitlines()[0][:200]})")
                found = True
        return found

    def _mark_bad(self, i: int, kind: str, detail: str = "") -> None:
        if i not in self._known_bad:
            self._known_bad[i] = kind
            warnings.warn(f"{self.source.where(i)}: bad sample ({kind}{detail}), skipped and replaced", stacklevel=3)

    def replacement(self, i: int, attempt: int) -> int:
        """The id tried in place of sample i at `attempt` (0: i itself): a fixed pseudo-random id for the first
        REPLACE_TRIES attempts (so no sample is drawn more often for following a bad one), then every id after i in
        turn (so a data set with any usable sample always yields one)."""
        n = len(self.source)
        if attempt == 0 or n == 1:
            return i % n
        if attempt <= REPLACE_TRIES:
            return (i + 1 + sample_seed(self.seed, i, attempt, 2) % (n - 1)) % n
        return (i + attempt - REPLACE_TRIES) % n

    def _first_usable(self, ids: Tensor, decoder: Decoder) -> tuple[list[int], list, dict[int, str]]:
        """decoder.read of every id, a bad sample (BadSample) replaced (see `replacement`): (ids used, pairs read,
        distinct bad samples met {id: kind})."""
        bad: dict[int, str] = {}
        used, results = [], []
        n = len(self.source)
        for i in ids.tolist():
            for attempt in range(n + REPLACE_TRIES):
                j = self.replacement(i, attempt)
                if j in self._known_bad:
                    bad[j] = self._known_bad[j]
                    continue
                try:
                    results.append(decoder.read(self.source, j))
                    break
                except BadSample as e:
                    self._mark_bad(j, str(e))
                    bad[j] = str(e)
            else:
                raise InputError(f"no usable sample in the data set ({n} samples, all bad)")
            used.append(j)
        return used, results, bad

    @staticmethod
    def _bad_fields(bad: dict[int, str]) -> dict[str, Tensor]:
        ids = sorted(bad)
        return {"bad_ids": torch.tensor(ids, dtype=torch.long),
                "bad_kinds": torch.tensor([BAD_KINDS.index(bad[i]) for i in ids], dtype=torch.long)}
