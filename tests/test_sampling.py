"""`vtp-fast sample` at scale (vtp_fast.downstream.sample): two gloo ranks write the same .npz as one process, a
run killed by SIGKILL resumes to the same .npz without redoing finished chunks, labels are class-balanced, and the
.npz is in ADM's format. A tiny DiT (random, non-zero adaLN so that the images depend on everything) and the nano
tokenizer; every process on one torch thread, so that the only difference between runs is the world size."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from vtp_fast import VTP, load_pretrained, save_pretrained, vtp_config
from vtp_fast.config import InputError
from vtp_fast.downstream import sample as sampling
from vtp_fast.downstream.sample import SampleSpec, sample_images, sample_noise
from vtp_fast.models.dit import DiT, dit_config
from vtp_fast.models.pretrained import tokenizer_fingerprint
from vtp_fast.train.dit import export_dit, load_dit
from vtp_fast.train.flow import sample as flow_sample

ROOT = Path(__file__).resolve().parents[1]
# 10 samples of 3 classes in chunks of 4 (4 + 4 + 2), batches of 3 from each chunk's start (3 + 1, 3 + 1, 2);
# guidance only on part of the path, so that both branches of the sampler run
SPEC = SampleSpec(n=10, classes=(0, 1, 2), steps=3, cfg_scale=2.0, cfg_interval=(0.0, 0.7), seed=5, batch=3,
                  chunk=4)


def load_models(models: Path):
    tokenizer = load_pretrained(models / "tokenizer").requires_grad_(False)
    dit, meta = load_dit(models / "dit")
    return dit, meta, tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tokenizer = VTP(vtp_config("vtp-nano")).eval()
    save_pretrained(tokenizer, root / "tokenizer")
    dit = DiT(dit_config("dit-nano", in_channels=64, input_size=4, num_classes=3))
    with torch.no_grad():
        for p in dit.parameters():  # adaLN-Zero starts at an exact zero velocity: no class or noise would show
            p.add_(torch.randn_like(p) * 0.05)
    meta = {"channels": 64, "grid": [4, 4], "mean": [0.1] * 64, "std": [0.9] * 64, "class_names": ["a", "b", "c"],
            "data": "none", "tokenizer": "nano", "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "image_size": 64}
    export_dit(dit, meta, root / "dit")
    return root


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory) -> dict[str, np.ndarray]:
    """The uninterrupted one-process run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("reference")
        paths = sample_images(*load_models(models), out, SPEC, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert paths["npz"] == out / "samples.npz" and not (out / "chunks").exists()
    with np.load(out / "samples.npz") as npz:
        return {k: npz[k] for k in npz.files}


def test_the_npz_is_in_adm_format_with_class_balanced_labels(reference, models, tmp_path):
    assert sorted(reference) == ["arr_0", "arr_1"]
    images, labels = reference["arr_0"], reference["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (10, 64, 64, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert np.bincount(labels).tolist() == [4, 3, 3]  # balanced: counts differ by at most one
    assert SPEC.labels(0, 300).tolist() == [0, 1, 2] * 100
    assert len({images[i].tobytes() for i in range(10)}) == 10 and images.std() > 1  # ten different images


def test_a_sample_depends_on_its_index_not_on_its_batch(models, one_thread):
    noise = sample_noise(7, 0, 6, (64, 4, 4))
    assert torch.equal(sample_noise(7, 3, 5, (64, 4, 4)), noise[3:5])  # sample i's noise: seed and i only
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise, sample_noise(8, 0, 6, (64, 4, 4)))
    dit, _, _ = load_models(models)
    y = torch.tensor([0, 1, 2, 0, 1, 2])

    def run(lo, hi):
        return flow_sample(dit, (hi - lo, 64, 4, 4), y[lo:hi], steps=3, cfg_scale=2.0, cfg_interval=(0.0, 0.7),
                           noise=noise[lo:hi])

    whole, halves = run(0, 6), torch.cat([run(0, 3), run(3, 6)])
    # Equal up to fp32 rounding only, not bit for bit: the batched matmuls of another batch size sum in another
    # order (~5e-7 on this model). Hence the fixed batches counted from each chunk's start (the same batches on
    # any world size) and --batch in the manifest a resume must match.
    torch.testing.assert_close(halves, whole, rtol=0, atol=1e-5)


def _rank(rank: int, world: int, rendezvous: str, models: Path, out: Path, result: Path):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        seen = []
        original = sampling.render_batch
        sampling.render_batch = lambda *a: seen.append(a[-2:]) or original(*a)
        paths = sample_images(*load_models(models), out, SPEC, png=True, progress=False)
        torch.save({"paths": {k: str(v) for k, v in paths.items()}, "batches": seen}, result.with_suffix(f".{rank}"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_write_what_one_process_writes(reference, models, tmp_path):
    out = tmp_path / "out"
    mp.start_processes(_rank, args=(2, str(tmp_path / "rendezvous"), models, out, tmp_path / "result"), nprocs=2,
                       start_method="spawn")
    with np.load(out / "samples.npz") as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        assert np.array_equal(npz["arr_0"], reference["arr_0"]) and np.array_equal(npz["arr_1"], reference["arr_1"])
    r0, r1 = (torch.load(tmp_path / f"result.{r}", weights_only=True) for r in (0, 1))
    assert set(r0["paths"]) == {"npz", "grid", "json", "png"} and r1["paths"] == {}
    # chunks dealt round-robin: rank 0 chunks 0 and 2, rank 1 chunk 1; batches counted from each chunk's start
    assert r0["batches"] == [(0, 3), (3, 4), (8, 10)] and r1["batches"] == [(4, 7), (7, 8)]
    pngs = sorted((out / "png").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(10)]  # each rank wrote its chunks' PNGs
    for i, p in enumerate(pngs):
        assert np.array_equal(np.asarray(Image.open(p)), reference["arr_0"][i])
    assert not (out / "chunks").exists() and (out / "grid.png").is_file() and (out / "samples.json").is_file()


KILLED_RUN = """
import sys, time
from pathlib import Path
import torch
from tests.test_sampling import SPEC, load_models
from vtp_fast.downstream import sample as sampling
torch.set_num_threads(1)
original = sampling.render_batch
def slow(*args):  # slow enough that the test can kill it in the middle of the second chunk
    time.sleep(0.5)
    return original(*args)
sampling.render_batch = slow
sampling.sample_images(*load_models(Path(sys.argv[1])), sys.argv[2], SPEC, progress=False)
"""


def test_a_killed_run_resumes_to_the_same_npz_keeping_finished_chunks(reference, models, tmp_path, monkeypatch,
                                                                     one_thread):
    out = tmp_path / "out"
    work = out / "chunks"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(models), str(out)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not list(work.glob("chunk_*.npy")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no chunk written in 60 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done = sorted(p.name for p in work.glob("chunk_*.npy"))
    assert 1 <= len(done) < SPEC.chunks and not (out / "samples.npz").exists()
    with pytest.raises(InputError, match=r"holds the chunks of another sampling run \(steps 3 != 4\)"):
        sample_images(*load_models(models), out, SampleSpec(**{**SPEC.__dict__, "steps": 4}), progress=False)

    seen = []
    original = sampling.render_batch
    monkeypatch.setattr(sampling, "render_batch", lambda *a: seen.append(a[-2:]) or original(*a))
    sample_images(*load_models(models), out, SPEC, progress=False)
    finished = {int(name[6:12]) for name in done}
    redone = sorted({start // SPEC.chunk for start, _ in seen})
    assert redone == [k for k in range(SPEC.chunks) if k not in finished]  # only the missing chunks were sampled
    with np.load(out / "samples.npz") as npz:
        assert np.array_equal(npz["arr_0"], reference["arr_0"]) and np.array_equal(npz["arr_1"], reference["arr_1"])
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "samples.json", "samples.npz"]  # no temporaries

    # a finished set: a second run returns at once, other parameters are refused
    seen.clear()
    assert sample_images(*load_models(models), out, SPEC, progress=False)["npz"] == out / "samples.npz"
    assert seen == []
    with pytest.raises(InputError, match=r"finished sample set made otherwise \(seed 5 != 6\)"):
        sample_images(*load_models(models), out, SampleSpec(**{**SPEC.__dict__, "seed": 6}), progress=False)


def test_the_command_line_refuses_n_with_per_class(tmp_path, capsys):
    from vtp_fast.cli import main

    assert main(["sample", "--dit", "none", "--checkpoint", "none", "--out", str(tmp_path / "o"), "--n", "6",
                 "--per-class", "2"]) == 2
    assert "--n 6 and --per-class 2: give one" in capsys.readouterr().err
