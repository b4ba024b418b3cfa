"""Typed configs: YAML differences, dotted overrides, errors that name the key."""

from dataclasses import dataclass, field

import pytest

from vtp_fast.config import ConfigError, load_config, parse_override, save_config
from vtp_fast.train.config import PretrainConfig


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    name: str | None = None


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    steps: int = 10
    flags: list[str] = field(default_factory=list)


def test_defaults_then_files_then_overrides(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("steps: 20\ninner:\n  lr: 0.5\n")
    b.write_text("inner:\n  betas: [0.8, 0.9]\n")
    cfg = load_config(Outer, [a, b], ["inner.lr=2e-4", "flags=[x, y]", "inner.name=run1"])
    assert cfg.steps == 20 and cfg.inner.lr == 2e-4 and cfg.inner.betas == (0.8, 0.9)
    assert cfg.flags == ["x", "y"] and cfg.inner.name == "run1"
    assert isinstance(cfg.inner.lr, float) and load_config(Outer, [], ["inner.lr=1"]).inner.lr == 1.0


def test_unknown_key_is_named_with_its_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("inner:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key inner\.lrr \(valid keys under inner"):
        load_config(Outer, [f])
    with pytest.raises(ConfigError, match=r"unknown config key stepz"):
        load_config(Outer, [], ["stepz=3"])


def test_wrong_types_are_named():
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        load_config(Outer, [], ["steps=1.5"])
    with pytest.raises(ConfigError, match=r"inner.betas: expected 2 items"):
        load_config(Outer, [], ["inner.betas=[1, 2, 3]"])
    with pytest.raises(ConfigError, match="inner: expected a mapping"):
        load_config(Outer, [], ["inner=3"])
    with pytest.raises(ConfigError, match="not of the form"):
        parse_override("steps")


def test_bad_yaml_and_missing_file(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, [f])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, [tmp_path / "missing.yaml"])


def test_validation_names_the_key():
    with pytest.raises(ConfigError, match="run.steps: must be >= 1"):
        load_config(PretrainConfig, [], ["run.steps=0"])
    with pytest.raises(ConfigError, match="data.emoji.eval_styles: must not overlap"):
        load_config(PretrainConfig, [], ["data.emoji.eval_styles=[google]"])
    with pytest.raises(ConfigError, match="data.emoji.train_styles"):
        load_config(PretrainConfig, [], ["data.emoji.train_styles=[apple]"])
    with pytest.raises(ConfigError, match="optim.lr: must be >= 0"):
        load_config(PretrainConfig, [], ["optim.lr=-1"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(PretrainConfig, [], ["run.steps=7", "model.overrides={vision_depth: 1}"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(PretrainConfig, [path]) == cfg


def test_shipped_configs_load():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "configs" / "tokenizer").glob("*.yaml"))
    assert len(files) >= 6
    for f in files:
        load_config(PretrainConfig, [f])


def test_shipped_dit_configs_load_once_the_latents_are_named():
    from pathlib import Path

    from vtp_fast.train.config import DiTTrainConfig

    files = sorted((Path(__file__).parents[1] / "configs" / "dit").glob("*.yaml"))
    assert len(files) >= 2
    for f in files:
        cfg = load_config(DiTTrainConfig, [f], ["latents=runs/latents"])
        assert cfg.latents == "runs/latents" and cfg.cos_over == "position"
        with pytest.raises(ConfigError, match="^latents: a latent set directory is required"):
            load_config(DiTTrainConfig, [f])  # a default left unset: not blamed on the file
