"""`train-dit`: a resumed run continues exactly; a fresh run never mixes with an earlier run's checkpoints."""

import json

import pytest
import torch

from vtp_fast import VTP, vtp_config
from vtp_fast.config import ConfigError, load_config
from vtp_fast.data.labelled import LabelledImages
from vtp_fast.data.latents import load_latents
from vtp_fast.eval.latents import extract_latents
from vtp_fast.models.pretrained import read_safetensors
from vtp_fast.train import dit as dit_train
from vtp_fast.train.config import DiTOptimConfig, DiTRunConfig, DiTTrainConfig
from vtp_fast.train.dit import ema_decay, train_dit


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 32, 32, 3), dtype=torch.uint8, generator=g)
    data = LabelledImages(images, torch.arange(12) % 3, ["a", "b", "c"], [""] * 12, "random-32")
    out = tmp_path_factory.mktemp("lat") / "latents"
    torch.manual_seed(0)
    extract_latents(VTP(vtp_config("vtp-nano")).eval(), data, out, progress=False)
    return out


def config(latents, out, **run) -> DiTTrainConfig:
    return DiTTrainConfig(latents=str(latents), preset="dit-nano", overrides={"in_channels": 64, "input_size": 2,
                          "num_classes": 3}, batch=4, optim=DiTOptimConfig(warmup_steps=2),
                          run=DiTRunConfig(steps=6, log_every=1, checkpoint_every=3, out_dir=str(out), **run))


def losses(out) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss/total"]) for r in rows]


@pytest.mark.parametrize("fmt", ["full", "sharded"])
def test_resume_continues_exactly_and_fresh_runs_refuse_old_checkpoints(latents, tmp_path, capsys, fmt):
    straight = tmp_path / "straight"
    train_dit(config(latents, straight, checkpoint_format=fmt))
    split = tmp_path / "split"
    train_dit(config(latents, split, stop_at=3, checkpoint_format=fmt))
    assert [s for s, _ in losses(split)] == [1, 2, 3]
    capsys.readouterr()
    train_dit(config(latents, split, resume="auto", checkpoint_format=fmt))
    assert "resuming at 3" in capsys.readouterr().out  # continued, not started over
    assert losses(split) == losses(straight)  # the same batches, noise, t and label dropout after the resume
    a = read_safetensors(straight / "dit" / "model.safetensors")
    b = read_safetensors(split / "dit" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="earlier run's checkpoints"):
        train_dit(config(latents, split))  # resume=none over an earlier run


def test_resuming_past_stop_at_is_refused(latents, tmp_path):
    train_dit(config(latents, tmp_path / "run"))
    with pytest.raises(ConfigError, match="stop_at"):
        train_dit(config(latents, tmp_path / "run", stop_at=3, resume="auto"))


def test_ema_decay_warms_up_then_holds():
    assert [ema_decay(0.999, s) for s in (0, 8, 80)] == pytest.approx([0.1, 0.5, 0.9])
    assert ema_decay(0.999, 8990) == pytest.approx(0.999) and ema_decay(0.999, 10**6) == 0.999
    assert ema_decay(0.3, 0) == 0.1 and ema_decay(0.3, 5) == 0.3  # the configured decay caps the warm-up


def test_training_uses_the_warmed_up_decay_at_every_step_also_after_a_resume(latents, tmp_path, monkeypatch):
    seen = []
    real = dit_train.ema_update

    def spy(ema_params, params, decay):
        seen.append(decay)
        real(ema_params, params, decay)

    monkeypatch.setattr(dit_train, "ema_update", spy)
    train_dit(config(latents, tmp_path / "run", stop_at=3))
    train_dit(config(latents, tmp_path / "run", resume="auto"))
    assert seen == pytest.approx([(1 + s) / (10 + s) for s in range(6)])  # not 0.999 from step 0


def test_the_optimizer_lives_under_optim_and_old_flat_keys_name_their_new_place(tmp_path):
    cfg = load_config(DiTTrainConfig, ["configs/dit/study_tiny.yaml"], ["latents=x"])
    assert (cfg.optim.lr, cfg.optim.final_lr, cfg.optim.warmup_steps, cfg.optim.weight_decay) == (1e-3, 1e-4, 50, 0.0)
    assert cfg.optim.final_lr == cfg.optim.lr * 0.1  # the DiT's schedule as it was: cosine to a tenth of the peak
    defaults = DiTTrainConfig().optim
    assert (defaults.lr, defaults.final_lr, defaults.warmup_steps) == (2e-4, 2e-4 * 0.1, 100)
    assert load_config(DiTTrainConfig, [], ["latents=x", "optim.lr=1e-3"]).optim.final_lr == 1e-3 * 0.1  # follows lr
    assert load_config(DiTTrainConfig, [], ["latents=x", "optim.min_lr=0"]).optim.final_lr == 0
    old = tmp_path / "old.yaml"
    old.write_text("preset: dit-tiny\nlr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"old.yaml: unknown config key lr \(did you mean optim.lr\?"):
        load_config(DiTTrainConfig, [old], ["latents=x"])
    with pytest.raises(ConfigError, match="optim.weight_decay_end: the DiT keeps its weight decay constant"):
        load_config(DiTTrainConfig, [], ["latents=x", "optim.weight_decay_end=0.2"])


def test_an_export_made_before_learn_sigma_went_still_loads(latents, tmp_path):
    model = dit_train.build_dit(config(latents, tmp_path), load_latents(latents))
    path = dit_train.export_dit(model, load_latents(latents).meta, tmp_path / "dit")
    config_json = json.loads((path / "config.json").read_text())
    config_json["dit"]["learn_sigma"] = False  # what every export wrote while DiTConfig had the field
    (path / "config.json").write_text(json.dumps(config_json))
    loaded, _ = dit_train.load_dit(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                 strict=True))


def test_run_compile_scope_compiles_the_blocks_or_the_whole_model(latents, tmp_path):
    for scope in ("blocks", "whole"):
        model = dit_train.DiTJob(config(latents, tmp_path / scope, compile=True, compile_scope=scope)).model
        blocks = [b._compiled_call_impl is not None for b in model.transformer_blocks()]
        assert (model._compiled_call_impl is not None, all(blocks), any(blocks)) == (
            (True, False, False) if scope == "whole" else (False, True, True))
