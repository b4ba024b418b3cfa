"""Downstream: latent extraction, DiT training, sampling, evaluation commands and their bad-input errors (on a
synthetic emoji-format set: no network). The scaling study's tests are in tests/study/."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from vtp_fast import VTP, save_pretrained, vtp_config
from vtp_fast.cli import main
from vtp_fast.data.labelled import load_images
from vtp_fast.data.latents import load_latents
from vtp_fast.eval.latents import extract_latents
from vtp_fast.models.pretrained import check_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_pretrained(VTP(vtp_config("vtp-nano")), tmp_path_factory.mktemp("tok") / "nano")


def test_extract_train_sample_eval_from_the_command_line(emoji_env, tokenizer_dir, tmp_path, capsys):
    lat = tmp_path / "latents"
    assert main(["extract-latents", "--checkpoint", str(tokenizer_dir), "--data", "emoji:google,twitter",
                 "--out", str(lat)]) == 0
    latents = load_latents(lat)
    assert latents.shape == (2 * 24, 64, 4, 4)  # 24 images and their mirror images
    z, _ = latents.batch(torch.arange(len(latents)))  # normalised per batch with meta.json's statistics
    assert z.mean((0, 2, 3)).abs().max() < 1e-4 and (z.std((0, 2, 3)) - 1).abs().max() < 1e-2  # normalised
    assert latents.meta["class_names"] == ["circle", "square", "triangle"]

    out = tmp_path / "dit"
    assert main(["train-dit", f"latents={lat}", "preset=dit-nano", "overrides={in_channels: 64}", "run.steps=6",
                 "batch=8", "run.log_every=2", f"run.out_dir={out}"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6] and all(np.isfinite(r["loss/total"]) for r in rows)

    samples = tmp_path / "samples"
    assert main(["sample", "--dit", str(out / "dit"), "--checkpoint", str(tokenizer_dir), "--out", str(samples),
                 "--per-class", "2", "--steps", "3", "--solver", "heun", "--cfg-scale", "2.0", "--png"]) == 0
    npz = np.load(samples / "samples.npz")  # ADM's format: arr_0 uint8 NHWC images, arr_1 labels
    assert npz["arr_0"].shape == (6, 64, 64, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [0, 1, 2, 0, 1, 2]
    assert (samples / "grid.png").exists() and len(list((samples / "png").glob("*.png"))) == 6

    capsys.readouterr()
    assert main(["eval", "gfid", "--samples", str(samples / "samples.npz"), "--data", "emoji:google", "--n",
                 "6"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["gfid"] > 0 and result["n_fake"] == 6
    assert main(["eval", "probe", "--checkpoint", str(tokenizer_dir), "--data", "emoji:google,twitter",
                 "--test-data", "emoji:openmoji"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["probe_cls_meanpatch"] <= 1 and 0 <= result["probe_latent"] <= 1


def test_bad_input_is_refused_before_work(emoji_env, tokenizer_dir, tmp_path):
    data = load_images("emoji:google")
    lat = tmp_path / "latents"
    extract_latents(VTP(vtp_config("vtp-nano")).eval(), data, lat, progress=False)  # another tokenizer
    meta = load_latents(lat).meta
    from vtp_fast import load_pretrained

    with pytest.raises(ValueError, match="made by another tokenizer"):
        check_tokenizer(meta, load_pretrained(tokenizer_dir))
    with pytest.raises(ValueError, match="64 channels but the tokenizer makes 32"):
        check_tokenizer(meta, VTP(vtp_config("vtp-nano", vision_feature_bottleneck=32)))
    from vtp_fast.eval.evaluate import generation_scores

    with pytest.raises(ValueError, match="has 12 images, fewer than the 50"):
        generation_scores(torch.rand(50, 3, 64, 64), data, 50)
    # a DiT trained on other latents: the sampler refuses it with this tokenizer
    from vtp_fast.train.config import DiTRunConfig, DiTTrainConfig
    from vtp_fast.train.dit import generate, load_dit, train_dit

    train_dit(DiTTrainConfig(latents=str(lat), preset="dit-nano", overrides={"in_channels": 64}, batch=4,
                             run=DiTRunConfig(steps=2, out_dir=str(tmp_path / "dit"))))
    dit, dmeta = load_dit(tmp_path / "dit" / "dit")
    with pytest.raises(ValueError, match="another tokenizer"):
        generate(dit, dmeta, load_pretrained(tokenizer_dir), torch.tensor([0]))
    bad = tmp_path / "bad-labels"
    shutil.copytree(lat, bad)
    m = json.loads((bad / "meta.json").read_text())
    m["class_names"] = ["everything"]  # labels 0..2 no longer fit
    (bad / "meta.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="labels up to 2 but 1 class"):
        load_latents(bad)
    from vtp_fast.data.labelled import LabelledImages

    one_class = LabelledImages(data.images, torch.zeros_like(data.labels), ["everything"], data.captions, "one")
    unconditional = tmp_path / "uncond"
    tok = VTP(vtp_config("vtp-nano")).eval()
    extract_latents(tok, one_class, unconditional, progress=False)
    paths = train_dit(DiTTrainConfig(latents=str(unconditional), preset="dit-nano", overrides={"in_channels": 64},
                                     batch=4, cos_over="position",  # the LightningDiT recipe's options, CPU autocast
                                     run=DiTRunConfig(steps=1, out_dir=str(tmp_path / "dit-u"), precision="bf16")))
    row = json.loads(paths["metrics"].read_text().splitlines()[-1])
    assert math.isfinite(row["loss/total"]) and row["loss/cos"] > 0
    dit_u, meta_u = load_dit(tmp_path / "dit-u" / "dit")
    with pytest.raises(ValueError, match="guidance needs a class-conditional DiT"):
        generate(dit_u, meta_u, tok, torch.tensor([0]), cfg_scale=2.0)


def test_generative_probe_during_pretraining(emoji_env, tmp_path):
    from tests.train.test_pretrain import SMALL
    from vtp_fast.config import load_config
    from vtp_fast.downstream.generative_probe import generative_probe
    from vtp_fast.train.config import PretrainConfig
    from vtp_fast.train.pretrain import pretrain

    out = tmp_path / "run"
    root = emoji_env / "emoji" / "prepared-64"
    small = [o for o in SMALL if not o.startswith(("data.image_size", "ssl.views.global"))]
    pretrain(load_config(PretrainConfig, [], [*small, f"data.emoji.root={root}", "ssl.views.global_size=64",
                                              f"run.out_dir={out}", "run.steps=2", "run.generative_probe_every=2",
                                              "run.probe_images=12", "run.probe_dit_steps=3"]),
             generative_probe=generative_probe)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    probe = [r for r in rows if "gen_probe_gfid" in r]
    assert [r["step"] for r in probe] == [2] and np.isfinite(probe[0]["gen_probe_gfid"])
    assert (out / "gen_probe" / "step_00000002" / "dit" / "dit" / "model.safetensors").exists()
