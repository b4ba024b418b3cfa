"""The vtp-fast command: info, the main job (smoke), reconstruct, encode, and one-line errors on bad input."""

import json
import os
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


def test_encode_and_reconstruct_in_bf16(ckpt_dir, images, tmp_path):
    """--precision bf16: the fast path's latents near fp32's, stored as fp32; reconstruct writes its images."""
    exact, fast = tmp_path / "z.safetensors", tmp_path / "z16.safetensors"
    assert main(["encode", *images, "--checkpoint", str(ckpt_dir), "--out", str(exact)]) == 0
    assert main(["encode", *images, "--checkpoint", str(ckpt_dir), "--out", str(fast), "--precision", "bf16"]) == 0
    z, z16 = load_file(exact)["latents"], load_file(fast)["latents"]
    assert z16.dtype == torch.float32 and not torch.equal(z, z16)
    torch.testing.assert_close(z16, z, rtol=0.05, atol=0.05 * z.abs().max().item())
    out = tmp_path / "rec"
    assert main(["reconstruct", *images, "--checkpoint", str(ckpt_dir), "--out", str(out), "--precision", "bf16"]) == 0
    assert Image.open(out / "img0_recon.png").size == (48, 32)


@pytest.mark.parametrize("problem", ["size", "missing", "pickle", "truncated", "missing_key"])
def test_bad_input_is_one_clear_line_and_writes_nothing(problem, ckpt_dir, images, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir, ckpt)
    out = tmp_path / "out"
    out.mkdir()
    (out / "img0_recon.png").write_bytes(b"keep me")
    imgs = list(images)
    expect = {"size": "--size 100: must be a multiple of the patch size 16 (e.g. 96 or 112)",
              "missing": "no such file", "pickle": "pickle", "truncated": "truncated",
              "missing_key": "missing keys (1): trunk.norm.weight"}[problem]
    if problem == "size":
        imgs += ["--size", "100"]
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
    fit = ["--max-side", "300"] if resize == "fit" else []  # refused otherwise: it would be ignored
    assert main(["reconstruct", str(photo), "--checkpoint", str(ckpt_dir), "--out", str(out), "--resize", resize,
                 *fit]) == 0
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
    from vtp_fast.eval import codec

    monkeypatch.setattr(codec, "PIXEL_BUDGET", 40 * 40)
    photo = _photo(tmp_path / "big.png", 64, 48)
    assert main(["reconstruct", str(photo), "--checkpoint", str(ckpt_dir), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^vtp-fast: warning: 1 image\(s\) above .* big.png \(64x48\); about [\d.]+ (s|min) on cpu "
                     r"\(expected within a factor of 2", err, flags=re.M), err


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
    from vtp_fast.cli import codec
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
    monkeypatch.setattr(codec, "cmd_info", boom)
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


# -------------------------------------------------------------- issue 20: what a new user met on the command line
def _exit_code(argv) -> int:
    """main's return code, or argparse's exit code for an option it refuses."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _checkpoint_run(ckpt_dir, run: Path, steps=(12,)) -> Path:
    """A run directory whose checkpoints (the full format: model/ in the published layout) hold `ckpt_dir`."""
    import shutil

    for step in steps:
        shutil.copytree(ckpt_dir, run / "checkpoints" / f"step_{step:08d}" / "model")
    return run


@pytest.mark.parametrize("command, target, expect", [
    ("reconstruct", "taken", "exists and is not a folder"),
    ("reconstruct", "taken/out", "taken is a file, not a folder"),
    ("encode", "dir", "is a folder (name a file in it)"),
    ("export", "dir", "a folder that is not empty; --force replaces it")])
def test_out_problems_are_one_line_said_before_any_work(command, target, expect, tmp_path, capsys):
    """The checkpoint named does not exist, so an --out error shows that it was found before the checkpoint was
    read; what --out names is left as it was."""
    (tmp_path / "taken").write_text("keep me")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "keep").write_text("keep me")
    ckpt = str(tmp_path / "no-checkpoint")
    head = ["export", ckpt] if command == "export" else [command, str(tmp_path / "x.png"), "--checkpoint", ckpt]
    assert main([*head, "--out", str(tmp_path / target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert err[0].startswith(f"vtp-fast: error: --out {tmp_path / target}: ")
    assert (tmp_path / "taken").read_text() == "keep me" and [p.name for p in (tmp_path / "dir").iterdir()] == ["keep"]


def test_export_names_the_step_and_replaces_an_output_only_with_force(ckpt_dir, tmp_path, capsys):
    run = _checkpoint_run(ckpt_dir, tmp_path / "run", steps=(4, 12))
    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert re.search(r"step 12\b", capsys.readouterr().out)  # a run directory: its newest checkpoint
    older = str(run / "checkpoints" / "step_00000004")
    assert _exit_code(["export", older, "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", older, "--out", str(out), "--force"]) == 0
    assert re.search(r"step 4\b", capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_unreadable_images_are_skipped_named_and_counted(ckpt_dir, tmp_path, capsys):
    """One warning line per bad image (no Python file and line), the others processed, the count at the end."""
    from tests.helpers import png_with_bad_pixels

    folder = tmp_path / "photos"
    folder.mkdir()
    _photo(folder / "a.png", 48, 32)
    _photo(folder / "b.png", 48, 32, seed=1)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # its header does not read
    (folder / "pixels.png").write_bytes(png_with_bad_pixels())  # its header reads, its pixels do not
    out = tmp_path / "out"
    r = run_cli("reconstruct", str(folder), "--checkpoint", str(ckpt_dir), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a_recon.png", "b_recon.png", "grid.png"]
    lines = [line for line in r.stderr.splitlines() if line.strip() and "reconstruct:" not in line]  # no bar
    assert len(lines) == 3, r.stderr
    assert lines[0].startswith(f"vtp-fast: warning: {folder / 'broken.png'}: unreadable image (")
    assert lines[1].startswith(f"vtp-fast: warning: {folder / 'pixels.png'}: unreadable image (")
    assert lines[0].endswith("; skipped") and lines[1].endswith("; skipped")
    assert lines[2] == "2 of 4 images skipped (unreadable, named above)"
    z = tmp_path / "z.safetensors"
    assert main(["encode", str(folder), "--checkpoint", str(ckpt_dir), "--out", str(z)]) == 0
    assert load_file(z)["latents"].shape[0] == 2
    assert "2 of 4 images skipped" in capsys.readouterr().err


def test_outputs_get_the_users_umask(ckpt_dir, images, tmp_path):
    """safetensors' save_file makes its files 0o600 and exported folders were 0o700: outputs follow the umask."""
    import stat

    run = _checkpoint_run(ckpt_dir, tmp_path / "run")
    old = os.umask(0o027)
    try:
        assert main(["encode", *images, "--checkpoint", str(ckpt_dir), "--out", str(tmp_path / "z.safetensors")]) == 0
        assert main(["reconstruct", *images, "--checkpoint", str(ckpt_dir), "--out", str(tmp_path / "rec")]) == 0
        assert main(["export", str(run), "--out", str(tmp_path / "exported")]) == 0
    finally:
        os.umask(old)

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(tmp_path / "z.safetensors") == 0o640
    assert {mode(p) for p in (tmp_path / "rec").iterdir()} == {0o640} and mode(tmp_path / "rec") == 0o750
    assert {mode(p) for p in (tmp_path / "exported").iterdir()} == {0o640} and mode(tmp_path / "exported") == 0o750


@pytest.mark.parametrize("options, expect", [
    (["--max-side", "300"], "--max-side 300: applies to --resize fit only"),
    (["--resize", "fit", "--max-side", "0"], "argument --max-side: '0': expected an integer of at least 1"),
    (["--size", "64", "--resize", "crop"], "--size replaces --resize"),
    (["--batch", "0"], "argument --batch: '0': expected an integer of at least 1")])
def test_image_options_that_would_be_ignored_are_refused(options, expect, ckpt_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert _exit_code(["reconstruct", *images, "--checkpoint", str(ckpt_dir), "--out", str(out), *options]) == 2
    assert expect in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("options, expect", [
    (["--short-side", "0"], "argument --short-side: '0': expected an integer of at least 1"),
    (["--max-side", "-5"], "argument --max-side: '-5': expected an integer of at least 1"),
    (["--per-shard", "0"], "argument --per-shard: '0': expected an integer of at least 1"),
    (["--quality", "0"], "argument --quality: '0': expected an integer from 1 to 100"),
    (["--size", "32"], "--size and --styles apply to the emoji set")])
def test_shard_options_that_would_be_ignored_are_refused(options, expect, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    _photo(folder / "a.png", 48, 32)
    out = tmp_path / "shards"
    assert _exit_code(["data", "shards", str(folder), "--out", str(out), *options]) == 2
    assert expect in capsys.readouterr().err
    assert not out.exists()


def test_encode_help_does_not_speak_of_decoding():
    from vtp_fast.cli import build_parser

    helps = {path[-1]: {a.dest: a.help for a in p._actions} for path, p in _parsers(build_parser())}
    assert "decod" not in helps["encode"]["resize"]
    assert "cropped back after decoding" in helps["reconstruct"]["resize"]


def test_the_large_image_estimate_holds_across_runs(ckpt_dir, capsys):
    """Two estimates for a 6000 x 4000 image (the old ones: 1,607.5, 18.6 and 0.9 min) agree within the error the
    message states."""
    import argparse
    import warnings

    from vtp_fast import load_pretrained
    from vtp_fast.eval import codec

    model = load_pretrained(ckpt_dir).requires_grad_(False)
    args = argparse.Namespace(resize="pad", size=None, max_side=1024)
    notes = []
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            codec.warn_large(model, [(Path("big.jpg"), (6000, 4000))], args, 16)
        notes.append(capsys.readouterr().err + "".join(str(w.message) for w in caught))
    found = [re.search(r"about ([\d.]+) (s|min) on cpu \(expected within a factor of ([\d.]+)", n) for n in notes]
    assert all(found), notes
    seconds = [float(m[1]) * (60 if m[2] == "min" else 1) for m in found]
    assert max(seconds) / min(seconds) <= float(found[0][3]), notes


def test_sigterm_stops_a_large_image_within_two_seconds(ckpt_dir, tmp_path):
    """4096 x 3072 pixels are 49,152 tokens: one attention operation of vtp-nano runs for seconds on 2 cores, and a
    signal handler waits for the operation it interrupts. The forward runs in a worker thread, so SIGTERM ends the
    command at once: staging folder removed, one line, no traceback."""
    import signal
    import time

    photo = _photo(tmp_path / "big.jpg", 4096, 3072)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "vtp_fast.cli", "reconstruct", str(photo), "--checkpoint",
                             str(ckpt_dir), "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stderr:  # the forward starts right after the large image is announced
        if "above 4 MP" in line:
            break
    time.sleep(3)  # decoded, and inside the first attention operation (11 s here)
    assert proc.poll() is None, "finished before it could be stopped"
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    proc.wait(timeout=120)
    took = time.monotonic() - start
    assert proc.returncode == 2 and "vtp-fast: error: interrupted" in err and "Traceback" not in err, err
    assert took < 2.0, f"stopped {took:.1f} s after SIGTERM"
    assert not list(out.glob(".reconstruct-*"))


def test_no_cuda_home_note_on_a_machine_without_a_gpu(tmp_path):
    """torch.compile on a CPU imports torch.utils.cpp_extension, which logged 'No CUDA runtime is found, using
    CUDA_HOME=...' (vtp-fast bench)."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    r = subprocess.run([sys.executable, "-c", "import vtp_fast.cli, torch.utils.cpp_extension"], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "CUDA_HOME": str(tmp_path)})
    assert r.returncode == 0 and "No CUDA runtime" not in r.stderr, r.stderr
