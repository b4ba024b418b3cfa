"""The vtp-fast command: info, the main job (smoke), reconstruct, encode, and one-line errors on bad input."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import make_prepared_emoji
from vtp_fast import VTP, save_pretrained, vtp_config
from vtp_fast.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vtp_fast.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_info_reports_native_extension_and_backends():
    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    assert "native extension vtp_fast._C: loaded" in r.stdout
    resolved = dict(re.findall(r"^\s+(\w+)\s+->\s+(\w+)", r.stdout, flags=re.M))
    assert resolved["masked_gather"] == "native" and resolved["attention"] == "sdpa"


def test_info_says_where_fp32_attention_goes_on_a_gpu():
    """The Triton attention kernel is not offered at fp32 on a GPU (the compile gate shows it spilling): info for
    cuda names where fp32 goes."""
    pytest.importorskip("triton")
    r = run_cli("info", "--device", "cuda")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\s+triton: fp32 on CUDA runs through SDPA", r.stdout, flags=re.M), r.stdout


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "nano"
    torch.manual_seed(0)
    save_pretrained(VTP(vtp_config("vtp-nano")), d)
    return d


@pytest.fixture
def images(tmp_path):
    paths = []
    rng = np.random.default_rng(0)
    for i, mode in enumerate(["RGB", "RGBA", "L"]):
        arr = rng.integers(0, 255, (32, 48, {"RGB": 3, "RGBA": 4, "L": 1}[mode]), dtype=np.uint8)
        p = tmp_path / f"img{i}.png"
        Image.fromarray(arr.squeeze(-1) if mode == "L" else arr, mode).save(p)
        paths.append(str(p))
    return paths


def test_reconstruct_writes_images_grid_and_psnr(ckpt_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["reconstruct", *images, "--checkpoint", str(ckpt_dir), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("PSNR") == 3 and "grid" in text
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "img0_recon.png", "img1_recon.png", "img2_recon.png"]
    assert Image.open(out / "img0_recon.png").size == (48, 32)
    assert Image.open(out / "grid.png").size == (3 * 50 + 2, 2 * 34 + 2)


def test_encode_writes_latents(ckpt_dir, images, tmp_path):
    out = tmp_path / "z.safetensors"
    assert main(["encode", *images, "--checkpoint", str(ckpt_dir), "--out", str(out)]) == 0
    assert load_file(out)["latents"].shape == (3, 64, 2, 3)


@pytest.mark.parametrize("problem", ["size", "unreadable", "missing", "pickle", "truncated", "missing_key"])
def test_bad_input_is_one_clear_line_and_writes_nothing(problem, ckpt_dir, images, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir, ckpt)
    out = tmp_path / "out"
    out.mkdir()
    (out / "img0_recon.png").write_bytes(b"keep me")
    imgs = list(images)
    expect = {"size": "--size 100: must be a multiple of the patch size 16 (e.g. 96 or 112)",
              "unreadable": "unreadable image", "missing": "no such file", "pickle": "pickle", "truncated": "truncated",
              "missing_key": "missing keys (1): trunk.norm.weight"}[problem]
    if problem == "size":
        imgs += ["--size", "100"]
    elif problem == "unreadable":
        (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        imgs.append(str(tmp_path / "bad.png"))
    elif problem == "missing":
        imgs.append(str(tmp_path / "nope.png"))
    else:
        sd = {k: v.clone() for k, v in load_file(ckpt / "model.safetensors").items()}
        if problem == "pickle":
            torch.save(sd, ckpt / "model.safetensors")
        elif problem == "truncated":
            data = (ckpt / "model.safetensors").read_bytes()
            (ckpt / "model.safetensors").write_bytes(data[:1000])
        else:
            from safetensors.torch import save_file

            sd.pop("trunk.norm.weight")
            save_file(sd, str(ckpt / "model.safetensors"))
    r = run_cli("reconstruct", *imgs, "--checkpoint", str(ckpt), "--out", str(out))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vtp-fast: error:") and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["img0_recon.png"]
    assert (out / "img0_recon.png").read_bytes() == b"keep me"


def _photo(path, w, h, seed=0):
    """A smooth image (a reconstructable gradient with noise) of w x h."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1) + rng.normal(0, 4, (h, w, 3))
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("resize, size", [("pad", (600, 400)), ("crop", (592, 400)), ("fit", (300, 200))])
def test_photos_of_any_size_are_reconstructed(resize, size, ckpt_dir, tmp_path, capsys):
    photo = _photo(tmp_path / "photo.jpg", 600, 400)
    out = tmp_path / "out"
    assert main(["reconstruct", str(photo), "--checkpoint", str(ckpt_dir), "--out", str(out), "--resize", resize,
                 "--max-side", "300"]) == 0
    assert Image.open(out / "photo_recon.png").size == size
    assert "PSNR" in capsys.readouterr().out


def test_folders_and_mixed_sizes(ckpt_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "trip").mkdir(parents=True)
    (folder / ".thumbs").mkdir()
    _photo(folder / "a.png", 48, 32)
    _photo(folder / "trip" / "b.jpg", 40, 33)
    _photo(folder / "trip" / "c.png", 48, 32, seed=1)
    _photo(folder / ".thumbs" / "hidden.png", 16, 16)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "z.safetensors"
    assert main(["encode", str(folder), "--checkpoint", str(ckpt_dir), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 images found in 1 path(s)" in text
    tensors = load_file(out)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"latents.2x3": (2, 64, 2, 3),
                                                                "latents.3x3": (1, 64, 3, 3)}
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        index = {Path(r["file"]).name: r for r in json.loads(f.metadata()["files"])}
    assert index["b.jpg"]["key"] == "latents.3x3" and index["b.jpg"]["size"] == [40, 33]
    assert {index["a.png"]["row"], index["c.png"]["row"]} == {0, 1}
    recon = tmp_path / "recon"
    assert main(["reconstruct", str(folder), "--checkpoint", str(ckpt_dir), "--out", str(recon)]) == 0
    assert "no grid: the images differ in size" in capsys.readouterr().out
    assert Image.open(recon / "b_recon.png").size == (40, 33)


@pytest.mark.parametrize("device, expect", [("gpu", "--device: 'gpu' is not a device"),
                                            ("cuda", "--device: cuda requested but no CUDA device is visible")])
def test_device_errors_name_the_option(device, expect, ckpt_dir, images, tmp_path):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    r = run_cli("reconstruct", *images, "--checkpoint", str(ckpt_dir), "--out", str(tmp_path), "--device", device)
    assert r.returncode == 2 and expect in r.stderr, r.stderr


def test_large_images_are_announced_with_an_estimated_time(ckpt_dir, tmp_path, capsys, monkeypatch):
    import vtp_fast.cli as cli

    monkeypatch.setattr(cli, "PIXEL_BUDGET", 40 * 40)
    photo = _photo(tmp_path / "big.png", 64, 48)
    assert main(["reconstruct", str(photo), "--checkpoint", str(ckpt_dir), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: 1 image\(s\) above .* big.png \(64x48\); about [\d.]+ min on cpu", err), err


def test_a_stopped_run_leaves_no_temp_folder(ckpt_dir, tmp_path):
    """SIGTERM (what `kill` and job schedulers send) unwinds like Ctrl-C: the staging folder is removed."""
    import signal
    import time

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(400):
        _photo(folder / f"{i:03d}.png", 64, 64, seed=i)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "vtp_fast.cli", "reconstruct", str(folder), "--checkpoint",
                             str(ckpt_dir), "--out", str(out), "--batch", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.glob(".reconstruct-*/*.png")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, "finished before it could be stopped"
    assert not list(out.glob(".reconstruct-*")) and not list(out.iterdir())
    assert "Traceback" not in err


def test_bad_config_key_is_one_line(tmp_path):
    r = run_cli("pretrain", "optim.lrr=1", f"run.out_dir={tmp_path}")
    assert r.returncode == 2 and "unknown config key optim.lrr" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("pretrain", "batch.ssl=100", f"run.out_dir={tmp_path}")
    assert r.returncode == 2 and "batch.ssl: 100 must be between 0 and batch.size=64" in r.stderr


def test_pretrain_smoke(tmp_path, capsys):
    from tests.train.test_pretrain import SMALL

    root = make_prepared_emoji(tmp_path / "emoji", size=32)
    out = tmp_path / "run"
    assert main(["pretrain", *SMALL, f"data.emoji.root={root}", f"run.out_dir={out}", "run.steps=4", "run.log_every=2",
                 "run.eval_every=2", "run.tensorboard=true"]) == 0
    text = capsys.readouterr().out
    for name in ("checkpoint", "reconstructions.png", "loss.png", "psnr.png", "zero_shot.png", "metrics.jsonl",
                 "config.yaml", "tb"):
        assert (out / name).exists() and str(out / name) in text, name
    assert list((out / "tb").glob("events.out.tfevents.*")), "TensorBoard event files"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/total" in r] == [2, 4]
    assert [r["step"] for r in rows if "eval_psnr" in r] == [0, 2, 4]
    assert all(np.isfinite(v) for r in rows for k, v in r.items() if k.startswith("loss/"))
    assert {"lr", "grad_norm", "images_per_s", "memory_mb", "loss/clip", "loss/dino", "loss/ibot"} <= set(rows[1])
    from vtp_fast import load_pretrained

    m = load_pretrained(out / "checkpoint")
    assert m.config.train_clip and m.config.image_size == 32


@pytest.mark.parametrize("error", ["config", "input", "image", "checkpoint", "diverged", "value", "os", "key"])
def test_only_the_projects_own_errors_are_one_line(error, monkeypatch, capsys):
    from vtp_fast import cli
    from vtp_fast.config import ConfigError, InputError, UserError
    from vtp_fast.data.images import ImageError
    from vtp_fast.models.pretrained import CheckpointError
    from vtp_fast.train.loop import TrainingDiverged

    raised = {"config": ConfigError("optim.lr: bad"), "input": InputError("x.csv: no column path"),
              "image": ImageError("a.png: unreadable image"), "checkpoint": CheckpointError("m: truncated"),
              "diverged": TrainingDiverged("3 consecutive steps"), "value": ValueError("a bug"),
              "os": OSError("a bug too"), "key": KeyError("a bug as well")}[error]

    def boom(args):
        raise raised

    monkeypatch.delenv("VTP_FAST_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_info", boom)
    if error in ("value", "os", "key"):  # not a user error: it propagates, so the traceback is shown
        with pytest.raises(type(raised)):
            main(["info"])
        assert not isinstance(raised, cli.user_errors())
        return
    assert main(["info"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vtp-fast: error: {str(raised)}"]
    assert isinstance(raised, UserError) or error in ("image", "checkpoint")  # those two: see cli.user_errors


def _parsers(parser, path=("vtp-fast",)):
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_option_has_a_help_line_that_shows_its_default():
    from vtp_fast.cli import build_parser

    missing, silent = [], []
    for path, parser in _parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            name = f"{' '.join(path)} {action.option_strings or action.dest}"
            if action.dest == "help" or isinstance(action.choices, dict):  # -h, the subcommand list
                continue
            if not action.help:
                missing.append(name)
            has_default = action.default is not None and action.default is not False and action.default != []
            if has_default and "default" not in action.help and "%(default)" not in formatter._get_help_string(action):
                silent.append(name)
    assert not missing, missing
    assert not silent, silent


def test_overrides_may_follow_options():
    """`vtp-fast pretrain --resume auto run.steps=3`: dotted overrides after an option are overrides, not an
    error; a command without overrides still refuses them."""
    from vtp_fast.cli import parse

    args = parse(["pretrain", "--resume", "auto", "run.steps=3", "--config", "a.yaml", "objective.clip=0"])
    assert args.resume == "auto" and args.overrides == ["run.steps=3", "objective.clip=0"]
    assert args.config == ["a.yaml"]
    with pytest.raises(SystemExit):
        parse(["export", "ckpt", "--out", "x", "run.steps=3"])  # export takes no overrides
