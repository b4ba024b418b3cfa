"""Issue 10, end to end: pretraining on shards that hold corrupt PNGs starts, is interrupted and resumes with
`--resume auto` under every decoder, and the distinct bad-sample count continues across the resume."""

import json
import shutil
import warnings

import numpy as np
import pytest

from tests.data.test_decoders import require_dali
from tests.helpers import png_with_bad_pixels, random_png
from vtp_fast.config import load_config
from vtp_fast.data.shards import Sample, write_shards
from vtp_fast.eval.evaluate import held_out_scores
from vtp_fast.train.config import PretrainConfig
from vtp_fast.train.pretrain import pretrain

SMALL = ["model.preset=vtp-nano", "data.image_size=32", "data.eval_images=4", "batch.size=8", "batch.ssl=2",
         "batch.rec=2", "ssl.views.global_size=32", "ssl.views.local_size=16", "ssl.views.local_crops=1",
         "ssl.prototypes=64", "ssl.hidden=32", "ssl.bottleneck=16", "objective.perceptual=0", "run.log_every=1",
         "run.eval_every=100", "run.tensorboard=false", "run.threads=1", "run.steps=4", "run.checkpoint_every=2",
         "run.keep_checkpoints=3"]


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory):
    rng = np.random.default_rng(0)
    samples = [Sample(random_png(rng, 40), "png", f"a picture number {i}") for i in range(12)]
    samples[2] = Sample(samples[2].image[: len(samples[2].image) // 2], "png", "a truncated png")
    samples[7] = Sample(png_with_bad_pixels(), "png", "a png with garbage pixels")
    samples[10] = Sample(samples[10].image, "png", None)
    out = tmp_path_factory.mktemp("corrupt")
    write_shards(samples, out, per_shard=5, progress=False)
    return out


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("decoder", ["torchvision", "dali", pytest.param("nvjpeg", marks=pytest.mark.cuda)])
def test_corrupt_pngs_first_start_and_resume(corrupt_shards, tmp_path, decoder, capfd):
    if decoder == "dali":
        require_dali()
    args = [*SMALL, f"data.shards={corrupt_shards}", f"data.decoder={decoder}"]
    full = tmp_path / "full"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pretrain(load_config(PretrainConfig, [], [*args, f"run.out_dir={full}"]), held_out_scores)
    header, err = capfd.readouterr()
    # the header's check reads captions, image headers, PNG checksums and whether a PNG's pixel stream inflates:
    # the garbage-pixel PNG is found there, before any decoder (DALI's libpng printed a line of its own for it)
    assert "9 usable pairs (12 samples, 3 bad: corrupt_image 2, no_caption 1)" in header
    assert "libpng" not in err
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_00000004")  # killed after the checkpoint of step 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pretrain(load_config(PretrainConfig, [], [*args, f"run.out_dir={part}", "run.resume=auto"]), held_out_scores)
    assert "resuming at step 2" in capfd.readouterr().out

    def counts(out):
        return {r["step"]: {k: v for k, v in r.items() if k.startswith("data/bad")} for r in rows(out)
                if "loss/total" in r}

    a, b = counts(full), counts(part)
    assert a == b, (a, b)  # the resumed run continues the count (it restarted at 0 before)
    assert a[4]["data/bad_samples"] == 3  # 4 steps x 8 = 32 draws, more than two epochs: every bad one, once
    assert a[4]["data/bad_samples/corrupt_image"] == 2 and a[4]["data/bad_samples/no_caption"] == 1
