"""Typed configs: dataclass defaults, YAML files holding only differences, dotted overrides last.

    cfg = load_config(PretrainConfig, ["configs/tokenizer/tiny.yaml"], ["optim.lr=3e-4", "run.steps=200"])

An unknown key anywhere is a `ConfigError` naming its dotted path; a value of the wrong type too. The
resolved config is written next to a run's outputs with `save_config`.

Where each schema lives (one per layer, beside the code it configures):

- vtp_fast.train.config: every training job's: `RunConfig` (declared once; `PretrainRunConfig`, `DiTRunConfig`),
  `OptimConfig`, pretraining's `PretrainConfig` (model, data with its `emoji` section, batch, ssl, gan) and the
  DiT's `DiTTrainConfig`;
- vtp_fast.models.vtp `VTPConfig`, vtp_fast.models.dit `DiTConfig`: architectures (the published config.json);
- vtp_fast.losses.objective `ObjectiveConfig`: the objective's term weights;
- vtp_fast.data.views `ViewConfig`: the multi-crop views and iBOT masks;
- vtp_fast.study.config `StudyConfig`: the scaling study.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class UserError(Exception):
    """Base of the project's own errors about what a user handed it (a config, an input file, a checkpoint, a data
    set): the `vtp-fast` command reports these, and only these, as one line without a traceback (anything else is a
    bug and shows its traceback). It lives here, at the bottom of the package, so every layer can raise one."""


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message names the key."""


class InputError(UserError, ValueError):
    """An input the user named (a data set, a latent set, an exported model, a command-line argument) cannot be used;
    the message names it and the problem."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (converting ints to floats, lists to tuples, dicts to
    nested dataclasses) and return it."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: only null is supported, got {value!r}")
        return None
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp}")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) mapping; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = unknown[0]  # a key that lives one section down (a flat `lr` for `optim.lr`) is named there
        moved = [f"{prefix}{name}.{key}" for name in sorted(names) if dataclasses.is_dataclass(hints[name])
                 and key in {f.name for f in dataclasses.fields(hints[name])}]
        hint = f"did you mean {' or '.join(moved)}? " if moved else ""
        raise ConfigError(f"unknown config key {prefix}{key} ({hint}valid keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def to_dict(cfg: Any) -> dict:
    """A dataclass config as plain YAML-friendly data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def merge(base: dict, delta: dict) -> dict:
    """Recursive dict merge: `delta` wins; nested mappings merge."""
    out = dict(base)
    for k, v in delta.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """'a.b.c=value' -> {'a': {'b': {'c': value}}}; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    path, raw = text.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {path}: cannot parse value {raw!r}: {e}") from None
    for k in reversed(keys):
        value = {k: value}
    return value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(cls: type[T], files: typing.Sequence[str | Path] = (), overrides: typing.Sequence[str] = ()) -> T:
    """Defaults of `cls`, then each YAML file's differences in order, then dotted overrides."""
    layers = [load_yaml(f) for f in files]
    data: dict = {}
    for layer in layers:
        data = merge(data, layer)
    for o in overrides:
        data = merge(data, parse_override(o))
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{_culprit(cls, files, layers, str(e))}{e}") from None


def _culprit(cls: type, files: typing.Sequence[str | Path], layers: list[dict], message: str) -> str:
    """'file: ' for the first config file after which `message` shows; '' when the defaults already show it
    (a required value left unset) or only the overrides do."""

    def shows(data: dict) -> bool:
        try:
            from_dict(cls, data)
        except ConfigError as e:
            return str(e) == message
        return False

    data: dict = {}
    if shows(data):
        return ""
    for f, layer in zip(files, layers, strict=True):
        data = merge(data, layer)
        if shows(data):
            return f"{f}: "
    return ""


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (every field, not just the differences)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
