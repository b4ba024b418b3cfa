"""extract-latents at scale: an image folder tree encoded into latent shards, the same set from 1 or 2 processes
(gloo on the CPU), a killed run resumed to the uninterrupted run's set without encoding finished shards again, and
the command line's options."""

import json
import os

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.data.test_labelled import make_tree
from vtp_fast import VTP, save_pretrained, vtp_config
from vtp_fast.cli import main
from vtp_fast.data import latents as store
from vtp_fast.data.labelled import FolderImages
from vtp_fast.data.latents import load_latents
from vtp_fast.eval.latents import extract_latents

SIZE, PER_SHARD, BATCH = 32, 4, 3  # 13 images (the 5th broken) -> shards of 4, 4, 4, 1 images, chunks of 3


def tokenizer() -> VTP:
    torch.manual_seed(0)
    return VTP(vtp_config("vtp-nano")).eval()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("tree") / "train")


def shards(out) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted(out.glob("latents-*.safetensors"))}


def assert_same_sets(a, b) -> None:
    sa, sb = shards(a), shards(b)
    assert sa.keys() == sb.keys() and len(sa) == 4
    for name in sa:
        assert sa[name].keys() == sb[name].keys()
        for k in sa[name]:
            assert torch.equal(sa[name][k], sb[name][k]), (name, k)  # bit for bit
    ma, mb = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    assert ma == mb  # the statistics included: exactly the same floats


def extract(tree, out, **kw) -> dict:
    torch.set_num_threads(1)  # as the spawned processes: the same reduction order in every encoder matmul
    return extract_latents(tokenizer(), FolderImages(tree, SIZE), out, per_shard=PER_SHARD, batch=BATCH,
                           progress=False, **kw)


@pytest.fixture(scope="module")
def straight(tree, tmp_path_factory):
    threads = torch.get_num_threads()
    try:
        out = tmp_path_factory.mktemp("straight") / "latents"
        with pytest.warns(UserWarning, match="broken.jpg"):
            meta = extract(tree, out)
        return out, meta
    finally:
        torch.set_num_threads(threads)


def test_a_folder_tree_becomes_sharded_latents_with_exact_statistics(straight):
    out, meta = straight
    assert meta["count"] == 2 * 12 and meta["skipped"] == 1 and meta["class_names"] == ["a_dog", "b_cat", "c_fox",
                                                                                        "empty_class"]
    assert [s["count"] for s in meta["shards"]] == [8, 6, 8, 2]  # shard 1 holds the broken image: 3 of its 4
    lat = load_latents(out)
    assert lat.shape == (24, 64, 2, 2)
    z = torch.cat([s["latents"] for s in shards(out).values()]).double()
    assert torch.allclose(torch.tensor(meta["mean"], dtype=torch.float64), z.mean((0, 2, 3)), rtol=0, atol=1e-12)
    first = shards(out)[store.shard_name(0)]
    assert first["labels"].tolist() == [0, 0, 0, 0] * 2  # a_dog's 4 images, then their mirror images


def _rank(rank: int, tree, out, rendezvous) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    tdist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        extract(tree, out)
    finally:
        tdist.destroy_process_group()


def test_two_processes_write_the_set_one_process_writes(tree, straight, tmp_path):
    out = tmp_path / "latents"
    mp.start_processes(_rank, args=(tree, out, tmp_path / "rendezvous"), nprocs=2, start_method="spawn")
    assert_same_sets(straight[0], out)  # rank 1 encoded shards 1 and 3: the same content, the same statistics


class Interrupted(Exception):
    pass


def test_a_killed_run_resumes_keeping_finished_shards(tree, straight, tmp_path, monkeypatch):
    out = tmp_path / "latents"
    real_write, written = store.write_shard, []

    def dies_after_two(path, *args, **kw):
        if len(written) == 2:
            raise Interrupted
        written.append(path.name)
        return real_write(path, *args, **kw)

    monkeypatch.setattr(store, "write_shard", dies_after_two)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(Interrupted), pytest.warns(UserWarning):
            extract(tree, out)
        assert written == [store.shard_name(0), store.shard_name(1)] and not (out / "meta.json").exists()
        stale = out / ".latents-00002.safetensors.0123abcd.tmp"  # what a SIGKILL in the middle of a write leaves
        stale.write_bytes(b"half a shard")
        monkeypatch.setattr(store, "write_shard", real_write)
        encoded = []
        real_encode = VTP.encode
        monkeypatch.setattr(VTP, "encode", lambda self, x: encoded.append(x.shape[0]) or real_encode(self, x))
        before = {p: p.stat().st_mtime_ns for p in out.glob("latents-*")}
        extract(tree, out)
    finally:
        torch.set_num_threads(threads)
    assert sum(encoded) == 2 * 5  # shards 2 and 3 only (4 + 1 images, and their mirror images)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # finished shards kept as they were
    assert not stale.exists()
    assert_same_sets(straight[0], out)
    encoded.clear()
    extract(tree, out)  # a complete set with the same options: nothing to encode
    assert encoded == []


def test_other_options_restart_the_set_and_bf16_halves_it(tree, straight, tmp_path):
    out = tmp_path / "latents"
    with pytest.warns(UserWarning, match="broken.jpg"):
        extract(tree, out)
    (out / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning, match="broken.jpg"):  # every shard encoded again, the broken image met again
        meta = extract(tree, out, dtype="bf16", flip=False)  # another plan: the fp32 shards are not mixed in
    assert meta["dtype"] == "bf16" and meta["count"] == 12 and (out / "notes.txt").read_text() == "mine"
    got = shards(out)
    ref = shards(straight[0])
    for name in got:
        z = got[name]["latents"]
        assert z.dtype == torch.bfloat16
        n = z.shape[0]  # the originals come first in the flipped set's shard
        torch.testing.assert_close(z.float(), ref[name]["latents"][:n], rtol=1e-2, atol=1e-2)
    lat = load_latents(out)
    z, _ = lat.batch(torch.arange(len(lat)))
    assert z.dtype == torch.float32 and z.mean((0, 2, 3)).abs().max() < 1e-4


def test_the_command_line_extracts_a_folder_tree(tree, tmp_path, capsys):
    tok = save_pretrained(tokenizer(), tmp_path / "tok")
    out = tmp_path / "latents"
    assert main(["extract-latents", "--checkpoint", str(tok), "--data", str(tree), "--out", str(out), "--size",
                 str(SIZE), "--dtype", "bf16", "--per-shard", "5", "--workers", "2", "--batch", "2",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "1 image(s) skipped" in err and "broken.jpg" in err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "bf16" and [s["count"] for s in meta["shards"]] == [8, 10, 6]
    assert meta["image_size"] == SIZE and meta["tokenizer"] == str(tok)
