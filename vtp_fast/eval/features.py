"""Stored image features: what zero-shot classification and the linear probes read at ImageNet scale.

`extract_features(model, data, out)` embeds every image of a labelled image source (vtp_fast.data.labelled:
streamed, decoded by DataLoader workers, ADM's centre crop for folders and shards) once, with the frozen tokenizer
in eval mode, and stores one float row per usable image. A row holds, in this column order:
    cls_blocks   (n_blocks * D)  the normed class token of each of the last n_blocks trunk blocks, shallowest
                                 first (`VTP.block_features`; DINOv2's linear evaluation concatenates the last n)
    patch_mean   (D)             the mean of the last block's normed patch tokens
    latent       (C)             the bottleneck latents, mean-pooled over positions (the 64-d tokenizer latent)
    clip         (E)             the L2-normalised CLIP image embedding (models with a text tower only)
`cls_blocks`' last D columns + `patch_mean` are the "last-layer" features (`vtp_fast.eval.probe.extract_features`'
cls_meanpatch: the published VTP's "cls token + patch tokens").

On disk a feature set is a directory:
    plan.json               what is being extracted (data set and its image count, image size, images per chunk,
                            n_blocks, stored dtype, columns, tokenizer fingerprint). A run that finds the same plan
                            keeps the finished chunks (resume); another plan starts over.
    index-00000.npy         chunk k: (m, 2) int64, the source id and the label of each usable image of source
                            images [k * chunk, (k + 1) * chunk), in order (m < chunk when some could not be decoded)
    features-00000.npy      chunk k: (m, F) float32 or float16, its rows. Written after its index, each under a
                            hidden temporary name then renamed: a chunk whose features file exists is complete.
    meta.json               written last, when every chunk is: columns, counts per chunk, class names, skipped...
Under torchrun chunk k is embedded by rank k % world, so a chunk's content does not depend on the number of
processes. One .npy per chunk, not one shared file: ranks on different machines never write the same pages. The
folder must be on storage every rank sees.

`FeatureStore(path)` reads a finished set: labels and ids in memory (16 bytes per image), the rows memory-mapped
chunk by chunk (np.load(mmap_mode="r")) and gathered on demand (`rows`, or a `FeatureView` that indexes like an
(N, D) tensor, for the probes), never a whole set in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vtp_fast import distributed as dist
from vtp_fast.config import InputError
from vtp_fast.constants import autocast
from vtp_fast.data.images import normalize_u8
from vtp_fast.data.labelled import class_names_of, process_chunks, warn_bad
from vtp_fast.io import atomic_file, atomic_write_text, same_plan
from vtp_fast.models.pretrained import tokenizer_fingerprint

FORMAT = 1
PLAN, META = "plan.json", "meta.json"
DTYPES = {"fp32": np.float32, "fp16": np.float16}
PRECISIONS = ("fp32", "bf16", "auto")


def features_name(k: int) -> str:
    return f"features-{k:05d}.npy"


def index_name(k: int) -> str:
    return f"index-{k:05d}.npy"


def layout(model, n_blocks: int) -> dict[str, list[int]]:
    """Column ranges [start, end) of each group of a stored row (see the module docstring)."""
    c = model.config
    widths = {"cls_blocks": n_blocks * c.vision_embed_dim, "patch_mean": c.vision_embed_dim,
              "latent": c.vision_feature_bottleneck}
    if c.train_clip:
        widths["clip"] = c.text_embed_dim
    out, at = {}, 0
    for name, w in widths.items():
        out[name] = [at, at + w]
        at += w
    return out


@torch.no_grad()
def embed(model, images: Tensor, n_blocks: int) -> Tensor:
    """Normalised images (b, 3, S, S) on the model's device -> stored rows (b, F) float32 (see `layout`)."""
    outs = model.block_features(images, n_blocks)  # n_blocks x TrunkOutput, the deepest last
    last = outs[-1]
    parts = [o.cls for o in outs]  # n_blocks x (b, D)
    parts.append(last.patch.mean(1))  # (b, D)
    parts.append(model.latents_from_patch(last.patch, last.grid).mean((2, 3)))  # (b, C)
    if model.config.train_clip:
        parts.append(model.clip_image_features_from_tokens(last.cls, last.patch))  # (b, E)
    return torch.cat([p.float() for p in parts], dim=1)


# ---------------------------------------------------------------------------------------------- writing
def write_chunk(out: Path, k: int, rows: np.ndarray, ids: np.ndarray, labels: np.ndarray) -> None:
    """Chunk k's files (atomically, index first): rows (m, F) in the stored dtype, ids and labels (m,)."""
    with atomic_file(out / index_name(k)) as f:
        np.save(f, np.stack([ids, labels], axis=1).astype(np.int64).reshape(-1, 2))
    with atomic_file(out / features_name(k)) as f:
        np.save(f, np.ascontiguousarray(rows))


def begin(out: Path, plan: dict) -> set[int]:
    """Prepare `out` for extracting `plan` (one process; `vtp_fast.io.same_plan`): the ids of the chunks already
    finished under the same plan."""
    if same_plan(out, PLAN, plan, [".features-*.tmp", ".index-*.tmp"], ["features-*.npy", "index-*.npy", META]):
        done = {int(p.name[len("features-"):-len(".npy")]) for p in out.glob("features-*.npy")}
        return {k for k in done if (out / index_name(k)).is_file()}
    return set()


def _embed_chunks(model, data, out: Path, todo: list[int], *, n_blocks: int, batch: int, chunk: int,
                  dtype: np.dtype, precision: str, workers: int, progress: bool) -> None:
    """Embed and write chunks `todo` of `data`."""
    device = next(model.parameters()).device
    width = max(end for _, end in layout(model, n_blocks).values())

    def embed_batch(got) -> tuple:
        if not len(got.ids):
            return np.zeros((0, width), dtype), got.ids.numpy(), got.labels.numpy(), got.bad
        with autocast(precision, device):
            rows = embed(model, normalize_u8(got.images).to(device), n_blocks).cpu().numpy().astype(dtype)
        return rows, got.ids.numpy(), got.labels.numpy(), got.bad

    bad = []
    for k, parts in process_chunks(data, todo, chunk, batch, workers, embed_batch,
                                   desc=f"features (rank {dist.rank()})", progress=progress):
        rows, ids, labels, chunk_bad = zip(*parts, strict=True)
        write_chunk(out, k, np.concatenate(rows), np.concatenate(ids), np.concatenate(labels))
        bad += [b for part in chunk_bad for b in part]
    warn_bad(bad, data.name)


@torch.no_grad()
def extract_features(model, data, out: str | Path, *, n_blocks: int = 4, batch: int = 256, chunk: int = 4096,
                     dtype: str = "fp32", precision: str = "auto", workers: int = 0,
                     progress: bool = True) -> FeatureStore:
    """Embed every image of the source `data` into the feature set `out` (chunks of `chunk` images, rows stored as
    `dtype`: "fp32" or "fp16"; the trunk in bf16 autocast with `precision` "bf16", or "auto" on a GPU), on every
    rank of a torchrun launch (each embeds its chunks); resumes a killed run's set. `n_blocks` is capped at the
    trunk's depth. Returns the finished set, on every rank."""
    if len(data) == 0:
        raise InputError(f"features: the data set {data.name} holds no images")
    if dtype not in DTYPES:
        raise InputError(f"features: dtype {dtype!r} (choices: {', '.join(DTYPES)})")
    if precision not in PRECISIONS:
        raise InputError(f"features: precision {precision!r} (choices: {', '.join(PRECISIONS)})")
    model.eval()
    out = Path(out)
    n_blocks = min(n_blocks, model.config.vision_depth)
    plan = {"format": FORMAT, "data": data.name, "images": len(data), "image_size": int(data.size),
            "chunk": chunk, "n_blocks": n_blocks, "dtype": dtype, "precision": precision,
            "columns": layout(model, n_blocks), "tokenizer_fingerprint": tokenizer_fingerprint(model)}
    finished = dist.broadcast_object(begin(out, plan) if dist.rank() == 0 else None)
    n_chunks = -(-len(data) // chunk)
    todo = [k for k in range(dist.rank(), n_chunks, dist.world_size()) if k not in finished]
    _embed_chunks(model, data, out, todo, n_blocks=n_blocks, batch=batch, chunk=chunk, dtype=DTYPES[dtype],
                  precision=precision, workers=workers, progress=progress and dist.rank() == 0)
    dist.barrier()
    if dist.rank() == 0:
        _finish(out, plan, data.class_names)
    dist.barrier()
    return FeatureStore(out)


def save_features(out: str | Path, rows: Tensor | np.ndarray, labels: Tensor | np.ndarray,
                  columns: dict[str, list[int]], *, class_names: list[str] | None = None, n_blocks: int = 1,
                  chunk: int = 4096, name: str = "memory") -> FeatureStore:
    """A feature set of rows (N, F) and labels (N,) already in memory (features made elsewhere, tests), in the
    layout `extract_features` writes; `columns` names the column groups (`layout`)."""
    out, rows, labels = Path(out), np.asarray(rows, dtype=np.float32), np.asarray(labels, dtype=np.int64)
    plan = {"format": FORMAT, "data": name, "images": len(rows), "image_size": 0, "chunk": chunk,
            "n_blocks": n_blocks, "dtype": "fp32", "precision": "", "columns": columns, "tokenizer_fingerprint": ""}
    begin(out, {**plan, "written": "save_features"})
    for k, lo in enumerate(range(0, len(rows), chunk)):
        write_chunk(out, k, rows[lo:lo + chunk], np.arange(lo, min(lo + chunk, len(rows))), labels[lo:lo + chunk])
    _finish(out, plan, class_names)
    return FeatureStore(out)


def _finish(out: Path, plan: dict, class_names: list[str] | None) -> None:
    """meta.json from the chunks' index files (every chunk is written)."""
    counts, top = [], -1
    for k in range(-(-plan["images"] // plan["chunk"])):
        index = np.load(out / index_name(k), mmap_mode="r")  # (m, 2)
        counts.append(int(index.shape[0]))
        top = max(top, int(index[:, 1].max()) if len(index) else -1)
    if sum(counts) == 0:
        raise InputError(f"features: none of the {plan['images']} images of {plan['data']} could be used")
    meta = {**plan, "count": sum(counts), "counts": counts, "skipped": plan["images"] - sum(counts),
            "dim": max(end for _, end in plan["columns"].values()),
            "class_names": list(class_names or class_names_of(top))}
    atomic_write_text(out / META, json.dumps(meta, indent=1))


# ---------------------------------------------------------------------------------------------- reading
class FeatureStore:
    """A finished feature set (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / META).is_file():
            raise InputError(f"{self.path}: not a finished feature set (no {META}); extract again, it resumes")
        self.meta = json.loads((self.path / META).read_text())
        counts = self.meta["counts"]
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)  # (chunks,)
        index = np.concatenate([np.load(self.path / index_name(k)).reshape(-1, 2) for k in range(len(counts))])
        if index.shape[0] != self.meta["count"]:
            raise InputError(f"{self.path}: the chunks hold {index.shape[0]} rows, meta.json says "
                             f"{self.meta['count']}; extract again")
        self.ids = torch.from_numpy(index[:, 0].copy())  # (N,) source ids
        self.labels = torch.from_numpy(index[:, 1].copy())  # (N,)
        self.columns: dict[str, list[int]] = self.meta["columns"]
        self.class_names: list[str] = self.meta["class_names"]
        self._maps: dict[int, np.ndarray] = {}
        self._resident: tuple[np.ndarray, Tensor] | None = None
        self._resident_at: dict[bytes, Tensor | None] = {}  # column set -> its places in the resident table

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def n_blocks(self) -> int:
        return int(self.meta["n_blocks"])

    def cols(self, *groups: str) -> np.ndarray:
        """The column indices of column groups, concatenated in the order given."""
        for g in groups:
            if g not in self.columns:
                raise InputError(f"{self.path}: no {g!r} features (it has {', '.join(self.columns)})")
        return np.concatenate([np.arange(*self.columns[g]) for g in groups])

    def cls_cols(self, n: int) -> np.ndarray:
        """The columns of the class tokens of the last n blocks, shallowest first."""
        if not 1 <= n <= self.n_blocks:
            raise InputError(f"{self.path}: holds the class tokens of the last {self.n_blocks} blocks, not {n}")
        lo, hi = self.columns["cls_blocks"]
        return np.arange(hi - n * (hi - lo) // self.n_blocks, hi)

    def _map(self, k: int) -> np.ndarray:
        if k not in self._maps:
            self._maps[k] = np.load(self.path / features_name(k), mmap_mode="r")  # (m, F)
        return self._maps[k]

    def keep_resident(self, cols: np.ndarray, device: str | torch.device) -> None:
        """Copy columns `cols` of every row to a float32 tensor on `device`, a chunk at a time: `rows` of those
        columns then gathers from it (the same values, without the maps: the probes' fast path on a GPU)."""
        cols = np.unique(np.asarray(cols, dtype=np.int64))
        table = torch.empty(len(self), len(cols), dtype=torch.float32, device=device)
        for k, start in enumerate(self.starts.tolist()):
            m = self._map(k)
            table[start:start + len(m)] = torch.from_numpy(np.asarray(m[:, cols], dtype=np.float32)).to(device)
        self._resident, self._resident_at = (cols, table), {}

    def _held_at(self, cols: np.ndarray | None) -> Tensor | None:
        """Where columns `cols` sit in the resident table (on its device), or None when it does not hold them all;
        worked out once per column set, not per batch."""
        if self._resident is None or cols is None:
            return None
        key = np.asarray(cols, dtype=np.int64).tobytes()
        if key not in self._resident_at:
            held, table = self._resident
            self._resident_at[key] = (torch.from_numpy(np.searchsorted(held, cols)).to(table.device)
                                      if np.isin(cols, held).all() else None)
        return self._resident_at[key]

    def rows(self, idx: Tensor | np.ndarray, cols: np.ndarray | None = None) -> Tensor:
        """Rows idx (b,) (positions 0 .. N-1), columns `cols` (all by default) -> (b, len(cols)) float32, on the CPU
        (on the resident tensor's device when `keep_resident` holds those columns)."""
        if (at := self._held_at(cols)) is not None:
            table = self._resident[1]
            return table[torch.as_tensor(idx, dtype=torch.long).to(table.device)[:, None], at]
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        width = int(self.meta["dim"]) if cols is None else len(cols)
        out = np.empty((len(idx), width), np.float32)
        chunk = np.searchsorted(self.starts, idx, side="right") - 1  # (b,)
        for k in np.unique(chunk):
            sel = np.nonzero(chunk == k)[0]
            local = idx[sel] - self.starts[k]
            order = np.argsort(local, kind="stable")  # read each map in ascending order
            m = self._map(int(k))
            block = m[local[order]] if cols is None else m[np.ix_(local[order], cols)]
            out[sel[order]] = block
        return torch.from_numpy(out)

    def view(self, cols: np.ndarray) -> FeatureView:
        return FeatureView(self, cols)

    def __getstate__(self):  # maps and device tensors do not cross process boundaries
        return {**self.__dict__, "_maps": {}, "_resident": None, "_resident_at": {}}


class FeatureView:
    """Some columns of a feature set, indexed like an (N, D) float32 tensor: `view[idx]` -> (b, D)."""

    def __init__(self, store: FeatureStore, cols: np.ndarray):
        self.store, self.cols = store, np.asarray(cols, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.store), len(self.cols))

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, idx: Tensor) -> Tensor:
        return self.store.rows(idx, self.cols)
