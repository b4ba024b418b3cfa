"""Latent extraction: a tokenizer's latents of a labelled image source (vtp_fast.data.labelled), written as a latent
set (vtp_fast.data.latents documents the files) for training a DiT on them. As in the paper's protocol every image
(cut square by its source: ADM's centre crop for image folders and shards) is encoded together with its horizontal
mirror (`flip=False` skips the mirrors).

At any scale, and under torchrun: image i belongs to shard i // per_shard, shard k is encoded by rank k % world
(round-robin), in chunks of `batch` images counted from the shard's first image, so a shard's content does not
depend on the number of processes nor on which one encoded it. Each rank decodes its shards' images with DataLoader
workers (the thread budget's, or `workers`), encodes them (bf16 autocast on a GPU, float32 on the CPU) and writes
every shard atomically as it completes. The per-channel statistics are float64 sums per shard, all-reduced as a
(shards, ...) table in which each shard has one writer, then added in shard order: exact, and the same for any
world size. meta.json, written last by rank 0, makes the set complete; a killed run started again with the same
arguments keeps its finished shards and encodes the rest.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vtp_fast import distributed as dist
from vtp_fast.config import InputError
from vtp_fast.constants import DTYPES, autocast
from vtp_fast.data import latents as store
from vtp_fast.data.images import normalize_u8
from vtp_fast.data.labelled import class_names_of, process_chunks, warn_bad
from vtp_fast.models.pretrained import tokenizer_fingerprint
from vtp_fast.models.vtp import VTP


def _plan(model: VTP, data, flip: bool, per_shard: int, dtype: str) -> dict:
    plan = {"data": data.name, "images": len(data), "image_size": int(data.size), "per_shard": per_shard,
            "flipped_copies": flip, "dtype": dtype, "tokenizer_fingerprint": tokenizer_fingerprint(model)}
    weights = next(model.parameters()).dtype
    if weights != torch.float32:  # a bf16 cast (apply_inference) encodes other latents: never mixed on resume
        plan["weights"] = str(weights).removeprefix("torch.")
    return plan


def _encode(model: VTP, images: torch.Tensor, device: torch.device, flip: bool,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 (b, S, S, 3) -> latents (b, C, h, w) and those of the mirror images (or None), in the stored dtype."""
    x = normalize_u8(images).to(device)  # (b, 3, S, S)
    with autocast("auto", device):
        z = model.encode(x).float().to(dtype).cpu()
        zf = model.encode(x.flip(-1)).float().to(dtype).cpu() if flip else None
    return z, zf


def _encode_shards(model: VTP, data, out: Path, todo: list[int], *, flip: bool, batch: int, per_shard: int,
                   dtype: torch.dtype, workers: int, progress: bool) -> dict[int, store.ShardStats]:
    """Encode and write shards `todo`; their statistics."""
    device = next(model.parameters()).device
    shape = (model.config.vision_feature_bottleneck, *(2 * [data.size // model.config.vision_patch_size]))

    def encode(got) -> tuple:
        if len(got.ids):
            return *_encode(model, got.images, device, flip, dtype), got.labels, got.bad
        return torch.zeros(0, *shape, dtype=dtype), None, got.labels, got.bad

    done: dict[int, store.ShardStats] = {}
    for k, parts in process_chunks(data, todo, per_shard, batch, workers, encode,
                                   desc=f"extract-latents (rank {dist.rank()})", progress=progress):
        z = torch.cat([p[0] for p in parts] + ([p[1] for p in parts if p[1] is not None] if flip else []))
        labels = torch.cat([p[2] for p in parts] * (2 if flip else 1))
        bad = [b for p in parts for b in p[3]]
        warn_bad(bad, data.name)
        done[k] = store.write_shard(out / store.shard_name(k), z, labels, bad)
    return done


def _gather(stats: dict[int, store.ShardStats], n_shards: int, channels: int,
            device: torch.device) -> list[store.ShardStats]:
    """Every shard's statistics on every rank: a (shards, 2 + 2C) float64 table, each row filled by the rank that
    holds it, all-reduced (every other rank adds zeros: exact)."""
    table = torch.zeros(n_shards, 2 + 2 * channels, dtype=torch.float64)
    for k, s in stats.items():
        table[k] = torch.cat([torch.tensor([s.count, s.max_label + 1], dtype=torch.float64), s.sum, s.sumsq])
    if dist.is_distributed():
        table = dist.all_reduce_sum(table.to(device)).cpu()
    return [store.ShardStats(int(r[0]), r[2:2 + channels].clone(), r[2 + channels:].clone(), int(r[1]) - 1)
            for r in table]


@torch.no_grad()
def extract_latents(model: VTP, data, out: str | Path, *, flip: bool = True, batch: int = 128,
                    per_shard: int = 4096, dtype: str = "fp32", workers: int = 0, tokenizer: str = "",
                    progress: bool = True) -> dict:
    """Encode every image of the source `data` (and, with `flip`, its horizontal mirror) into the latent set `out`
    (shards of `per_shard` images, latents stored as `dtype`: "fp32" or "bf16"); on every rank of a torchrun
    launch (each encodes its shards). Resumes a killed run's set. Returns the meta."""
    if len(data) == 0:
        raise InputError(f"extract-latents: the data set {data.name} holds no images")
    if dtype not in DTYPES:
        raise InputError(f"extract-latents: dtype {dtype!r} (choices: {', '.join(DTYPES)})")
    model.eval()
    out = Path(out)
    plan = _plan(model, data, flip, per_shard, dtype)
    finished = store.begin_set(out, plan) if dist.rank() == 0 else None
    finished = dist.broadcast_object(finished)
    n_shards = -(-len(data) // per_shard)
    mine = range(dist.rank(), n_shards, dist.world_size())
    stats = {k: store.read_shard_stats(out / store.shard_name(k)) for k in mine if k in finished}
    stats |= _encode_shards(model, data, out, [k for k in mine if k not in finished], flip=flip, batch=batch,
                            per_shard=per_shard, dtype=DTYPES[dtype], workers=workers,
                            progress=progress and dist.rank() == 0)
    channels = model.config.vision_feature_bottleneck
    every = _gather(stats, n_shards, channels, next(model.parameters()).device)
    grid = data.size // model.config.vision_patch_size
    count = sum(s.count for s in every)
    if count == 0:
        raise InputError(f"extract-latents: none of the {len(data)} images of {data.name} could be used")
    mean, std = store.merge_stats(every, grid * grid)
    meta = {"channels": channels, "grid": [grid, grid], "count": count, "dtype": dtype, "flipped_copies": flip,
            "mean": mean.tolist(), "std": std.tolist(),
            "class_names": list(data.class_names or class_names_of(max(s.max_label for s in every))),
            "shards": [{"file": store.shard_name(k), "count": s.count} for k, s in enumerate(every)],
            "per_shard": per_shard, "skipped": len(data) - count // (2 if flip else 1), "data": data.name,
            "tokenizer": tokenizer, "tokenizer_fingerprint": plan["tokenizer_fingerprint"],
            "image_size": int(data.size)}
    if dist.rank() == 0:
        store.finish_set(out, meta)
    dist.barrier()
    return meta
