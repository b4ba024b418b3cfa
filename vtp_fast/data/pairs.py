"""Image-text pairs for pretraining and the per-step batches built from them.

`StepBatches[step]` is this rank's share of the global batch of `step`: a deterministic function of (seed,
step, rank), so a resumed run continues with exactly the batches it would have seen, and any number of
DataLoader workers produce the same data. Two ways to draw it (`data.sampling`):
  epochs     the global batch of step s holds positions [s * G, (s + 1) * G) of an endless stream of per-epoch
             shuffles of the data set (`epoch_order`); rank r takes its contiguous slice of it
  resampled  for data sets too large to go through in epochs: each virtual group of the global batch (BatchShape)
             reads a contiguous run of samples from one shard drawn with replacement, from a random offset
             (wrapping), a function of (seed, step, group) alone: no epoch bookkeeping, reads that stay within a
             shard, and the same global batch on any number of ranks

Sources: `PairSet` (decoded images in memory: the emoji set, synthetic data) and `ShardSource` (WebDataset
shards decoded per sample). A sample that cannot be used (corrupt image, missing, empty or non-UTF-8 caption) is
replaced deterministically (`StepBatches.replacement`), reported once naming shard and key, and named in the
batch's `bad_ids` / `bad_kinds`, which `BadSampleCount` turns into counts of distinct bad samples.
"""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vtp_fast.config import ConfigError, InputError
from vtp_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from vtp_fast.data.batch import Batch, BatchShape
from vtp_fast.data.emoji import load_emoji
from vtp_fast.data.views import ViewConfig, mask_to_index, mask_weights, sample_seed, ssl_views
from vtp_fast.text import tokenize

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


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


@dataclass
class PairSet:
    images: Tensor  # (N, S, S, 3) uint8
    tokens: Tensor  # (N, L) int64 CLIP BPE ids
    captions: list[str]
    labels: Tensor  # (N,) int64 category ids (for probes)
    skipped: dict[str, int] = field(default_factory=dict)  # dropped samples by reason

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def offsets(self) -> list[int]:
        """One "shard" holding every sample (the resampled mode's unit)."""
        return [0, len(self)]


_PNG = b"\x89PNG\r\n\x1a\n"


def _png_pixels_inflate(data: bytes) -> bool:
    """Whether a PNG's pixel stream (its IDAT chunks, joined) inflates: chunks can all pass their CRCs around
    compressed garbage, which only a decoder notices (DALI's libpng then prints an error line of its own)."""
    import zlib

    pos, idat = len(_PNG), []
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + length])
        pos += 12 + length  # length, type, data, CRC
    try:
        inflater = zlib.decompressobj()
        while idat:  # in pieces: never the whole image inflated at once
            chunk = idat.pop(0)
            while chunk:
                inflater.decompress(chunk, 1 << 20)
                chunk = inflater.unconsumed_tail
        return inflater.eof
    except zlib.error:
        return False


class ShardSource:
    """Samples of WebDataset shards, decoded on demand (PIL): the plain image is the full image's centred square
    resized to `image_size` (`vtp_fast.data.images.plain_image`, as every decoder cuts it); the views are cut from
    the full image. Captions: UTF-8, truncated to the context with the end-of-text token kept; missing, empty or
    not UTF-8 -> BadSample."""

    def __init__(self, shards, image_size: int, context_length: int):
        self.shards, self.image_size, self.context_length = shards, image_size, context_length
        self.known_bad: dict[int, str] = {}  # sample id -> kind, as found (by `count_usable` or by reading)

    def __len__(self) -> int:
        return len(self.shards)

    @property
    def offsets(self):
        """(shards + 1,): the first sample id of every shard, then the total."""
        return self.shards.offsets

    def count_usable(self) -> int:
        """Check every sample as `encoded` does (caption, image header, PNG checksums; no pixels decoded) and return
        how many are usable; the bad ones are reported (once) and remembered in `known_bad`."""
        for i in range(len(self)):
            if i not in self.known_bad:
                try:
                    self._checked(i)
                except BadSample as e:
                    self.known_bad[i] = str(e)
                    warnings.warn(f"{self.where(i)}: bad sample ({e}), skipped and replaced", stacklevel=2)
        return len(self) - len(self.known_bad)

    def where(self, i: int) -> str:
        """'shard path:key' of sample i, for messages."""
        shard, j = self.shards.locate(i)
        return f"{self.shards.shards[shard]}:{self.shards.groups[shard][j][0][3].rsplit('.', 1)[0]}"

    def encoded(self, i: int) -> tuple[bytes, tuple[int, int], str]:
        """(encoded image, (height, width) from its header, caption) without decoding the pixels of an opaque
        image; BadSample for a missing image or caption, an empty or non-UTF-8 caption, an unreadable image header
        or a PNG whose chunks fail their checksums (a truncated or damaged file, which no decoder is ever given).
        An image with transparency (RGBA, LA, palette or colour-key transparency) is composited on white here
        (`vtp_fast.data.images.to_rgb`) and handed on as a PPM, so every decoder applies the same alpha rule."""
        from vtp_fast.data.images import ImageError, open_rgb

        raw, size, caption, alpha = self._checked(i)
        if not alpha:
            return raw.image, size, caption
        try:
            rgb = open_rgb(raw.image)
        except ImageError:
            raise BadSample("corrupt_image") from None
        buf = io.BytesIO()
        rgb.save(buf, format="PPM")
        return buf.getvalue(), size, caption

    def _checked(self, i: int):
        """(raw sample, (height, width), caption, has transparency) or BadSample (see `encoded`)."""
        from PIL import Image, UnidentifiedImageError

        from vtp_fast.data.images import has_alpha

        raw = self.shards[i]
        if raw.image is None:
            raise BadSample("no_image")
        if raw.caption is None:
            raise BadSample("no_caption")
        try:
            caption = raw.caption.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadSample("caption_not_utf8") from None
        if not caption:
            raise BadSample("empty_caption")
        try:
            with Image.open(io.BytesIO(raw.image)) as img:
                w, h = img.size
                alpha = has_alpha(img)
                if img.format == "PNG":
                    img.verify()  # every chunk's CRC, without inflating the pixels
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
            raise BadSample("corrupt_image") from None
        if raw.image.startswith(_PNG) and not _png_pixels_inflate(raw.image):
            raise BadSample("corrupt_image")  # found here, it is skipped before a decoder prints libpng's complaint
        return raw, (h, w), caption, alpha

    def sample(self, i: int) -> tuple[Tensor, Tensor, str]:
        """(plain (S, S, 3) uint8, full image (3, H, W) float in [0, 1] for the views, caption)."""
        from vtp_fast.data.images import ImageError, as_uint8, open_rgb, plain_image

        raw, _, caption, _ = self._checked(i)
        try:
            img = as_uint8(open_rgb(raw.image, name=f"sample {i}"))  # (3, H, W)
        except ImageError:
            raise BadSample("corrupt_image") from None
        plain = plain_image(img, self.image_size).permute(1, 2, 0)  # (3, S, S) -> (S, S, 3)
        return plain, img.float() / 255, caption


USABLE_SCAN_MAX = 50_000  # shard sets up to this size are checked sample by sample at start (`describe_pairs`)


def describe_pairs(source) -> str:
    """'N usable pairs' for a run header: a ShardSource of at most USABLE_SCAN_MAX samples is checked at once
    (see `ShardSource.count_usable`); a larger one reports its indexed samples, its bad ones counted as met."""
    if not isinstance(source, ShardSource):
        return f"{len(source)} pairs"
    if len(source) > USABLE_SCAN_MAX:
        return f"{len(source)} samples (bad ones skipped and counted as they are read)"
    usable = source.count_usable()
    if usable == len(source):
        return f"{usable} usable pairs"
    kinds = Counter(source.known_bad.values())
    return (f"{usable} usable pairs ({len(source)} samples, {len(source) - usable} bad: "
            f"{', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})")


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
    from vtp_fast.data.images import normalize

    return normalize(images.permute(0, 3, 1, 2))  # (B, S, S, 3) -> (B, 3, S, S)


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


DECODERS = ("torchvision", "nvjpeg", "dali")
REPLACE_TRIES = 8  # pseudo-random replacements tried for a bad sample before scanning the ids after it


def pick_decoder(name: str) -> str:
    """auto: DALI when importable, else torchvision's nvJPEG on a GPU, else PIL (torchvision path)."""
    from vtp_fast import optional

    if name != "auto":
        if name == "dali" and not optional.available("dali"):
            raise ConfigError(f"data.decoder: dali requested but unavailable ({optional.reason('dali')})")
        if name == "nvjpeg" and not torch.cuda.is_available():
            raise ConfigError("data.decoder: nvjpeg needs a CUDA device")
        return name
    if optional.available("dali"):
        return "dali"
    return "nvjpeg" if torch.cuda.is_available() else "torchvision"


SAMPLING = ("epochs", "resampled")
_RESAMPLED = 0x5E5A  # tags the resampled mode's seeds


class StepBatches(Dataset):
    def __init__(self, source, shape: BatchShape, views: ViewConfig, *, seed: int, rank: int = 0,
                 world: int = 1, steps: int = 1 << 40, trim_text: bool = False, decoder: str = "torchvision",
                 dali_threads: int = 2, dali_device: str | None = None, sampling: str = "epochs"):
        """source: a PairSet or ShardSource; trim_text: cut token padding beyond the batch's longest caption
        (see `trim_tokens`); decoder (shards): "torchvision" (PIL on the CPU), "nvjpeg" (torchvision's GPU JPEG
        decoder, views on the GPU) or "dali" (vtp_fast.data.dali); see `assemble` for images a decoder fails
        on. dali_device: "gpu" or "cpu"
        (default: "gpu" when CUDA is available), where the DALI decoder runs."""
        if decoder not in DECODERS:
            raise ConfigError(f"unknown decoder {decoder!r} (choices: {', '.join(DECODERS)})")
        if sampling not in SAMPLING:
            raise ConfigError(f"unknown sampling {sampling!r} (choices: {', '.join(SAMPLING)})")
        self.source, self.shape, self.views, self.trim_text, self.sampling = source, shape, views, trim_text, sampling
        self.seed, self.rank, self.world, self.steps = seed, rank, world, steps
        self.decoder = decoder if isinstance(source, ShardSource) else "torchvision"
        self._dali, self._dali_threads, self._dali_device = None, dali_threads, dali_device
        # sample id -> kind, found by this process (each reported once); a ShardSource's, shared
        self._known_bad: dict[int, str] = getattr(source, "known_bad", {})
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

    def fetch(self, ids: Tensor) -> tuple[Tensor, Tensor, list[Tensor], Tensor, dict[int, str]]:
        """(ids actually used, plain images (B, S, S, 3) uint8, full images for the first `shape.ssl`, tokens
        (B, L), bad samples met {id: kind}). A bad sample is replaced (see `_first_usable`)."""
        n_ssl = self.shape.ssl
        if isinstance(self.source, PairSet):  # decoded in memory: nothing can go bad
            imgs = self.source.images[ids]
            fulls = [img.permute(2, 0, 1).float() / 255 for img in imgs[:n_ssl]]
            return ids, imgs, fulls, self.source.tokens[ids], {}
        used, samples, bad = self._first_usable(ids, self.source.sample)
        plains, fulls, captions = zip(*samples, strict=True)
        tokens = tokenize(list(captions), self.source.context_length)  # one call for the batch
        return torch.tensor(used), torch.stack(plains), list(fulls[:n_ssl]), tokens, bad

    def assemble(self, ids: Tensor, epochs: Tensor) -> Batch:
        """The batch of samples `ids` (B,) drawn in `epochs` (B,): SSL views for the first `shape.ssl`; bad_ids
        and bad_kinds name the distinct bad samples met (see BadSampleCount).

        Images whose bytes fail PIL's checks never reach the GPU decoders. When a decoder still fails on a batch,
        its pipeline is dropped (rebuilt on the next batch), the culprits are found (a full PIL decode, else the
        decoder on each image alone), marked bad (reported once, naming shard and key) and the batch is rebuilt
        without them: same decoder, same replacements as any later batch that meets them."""
        from vtp_fast.data.images import ImageError

        if self.decoder == "torchvision":
            return self._assemble_pil(ids, epochs)
        for _ in range(8):
            try:
                return self._assemble_encoded(ids, epochs)
            except (RuntimeError, ImageError) as e:  # ImageError: the nvJPEG path's PIL decode of a non-JPEG
                self._dali = None  # a pipeline that failed is not reused
                if not self._find_undecodable(ids, e):
                    break
        return self._assemble_pil(ids, epochs)  # the decoder fails on images it decodes alone: PIL for this batch

    def _find_undecodable(self, ids: Tensor, error: Exception) -> bool:
        """After the decoder failed on the batch of `ids`: mark the samples it cannot use bad; False when none
        was found."""
        from vtp_fast.data.images import ImageError, open_rgb

        used, items, _ = self._first_usable(ids, self.source.encoded)
        found = False
        for i, (image, _, _) in zip(used, items, strict=True):
            try:
                open_rgb(image)
            except ImageError:
                self._mark_bad(i, "corrupt_image")
                found = True
        if found:
            return True
        self._decoder()
        for i, (image, _, _) in zip(used, items, strict=True):
            try:
                self._dali.decode([image], self.source.image_size)
            except (RuntimeError, ImageError):
                self._dali = None
                self._decoder()
                self._mark_bad(i, "decoder_error", f" ({self.decoder}: {str(error).splitlines()[0][:200]})")
                found = True
        return found

    def _mark_bad(self, i: int, kind: str, detail: str = "") -> None:
        if i not in self._known_bad:
            self._known_bad[i] = kind
            where = self.source.where(i) if hasattr(self.source, "where") else f"sample {i}"
            warnings.warn(f"{where}: bad sample ({kind}{detail}), skipped and replaced", stacklevel=3)

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

    def _first_usable(self, ids: Tensor, read) -> tuple[list[int], list, dict[int, str]]:
        """read(id) for every id, a bad sample (BadSample) replaced (see `replacement`): (ids used, results,
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
                    results.append(read(j))
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

    def _decoder(self):
        if self._dali is None:
            if self.decoder == "dali":
                from vtp_fast.data.dali import DaliDecoder

                self._dali = DaliDecoder(self.shape.size, threads=self._dali_threads, device=self._dali_device,
                                         seed=self.seed)
            else:
                from vtp_fast.data.nvjpeg import NvjpegDecoder

                self._dali = NvjpegDecoder()
        return self._dali

    def _assemble_encoded(self, ids: Tensor, epochs: Tensor) -> Batch:
        """The DALI / nvJPEG path: pixels are decoded by the decoder, every random choice made here."""
        from vtp_fast.data.views import sample_views

        decoder = self._decoder()
        used, items, bad = self._first_usable(ids, self.source.encoded)
        encoded = [x[0] for x in items]
        tokens = tokenize([x[2] for x in items], self.source.context_length)
        images = decoder.decode(encoded, self.source.image_size)
        batch = Batch(images, trim_tokens(tokens) if self.trim_text else tokens, torch.tensor(used),
                      **self._bad_fields(bad))
        n = self.shape.ssl
        if n:
            grid = (self.views.global_size // self.shape.patch,) * 2
            params = [sample_views(*items[k][1], self.views, grid,
                                   torch.Generator().manual_seed(sample_seed(self.seed, int(e), used[k], 1)))
                      for k, e in enumerate(epochs[:n].tolist())]
            views = decoder.views(encoded[:n], [p[0] for p in params])  # per view (n, 3, s, s)
            batch.global_crops = torch.cat(views[:2])  # view-major: (2n, 3, G, G)
            local = views[2:]
            batch.local_crops = torch.cat(local) if local else batch.global_crops.new_zeros(0, 3, 1, 1)
            self._add_masks(batch, torch.stack([p[1] for p in params]).transpose(0, 1).flatten(0, 1))
        return batch

    @staticmethod
    def _add_masks(batch: Batch, masks: Tensor) -> None:
        """masks: (2n, N) view-major iBOT masks -> masks, packed index (M,) and per-token weights (M,)."""
        batch.masks, batch.mask_index, batch.mask_weight = masks, mask_to_index(masks), mask_weights(masks)

    def _assemble_pil(self, ids: Tensor, epochs: Tensor) -> Batch:
        ids, plains, fulls, tokens, bad = self.fetch(ids)
        batch = Batch(normalize_u8(plains), trim_tokens(tokens) if self.trim_text else tokens, ids,
                      **self._bad_fields(bad))
        n = self.shape.ssl
        if n:
            grid = (self.views.global_size // self.shape.patch,) * 2
            views = [ssl_views(full, self.views, grid,
                               torch.Generator().manual_seed(sample_seed(self.seed, int(e), int(i), 1)))
                     for full, i, e in zip(fulls, ids[:n].tolist(), epochs[:n].tolist(), strict=True)]
            g, l, m = (torch.stack(t) for t in zip(*views, strict=True))  # (n, 2, ...), (n, L, ...), (n, 2, N)
            # view-major layouts: all samples' view 0, then view 1, ...
            batch.global_crops = ((g.transpose(0, 1).flatten(0, 1)) - MEAN) / STD  # (2n, 3, G, G)
            batch.local_crops = ((l.transpose(0, 1).flatten(0, 1)) - MEAN) / STD  # (L n, 3, l, l)
            self._add_masks(batch, m.transpose(0, 1).flatten(0, 1))  # (2n, N)
        return batch

    def __getstate__(self):  # a DALI pipeline is rebuilt in each worker process
        state = dict(self.__dict__)
        state["_dali"] = None
        return state
