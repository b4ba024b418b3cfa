"""The study's GPU-hour plan: the scaled tokenizer step equals a direct count at the configured batch, the CLIP
logits term matches its closed form, GPU-hours scale exactly with budgets / seeds / samples, measured MFU rows
replace the assumed ones, and the markdown lists every stage kind."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vtp_fast.measure.perf_model import PEAK_FLOPS
from vtp_fast.measure.study_flops import MAX_BASE, base_batch
from vtp_fast.study import StudyConfig
from vtp_fast.study import plan as plan_mod
from vtp_fast.study.plan import KINDS, gpu_plan, plan_markdown
from vtp_fast.study.run import tokenizer_step

# A tiny tokenizer at a batch whose smallest same-ratio batch (4 : 1 : 2) is 1/8 of it: the plan counts at 4 pairs
# and scales to 32, the test counts at 32 directly.
TINY = ["model.preset=vtp-nano", "model.init=null", "data.image_size=64", "batch.size=32", "batch.ssl=8",
        "batch.rec=16", "ssl.prototypes=64", "ssl.hidden=32", "ssl.bottleneck=16", "ssl.views.global_size=64",
        "ssl.views.local_size=32", "ssl.views.local_crops=2", "objective.perceptual=0"]
TINY_DIT = ["preset=dit-nano", "batch=16"]


def tiny_study(**kw) -> StudyConfig:
    base = dict(tokenizer_overrides=TINY, dit_overrides=TINY_DIT, mixes=("rec", "clip+ssl+ae"), wide_channels=0,
                max_images=1000)
    return StudyConfig(**{**base, **kw})


def direct_step_flops(cfg: StudyConfig, mix: str) -> int:
    """One step at the configured batch, counted here without the plan's scaling (same trainer, meta device,
    iBOT masks at their expected size so the count does not depend on the random masks)."""
    from vtp_fast.data.pairs import synthetic_pairs
    from vtp_fast.data.step_batches import StepBatches
    from vtp_fast.ops.registry import building_for
    from vtp_fast.study.run import pretrain_config
    from vtp_fast.train.trainer import _build_trainer, forward_backward, schedules

    p = pretrain_config(cfg, Path("/nonexistent"), mix, 1, cfg.channels)
    p.run.compile, p.run.precision = False, "fp32"
    meta = torch.device("meta")
    with building_for("cpu"), meta:
        t = _build_trainer(p, meta)
    pairs = synthetic_pairs(2 * p.batch.size, p.data.image_size, t.model.config.text_context_length)
    batch = StepBatches(pairs, t.shape, p.ssl.views, seed=0, trim_text=False)[0]
    if p.batch.ssl:
        v = p.ssl.views
        masks = torch.zeros_like(batch.masks)
        masks[:, :round(masks.shape[1] * v.mask_probability * (v.mask_ratio[0] + v.mask_ratio[1]) / 2)] = True
        batch.set_masks(masks)
    batch = batch.to(meta)
    with FlopCounterMode(display=False) as counter:
        forward_backward(t, [batch], schedules(p, 0))
    return counter.get_total_flops()


@pytest.mark.parametrize("mix, koleo, rel", [
    ("rec", 0.1, 1e-9), ("clip+ssl+ae", 0.0, 1e-9),
    # KoLeo's pairwise distances are quadratic in the per-rank SSL batch and scaled linearly by the plan: the only
    # term left off (2 views x n^2 x D x 2 FLOPs: 14 kFLOP of 1.4 GFLOP here, 1e-5)
    ("clip+ssl+ae", 0.1, 1e-4)])
def test_scaled_step_equals_a_direct_count_at_the_configured_batch(mix, koleo, rel):
    cfg = tiny_study(tokenizer_overrides=[*TINY, f"objective.koleo={koleo}"])
    step = tokenizer_step(cfg, mix, cfg.channels)
    # the scaling is exercised: 4 : 1 : 2 pairs counted, 32 : 8 : 16 configured; a mix without CLIP encodes only
    # the images it uses (rec: 16 : 0 : 16, counted at 1 : 0 : 1)
    assert step["counted_at"]["size"] == (4 if mix != "rec" else 1)
    assert step["batch"]["size"] == (32 if mix != "rec" else 16)
    direct = direct_step_flops(cfg, mix)
    planned = step["linear_flops"] + step["clip_logits_flops"]
    assert planned == pytest.approx(direct, rel=rel), (planned, direct)
    if mix == "rec":
        assert step["clip_logits_flops"] == 0


def test_clip_logits_term_is_quadratic_in_the_global_batch():
    """Local x global logits summed over ranks: 2 directions x (1 forward + 2 backward) matmuls of N x N x E."""
    cfg = tiny_study()
    small = tokenizer_step(cfg, "clip+ssl+ae", cfg.channels)
    e = small["clip_width"]
    assert small["clip_logits_flops"] == pytest.approx(12 * e * 32 ** 2, rel=0.01)
    big = tokenizer_step(replace(cfg, tokenizer_overrides=[*TINY, "batch.size=128", "batch.ssl=32", "batch.rec=64"]),
                         "clip+ssl+ae", cfg.channels)
    assert big["clip_logits_flops"] == pytest.approx(16 * small["clip_logits_flops"])
    assert big["linear_flops"] == pytest.approx(4 * small["linear_flops"])
    # accumulation: each micro-step builds the logits of its own global batch
    acc = tokenizer_step(replace(cfg, tokenizer_overrides=[*TINY, "batch.accumulation=2"]), "clip+ssl+ae",
                         cfg.channels)
    assert acc["clip_logits_flops"] == pytest.approx(small["clip_logits_flops"] / 2)


def test_base_batch_keeps_the_ratio():
    assert base_batch(16384, 4096, 2048) == (8, 2, 1)
    assert base_batch(4096, 0, 512) == (8, 0, 1)
    size, ssl, rec = base_batch(1000, 333, 1)
    assert size == MAX_BASE and ssl == round(333 * size / 1000) and rec == 1


def kind_hours(plan: dict) -> dict:
    return {k: v["gpu_hours"] for k, v in plan["kinds"].items()}


def test_gpu_hours_scale_exactly_with_budgets_seeds_and_samples():
    cfg = tiny_study(dit_steps=100, dit_curve=(50, 100), samples=100, kid_subset_size=50)
    base = gpu_plan(cfg)
    h = kind_hours(base)
    assert set(h) == set(KINDS) and all(v > 0 for v in h.values())

    doubled = kind_hours(gpu_plan(replace(cfg, budgets=tuple(2 * b for b in cfg.budgets))))
    assert doubled["tokenizer"] == pytest.approx(2 * h["tokenizer"], rel=1e-12)
    assert {k: v for k, v in doubled.items() if k != "tokenizer"} == pytest.approx(
        {k: v for k, v in h.items() if k != "tokenizer"}, rel=1e-12)

    seeds = gpu_plan(replace(cfg, dit_seeds=2 * cfg.dit_seeds))
    assert kind_hours(seeds)["dit_train"] == pytest.approx(2 * h["dit_train"], rel=1e-12)
    dit_rows = lambda p: sum(r["gpu_hours"] for r in p["stages"] if "Euler" in r["name"])  # noqa: E731
    assert dit_rows(seeds) == pytest.approx(2 * dit_rows(base), rel=1e-12)

    samples = kind_hours(gpu_plan(replace(cfg, samples=2 * cfg.samples)))
    for kind in ("sampling", "inception"):
        assert samples[kind] == pytest.approx(2 * h[kind], rel=1e-12)
    assert samples["tokenizer"] == pytest.approx(h["tokenizer"]) and samples["dit_train"] == pytest.approx(
        h["dit_train"])

    # GPU-hours are FLOPs / (peak x MFU): one MFU given for everything halves / doubles them all
    half = gpu_plan(cfg, mfu=0.2)
    for row in half["kinds"].values():
        assert row["gpu_hours"] == pytest.approx(row["tflop"] * 1e12 / (PEAK_FLOPS * 0.2) / 3600)
    assert gpu_plan(cfg, mfu=0.4)["total"]["gpu_hours"] == pytest.approx(half["total"]["gpu_hours"] / 2)


def test_the_reference_is_counted_once_adm_batch_or_labelled_images():
    cfg = tiny_study(samples=100, kid_subset_size=50)
    row = lambda p: next(r for r in p["stages"] if r["name"].startswith("the reference"))  # noqa: E731
    assert row(gpu_plan(cfg))["count"] == 100 + 100  # 100 labelled images as the reference, 100 others: the floor
    adm = gpu_plan(replace(cfg, adm_reference="/data/VIRTUAL_imagenet256_labeled.npz"))
    assert row(adm)["count"] == plan_mod.ADM_REFERENCE_IMAGES + 100


def test_images_come_from_max_images_else_the_argument_else_an_assumption():
    cfg = tiny_study(max_images=0)
    assumed = gpu_plan(cfg)
    assert assumed["images"]["labelled"] == plan_mod.DEFAULT_IMAGES
    assert any("assumed" in a and "labelled" in a for a in assumed["assumptions"])
    given = gpu_plan(cfg, images=2000)
    assert given["images"]["labelled"] == 2000
    latents = lambda p: p["kinds"]["latents"]["count"]  # noqa: E731
    assert latents(given) == 2 * 2000 * len(cfg.runs)
    assert gpu_plan(replace(cfg, max_images=500), images=2000)["images"]["labelled"] == 500


def test_measured_h200_rows_replace_the_assumed_mfu(tmp_path):
    cfg = tiny_study()
    rows = [{"bench": "dit", "mode": "eager", "device": "cuda", "device_name": "NVIDIA H200", "tflop_per_s": 237.0},
            {"bench": "dit", "mode": "compiled", "device": "cuda", "device_name": "NVIDIA H200", "tflop_per_s": 395.0},
            {"bench": "attention", "device": "cuda", "tflop_per_s": 500.0}]
    (tmp_path / "2026-12-02.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken")
    plan = gpu_plan(cfg, measured=tmp_path)
    assert plan["mfu"]["dit_train"]["value"] == pytest.approx(395e12 / PEAK_FLOPS)
    assert plan["mfu"]["dit_train"]["source"].startswith("measured")
    assert plan["mfu"]["tokenizer"]["source"].startswith(plan_mod.ASSUMED)
    empty = gpu_plan(cfg, measured=tmp_path / "none")
    assert all(m["source"].startswith(plan_mod.ASSUMED) for m in empty["mfu"].values())
    assert empty["mfu_label"] == plan_mod.ASSUMED


def test_markdown_lists_every_stage_kind_the_total_and_the_assumptions():
    plan = gpu_plan(tiny_study())
    md = plan_markdown(plan)
    for kind in KINDS:
        assert f"| {kind}: " in md
    assert "**total**" in md and "assumed until bench/device_check.sh measures it" in md
    for a in plan["assumptions"]:
        assert a in md
    for mix, budget, channels in tiny_study().runs:
        assert f"{mix}-{budget}-c{channels}: pretrain" in md


def test_default_study_plan_is_json_and_orders_the_mixes_by_cost():
    cfg = StudyConfig(mixes=("rec", "clip+ae", "ssl+ae", "clip+ssl+ae"))
    plan = gpu_plan(cfg)
    json.loads(json.dumps(plan))
    total = plan["total"]["gpu_hours"]
    assert math.isfinite(total) and total == pytest.approx(sum(k["gpu_hours"] for k in plan["kinds"].values()))
    assert sum(r["count"] for r in plan["stages"] if r["kind"] == "tokenizer") == sum(b for _, b, _ in cfg.runs)
    # the semantic mixes cost more than reconstruction alone; the wide run differs from the narrow one
    steps = plan["per_unit"]["tokenizer_step"]
    assert steps["clip+ssl+ae/c64"]["step_flops"] > steps["clip+ae/c64"]["step_flops"] > steps["rec/c64"]["step_flops"]
    assert steps["clip+ssl+ae/c256"]["step_flops"] != steps["clip+ssl+ae/c64"]["step_flops"]
