"""Pairs read from WebDataset shards: random access to the raw samples (`ShardSet`, through the shards' index
files, see vtp_fast.data.shards) and the checked image-text pairs pretraining draws from them (`ShardSource`, a
`vtp_fast.data.pairs.PairSource`)."""

from __future__ import annotations

import io
import json
import warnings
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from vtp_fast.config import InputError
from vtp_fast.data.images import ImageError, as_uint8, has_alpha, open_rgb, plain_image
from vtp_fast.data.pairs import BadSample, Pair
from vtp_fast.data.shards import IMAGE_EXTS, expand, shard_groups
from vtp_fast.text import tokenize


@dataclass
class RawSample:
    """What a shard holds for one sample: encoded image bytes and extension, caption bytes, label, json."""

    key: str
    image: bytes | None
    ext: str | None
    caption: bytes | None
    label: int | None
    meta: dict | None


class ShardSet:
    """Random access to every sample of a list of shards (their .idx files, rebuilt when missing)."""

    def __init__(self, spec: str | Sequence[str]):
        found, groups, problems, damaged = [], [], Counter(), []
        for path in expand(spec):
            if not path.is_file():
                warnings.warn(f"{path}: missing shard, skipped", stacklevel=2)
                problems["missing_shard"] += 1
                damaged.append((path, "missing_shard", 0))
                continue
            g, damage, index_problem = shard_groups(path)
            if index_problem is not None:
                problems[index_problem] += 1
                damaged.append((path.with_suffix(".idx"), index_problem, 0))
            usable = [x for x in g if any(e in IMAGE_EXTS for e, *_ in x)]
            if damage is not None:
                warnings.warn(f"{path}: {damage.replace('_', ' ')}; keeping its {len(usable)} complete samples",
                              stacklevel=2)
                problems[damage] += 1
                damaged.append((path, damage, len(usable)))
            problems["sample_without_image"] += len(g) - len(usable)
            found.append(path)
            groups.append(usable)
        if not found:
            raise InputError(f"no readable shards in {spec!r}")
        self.shards, self.groups = found, groups
        self.problems = Counter({k: v for k, v in problems.items() if v})
        self.damaged: list[tuple[Path, str, int]] = damaged  # (file, problem, samples kept)
        self._offsets = np.cumsum([0] + [len(g) for g in groups])
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def offsets(self) -> np.ndarray:
        """(shards + 1,): the first sample id of every shard, then the total."""
        return self._offsets

    def locate(self, i: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return shard, i - int(self._offsets[shard])

    def _handle(self, shard: int):
        fh = self._handles.get(shard)
        if fh is None:  # one open file per shard per process (DataLoader workers each get their own)
            fh = self._handles[shard] = open(self.shards[shard], "rb")  # noqa: SIM115
        return fh

    def __getitem__(self, i: int) -> RawSample:
        shard, j = self.locate(i)
        fh = self._handle(shard)
        parts: dict[str, bytes] = {}
        key = ""
        for ext, offset, size, name in self.groups[shard][j]:
            fh.seek(offset)
            parts[ext.lower()] = fh.read(size)
            key = name.rsplit(".", 1)[0]
        ext = next((e for e in IMAGE_EXTS if e in parts), None)
        label = None
        if "cls" in parts:
            try:
                label = int(parts["cls"].strip())
            except ValueError:
                label = None
        meta = None
        if "json" in parts:
            try:
                meta = json.loads(parts["json"])
            except (ValueError, UnicodeDecodeError):
                meta = None
        return RawSample(key, parts.get(ext) if ext else None, ext, parts.get("txt"), label, meta)

    def __getstate__(self):  # file handles do not cross process boundaries
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


_PNG = b"\x89PNG\r\n\x1a\n"


def _png_pixels_inflate(data: bytes) -> bool:
    """Whether a PNG's pixel stream (its IDAT chunks, joined) inflates: chunks can all pass their CRCs around
    compressed garbage, which only a decoder notices (DALI's libpng then prints an error line of its own)."""
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


USABLE_SCAN_MAX = 50_000  # shard sets up to this size are checked sample by sample at start (`describe`)


class ShardSource:
    """The samples of WebDataset shards as a `PairSource`, read on demand: `pixels` decodes with PIL, `encoded`
    hands the bytes on to a batch decoder (DALI, nvJPEG); both check first what can be checked without decoding
    (`encoded`). Captions: UTF-8, truncated to the context with the end-of-text token kept; missing, empty or not
    UTF-8 -> BadSample."""

    in_memory = False

    def __init__(self, shards: ShardSet, image_size: int, context_length: int):
        self.shards, self.image_size, self.context_length = shards, image_size, context_length
        self.known_bad: dict[int, str] = {}  # sample id -> kind, as found (by `count_usable` or by reading)

    def __len__(self) -> int:
        return len(self.shards)

    @property
    def offsets(self):
        """(shards + 1,): the first sample id of every shard, then the total."""
        return self.shards.offsets

    @property
    def skipped(self) -> dict[str, int]:
        """Damaged shards and samples without an image, by kind (`ShardSet.problems`)."""
        return self.shards.problems

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

    def describe(self) -> str:
        """'N usable pairs': a set of at most USABLE_SCAN_MAX samples is checked at once (`count_usable`); a larger
        one reports its indexed samples, its bad ones counted as met."""
        if len(self) > USABLE_SCAN_MAX:
            return f"{len(self)} samples (bad ones skipped and counted as they are read)"
        usable = self.count_usable()
        if usable == len(self):
            return f"{usable} usable pairs"
        kinds = Counter(self.known_bad.values())
        return (f"{usable} usable pairs ({len(self)} samples, {len(self) - usable} bad: "
                f"{', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})")

    def where(self, i: int) -> str:
        """'shard path:key' of sample i, for messages."""
        shard, j = self.shards.locate(i)
        return f"{self.shards.shards[shard]}:{self.shards.groups[shard][j][0][3].rsplit('.', 1)[0]}"

    def encoded(self, i: int) -> Pair:
        """(encoded image, (height, width) from its header, caption) without decoding the pixels of an opaque
        image; BadSample for a missing image or caption, an empty or non-UTF-8 caption, an unreadable image header
        or a PNG whose chunks fail their checksums (a truncated or damaged file, which no decoder is ever given).
        An image with transparency (RGBA, LA, palette or colour-key transparency) is composited on white here
        (`vtp_fast.data.images.to_rgb`) and handed on as a PPM, so every decoder applies the same alpha rule."""
        raw, size, caption, alpha = self._checked(i)
        if not alpha:
            return Pair(raw.image, size, caption)
        try:
            rgb = open_rgb(raw.image)
        except ImageError:
            raise BadSample("corrupt_image") from None
        buf = io.BytesIO()
        rgb.save(buf, format="PPM")
        return Pair(buf.getvalue(), size, caption)

    def pixels(self, i: int) -> Pair:
        """(full image (3, H, W) uint8 decoded by PIL, (H, W), caption), checked as `encoded` is first."""
        raw, _, caption, _ = self._checked(i)
        try:
            img = as_uint8(open_rgb(raw.image, name=f"sample {i}"))  # (3, H, W)
        except ImageError:
            raise BadSample("corrupt_image") from None
        return Pair(img, tuple(img.shape[1:]), caption)

    def _checked(self, i: int):
        """(raw sample, (height, width), caption, has transparency) or BadSample (see `encoded`)."""
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

    def tokenize(self, texts: list[str]) -> Tensor:
        return tokenize(texts, self.context_length)  # one call for the batch

    def plain_images(self, n: int) -> tuple[list[int], Tensor]:
        ids, plains = [], []
        for i in range(len(self)):
            try:
                img = self.pixels(i).image
            except BadSample:
                continue
            ids.append(i)
            plains.append(plain_image(img, self.image_size).permute(1, 2, 0))  # (3, S, S) -> (S, S, 3)
            if len(ids) == n:
                break
        s = self.image_size
        return ids, torch.stack(plains) if plains else torch.zeros(0, s, s, 3, dtype=torch.uint8)
