"""Checkpoints in the published layout: a directory with `config.json` and `model.safetensors`.

`load_pretrained` is strict (every missing, unexpected or mis-shaped key is an error naming it) and never
executes code from the file (safetensors only; a pickle is refused). `save_pretrained` writes the same layout
atomically, so the reference implementation reads what we save and a failed save never replaces a good one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vtp_fast.config import ConfigError, InputError, UserError, from_dict
from vtp_fast.io import atomic_dir
from vtp_fast.models.vtp import VTP, VTPConfig
from vtp_fast.ops.registry import building_for

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
# Hugging Face bookkeeping fields that carry no architecture.
_HF_METADATA = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
                "auto_map", "decoder_use_qk_norm_eps"}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be read as the published layout; the message names the file and the problem."""


def read_config(path: Path) -> VTPConfig:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a checkpoint directory holds {CONFIG_NAME} and "
                              f"{WEIGHTS_NAME})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if data.get("model_type", "vtp") != "vtp":
        raise CheckpointError(f"{path}: model_type is {data['model_type']!r}, expected 'vtp'")
    fields = {f.name for f in dataclasses.fields(VTPConfig)}
    unknown = sorted(set(data) - fields - _HF_METADATA)
    if unknown:
        warnings.warn(f"{path}: ignoring unknown config fields {unknown}", stacklevel=2)
    try:
        return from_dict(VTPConfig, {k: v for k, v in data.items() if k in fields})
    except ConfigError as e:
        raise CheckpointError(f"{path}: unsupported model config: {e}") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; pickles, truncated and corrupt files raise CheckpointError."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)  # u64 header length, then the JSON header's "{"
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a checkpoint directory holds {CONFIG_NAME} and "
                              f"{WEIGHTS_NAME})") from None
    if len(head) < 9 or head[8:9] != b"{" or struct.unpack("<Q", head[:8])[0] + 8 > size:
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
            raise CheckpointError(f"{path}: this is a pickle (torch.save) file, not safetensors; it is not loaded "
                                  "because unpickling can run code. Convert it with safetensors.torch.save_file.")
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes)")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from None


def _copy(target: torch.Tensor, full: torch.Tensor) -> None:
    target.copy_(full)


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str,
                      copy_: Callable[[torch.Tensor, torch.Tensor], None] = _copy) -> None:
    """Copy `state` into `module` (casting dtypes); any missing, unexpected or mis-shaped key raises.

    `copy_(target, whole)` writes one tensor; a module that may be FSDP-sharded is loaded with
    `vtp_fast.distributed.copy_full_` (which fills this rank's shard), passed in by the training layer: models do
    not know about process groups."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
                       for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("mis-shaped keys", misshaped)) if keys]
    if problems:
        raise CheckpointError(f"{source}: does not match the model; " + "; ".join(problems))
    with torch.no_grad():
        for k, t in expected.items():
            copy_(t, state[k])


HUB_OWNER = "MiniMaxAI"  # the published VTP-{Small,Base,Large}-f16d64 weights
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$|^VTP-[\w.-]+$")


def resolve_checkpoint(name: str | Path, revision: str | None = None) -> Path:
    """A local checkpoint directory, or a Hugging Face Hub model id resolved to its snapshot in the local Hub cache
    (`huggingface_hub`: $HF_HOME / $HF_HUB_CACHE, downloaded when online, $HF_HUB_OFFLINE respected).

    Hub ids: "owner/name", "VTP-Large-f16d64" (short for MiniMaxAI/VTP-Large-f16d64), each optionally pinned with
    "@REVISION" (a branch, tag or commit; `revision` likewise). A local directory of that name wins."""
    path = Path(name)
    if path.is_dir():
        return path
    text = str(name)
    if "@" in text:
        text, revision = text.split("@", 1)
    if not _HUB_ID.match(text):
        raise CheckpointError(f"{name}: not a checkpoint directory (expected {CONFIG_NAME} + {WEIGHTS_NAME}) "
                              "nor a Hugging Face Hub id (owner/name)")
    repo = text if "/" in text else f"{HUB_OWNER}/{text}"
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    pinned = f" --revision {revision}" if revision else ""
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise CheckpointError(f"{name}: {type(e).__name__} on the Hugging Face Hub ({repo}{pinned})") from None
    except (LocalEntryNotFoundError, OSError) as e:  # offline (or no network) and not in the cache
        raise CheckpointError(
            f"{name}: {repo}{'@' + revision if revision else ''} is not in the Hugging Face cache ({HF_HUB_CACHE}) "
            f"and cannot be downloaded here ({type(e).__name__}); fetch it where there is internet with "
            f"`hf download {repo}{pinned} --include {CONFIG_NAME} {WEIGHTS_NAME}` and copy that cache "
            "($HF_HOME) here, or pass the checkpoint directory") from None


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", rope_dtype: str = "bf16",
                    revision: str | None = None) -> VTP:
    """A VTP model from a directory in the published layout (any size) or a Hugging Face Hub id (see
    `resolve_checkpoint`), in eval mode, on `device`."""
    path = resolve_checkpoint(path, revision)
    config = read_config(path / CONFIG_NAME)
    state = read_safetensors(path / WEIGHTS_NAME)
    with building_for(device):  # its layers pick the ops' backends for the device it will run on
        model = VTP(config, rope_dtype=rope_dtype)
    load_state_strict(model, state, str(path / WEIGHTS_NAME))
    return model.to(device).eval()


def config_json(config: VTPConfig) -> dict:
    return {"architectures": ["VTPModel"], "model_type": "vtp", "dtype": "float32",
            **dataclasses.asdict(config)}


def save_pretrained(model: VTP, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model` as config.json + model.safetensors under `path`, atomically (temp dir + rename).

    `state` replaces model.state_dict() (e.g. whole tensors gathered from FSDP shards)."""
    path = Path(path)
    if state is None:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(path) as tmp:  # a published model: the umask decides who reads it
        (tmp / CONFIG_NAME).write_text(json.dumps(config_json(model.config), indent=2) + "\n")
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    return path


def tokenizer_fingerprint(model: VTP) -> str:
    """A short hash of the tokenizer's weights: latents from another tokenizer are refused. The values are rounded
    to bf16 first, so the fp32 tokenizer and its bf16 cast (`apply_inference`) are one tokenizer."""
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().flatten()[:1024].to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_tokenizer(meta: dict, model: VTP) -> None:
    """Refuse a tokenizer that did not make the latents `meta` (a latent set's meta.json) describes: channels or
    weights differ."""
    c = model.config.vision_feature_bottleneck
    if meta["channels"] != c:
        raise InputError(f"the latents have {meta['channels']} channels but the tokenizer makes {c}")
    fp = tokenizer_fingerprint(model)
    if meta.get("tokenizer_fingerprint") and meta["tokenizer_fingerprint"] != fp:
        raise InputError(f"the latents were made by another tokenizer ({meta.get('tokenizer') or 'unknown'}, "
                         f"fingerprint {meta['tokenizer_fingerprint']} != {fp}); re-extract them")
