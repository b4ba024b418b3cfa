"""Latent sets on disk: memory-mapped shards read a batch at a time and normalised per batch, DiT batches that are
the same global batch on any number of ranks, and host memory that does not grow with the set."""

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vtp_fast.config import InputError
from vtp_fast.constants import DTYPES
from vtp_fast.data import latents as store
from vtp_fast.data.latents import LatentBatches, load_latents
from vtp_fast.data.views import sample_seed

ROOT = Path(__file__).resolve().parents[2]


def write_set(path: Path, counts: list[int], channels: int = 8, grid: int = 4, dtype: str = "fp32",
              classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic latent set (shards of `counts` latents, values ~ N(channel, 1 + channel)); returns what it
    holds (the stored latents (N, C, h, w) as float32, labels (N,)), built a shard at a time."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.arange(channels, dtype=torch.float32).view(1, -1, 1, 1)
    stats, zs, ys = [], [], []
    for k, n in enumerate(counts):
        z = (torch.randn(n, channels, grid, grid, generator=gen) * (1 + scale) + scale).to(DTYPES[dtype])
        y = torch.randint(classes, (n,), generator=gen)
        stats.append(store.write_shard(path / store.shard_name(k), z, y))
        if sum(counts) <= 100_000:  # the large sets of the memory test are not kept
            zs.append(z.float())
            ys.append(y)
    mean, std = store.merge_stats(stats, grid * grid)
    store.finish_set(path, {"channels": channels, "grid": [grid, grid], "count": sum(counts), "dtype": dtype,
                            "mean": mean.tolist(), "std": std.tolist(), "class_names": [str(c) for c in range(classes)],
                            "shards": [{"file": store.shard_name(k), "count": n} for k, n in enumerate(counts)],
                            "data": "synthetic", "tokenizer": "", "tokenizer_fingerprint": "", "image_size": 64})
    return (torch.cat(zs), torch.cat(ys)) if zs else (None, None)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_batches_are_the_stored_rows_normalised_per_batch(tmp_path, dtype):
    z, y = write_set(tmp_path, [7, 0, 12, 5], dtype=dtype)  # an empty shard among them
    lat = load_latents(tmp_path)
    assert lat.shape == (24, 8, 4, 4) and len(lat) == 24
    ids = torch.tensor([23, 0, 7, 7, 18, 6, 19, 2])  # across shards, repeated, unsorted
    raw, labels = lat.raw(ids)
    assert raw.dtype == DTYPES[dtype] and torch.equal(raw.float(), z[ids]) and torch.equal(labels, y[ids])
    norm, _ = lat.batch(ids)
    assert norm.dtype == torch.float32 and torch.equal(norm, (z[ids] - lat.mean) / lat.std)
    whole, _ = lat.batch(torch.arange(len(lat)))
    assert whole.mean((0, 2, 3)).abs().max() < 1e-5 and (whole.std((0, 2, 3), correction=0) - 1).abs().max() < 1e-5
    assert torch.allclose(lat.mean.flatten(), z.double().mean((0, 2, 3)).float(), atol=1e-5)
    copy = pickle.loads(pickle.dumps(lat))  # DataLoader workers: the maps are opened again there
    assert torch.equal(copy.raw(ids)[0], raw)
    shard = load_file(str(tmp_path / store.shard_name(2)))  # plain safetensors: any reader can open a shard
    assert shard["latents"].shape == (12, 8, 4, 4) and shard["sum"].dtype == torch.float64


def test_merged_statistics_do_not_depend_on_how_shards_were_grouped(tmp_path):
    write_set(tmp_path, [5, 9, 3])
    stats = [store.read_shard_stats(tmp_path / store.shard_name(k)) for k in range(3)]
    mean, std = store.merge_stats(stats, 16)
    z = torch.cat([load_file(str(tmp_path / store.shard_name(k)))["latents"] for k in range(3)]).double()
    assert torch.allclose(mean, z.mean((0, 2, 3)), rtol=0, atol=1e-12)
    assert torch.allclose(std, z.std((0, 2, 3), correction=0), rtol=0, atol=1e-10)
    assert json.loads((tmp_path / "meta.json").read_text())["mean"] == mean.tolist()


def test_dit_batches_are_one_global_batch_split_over_ranks(tmp_path):
    write_set(tmp_path, [10, 10, 10])
    lat = load_latents(tmp_path)
    one = LatentBatches(lat, 8, seed=3)
    two = [LatentBatches(lat, 8, seed=3, rank=r, world=2) for r in range(2)]
    four = [LatentBatches(lat, 8, seed=3, rank=r, world=4) for r in range(4)]
    for step in (0, 1, 57):
        z, y = one[step]
        assert z.shape == (8, 8, 4, 4)
        for split in (two, four):
            parts = [b[step] for b in split]
            assert torch.equal(torch.cat([p[0] for p in parts]), z) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert not torch.equal(one.ids(0), one.ids(1)) and torch.equal(one.ids(5), LatentBatches(lat, 8, seed=3).ids(5))
    gen = torch.Generator().manual_seed(sample_seed(3, 0xD17, 1))
    assert torch.equal(one.ids(1), torch.randint(30, (8,), generator=gen))  # a function of (seed, step) alone


def test_bad_sets_are_refused_naming_the_problem(tmp_path):
    write_set(tmp_path / "a", [4, 4])
    (tmp_path / "a" / store.shard_name(1)).unlink()
    with pytest.raises(InputError, match="missing latent shard"):
        load_latents(tmp_path / "a")
    write_set(tmp_path / "b", [4])
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    meta["grid"] = [2, 2]
    (tmp_path / "b" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="do not match meta.json"):
        load_latents(tmp_path / "b")
    with pytest.raises(InputError, match="no meta.json"):
        load_latents(tmp_path / "c")


PEAK = textwrap.dedent("""
    import sys, torch
    from vtp_fast.data.latents import LatentBatches, load_latents
    torch.set_num_threads(1)
    data = LatentBatches(load_latents(sys.argv[1]), 256, seed=0)
    for step in range(int(sys.argv[2])):
        z, y = data[step]
        assert z.shape == (256, 64, 4, 4) and torch.isfinite(z).all()
    print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")))
""")


def peak_rss_kib(path: Path, steps: int) -> int:
    out = subprocess.run([sys.executable, "-c", PEAK, str(path), str(steps)], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    return int(out.stdout.split()[-1])


def test_host_memory_does_not_grow_with_the_set(tmp_path):
    """Peak resident memory (VmHWM, file pages included) of 60 DiT batches of 256 from a set of 4,000 latents
    (16 MiB) and from one 10x larger (160 MiB): within 10%. Holding the set (or a normalised copy) would add
    160-320 MiB to the larger run's ~300 MiB."""
    rows = 4_000
    write_set(tmp_path / "small", [rows], channels=64)
    write_set(tmp_path / "large", [rows] * 10, channels=64)
    small, large = peak_rss_kib(tmp_path / "small", 60), peak_rss_kib(tmp_path / "large", 60)
    print(f"peak RSS: small set {small / 1024:.1f} MiB, 10x set {large / 1024:.1f} MiB")
    assert abs(large - small) <= 0.1 * small, (small, large)
