"""The scaling study: its config's checks, the report's statistics and claims, the time-left estimate, and every stage
end to end at tiny shapes (the CPU study and the GPU-scale study's dry run, on a synthetic emoji-format set; the GPU
study's from an image folder tree with an ADM-format reference batch, as on the cluster)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vtp_fast.config import ConfigError
from vtp_fast.study import StudyConfig, dry_run, load_study, run_study
from vtp_fast.study.report import claims, compare, mean_std, over_seeds
from vtp_fast.study.run import Progress, Stage


@pytest.mark.parametrize("override, message", [
    ("budgets=[300,100]", "budgets"), ("budgets=[]", "budgets"), ("dit_curve=[100,200]", "dit_curve"),
    ("mixes=[rec,clip]", "unknown mix clip"), ("wide_budget=7", "wide_budget"), ("kid_subset_size=2000", "kid_subset"),
    ("dit_seeds=0", "dit_seeds"), ("samples=3", "samples"), ("sample_chunk=0", "sample_chunk"),
    ("inception_precision=fp16", "inception_precision"),
    ("sample_classes=uniform", "sample_classes")])
def test_config_refuses_a_study_that_cannot_run(override, message):
    with pytest.raises(ConfigError, match=message):
        load_study(None, [override])


def test_the_gpu_study_config_is_paper_scale():
    cfg = load_study("configs/study/vtp_s.yaml")
    assert cfg.budgets[-1] / cfg.budgets[0] >= 9 and len(cfg.budgets) >= 3
    assert cfg.dit_seeds >= 3 and cfg.tokenizer.endswith("vtp_s.yaml")
    # the full protocol: every image of the labelled set, FID-50K against ADM's reference batch, exact Inception
    assert cfg.max_images == 0 and cfg.samples == 50000 and cfg.samples % 1000 == 0  # 50 samples of each class
    assert cfg.adm_reference.endswith("VIRTUAL_imagenet256_labeled.npz") and cfg.inception_precision == "fp32"
    assert cfg.sample_classes == "balanced"
    default = StudyConfig()
    assert default.budgets[-1] / default.budgets[0] >= 9 and default.dit_seeds >= 3 and default.samples >= 500


def test_mean_std_and_the_band_of_a_difference():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    a = {"gkid": 0.10, "gkid_std": 0.01, "seeds": 3}
    b = {"gkid": 0.05, "gkid_std": 0.01, "seeds": 3}
    d = compare(a, b)
    assert d["diff"] == pytest.approx(-0.05) and d["band"] == pytest.approx(2 * np.sqrt(2 * 0.01 ** 2 / 3))
    assert d["beyond_noise"]
    assert not compare(a, {"gkid": 0.09, "gkid_std": 0.01, "seeds": 3})["beyond_noise"]
    assert compare({"psnr": 15.0}, {"psnr": 16.0}, "psnr")["band"] is None  # measured once: no band


def test_a_figure_a_seed_could_not_compute_has_no_mean():
    assert over_seeds([{"sfid": 1.0}, {"sfid": 3.0}], "sfid") == {"sfid": 2.0, "sfid_std": pytest.approx(2 ** 0.5),
                                                                 "sfid_seeds": [1.0, 3.0]}
    none = over_seeds([{"inception_score": None}, {"inception_score": 3.0}], "inception_score")
    assert none["inception_score"] is None and none["inception_score_std"] is None
    assert over_seeds([{}], "recall")["recall"] is None  # a result written before the figure existed


def test_features_are_kept_once_and_read_back_equal(tmp_path):
    import torch

    from vtp_fast.eval.adm import SetFeatures
    from vtp_fast.study.scoring import kept

    rng = np.random.default_rng(0)
    pool = torch.from_numpy(rng.standard_normal((5, 2048)).astype(np.float32))
    stats = {"pool": (rng.standard_normal(2048), rng.standard_normal((2048, 2048))), "spatial": None}
    made = []

    def compute():
        made.append(1)
        return SetFeatures(5, pool, stats, ("pool",), skipped=2)

    first = kept(tmp_path, "five images", compute)
    again = kept(tmp_path, "five images", compute)
    assert len(made) == 1 and first is not again and torch.equal(again.pool, pool)
    assert np.array_equal(again.stats["pool"][1], stats["pool"][1]) and again.stats["spatial"] is None
    assert (again.n, again.skipped, again.precomputed) == (5, 2, ("pool",))
    kept(tmp_path, "other images", compute)  # another set: its own file
    assert len(made) == 2 and len(list(tmp_path.glob("*.npz"))) == 2


def test_a_set_cut_to_its_first_images_and_labels_read_without_a_label_table():
    import torch

    from vtp_fast.data.labelled import LabelledImages
    from vtp_fast.study.scoring import First, first, labels_of, real_images

    images = torch.arange(10 * 2 * 2 * 3, dtype=torch.int32).to(torch.uint8).view(10, 2, 2, 3)
    mem = LabelledImages(images, torch.arange(10) % 3, ["a", "b", "c"], [], "mem")
    cut = first(mem, 4)
    assert isinstance(cut, LabelledImages) and len(cut) == 4 and cut.name == "mem-first4"
    assert first(mem, 0) is mem and first(mem, 20) is mem

    class Decoded:  # a source decoded on demand with no label table (as labelled shards)
        name, size, class_names = "decoded", 2, None

        def __len__(self):
            return 10

        def fetch(self, ids):
            return mem.fetch(ids)

    cut = first(Decoded(), 4)
    assert isinstance(cut, First) and len(cut) == 4 and cut.labels is None
    assert labels_of(cut, torch.tensor([3, 1]), 0).tolist() == [0, 1]  # read with the images
    assert labels_of(mem, torch.tensor([5, 4]), 0).tolist() == [2, 1]  # from the table
    stream = real_images(cut, torch.tensor([2, 0, 3]), 0)
    got = list(stream.batches(1, 3, 1))  # images 1 and 2 of the stream: ids 0 and 3, (1, 3, 2, 2) each
    assert len(stream) == 3 and [b.shape for b in got] == [(1, 3, 2, 2)] * 2
    assert torch.equal(got[1][0], images[3].permute(2, 0, 1))


def test_claims_read_the_rows_the_right_way_round():
    cfg = StudyConfig(mixes=("rec", "clip+ssl+ae"), budgets=(1, 3, 9), wide_channels=0)

    def row(mix, steps, gkid, psnr, curve=None):
        r = {"name": f"{mix}-{steps}", "mix": mix, "steps": steps, "channels": 64, "gkid": gkid, "gkid_std": 0.001,
             "seeds": 3, "psnr": psnr, "curve": curve or [{}]}
        return r

    curve = [{"dit_steps": 10, "gkid": 0.3, "gkid_std": 0.01, "seeds": 3},
             {"dit_steps": 20, "gkid": 0.1, "gkid_std": 0.01, "seeds": 3}]
    rows = [row("rec", 1, 0.20, 15.0), row("rec", 9, 0.21, 21.0), row("clip+ssl+ae", 1, 0.2, 14.0),
            row("clip+ssl+ae", 9, 0.1, 17.0, curve)]
    found = {c["claim"]: c["verdict"] for c in claims(cfg, rows)}
    assert found["reconstruction-only scaling improves reconstruction"] == "held (one run each, no band)"
    assert found["reconstruction-only scaling improves generation"] == "did not hold"  # gKID up is worse
    assert found["clip+ssl+ae generates better than reconstruction only"] == "held"
    assert found["clip+ssl+ae improves generation with tokenizer compute"] == "held"
    assert found["(instrument) the best tokenizer's DiT improves along its training"] == "held"
    rows[1]["gkid"] = 0.2005  # within 2 standard errors
    assert {c["claim"]: c["verdict"] for c in claims(cfg, rows)}[
        "reconstruction-only scaling improves generation"] == "within the noise"


def test_time_left_follows_what_each_kind_of_stage_measured(tmp_path, monkeypatch, capsys):
    clock = iter([0.0, 0.0, 0.0, 30.0, 30.0, 30.0, 31.0])  # start; per stage: line, start, end
    monkeypatch.setattr("vtp_fast.study.run.time.perf_counter", lambda: next(clock))
    done = tmp_path / "done.json"
    done.write_text("{}")
    stages = [Stage("done already", "a", 99.0, done, lambda: None),
              Stage("first", "a", 10.0, tmp_path / "1", lambda: None),  # measured 30 s: kind a runs 3x slower
              Stage("second", "a", 10.0, tmp_path / "2", lambda: None),
              Stage("third", "b", 60.0, tmp_path / "3", lambda: None)]
    p = Progress(stages)
    assert p.total == 4 and p.done == 1 and p.left() == 80.0  # a finished stage costs nothing
    p.run(stages[1])
    assert p.left() == pytest.approx(3 * 10.0 + 60.0)
    p.run(stages[2])
    out = capsys.readouterr().out
    assert "study [2/4] first | 0.0 min elapsed, about 1 min left" in out
    assert "study [3/4] second | 0.5 min elapsed, about 2 min left" in out


def test_stage_times_add_up_over_invocations_an_interrupted_stage_included(tmp_path, monkeypatch):
    clock = iter([0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 7.0, 20.0, 20.0, 20.0, 23.0])  # init; per stage: line, start, end
    monkeypatch.setattr("vtp_fast.study.run.time.perf_counter", lambda: next(clock))
    times = tmp_path / "stage_seconds.json"

    def interrupted():
        raise KeyboardInterrupt

    first = Progress([Stage("a", "k", 1.0, tmp_path / "a", lambda: (tmp_path / "a").write_text("{}")),
                      Stage("b", "k", 1.0, tmp_path / "b", interrupted)], times)
    first.run(first.todo[0])
    with pytest.raises(KeyboardInterrupt):
        first.run(first.todo[0])
    assert json.loads(times.read_text()) == {"a": 5.0, "b": 2.0}  # b's 2 s before the interrupt are kept
    again = Progress([Stage("a", "k", 1.0, tmp_path / "a", lambda: None),
                      Stage("b", "k", 1.0, tmp_path / "b", lambda: None)], times)
    assert [s.name for s in again.todo] == ["b"]
    again.run(again.todo[0])
    assert json.loads(times.read_text()) == {"a": 5.0, "b": 5.0}


def test_dry_run_runs_every_stage_and_resumes_without_redoing_any(emoji_env, tmp_path, monkeypatch):
    cfg = dry_run(StudyConfig())
    out = run_study(cfg, tmp_path / "study")
    report = json.loads((out / "study.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["rec-1-c64", "clip+ssl+ae-1-c64", "rec-2-c64", "clip+ssl+ae-2-c64", "rec-3-c64",
                     "clip+ssl+ae-3-c64", "clip+ssl+ae-2-c256"]  # the wide tokenizer at the middle budget
    for r in report["rows"]:
        assert r["seeds"] == 2 and len(r["gkid_seeds"]) == 2 and r["gkid_std"] >= 0
        assert np.isfinite([r["rfid"], r["rkid"], r["gfid"], r["gkid"], r["ceiling_gkid"], r["psnr"]]).all()
        assert ("zero_shot_top1" in r) == ("clip" in r["mix"]) and r["tokenizer_gflops"] > 0
        assert r.get("zero_shot_classes", "captions") == "captions" and 0 <= r["probe_cls_meanpatch"] <= 1
        assert not (out / r["name"] / "features").exists()  # the probe's stored features, removed once scored
        assert [p["dit_steps"] for p in r["curve"]] == ([2, 4] if r["steps"] == 3 else [4])
        assert_adm_figures(r)
    assert report["floor"]["n_real"] == 12 and report["floor"]["n_fake"] == 12 and np.isfinite(report["floor"]["gkid"])
    # latents in shards of 32 images (the synthetic set's 36 labelled images: 2 shards, each with its mirrors)
    meta = json.loads((out / "rec-3-c64" / "latents" / "meta.json").read_text())
    assert [s["count"] for s in meta["shards"]] == [64, 8] and meta["count"] == 72
    # the sampler's ADM .npz: 12 images in chunks of 5, kept (keep_samples), one per reference image's class
    # (sample_classes: data, the CPU study's default)
    from vtp_fast.data.labelled import open_images
    from vtp_fast.eval.evaluate import pick

    train = open_images(cfg.data, 64)
    with np.load(out / "rec-3-c64" / "dit-s1" / "samples-4" / "samples.npz") as z:
        assert z["arr_0"].shape == (12, 64, 64, 3) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].tolist() == train.labels[pick(train, 12)].tolist()
    assert any(c["claim"].startswith("(instrument)") for c in report["claims"])
    assert report["compute_span"]["rec"] == pytest.approx(3.0, rel=1e-6)
    times = json.loads((out / "stage_seconds.json").read_text())
    # 7 pretrainings, the floor, 3 scoring stages per tokenizer, DiT seeds: 2 curve points for the 2 largest-budget
    # tokenizers, 1 for the other 5
    assert len(times) == 7 + 1 + 7 * 3 + 2 * 2 * 2 + 5 * 2 * 1
    assert report["seconds"] == pytest.approx(sum(times.values()))
    assert report["stage_seconds"] == times
    md = (out / "study.md").read_text()
    assert "Floor (12 real images against the reference)" in md and "the paper's claims" in md
    assert "against 12 real images of the labelled set" in md and "| sFID | IS | precision | recall |" in md
    for f in ("gkid_vs_compute.png", "gkid_vs_dit_steps.png", "channels.png", "reconstructions.png", "study.yaml"):
        assert (out / f).exists(), f
    # a second run reuses every stage's result: no stage's work is called again, and the rows are the same
    import vtp_fast.downstream.sample
    import vtp_fast.eval.adm
    import vtp_fast.eval.classify
    import vtp_fast.eval.features
    import vtp_fast.eval.latents
    import vtp_fast.study.scoring
    import vtp_fast.train.dit
    import vtp_fast.train.pretrain

    def redone(*args, **kwargs):
        raise AssertionError("a stage whose result exists was run again")

    for module, name in ((vtp_fast.train.pretrain, "pretrain"), (vtp_fast.train.dit, "train_dit"),
                         (vtp_fast.downstream.sample, "sample_images"), (vtp_fast.eval.latents, "extract_latents"),
                         (vtp_fast.eval.adm, "extract_features"), (vtp_fast.study.scoring, "extract_features"),
                         (vtp_fast.eval.classify, "probe_eval"), (vtp_fast.eval.features, "extract_features")):
        monkeypatch.setattr(module, name, redone)
    run_study(cfg, tmp_path / "study")
    again = json.loads((out / "study.json").read_text())
    assert again["rows"] == report["rows"]
    assert again["seconds"] == report["seconds"]  # the study's time, not this invocation's (which ran no stage)


def assert_adm_figures(r: dict) -> None:
    """A row's ADM suite beside gKID / gFID: sFID, precision and recall over the seeds and of the ceiling; the
    Inception Score null with its reason (the offline Inception weights have no head)."""
    assert np.isfinite([r["sfid"], r["sfid_std"], r["ceiling_sfid"]]).all() and len(r["sfid_seeds"]) == 2
    for key in ("precision", "recall", "ceiling_precision", "ceiling_recall"):
        assert 0 <= r[key] <= 1, key
    assert r["inception_score"] is None and "no classification head" in r["inception_score_unavailable"]


def image_folder(root: Path, spec: str) -> Path:
    """The emoji set `spec` as an ImageFolder tree (root/<category>/<i>.png), read back by the study streamed."""
    from vtp_fast.data.labelled import open_images

    data = open_images(spec, 64)
    for i, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
        folder = root / data.class_names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.numpy()).save(folder / f"{i:03d}.png")
    return root


def test_gpu_study_dry_run_from_the_command_line(emoji_env, tmp_path, capsys):
    """The GPU config's dry run on data as the cluster holds it: labelled and held-out image folder trees (decoded
    on demand, streamed) and an ADM-format reference batch (arr_0 uint8 (N, H, W, 3)), kept by the dry run because
    they are on this machine; samples removed once scored (keep_samples: false)."""
    from vtp_fast.cli import main

    train = image_folder(tmp_path / "train", "emoji:google,twitter,fluent")
    held = image_folder(tmp_path / "val", "emoji:openmoji")
    ref = tmp_path / "VIRTUAL_tiny.npz"
    images = np.stack([np.asarray(Image.open(p)) for p in sorted(train.glob("*/*.png"))[::2]])  # (18, 64, 64, 3)
    np.savez(ref, arr_0=images)
    assert main(["study", "--config", "configs/study/vtp_s.yaml", "--dry-run", "--out", str(tmp_path / "s"),
                 "mixes=[clip+ssl+ae]", "wide_channels=0", f"data={train}", f"held_out={held}",
                 f"adm_reference={ref}"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours" in out and "A dry run" in out
    plan = json.loads((tmp_path / "s" / "gpu_plan.json").read_text())
    assert plan  # the planned GPU-hours of the real study (tests/study/test_plan.py checks the numbers)
    assert plan["images"]["labelled"] == 1_281_167  # no cap: all of ImageNet train (assumed size)
    report = json.loads((tmp_path / "s" / "study.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["clip+ssl+ae-1-c64", "clip+ssl+ae-2-c64", "clip+ssl+ae-3-c64"]
    assert report["config"]["data"] == str(train) and report["config"]["adm_reference"] == str(ref)
    for r in report["rows"]:
        assert_adm_figures(r)
        assert r["curve"][-1]["gkid_seeds"] and np.isfinite(r["gfid"])
        # a folder has no captions: zero-shot among its class names (the folders), on stored features
        assert r["zero_shot_classes"] == "set" and r["zero_shot_chance"] == pytest.approx(1 / 3)
    floor = report["floor"]
    assert floor["n_real"] == 18 and floor["n_fake"] == 12  # the reference batch's images; samples of the train set
    meta = json.loads((tmp_path / "s" / "clip+ssl+ae-3-c64" / "latents" / "meta.json").read_text())
    assert meta["data"].startswith("folder-") and len(meta["shards"]) == 2  # decoded from the tree, in shards
    samples = tmp_path / "s" / "clip+ssl+ae-3-c64" / "dit-s0" / "samples-4"
    assert not (samples / "samples.npz").exists()  # removed once scored
    assert json.loads((samples / "samples.json").read_text())["manifest"]["classes"] == [0, 1, 2]  # balanced
    assert "ADM's reference batch" in (tmp_path / "s" / "study.md").read_text()
