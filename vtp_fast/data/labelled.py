"""Labelled image sets: what latents are extracted from, what FID/KID references and the linear probe read.

Every set is an image *source* with one interface, whatever its size:
    len(source)            images in the set (ids 0 .. len - 1, a fixed order)
    source.name            identifies the set (cache keys, meta.json)
    source.size            S: every image comes out S x S
    source.class_names     class names, index = label; None where only the labels tell (shards: "0", "1", ...)
    source.fetch(ids)      -> Fetched: the images of `ids` that could be used, (k, S, S, 3) uint8, their labels,
                           ids and captions, and the ids that could not be used with the reason
Sources:
    LabelledImages   decoded in memory: the emoji set, Fashion-MNIST, the generative probe's images, tests
    FolderImages     an ImageFolder tree, as ImageNet train / val are usually kept: ROOT/<class>/**/<image>;
                     class index = the class folder's position among the sorted class folders; within a class
                     the images sorted by relative path; decoded on demand
    ShardImages      WebDataset shards with .cls labels (vtp_fast.data.shards), decoded on demand
Decoded sources read through the pretraining decoders' PIL path (`open_rgb`: the one alpha rule) and cut ADM's
centre crop (`vtp_fast.data.images.adm_center_crop`); an image that cannot be decoded is skipped, reported and
counted (`Fetched.bad`), never fatal. `stream(source, chunks, workers)` reads chunks of ids with a torch
DataLoader whose worker processes each decode whole chunks; `take` collects a few images. No function here holds
a decoded set in memory except `load_images`, which does so on purpose for the small sets (the scaling study).

`open_images(spec, size)` names a source; `load_images(spec, size)` is the same set decoded into memory.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vtp_fast.config import InputError

T = TypeVar("T")


@dataclass
class Fetched:
    """The usable images among some ids, in the order asked for."""

    images: torch.Tensor  # (k, S, S, 3) uint8
    labels: torch.Tensor  # (k,) int64
    ids: torch.Tensor  # (k,) int64: the source ids of `images`
    captions: list[str] = field(default_factory=list)  # (k,) where the set has captions, else empty
    bad: list[tuple[int, str]] = field(default_factory=list)  # (id, why) of the ids that could not be used


@dataclass
class LabelledImages:
    """A decoded set in memory (also an image source: `fetch`)."""

    images: torch.Tensor  # (N, S, S, 3) uint8
    labels: torch.Tensor  # (N,) int64
    class_names: list[str]
    captions: list[str]
    name: str  # identifies the set (cache keys)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def fetch(self, ids: Sequence[int] | torch.Tensor) -> Fetched:
        idx = torch.as_tensor(ids, dtype=torch.long)
        captions = [self.captions[i] for i in idx.tolist()] if self.captions else []
        return Fetched(self.images[idx], self.labels[idx], idx, captions)


def probe_set(images: torch.Tensor, labels: torch.Tensor | None, class_names: list[str] | None,
              n: int) -> LabelledImages:
    """The first n images (uint8 (N, S, S, 3)) with their labels (one class when unlabelled)."""
    images = images[:n]
    if labels is None or not class_names:
        labels, class_names = torch.zeros(len(images), dtype=torch.long), ["all"]
    return LabelledImages(images, labels[:n].clone(), list(class_names), [], f"gen-probe-{len(images)}")


class _Decoded:
    """What the sources decoded on demand share: `read(i)` -> (encoded image bytes or a path, label, caption,
    name for messages) is theirs, decoding and ADM's crop are here."""

    size: int

    def read(self, i: int) -> tuple[bytes | Path, int, str, str]:
        raise NotImplementedError

    def fetch(self, ids: Sequence[int] | torch.Tensor) -> Fetched:
        from vtp_fast.data.images import ImageError, adm_center_crop, open_rgb

        images, labels, used, captions, bad = [], [], [], [], []
        for i in torch.as_tensor(ids, dtype=torch.long).tolist():
            try:
                image, label, caption, name = self.read(i)
                images.append(np.asarray(adm_center_crop(open_rgb(image, name), self.size)))  # (S, S, 3)
            except ImageError as e:
                bad.append((i, str(e)))
                continue
            labels.append(label)
            used.append(i)
            captions.append(caption)
        s = self.size
        stacked = torch.from_numpy(np.stack(images)) if images else torch.zeros(0, s, s, 3, dtype=torch.uint8)
        return Fetched(stacked, torch.tensor(labels, dtype=torch.long), torch.tensor(used, dtype=torch.long),
                       captions, bad)


def _set_name(kind: str, path: Path, size: int) -> str:
    return f"{kind}-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}-{size}"


def _list_tree(root: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """An ImageFolder tree -> (class names (sorted class folders), relative image paths (N,) bytes, labels (N,)
    int64). Hidden names are skipped; an empty class folder stays a class (indices stay those of the tree)."""
    from vtp_fast.data.images import IMAGE_SUFFIXES

    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    files: list[bytes] = []
    labels: list[int] = []
    for c, name in enumerate(classes):
        found = []
        for top, dirs, names in os.walk(root / name, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = os.path.relpath(top, root)
            found += [os.path.join(rel, f) for f in names
                      if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
        files += [os.fsencode(f) for f in sorted(found)]
        labels += [c] * len(found)
    # fixed-width bytes, not a list of str: DataLoader workers share the array instead of copying it page by
    # page as reference counts touch it (ImageNet: 1.28M names)
    return classes, np.array(files, dtype=np.bytes_), np.array(labels, dtype=np.int64)


class FolderImages(_Decoded):
    """An ImageFolder tree (see the module docstring), decoded on demand."""

    def __init__(self, root: str | Path, size: int):
        self.root, self.size = Path(root), size
        self.class_names, self.files, self.labels = _list_tree(self.root)
        if not len(self.files):
            raise InputError(f"{root}: no images in class folders (expected ROOT/<class>/<image>, as ImageFolder)")
        self.name = _set_name("folder", self.root, size)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> tuple[Path, int, str, str]:
        path = self.root / os.fsdecode(self.files[i])
        return path, int(self.labels[i]), "", str(path)


class ShardImages(_Decoded):
    """WebDataset shards with .cls labels, decoded on demand; a sample without an image or a label is bad."""

    class_names = None  # only the labels tell: "0", "1", ... up to the largest (`class_names_of`)

    def __init__(self, spec: str | Path, size: int):
        from vtp_fast.data.shard_source import ShardSet

        self.shards, self.size = ShardSet(str(spec)), size
        self.name = _set_name("shards", Path(spec), size)
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.shards)

    def read(self, i: int) -> tuple[bytes, int, str, str]:
        from vtp_fast.data.images import ImageError

        if os.getpid() != self._pid:  # a forked DataLoader worker: its own file handles, not the parent's offsets
            self.shards._handles, self._pid = {}, os.getpid()
        raw = self.shards[i]
        shard, _ = self.shards.locate(i)
        where = f"{self.shards.shards[shard]}: {raw.key}"
        if raw.image is None or raw.label is None:
            raise ImageError(f"{where}: no {'image' if raw.image is None else 'label (.cls)'}")
        return raw.image, raw.label, (raw.caption or b"").decode("utf-8", errors="replace"), where


def class_names_of(labels_max: int) -> list[str]:
    """The class names of a set that has none but its labels: "0" .. str(labels_max)."""
    return [str(c) for c in range(labels_max + 1)]


class _Chunks(Dataset):
    def __init__(self, source, chunks: Sequence):
        self.source, self.chunks = source, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> Fetched:
        return self.source.fetch(self.chunks[k])


def _as_is(x):
    return x


def chunk_batches(n: int, chunks: Sequence[int], per_chunk: int, batch: int) -> list[tuple[int, bool, torch.Tensor]]:
    """Of n images cut into chunks of `per_chunk` (chunk k: ids [k * per_chunk, (k + 1) * per_chunk)), the batches
    of `chunks` in order, counted from each chunk's start (so a chunk's batches do not depend on which chunks a rank
    has): (chunk, last batch of the chunk?, image ids (<= batch,))."""
    out = []
    for k in chunks:
        lo, hi = k * per_chunk, min(n, (k + 1) * per_chunk)
        starts = list(range(lo, hi, batch))
        out += [(k, s == starts[-1], torch.arange(s, min(hi, s + batch))) for s in starts]
    return out


def stream(source, chunks: Sequence[Sequence[int] | torch.Tensor], workers: int = 0) -> Iterator[Fetched]:
    """`source.fetch(chunk)` for every chunk of ids, in order: decoded by `workers` DataLoader worker processes
    (each decodes whole chunks, two in flight per worker), or here with 0 workers or a set in memory."""
    if workers == 0 or isinstance(source, LabelledImages):
        yield from (source.fetch(c) for c in chunks)
        return
    yield from DataLoader(_Chunks(source, chunks), batch_size=None, shuffle=False, num_workers=workers,
                          collate_fn=_as_is, prefetch_factor=2)


def process_chunks(data, chunks: Sequence[int], per_chunk: int, batch: int, workers: int,
                   process: Callable[[Fetched], T], *, desc: str, progress: bool) -> Iterator[tuple[int, list[T]]]:
    """The batches of `chunks` (`chunk_batches`) streamed from `data` and each passed to `process` as it arrives;
    yields (chunk, what `process` returned for each of its batches) once a chunk's last batch is done, with a
    progress bar over the images."""
    plan = chunk_batches(len(data), chunks, per_chunk, batch)
    bar = tqdm(total=sum(len(b[2]) for b in plan), desc=desc, unit="img", disable=not progress)
    parts: list[T] = []
    for (k, last, _), got in zip(plan, stream(data, [b[2] for b in plan], workers), strict=True):
        parts.append(process(got))
        bar.update(len(got.ids) + len(got.bad))
        if last:
            yield k, parts
            parts = []
    bar.close()


def warn_bad(bad: list[tuple[int, str]], name: str) -> None:
    """One warning for the images of set `name` that could not be used (the first few named)."""
    if bad:
        shown = "; ".join(why for _, why in bad[:3]) + ("; ..." if len(bad) > 3 else "")
        warnings.warn(f"{name}: {len(bad)} image(s) skipped ({shown})", stacklevel=3)


def take(source, ids: Sequence[int] | torch.Tensor, workers: int = 0, chunk: int = 256) -> Fetched:
    """The usable images of `ids` (a few: evaluation's picks), decoded in chunks of `chunk`; skipped ones warned
    about."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    parts = list(stream(source, [ids[i:i + chunk] for i in range(0, len(ids), chunk)], workers))
    s = source.size
    got = Fetched(torch.cat([p.images for p in parts]) if parts else torch.zeros(0, s, s, 3, dtype=torch.uint8),
                  torch.cat([p.labels for p in parts]) if parts else torch.zeros(0, dtype=torch.long),
                  torch.cat([p.ids for p in parts]) if parts else torch.zeros(0, dtype=torch.long),
                  [c for p in parts for c in p.captions], [b for p in parts for b in p.bad])
    warn_bad(got.bad, source.name)
    return got


def _named(kind: str, arg: str, size: int) -> LabelledImages:
    if kind == "emoji":
        from vtp_fast.data.emoji import STYLES, load_emoji
        from vtp_fast.data.emoji_prepare import prepare_emoji

        styles = tuple(arg.split(",")) if arg else STYLES
        data = load_emoji(prepare_emoji(size=size), styles)
        return LabelledImages(data.images, data.labels, data.category_names, data.captions,
                              f"emoji-{size}-{arg.replace(',', '+') or 'all'}")
    from vtp_fast.data.shards import FASHION_CLASSES, fashion_mnist

    split = "t10k" if arg == "test" else "train"  # the IDX files' name, kept in the set's name (cache keys)
    raw_images, raw_labels = fashion_mnist("test" if arg == "test" else "train")
    imgs, labels = torch.from_numpy(raw_images.copy()), torch.from_numpy(raw_labels.astype(np.int64))
    x = torch.nn.functional.pad(imgs[:, None].float(), (2, 2, 2, 2), value=0.0)  # (N, 1, 32, 32)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    rgb = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous()
    captions = [f"a photo of a {FASHION_CLASSES[i]}" for i in labels]
    return LabelledImages(rgb, labels, list(FASHION_CLASSES), captions, f"fashion-mnist-{split}-{size}")


def open_images(spec: str, size: int = 64):
    """An image source by name:
    'emoji' / 'emoji:google,twitter' (styles; labels = the 9 categories, captions = emoji names) and
    'fashion-mnist' / 'fashion-mnist:test' (Debian's dataset-fashion-mnist, padded to 32 and resized to `size`),
    both in memory; a directory of WebDataset shards with .cls labels (it holds *.tar files); or an ImageFolder
    tree (a directory of class folders)."""
    kind, _, arg = spec.partition(":")
    if kind in ("emoji", "fashion-mnist"):
        return _named(kind, arg, size)
    path = Path(spec)
    if path.is_dir():
        if any(not p.name.startswith(".") for p in path.glob("*.tar")):
            return ShardImages(path, size)
        return FolderImages(path, size)
    raise InputError(f"unknown data set {spec!r}: use emoji[:styles], fashion-mnist[:test], a shards directory or "
                     "an image folder tree (one folder per class)")


def load_images(spec: str, size: int = 64, workers: int = 0) -> LabelledImages:
    """The set `open_images(spec, size)` names, decoded into memory (for the small sets: the scaling study, the
    command line's in-memory evaluations, tests). Images that cannot be decoded are skipped with a warning."""
    source = open_images(spec, size)
    if isinstance(source, LabelledImages):
        return source
    got = take(source, range(len(source)), workers)
    if not len(got.ids):
        raise InputError(f"{spec}: none of its {len(source)} images could be used")
    names = source.class_names or class_names_of(int(got.labels.max()))
    return LabelledImages(got.images, got.labels, list(names), got.captions, source.name)
