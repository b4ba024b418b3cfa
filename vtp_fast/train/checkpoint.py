"""Training checkpoints that survive being killed.

`<run>/checkpoints/step_00000100/` holds
  model/              the tokenizer in the published layout (load_pretrained reads it)
  modules.safetensors SSL head, teacher, loss centres, discriminator: every other module's state
  train_state.pt      optimizer, step, RNG state, resolved config, the distinct bad samples met so far (ids and
                      kinds, so a resumed run continues data/bad_samples) (torch.load weights_only); the data
                      position is the step (batches are a function of seed, step and rank)
A checkpoint is built in a temp dir and renamed into place in one atomic step, so a run killed at any moment
leaves either the previous checkpoints or a complete new one; temp dirs are never picked up and are swept at
start. The newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from vtp_fast.config import ConfigError
from vtp_fast.distributed import copy_full_
from vtp_fast.io import atomic_dir
from vtp_fast.models.pretrained import (
    WEIGHTS_NAME,
    CheckpointError,
    load_state_strict,
    read_safetensors,
    save_pretrained,
)

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class Checkpointer:
    def __init__(self, root: str | Path, keep: int = 2):
        self.root, self.keep = Path(root), max(1, keep)

    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint a run continues from: resume "auto" (the newest here, if any), "none" (a fresh run,
        refused when this directory holds an earlier run's checkpoints) or a checkpoint directory."""
        if resume == "auto":
            return self.latest()
        if resume == "none":
            if (latest := self.latest()) is not None:
                raise ConfigError(f"{self.root} holds an earlier run's checkpoints (newest: {latest.name}); continue "
                                  "it with --resume auto, or choose another output directory")
            return None
        return Path(resume)

    def sweep(self) -> None:
        """Remove temp dirs of saves that were interrupted, and checkpoints set aside by an interrupted replace
        (the names vtp_fast.io.atomic_dir gives them)."""
        if self.root.is_dir():
            for p in [*self.root.glob(".step_*.tmp-*"), *self.root.glob(".step_*.old-*")]:
                shutil.rmtree(p, ignore_errors=True)

    def save(self, step: int, model: nn.Module | None, model_state: dict | None, modules: dict[str, dict],
             state: dict) -> Path:
        """model_state / modules: whole-tensor state dicts (see distributed.full_state_dict); without a model (a
        DiT run) only modules.safetensors and train_state.pt are written."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / step_dir_name(step)
        # .step_N.tmp-XXXXXXXX, fsynced, then renamed; a re-run of the same step after a resume replaces it whole.
        # 0o700: the mode tempfile.mkdtemp gave it before vtp_fast.io.
        with atomic_dir(final, perms=0o700) as tmp:
            if model is not None:
                save_pretrained(model, tmp / "model", state=model_state)
            flat = {f"{name}.{k}": v for name, sd in modules.items() for k, v in sd.items()}
            save_file(flat, str(tmp / "modules.safetensors"))
            torch.save(state, tmp / "train_state.pt")
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load(path: Path, model: nn.Module | None, modules: dict[str, nn.Module]) -> dict:
        """Restore weights into `model` and `modules` strictly; return the train state (not yet applied)."""
        path = Path(path)
        if model is not None:
            load_state_strict(model, read_safetensors(path / "model" / WEIGHTS_NAME), str(path / "model"),
                              copy_=copy_full_)
        flat = read_safetensors(path / "modules.safetensors")
        for name, module in modules.items():
            prefix = f"{name}."
            part = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
            load_state_strict(module, part, f"{path / 'modules.safetensors'} [{name}]", copy_=copy_full_)
        extra = sorted({k.split(".", 1)[0] for k in flat} - set(modules))
        if extra:
            raise CheckpointError(f"{path / 'modules.safetensors'}: holds modules this run does not have: {extra} "
                                  "(was it written with a different objective?)")
        try:
            return torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
            raise CheckpointError(f"{path / 'train_state.pt'}: unreadable ({type(e).__name__}: {e})") from None
