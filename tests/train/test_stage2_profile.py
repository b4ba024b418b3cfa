"""Stage 2 (frozen encoder, GAN-fine-tuned decoder) and the per-objective profile."""

import json
import time

import pytest
import torch

from tests.train.test_pretrain import SMALL, emoji_root, small_config  # noqa: F401 - fixture
from vtp_fast import VTP, load_pretrained, save_pretrained, vtp_config
from vtp_fast.config import ConfigError, load_config
from vtp_fast.data.step_batches import StepBatches
from vtp_fast.eval.evaluate import held_out_scores
from vtp_fast.losses.gan import adaptive_weight, discriminator_hinge, generator_hinge
from vtp_fast.measure import profile as profile_module
from vtp_fast.measure.ceilings import cpu_ceilings
from vtp_fast.measure.profile import OTHER, profile
from vtp_fast.models.discriminator import PatchDiscriminator
from vtp_fast.train.config import PretrainConfig
from vtp_fast.train.pretrain import pretrain

STAGE2 = ["stage=2", "objective.clip=0", "objective.ssl=0", "objective.gan=0.5", "batch.ssl=0", "batch.rec=8",
          "gan.channels=8", "gan.layers=2", "gan.start_step=1"]


def test_hinge_losses_and_adaptive_weight():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert discriminator_hinge(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1) / 2))
    assert generator_hinge(fake).item() == pytest.approx(1.0)
    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(5, 4)
    y = x @ w.T
    rec, gen = (y - 1).abs().mean(), -(y * 3).mean()
    g_rec = torch.autograd.grad(rec, w, retain_graph=True)[0]
    g_gen = torch.autograd.grad(gen, w, retain_graph=True)[0]
    expect = g_rec.norm() / (g_gen.norm() + 1e-4)
    assert adaptive_weight(rec, gen, w).item() == pytest.approx(expect.item(), rel=1e-6)
    assert not adaptive_weight(rec, gen, w).requires_grad


def test_discriminator_shapes():
    d = PatchDiscriminator(channels=8, layers=3)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_stage_config_rules():
    with pytest.raises(ConfigError, match="stage: 2 fine-tunes the pixel decoder only"):
        load_config(PretrainConfig, [], ["stage=2"])
    with pytest.raises(ConfigError, match="objective.gan: the adversarial term belongs to stage 2"):
        load_config(PretrainConfig, [], ["objective.gan=0.1"])


def test_stage2_trains_only_decoder_and_discriminator_and_resumes(emoji_root, tmp_path):  # noqa: F811
    torch.manual_seed(0)
    init = save_pretrained(VTP(vtp_config("vtp-nano", image_size=32)), tmp_path / "stage1")
    out = tmp_path / "stage2"
    pretrain(small_config(emoji_root, out, *STAGE2, f"model.init={init}", "run.steps=4", "run.checkpoint_every=2",
                          "run.keep_checkpoints=3"), held_out_scores)
    first, after = load_pretrained(init), dict(load_pretrained(out / "checkpoint").named_parameters())
    for k, v in first.named_parameters():
        assert torch.equal(v, after[k]) == (not k.startswith("pixel_decoder.")), f"{k}: only the decoder trains"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    gan_rows = [r for r in rows if "loss/gan" in r]
    assert gan_rows[0]["loss/gan"] == 0.0 and "loss/disc" not in gan_rows[0], "off before gan.start_step"
    assert all("loss/disc" in r and r["gan_weight"] > 0 for r in gan_rows[1:])
    # the discriminator and its optimizer are checkpointed; a resume continues exactly
    state = torch.load(out / "checkpoints" / "step_00000002" / "train_state.pt", weights_only=True)
    assert "disc_optimizer" in state
    part = tmp_path / "part"
    import shutil

    shutil.copytree(out, part)
    shutil.rmtree(part / "checkpoints" / "step_00000004")
    pretrain(small_config(emoji_root, part, *STAGE2, f"model.init={init}", "run.steps=4", "run.checkpoint_every=2",
                          "run.resume=auto"), held_out_scores)
    strip = lambda d: [(r["step"], r["loss/total"], r.get("loss/disc")) for r in  # noqa: E731
                       map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss/total" in r]
    assert strip(part) == strip(out)


def test_profile_reports_every_phase(emoji_root, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Issue 20, item 2: the rows add up to the step. Spikes land in data loading in the first timed step and in the
    optimizer in the second (as load does, in different phases in different steps): the medians of the phases miss
    both, their means carry each in the phase it hit and add up to the mean step."""
    spike, steps, warmup = 0.15, 3, 1
    get, clip = StepBatches.__getitem__, torch.nn.utils.clip_grad_norm_
    clipped = []

    def slow_data(self, step):
        time.sleep(spike if step == warmup else 0.0)
        return get(self, step)

    def slow_clip(*args, **kwargs):
        clipped.append(None)
        time.sleep(spike if len(clipped) == warmup + 2 else 0.0)
        return clip(*args, **kwargs)

    monkeypatch.setattr(StepBatches, "__getitem__", slow_data)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", slow_clip)
    # the CPU roofline at a tiny size (issue 22, item 2): the full one takes seconds
    monkeypatch.setattr(profile_module, "cpu_ceilings", lambda: cpu_ceilings(size=128, copy_mib=4))
    cfg = small_config(emoji_root, tmp_path / "run")
    result = profile(cfg, steps=steps, warmup=warmup, out=tmp_path / "prof")
    phases = {r["phase"]: r for r in result["phases"]}
    for name in ("data", "teacher forward", "trunk forward (shared)", "clip forward", "rec forward", "ssl forward",
                 "loss weighting", "clip backward", "rec backward", "ssl backward", "trunk (shared) backward",
                 "finite check (host sync)", "optimizer (clip, step)", "ema", "zero_grad", OTHER):
        # measured in most steps (a phase never timed reads 0 ms); "other", the step less the phases, is > 0 only
        # while no two phases count the same time
        assert name in phases and phases[name]["median_ms"] > 0, (name, phases.get(name))
    assert sum(r["mean_ms"] for r in result["phases"]) == pytest.approx(result["step_mean_ms"], rel=1e-9)
    assert sum(r["share_pct"] for r in result["phases"]) == pytest.approx(100, rel=1e-9)
    for name in ("data", "optimizer (clip, step)"):
        assert phases[name]["mean_ms"] >= 1e3 * spike / steps, (name, phases[name])
    assert result["step_mean_ms"] >= 2e3 * spike / steps
    assert result["gflop_per_image"] > 0 and result["mfu"] is None  # no known CPU peak
    # in its place, the share of the CPU's measured fp32 matmul ceiling (precision auto: fp32 on the CPU)
    ceilings = cpu_ceilings(size=128, copy_mib=4)
    assert result["ceiling_dtype"] == "fp32" and result["cpu_ceilings"]["fp32_gflops"] == ceilings.fp32_gflops
    assert result["ceiling_share"] == pytest.approx(1e3 * result["achieved_tflop_per_s"] / ceilings.fp32_gflops)
    printed = capsys.readouterr().out
    assert f"{100 * result['ceiling_share']:.1f}% of this CPU's measured fp32 matmul ceiling" in printed
    assert ceilings.describe() in printed and ceilings.describe() in (tmp_path / "prof" / "profile.md").read_text()
    for f in ("profile.md", "profile.json", "profile.png"):
        assert (tmp_path / "prof" / f).exists()
