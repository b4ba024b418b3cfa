"""Stored features (vtp_fast.eval.features): equal to the features computed in memory, resumable, the same from 2
gloo processes as from 1, bad images skipped and counted, rows gathered in any order from the chunk maps."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from vtp_fast import VTP, vtp_config
from vtp_fast.config import InputError
from vtp_fast.data.images import normalize_u8
from vtp_fast.data.labelled import FolderImages, LabelledImages
from vtp_fast.eval import features
from vtp_fast.eval.features import FeatureStore, extract_features, save_features
from vtp_fast.eval.probe import extract_features as in_memory_features


def nano() -> VTP:
    torch.manual_seed(0)
    return VTP(vtp_config("vtp-nano")).eval()


def random_set(n: int = 11, seed: int = 0) -> LabelledImages:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8, generator=g)
    return LabelledImages(images, torch.randint(0, 3, (n,), generator=g), ["a", "b", "c"], [], f"random-{n}-{seed}")


def test_trunk_blocks_end_with_the_features():
    model = nano()
    x = normalize_u8(random_set(3).images)
    with torch.no_grad():
        outs = model.block_features(x, 2)
        cls, patch = model.features(x)
    assert len(outs) == 2 and torch.equal(outs[-1].cls, cls) and torch.equal(outs[-1].patch, patch)
    assert not torch.allclose(outs[0].cls, cls)  # the block before differs
    with pytest.raises(ValueError, match=r"n must be in \[1, 2\]"):
        model.block_features(x, 3)


def test_stored_equal_in_memory(tmp_path):
    """Every group of a stored row equals what the in-memory code computes (same batches: bitwise)."""
    model, data = nano(), random_set()
    store = extract_features(model, data, tmp_path / "f", n_blocks=4, batch=4, chunk=4, progress=False)
    assert store.n_blocks == 2  # capped at the trunk's depth
    assert store.meta["counts"] == [4, 4, 3] and len(store) == 11 and store.meta["skipped"] == 0
    assert torch.equal(store.labels, data.labels) and torch.equal(store.ids, torch.arange(11))
    x = normalize_u8(data.images)
    ref = in_memory_features(model, x, batch=4)
    every = torch.arange(11)
    assert torch.equal(store.rows(every, np.concatenate([store.cls_cols(1), store.cols("patch_mean")])),
                       ref["cls_meanpatch"])
    assert torch.equal(store.view(store.cols("latent"))[every], ref["latent"])
    with torch.no_grad():
        clip = torch.cat([model.clip_image_features(x[i:i + 4]) for i in range(0, 11, 4)])
        first = torch.cat([model.block_features(x[i:i + 4], 2)[0].cls for i in range(0, 11, 4)])
    assert torch.equal(store.rows(every, store.cols("clip")), clip)
    assert torch.equal(store.rows(every, store.cls_cols(2)[:64]), first)  # the shallower block comes first
    # any order, across chunks, repeated rows
    pick = torch.tensor([10, 0, 5, 4, 10, 3])
    assert torch.equal(store.rows(pick), store.rows(every)[pick])
    assert store.meta["class_names"] == ["a", "b", "c"]
    # the probes' fast path: some columns held in a tensor (on a GPU there), the same rows
    cols = store.cols("latent", "patch_mean")
    mapped = store.rows(pick, cols)
    store.keep_resident(cols, "cpu")
    assert store._resident[1].shape == (11, 128) and torch.equal(store.rows(pick, cols), mapped)
    assert torch.equal(store.rows(pick, cols[:3]), mapped[:, :3])
    assert torch.equal(store.rows(pick, store.cols("clip")), store.rows(every, store.cols("clip"))[pick])  # mapped
    assert torch.equal(store.rows(every, cols)[pick], mapped)
    assert len(store._resident_at) == 3  # each column set located once (cols, cols[:3], clip: not held)


def test_resume_keeps_finished_chunks_and_a_new_plan_starts_over(tmp_path, monkeypatch):
    model, data = nano(), random_set()
    out = tmp_path / "f"
    first = extract_features(model, data, out, batch=4, chunk=4, progress=False)
    before = {p.name: p.read_bytes() for p in out.glob("*.npy")}
    (out / features.features_name(1)).unlink()  # a run killed while chunk 1 was written
    (out / features.META).unlink()
    (out / ".features-00001.npy.1234abcd.tmp").write_bytes(b"partial")
    embedded = []
    real = features.embed
    monkeypatch.setattr(features, "embed", lambda m, x, n: embedded.append(len(x)) or real(m, x, n))
    again = extract_features(model, data, out, batch=4, chunk=4, progress=False)
    assert embedded == [4]  # chunk 1 only
    assert {p.name: p.read_bytes() for p in out.glob("*.npy")} == before
    assert not list(out.glob(".*.tmp")) and again.meta == first.meta
    embedded.clear()
    extract_features(model, data, out, n_blocks=1, batch=4, chunk=4, progress=False)  # another plan
    assert embedded == [4, 4, 3] and FeatureStore(out).n_blocks == 1


def test_bad_images_are_skipped_and_counted(tmp_path):
    root = tmp_path / "tree"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "cat" / "2.png").write_bytes(b"not a png")
    (root / "dog" / "0.png").write_bytes(b"")
    data = FolderImages(root, 32)
    with pytest.warns(UserWarning, match="2 image"):
        store = extract_features(nano(), data, tmp_path / "f", batch=2, chunk=2, progress=False)
    assert len(store) == 4 and store.meta["skipped"] == 2 and store.meta["counts"] == [2, 0, 2]  # chunk 1: none
    assert store.ids.tolist() == [0, 1, 4, 5] and store.labels.tolist() == [0, 0, 1, 1]
    assert store.class_names == ["cat", "dog"]
    good = torch.stack([torch.from_numpy(np.asarray(data.fetch([i]).images[0])) for i in (0, 1, 4, 5)])
    ref = in_memory_features(nano(), normalize_u8(good), batch=2)["latent"]
    assert torch.equal(store.rows(torch.tensor([3, 0, 2]), store.cols("latent")), ref[[3, 0, 2]])


def test_unfinished_and_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="not a finished feature set"):
        FeatureStore(tmp_path)
    with pytest.raises(InputError, match="dtype"):
        extract_features(nano(), random_set(), tmp_path / "f", dtype="int8")
    store = save_features(tmp_path / "s", torch.randn(5, 6), torch.arange(5), {"cls_blocks": [0, 4],
                                                                               "patch_mean": [4, 6]}, n_blocks=2)
    with pytest.raises(InputError, match="no 'clip' features"):
        store.cols("clip")
    with pytest.raises(InputError, match="last 2 blocks, not 3"):
        store.cls_cols(3)
    assert store.cls_cols(1).tolist() == [2, 3] and store.class_names == ["0", "1", "2", "3", "4"]


# ---------------------------------------------------------------------------------------------- torchrun
def _worker(rank: int, tmp) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    torch.set_num_threads(1)
    embedded, real = [], features.embed
    features.embed = lambda m, x, n: embedded.append(len(x)) or real(m, x, n)
    try:
        store = extract_features(nano(), random_set(), tmp / "two", batch=4, chunk=4, progress=False)
        assert len(store) == 11  # every rank gets the finished set
        (tmp / f"embedded-{rank}.json").write_text(json.dumps(embedded))
    finally:
        dist.destroy_process_group()


def test_two_processes_store_what_one_does(tmp_path):
    """Chunks 0 and 2 on rank 0, chunk 1 on rank 1 (round-robin): the same files, byte for byte."""
    torch.set_num_threads(1)
    extract_features(nano(), random_set(), tmp_path / "one", batch=4, chunk=4, progress=False)
    mp.start_processes(_worker, args=(tmp_path,), nprocs=2, start_method="spawn")
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").glob("*.npy")}
    two = {p.name: p.read_bytes() for p in (tmp_path / "two").glob("*.npy")}
    assert len(one) == 6 and one == two
    assert [json.loads((tmp_path / f"embedded-{r}.json").read_text()) for r in (0, 1)] == [[4, 3], [4]]
    assert json.loads((tmp_path / "one" / "meta.json").read_text()) == json.loads(
        (tmp_path / "two" / "meta.json").read_text())
