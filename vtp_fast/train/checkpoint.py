"""Training checkpoints that survive being killed, whole or sharded, loadable on any world size.

`<run>/checkpoints/step_00000100/` holds, in the "full" format (`run.checkpoint_format`; the default),
  model/              the tokenizer in the published layout (load_pretrained reads it)
  modules.safetensors SSL head, teacher, loss centres, discriminator: every other module's state
  train_state.pt      optimizers, step, RNG state, resolved config, the job's own state (the distinct bad samples
                      met so far) (torch.load weights_only); the data position is the step (batches are a function
                      of seed and step)
Whole tensors are gathered on every rank (collective under FSDP) and written by the main rank. In the "sharded"
format every rank writes its own shards through torch.distributed.checkpoint, and nothing is gathered:
  state/              DCP: `weights.<model|module>.<name>` and `<optimizer>.state.<param>.<name>` (keyed by
                      parameter name, so any world size and either DDP or FSDP2 loads it, resharded)
  model_config.json   the tokenizer's config (`vtp-fast export` adds the weights: the published layout)
  train_state.pt      as above, without the optimizers
with `run.async_checkpoint` the shards are staged in memory and written in the background while training goes on;
the checkpoint is renamed into place at the step after (or at the end of the run), when the write is complete.

Either way a checkpoint is built in a temp dir and renamed into place in one atomic step, so a run killed at any
moment leaves either the previous checkpoints or a complete new one; temp dirs are never picked up and are swept at
start. The newest `keep` checkpoints are kept. `export` turns either format into the published layout.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import nn

from vtp_fast import distributed as dist
from vtp_fast.config import ConfigError
from vtp_fast.io import atomic_dir, atomic_write_text, fsync_tree, replace_dir
from vtp_fast.models.pretrained import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    config_json,
    load_pretrained,
    load_state_strict,
    read_config,
    read_safetensors,
    save_pretrained,
)
from vtp_fast.models.vtp import VTP

Format = Literal["full", "sharded"]
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_SHARDS, _MODEL_CONFIG, _TRAIN_STATE = "state", "model_config.json", "train_state.pt"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_sharded(path: Path) -> bool:
    return (Path(path) / _SHARDS / ".metadata").is_file()


class Checkpointer:
    def __init__(self, root: str | Path, keep: int = 2, format: Format = "full", async_save: bool = False):
        self.root, self.keep, self.format, self.async_save = Path(root), max(1, keep), format, async_save
        self._pending: tuple[Future, Path, Path] | None = None  # a background save: (write, temp dir, final)
        self._group = None  # the process group background saves talk over (not the training one)

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

    # ------------------------------------------------------------------------------------------------ save
    def save(self, step: int, model: VTP | None, modules: dict[str, nn.Module],
             optimizers: dict[str, torch.optim.Optimizer], state: dict) -> Path:
        """Checkpoint `step` (every rank calls this). model: the tokenizer (None for a DiT run); modules: every
        other checkpointed module; state: the rest of the train state (the main rank's is written)."""
        self.finish_pending()
        final = self.root / step_dir_name(step)
        if self.format == "full":
            self._save_full(final, model, modules, optimizers, state)
        else:
            self._save_sharded(final, model, modules, optimizers, state)
        return final

    def _save_full(self, final: Path, model, modules, optimizers, state) -> None:
        model_state = dist.full_state_dict(model) if model is not None else None
        whole = {name: dist.full_state_dict(m) for name, m in modules.items()}
        state = {**state, **{name: dist.full_optimizer_state(opt) for name, opt in optimizers.items()}}
        if dist.rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            # .step_N.tmp-XXXXXXXX, fsynced, then renamed; a re-run of the same step after a resume replaces it.
            # 0o700: the mode tempfile.mkdtemp gave it before vtp_fast.io.
            with atomic_dir(final, perms=0o700) as tmp:
                if model is not None:
                    save_pretrained(model, tmp / "model", state=model_state)
                flat = {f"{name}.{k}": v for name, sd in whole.items() for k, v in sd.items()}
                save_file(flat, str(tmp / "modules.safetensors"))
                torch.save(state, tmp / _TRAIN_STATE)
            self._prune()
        dist.barrier()

    def _save_sharded(self, final: Path, model, modules, optimizers, state) -> None:
        import torch.distributed.checkpoint as dcp

        tmp = None
        if dist.rank() == 0:  # the main rank names the temp dir; the shards go there from every rank
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.tmp-{secrets.token_hex(4)}")  # as io.atomic_dir names it
            tmp.mkdir(0o700)
            if model is not None:
                atomic_write_text(tmp / _MODEL_CONFIG, json.dumps(config_json(model.config), indent=2) + "\n")
            torch.save(state, tmp / _TRAIN_STATE)
        tmp = Path(dist.broadcast_object(str(tmp) if tmp is not None else None))
        shards = _sharded_state(_tree(model, modules), optimizers)
        if not self.async_save:
            dcp.save(shards, checkpoint_id=tmp / _SHARDS, no_dist=not dist.is_distributed())
            self._publish(tmp, final)
            dist.barrier()
            return
        if dist.is_distributed() and self._group is None:  # background collectives need their own group
            self._group = torch.distributed.new_group(backend="gloo")
        future = dcp.async_save(shards, checkpoint_id=tmp / _SHARDS, process_group=self._group,
                                no_dist=not dist.is_distributed())
        self._pending = (future, tmp, final)

    def finish_pending(self) -> Path | None:
        """Wait for a background save and rename it into place (every rank calls this at the same step);
        returns the checkpoint it completed, if any."""
        if self._pending is None:
            return None
        future, tmp, final = self._pending
        self._pending = None
        result = getattr(future, "upload_completion", future)  # AsyncSaveResponse (newer torch) or a Future
        result.result()
        self._publish(tmp, final)
        dist.barrier()
        return final

    def close(self) -> None:
        """Wait for a background save that an error or interrupt left unpublished (its temp dir is swept at the next
        start), so that no writer thread outlives the process groups it uses."""
        if self._pending is not None:
            future, self._pending = self._pending[0], None
            with contextlib.suppress(Exception):  # the error being handled is the one to report
                getattr(future, "upload_completion", future).result()

    def _publish(self, tmp: Path, final: Path) -> None:
        if dist.rank() == 0:
            fsync_tree(tmp)
            replace_dir(tmp, final)
            self._prune()

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ load
    @staticmethod
    def load(path: Path, model: VTP | None, modules: dict[str, nn.Module],
             optimizers: dict[str, torch.optim.Optimizer]) -> dict:
        """Restore weights and optimizer states into `model`, `modules` and `optimizers` strictly (either
        format, resharded onto this run's world size and DDP / FSDP2); return the rest of the train state."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint directory")
        state = _train_state(path)
        if is_sharded(path):
            _load_sharded(path, model, modules, optimizers)
            return state
        if model is not None:
            load_state_strict(model, read_safetensors(path / "model" / WEIGHTS_NAME), str(path / "model"),
                              copy_=dist.copy_full_)
        flat = read_safetensors(path / "modules.safetensors")
        for name, module in modules.items():
            prefix = f"{name}."
            part = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
            load_state_strict(module, part, f"{path / 'modules.safetensors'} [{name}]", copy_=dist.copy_full_)
        _refuse_extra_modules(path / "modules.safetensors", {k.split(".", 1)[0] for k in flat}, modules)
        for name, opt in optimizers.items():
            dist.load_optimizer_state(opt, state.pop(name))
        return state


def _train_state(path: Path) -> dict:
    try:
        return torch.load(path / _TRAIN_STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(f"{path / _TRAIN_STATE}: unreadable ({type(e).__name__}: {e})") from None


def _refuse_extra_modules(where: Path, saved: set[str], modules: dict[str, nn.Module]) -> None:
    extra = sorted(saved - set(modules) - {"model"})
    if extra:
        raise CheckpointError(f"{where}: holds modules this run does not have: {extra} (was it written with a "
                              "different objective?)")


def _tree(model: VTP | None, modules: dict[str, nn.Module]) -> nn.ModuleDict:
    """Every checkpointed module under one root, so that parameters (and their optimizer states) are named
    `model.<name>` / `<module>.<name>` whatever wraps them (DDP, FSDP2, torch.compile)."""
    return nn.ModuleDict({**({"model": model} if model is not None else {}), **modules})


def _sharded_state(tree: nn.ModuleDict, optimizers) -> dict:
    """The DCP state dict: this rank's shards (DTensors under FSDP2, whole tensors otherwise: written once)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return {"weights": tree.state_dict(), **{name: get_optimizer_state_dict(tree, opt)
                                             for name, opt in optimizers.items()}}


def _load_sharded(path: Path, model, modules, optimizers) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    saved = FileSystemReader(str(path / _SHARDS)).read_metadata().state_dict_metadata
    _refuse_extra_modules(path / _SHARDS, {k.split(".")[1] for k in saved if k.startswith("weights.")}, modules)
    tree = _tree(model, modules)
    target = _sharded_state(tree, optimizers)  # the shapes and shardings to load into
    try:
        dcp.load(target, checkpoint_id=path / _SHARDS, no_dist=not dist.is_distributed())
    except Exception as e:  # noqa: BLE001 - DCP raises a CheckpointException gathering every rank's failure
        raise CheckpointError(f"{path / _SHARDS}: does not fit this run ({type(e).__name__}: {e})"[:2000]) from None
    tree.load_state_dict(target["weights"])
    for name, opt in optimizers.items():
        set_optimizer_state_dict(tree, opt, target[name])


# ------------------------------------------------------------------------------------------------ export
def export_source(checkpoint: str | Path) -> Path:
    """The checkpoint `export` reads: `checkpoint`, or the newest finished checkpoint of a run directory."""
    path = Path(checkpoint)
    if (path / "checkpoints").is_dir():
        newest = Checkpointer(path / "checkpoints").latest()
        if newest is None:
            raise CheckpointError(f"{path}: a run directory without a finished checkpoint")
        path = newest
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    return path


def step_of(path: str | Path) -> int | None:
    """The step of a checkpoint directory (its name, step_N); None for another name."""
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the tokenizer of a training checkpoint (either format; or a run directory: its newest checkpoint)
    in the published layout that load_pretrained reads. Runs in one process: sharded weights are consolidated."""
    path = export_source(checkpoint)
    if not is_sharded(path):
        if not (path / "model" / CONFIG_NAME).is_file():
            raise CheckpointError(f"{path}: holds no tokenizer (a DiT run's checkpoint, or not a checkpoint)")
        return save_pretrained(load_pretrained(path / "model"), out)
    if not (path / _MODEL_CONFIG).is_file():
        raise CheckpointError(f"{path}: holds no tokenizer (a DiT run's checkpoint)")
    import torch.distributed.checkpoint as dcp

    model = VTP(read_config(path / _MODEL_CONFIG))
    target = {"weights": {f"model.{k}": v for k, v in model.state_dict().items()}}
    dcp.load(target, checkpoint_id=path / _SHARDS, no_dist=True)
    load_state_strict(model, {k[len("model."):]: v for k, v in target["weights"].items()}, str(path / _SHARDS))
    return save_pretrained(model, out)
