"""Benchmark: the data pipeline, images/s per decoder at the VTP view recipe.

    python bench/bench_data.py [--device cuda] [--out rows.jsonl] [--quick] [--shards DIR]

Shards of JPEGs (synthetic photographs-like images at 320 px, or --shards) are read by `StepBatches`: every
sample's plain 256 px image (CLIP + reconstruction), and for a quarter of the batch (the balanced batch's SSL
share) 2 global 256 px + 8 local 96 px crops with flips and colour jitter, iBOT masks and tokenized captions.
Decoders: PIL (the torchvision CPU path, DataLoader workers = threads), DALI (CPU operators, or `mixed` on a
GPU; threads = DALI threads) and, on a GPU, torchvision nvJPEG. The same number of CPU threads for each.

A row is labelled by what ran, not by what was asked for: "device" is where the batches' pixels were decoded (the
device of the tensors the pipeline returned), "backend" the decoder that produced them; a batch a GPU decoder
could not decode goes through PIL, and a row with any such batch is labelled as that fallback.
"""

from __future__ import annotations

import io
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vtp_fast import optional
from vtp_fast.data.batch import BatchShape
from vtp_fast.data.shard_source import ShardSet, ShardSource
from vtp_fast.data.shards import Sample, write_shards
from vtp_fast.data.step_batches import StepBatches
from vtp_fast.data.views import ViewConfig
from vtp_fast.measure.rows import Emit, RowLog, bench_cli

TABLE_COLUMNS = ["decoder", "threads", "batch", "image_size", "images_per_s", "ratio_vs_pil", "median_ms"]


def synthetic_jpegs(n: int, side: int, seed: int = 0) -> list[Sample]:
    """Smooth random images (low-frequency noise upsampled, like photographs in JPEG size and decode cost)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        small = rng.integers(0, 255, (side // 16, side // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side, side), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(Sample(buf.getvalue(), "jpg", f"a synthetic photo number {i}"))
    return out


def _throughput(data: StepBatches, workers: int, batches: int) -> tuple[float, float, set[str], int]:
    """(images/s, median ms per batch, devices the decoded images came back on, batches with a bad sample) over
    `batches` batches after one warm-up batch. A bad sample is replaced and its batch decoded by the same decoder
    (vtp_fast/data/step_batches.py), so it does not change what decoded the batch."""
    loader = DataLoader(data, batch_size=None, sampler=range(batches + 1), num_workers=workers,
                        prefetch_factor=2 if workers else None, persistent_workers=False)
    it = iter(loader)
    next(it)  # pipeline build, worker start
    times, devices, with_bad, t0 = [], set(), 0, time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        batch = next(it)
        times.append(time.perf_counter() - t)
        devices.add(batch.images.device.type)
        with_bad += len(batch.bad_ids) > 0
    total = time.perf_counter() - t0
    return batches * data.shape.size / total, 1e3 * float(np.median(times)), devices, with_bad


def _label(name: str, devices: set[str]) -> tuple[str, str]:
    """(device, backend) of what actually decoded the batches: decoder `name`, whose images came back on
    `devices`."""
    device = "cuda" if devices == {"cuda"} else "cpu"
    if name == "torchvision":
        return device, "PIL (torchvision path)"
    if name == "dali":  # DALI's `mixed` decoder hands back GPU tensors, its CPU operators CPU tensors
        return device, "DALI mixed (GPU)" if device == "cuda" else "DALI CPU"
    return device, "torchvision nvJPEG (GPU)" if device == "cuda" else "torchvision decode_jpeg (CPU)"


def run(device: str = "cpu", quick: bool = False, shards: str | None = None, emit: Emit | None = None) -> list[dict]:
    threads = min(os.cpu_count() or 2, 2 if device == "cpu" else 16)
    size, batch, batches = (64, 8, 2) if quick else (256, 64, 8)
    views = ViewConfig(global_size=size, local_size=32 if quick else 96, local_crops=2 if quick else 8)
    with tempfile.TemporaryDirectory() as tmp:
        if shards is None:
            shards = tmp
            write_shards(synthetic_jpegs(batch * (batches + 2), 96 if quick else 320), tmp, per_shard=256,
                         progress=False)
        source = ShardSource(ShardSet(shards), size, 32)
        shape = BatchShape(size=batch, ssl=batch // 4, rec=batch // 4, patch=16)
        gpu = device == "cuda" and torch.cuda.is_available()
        decoders = [("torchvision", threads)]
        if optional.available("dali"):
            decoders.append(("dali", 0))
        if gpu:
            decoders.append(("nvjpeg", 0))
        rows = RowLog(emit)
        for name, workers in decoders:
            torch.set_num_threads(1 if workers else threads)
            data = StepBatches(source, shape, views, seed=0, decoder=name, dali_threads=threads,
                               dali_device="gpu" if gpu else "cpu")
            ips, ms, devices, with_bad = _throughput(data, workers, batches)
            where, label = _label(name, devices)
            pil = rows.rows[0]["images_per_s"] if rows.rows else ips  # the first decoder is PIL
            rows.add({"bench": "data", "device": where, "backend": label, "decoder": label, "threads": threads,
                      "batch": batch, "image_size": size, "ssl": shape.ssl, "local_crops": views.local_crops,
                      "images_per_s": ips, "median_ms": ms, "ratio_vs_pil": ips / pil,
                      "batches_with_bad_samples": with_bad})
        torch.set_num_threads(threads)
    return rows.rows


def main() -> None:
    bench_cli(run, TABLE_COLUMNS, __doc__, lambda p: p.add_argument(
        "--shards", help="existing shards to read instead of synthetic JPEGs"), run_args=("shards",))


if __name__ == "__main__":
    main()
