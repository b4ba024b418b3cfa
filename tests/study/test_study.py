"""The scaling study: its config's checks, the report's statistics and claims, the time-left estimate, and every stage
end to end at tiny shapes (the CPU study and the GPU-scale study's dry run, on a synthetic emoji-format set)."""

import json

import numpy as np
import pytest

from vtp_fast.config import ConfigError
from vtp_fast.study import StudyConfig, dry_run, load_study, run_study
from vtp_fast.study.report import claims, compare, mean_std
from vtp_fast.study.run import Progress, Stage


@pytest.mark.parametrize("override, message", [
    ("budgets=[300,100]", "budgets"), ("budgets=[]", "budgets"), ("dit_curve=[100,200]", "dit_curve"),
    ("mixes=[rec,clip]", "unknown mix clip"), ("wide_budget=7", "wide_budget"), ("kid_subset_size=2000", "kid_subset"),
    ("dit_seeds=0", "dit_seeds")])
def test_config_refuses_a_study_that_cannot_run(override, message):
    with pytest.raises(ConfigError, match=message):
        load_study(None, [override])


def test_the_gpu_study_config_is_paper_scale():
    cfg = load_study("configs/study/vtp_s.yaml")
    assert cfg.budgets[-1] / cfg.budgets[0] >= 9 and len(cfg.budgets) >= 3
    assert cfg.samples == 10000 and cfg.dit_seeds >= 3 and cfg.tokenizer.endswith("vtp_s.yaml")
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
        assert [p["dit_steps"] for p in r["curve"]] == ([2, 4] if r["steps"] == 3 else [4])
    assert report["floor"]["n_real"] == 12 and np.isfinite(report["floor"]["gkid"])
    assert any(c["claim"].startswith("(instrument)") for c in report["claims"])
    assert report["compute_span"]["rec"] == pytest.approx(3.0, rel=1e-6)
    times = json.loads((out / "stage_seconds.json").read_text())
    # 7 pretrainings, the floor, 3 scoring stages per tokenizer, DiT seeds: 2 curve points for the 2 largest-budget
    # tokenizers, 1 for the other 5
    assert len(times) == 7 + 1 + 7 * 3 + 2 * 2 * 2 + 5 * 2 * 1
    assert report["seconds"] == pytest.approx(sum(times.values()))
    assert report["stage_seconds"] == times
    md = (out / "study.md").read_text()
    assert "Floor (real vs 12 other real images)" in md and "the paper's claims" in md
    for f in ("gkid_vs_compute.png", "gkid_vs_dit_steps.png", "channels.png", "reconstructions.png", "study.yaml"):
        assert (out / f).exists(), f
    # a second run reuses every stage's result: no stage's work is called again, and the rows are the same
    import vtp_fast.eval.evaluate
    import vtp_fast.eval.latents
    import vtp_fast.train.dit
    import vtp_fast.train.pretrain

    def redone(*args, **kwargs):
        raise AssertionError("a stage whose result exists was run again")

    for module, name in ((vtp_fast.train.pretrain, "pretrain"), (vtp_fast.train.dit, "train_dit"),
                         (vtp_fast.train.dit, "generate"), (vtp_fast.eval.latents, "extract_latents"),
                         (vtp_fast.eval.evaluate, "generation_scores"),
                         (vtp_fast.eval.evaluate, "reconstruction_scores")):
        monkeypatch.setattr(module, name, redone)
    run_study(cfg, tmp_path / "study")
    again = json.loads((out / "study.json").read_text())
    assert again["rows"] == report["rows"]
    assert again["seconds"] == report["seconds"]  # the study's time, not this invocation's (which ran no stage)


def test_gpu_study_dry_run_from_the_command_line(emoji_env, tmp_path, capsys):
    from vtp_fast.cli import main

    assert main(["study", "--config", "configs/study/vtp_s.yaml", "--dry-run", "--out", str(tmp_path / "s"),
                 "mixes=[rec]", "wide_channels=0"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours" in out and "A dry run" in out
    plan = json.loads((tmp_path / "s" / "gpu_plan.json").read_text())
    assert plan  # the planned GPU-hours of the real study (tests/study/test_plan.py checks the numbers)
    assert [r["name"] for r in json.loads((tmp_path / "s" / "study.json").read_text())["rows"]] == [
        "rec-1-c64", "rec-2-c64", "rec-3-c64"]
