"""Latent sets: a tokenizer's latents of a labelled image set, the DiT's training data (written by
vtp_fast.eval.latents.extract_latents, read here a batch at a time).

On disk a latent set is a directory:
    extract.json                what is being extracted (`begin_set`): data set and its image count, image size,
                                images per shard, flipped copies, stored dtype, tokenizer fingerprint. A run that
                                finds the same one there keeps the finished shards (resume); another one restarts.
    latents-00000.safetensors   shard k: the latents of source images [k * per_shard, (k + 1) * per_shard) that could
                                be decoded, in order, then (flipped copies) those of their mirror images, same order
        latents   (n, C, h, w)  float32 or bfloat16 (the stored dtype)
        labels    (n,)          int64
        sum       (C,)          float64: per channel, the sum over (n, h, w) of the stored values
        sumsq     (C,)          float64: the same of their squares
        metadata  count (n), max_label (-1 when empty), skipped (images that could not be decoded, JSON)
                                Each shard is written under a hidden temporary name and renamed: a file with the
                                name is complete.
    meta.json                   written last: the set is complete when it exists. channels, grid, count, dtype,
                                mean / std per channel (the shards' float64 sums added in shard order: the same
                                whatever number of processes wrote them), class_names, shards [{file, count}], data,
                                tokenizer, tokenizer_fingerprint, image_size, flipped_copies, per_shard, skipped.

Reading (`load_latents` -> LatentSet): every shard file is memory-mapped (the safetensors header is parsed here and
the data mapped read-only with mmap; nothing is loaded whole); `LatentSet.batch(ids)` gathers rows from the maps and
normalises them per batch with meta.json's statistics (there is no normalised copy of the set). The pages a gather
touched are dropped from this process's mapping after the copy (madvise DONTNEED; they stay in the page cache), so
a process's resident memory does not grow with the set or with the steps. `LatentBatches` is the DiT's data: step ->
this rank's share of the step's global batch.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from vtp_fast.config import InputError
from vtp_fast.constants import DTYPES
from vtp_fast.data.views import sample_seed
from vtp_fast.io import atomic_path, atomic_write_text, same_plan

PLAN, META = "extract.json", "meta.json"
RELEASE = 1 << 20  # bytes: the windows a gather's pages are dropped in (a multiple of the fault-around window)
_NP = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16, "I64": np.int64, "F64": np.float64}


def shard_name(k: int) -> str:
    return f"latents-{k:05d}.safetensors"


@dataclass
class ShardStats:
    count: int  # latents in the shard
    sum: torch.Tensor  # (C,) float64
    sumsq: torch.Tensor  # (C,) float64
    max_label: int  # -1 when empty


def write_shard(path: Path, latents: torch.Tensor, labels: torch.Tensor, skipped: list | None = None) -> ShardStats:
    """Shard file `path` (atomically) from latents (n, C, h, w) in the stored dtype and labels (n,); returns its
    statistics (also stored in it)."""
    z = latents.double()
    stats = ShardStats(int(latents.shape[0]), z.sum((0, 2, 3)), z.pow(2).sum((0, 2, 3)),
                       int(labels.max()) if labels.numel() else -1)
    meta = {"count": str(stats.count), "max_label": str(stats.max_label), "skipped": json.dumps(skipped or [])}
    with atomic_path(path) as tmp:
        save_file({"latents": latents.contiguous(), "labels": labels.to(torch.int64).contiguous(), "sum": stats.sum,
                   "sumsq": stats.sumsq}, str(tmp), metadata=meta)
    return stats


def read_shard_stats(path: Path) -> ShardStats:
    """The statistics stored in a shard file (its tensors are not read)."""
    with safe_open(str(path), framework="pt") as f:
        m = f.metadata()
        return ShardStats(int(m["count"]), f.get_tensor("sum"), f.get_tensor("sumsq"), int(m["max_label"]))


def merge_stats(stats: list[ShardStats], hw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (C,) float64 of every shard's latents: the sums added in shard order (so the
    result does not depend on which process wrote which shard); hw = h * w."""
    total = sum(s.count for s in stats) * hw
    sums = torch.zeros_like(stats[0].sum)
    sq = torch.zeros_like(stats[0].sumsq)
    for s in stats:
        sums, sq = sums + s.sum, sq + s.sumsq
    mean = sums / total
    return mean, (sq / total - mean**2).clamp_min(1e-12).sqrt()


def begin_set(out: Path, plan: dict) -> set[int]:
    """Prepare `out` for extracting `plan` (call on one process; `vtp_fast.io.same_plan`): the ids of the shards
    already finished under the same plan."""
    if same_plan(out, PLAN, plan, [".latents-*.tmp"], ["latents-*.safetensors", META]):
        return {int(p.name[8:13]) for p in out.glob("latents-*.safetensors")}
    return set()


def finish_set(out: Path, meta: dict) -> None:
    atomic_write_text(out / META, json.dumps(meta, indent=1))


class _Mapped:
    """One safetensors file, memory-mapped read-only; `rows(name, rows)` copies rows of a tensor out."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.base = 8 + n
        self.meta = header.pop("__metadata__", {})
        self.header = header
        fd = os.open(path, os.O_RDONLY)
        try:
            self.mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.mm.madvise(mmap.MADV_RANDOM)  # batches read scattered rows: no read-ahead around them
        self.arrays = {k: np.frombuffer(self.mm, _NP[v["dtype"]], int(np.prod(v["shape"])),
                                        self.base + v["data_offsets"][0]).reshape(v["shape"])
                       for k, v in header.items() if v["dtype"] in _NP}

    def rows(self, name: str, rows: np.ndarray) -> torch.Tensor:
        """Rows `rows` (sorted, (k,)) of tensor `name` -> (k, ...) a copy; their pages are then dropped from this
        process's mapping (they stay in the page cache), in aligned windows of RELEASE bytes: the kernel maps the
        cached pages around a faulting one too (fault-around, 64 KiB aligned windows by default)."""
        arr = self.arrays[name]
        out = torch.from_numpy(arr[rows])
        if self.header[name]["dtype"] == "BF16":
            out = out.view(torch.bfloat16)
        row = arr.strides[0] if arr.ndim else 0
        if row and len(rows):
            start = self.base + self.header[name]["data_offsets"][0]
            begins = (start + rows * row) // RELEASE * RELEASE
            ends = np.minimum(-(-(start + (rows + 1) * row) // RELEASE) * RELEASE, len(self.mm))
            keep = np.r_[True, begins[1:] > ends[:-1]]  # merge overlapping windows (rows are sorted)
            ends = np.maximum.reduceat(ends, np.nonzero(keep)[0])
            for b, e in zip(begins[keep].tolist(), ends.tolist(), strict=True):
                self.mm.madvise(mmap.MADV_DONTNEED, b, e - b)
        return out


class LatentSet:
    """A latent set on disk (see the module docstring), read a batch at a time."""

    def __init__(self, path: Path, meta: dict, files: list[Path], counts: list[int]):
        self.path, self.meta, self.files = path, meta, files
        self.offsets = np.cumsum([0, *counts])  # (shards + 1,): the first latent of every shard, then the total
        self.mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, -1, 1, 1)  # (1, C, 1, 1)
        self.std = torch.tensor(meta["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self._maps: dict[int, _Mapped] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, C, h, w)."""
        return (len(self), self.meta["channels"], *self.meta["grid"])

    def _map(self, k: int) -> _Mapped:
        if k not in self._maps:  # opened on first use, in each process (DataLoader workers map their own)
            self._maps[k] = _Mapped(self.files[k])
        return self._maps[k]

    def raw(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents `ids` (b,) as stored -> ((b, C, h, w) in the stored dtype, labels (b,) int64)."""
        ids = ids.numpy().astype(np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"latent ids out of range [0, {len(self)})")
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        z = torch.empty((len(ids), *self.shape[1:]), dtype=DTYPES[self.meta["dtype"]])
        y = torch.empty(len(ids), dtype=torch.int64)
        for k in np.unique(shard).tolist():
            where = np.nonzero(shard == k)[0]
            local = ids[where] - self.offsets[k]
            order = np.argsort(local, kind="stable")  # ascending rows: sequential page access
            rows, where = local[order], torch.from_numpy(where[order])
            m = self._map(k)
            z[where], y[where] = m.rows("latents", rows), m.rows("labels", rows)
        return z, y

    def batch(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents `ids` (b,) -> (normalised (b, C, h, w) float32, labels (b,) int64)."""
        z, y = self.raw(ids)
        return (z.float() - self.mean) / self.std, y

    def __getstate__(self):  # maps do not cross process boundaries
        return {**self.__dict__, "_maps": {}}


def _check_shard(path: Path, meta: dict, count: int) -> None:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    z, labels = header.get("latents"), header.get("labels")
    want = [count, meta["channels"], *meta["grid"]]
    if z is None or labels is None or z["shape"] != want or labels["shape"] != [count]:
        got = z and tuple(z["shape"])
        raise InputError(f"{path}: latents {got} do not match meta.json ({count}, {meta['channels']}, "
                         f"{meta['grid']})")
    dtype = {"fp32": "F32", "bf16": "BF16"}[meta["dtype"]]
    if z["dtype"] != dtype:
        raise InputError(f"{path}: latents stored as {z['dtype']} but meta.json says {meta['dtype']}")
    max_label = int(header.get("__metadata__", {}).get("max_label", -1))
    n_classes = len(meta["class_names"])
    if max_label >= max(n_classes, 1):
        raise InputError(f"{path.parent}: labels up to {max_label} but {n_classes} class names in meta.json")


def load_latents(path: str | Path) -> LatentSet:
    """A complete latent set (its meta.json and every shard it lists, checked against each other), memory-mapped."""
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        raise InputError(f"{path}: not a latent set (no meta.json); make one with vtp-fast extract-latents")
    meta = json.loads(meta_file.read_text())
    if "shards" not in meta:
        raise InputError(f"{path}: a latent set of an earlier format (no shard list in meta.json); extract it again")
    files, counts = [path / s["file"] for s in meta["shards"]], [s["count"] for s in meta["shards"]]
    for f, n in zip(files, counts, strict=True):
        if not f.is_file():
            raise InputError(f"{f}: missing latent shard")
        _check_shard(f, meta, n)
    if not sum(counts):
        raise InputError(f"{path}: no latents")
    return LatentSet(path, meta, files, counts)


_DIT_BATCH = 0xD17  # tags the DiT's batch draws


class LatentBatches(Dataset):
    """Step -> this rank's share of the step's global batch (normalised latents (batch / world, C, h, w) float32,
    labels (batch / world,)): `batch` latent ids drawn uniformly with replacement by a generator seeded from
    (seed, step) alone, rank r taking positions [r * batch / world, (r + 1) * batch / world). So 1 or N ranks train
    on the same global batch, and a resumed run reads the batches it would have read."""

    def __init__(self, latents: LatentSet, batch: int, seed: int, rank: int = 0, world: int = 1):
        if batch % world:
            raise InputError(f"a batch of {batch} does not split over {world} ranks")
        self.latents, self.batch, self.seed, self.rank, self.world = latents, batch, seed, rank, world

    def __len__(self) -> int:
        return 1 << 40

    def ids(self, step: int) -> torch.Tensor:
        """This rank's latent ids (batch / world,) at `step`."""
        gen = torch.Generator().manual_seed(sample_seed(self.seed, _DIT_BATCH, step))
        every = torch.randint(len(self.latents), (self.batch,), generator=gen)  # (batch,): the global batch
        per = self.batch // self.world
        return every[self.rank * per:(self.rank + 1) * per]

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents.batch(self.ids(step))
