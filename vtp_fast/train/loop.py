"""The one training loop every job runs: pretraining (stages 1 and 2) and the DiT.

A job supplies its step, its evaluations and its export (`Job`); the loop does the rest the same way for all:
resume from the newest checkpoint (weights, optimizers, RNG streams, the job's own state), clean-up of interrupted
saves, metrics (JSONL and TensorBoard, averaged over ranks), progress, the checkpoint schedule (whole or sharded:
vtp_fast.train.checkpoint), non-finite steps skipped up to `run.max_bad_steps` in a row.
Stall and straggler accounting (data wait, step-time spread across ranks, MFU, warnings): vtp_fast.train.stalls.
"""

from __future__ import annotations

import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn
from tqdm import tqdm

from vtp_fast import distributed as dist
from vtp_fast import optional
from vtp_fast.config import ConfigError, UserError, save_config, to_dict
from vtp_fast.threads import OpenMPWait, ThreadBudget, apply_budget, budget, resume_threads
from vtp_fast.train.checkpoint import Checkpointer
from vtp_fast.train.common import MetricsLog, pick_device, rng_state, seed_everything, set_rng_state
from vtp_fast.train.config import RunConfig
from vtp_fast.train.stalls import Stalls, Window


class TrainingDiverged(UserError, RuntimeError):
    """Too many consecutive steps with non-finite losses; the last good checkpoint is kept."""


@dataclass
class StepOutput:
    """What one optimizer step reports. terms: the loss terms (detached, averaged over micro-batches; "total"
    among them), logged as loss/<name>; aux: other per-step tensors (gradient norm, adaptive GAN weight);
    scalars: the schedules' values at this step; finite: whether the step was taken (decided on every rank
    together); a skipped step names its non-finite terms in bad_terms."""

    terms: dict[str, Tensor]
    aux: dict[str, Tensor] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    finite: bool = True
    bad_terms: list[str] = field(default_factory=list)


@dataclass
class Evaluation:
    """fn(step) runs on every rank (gathering sharded weights is collective) and returns the row to log on the
    main rank ({} on the others), every `every` steps, and at the start of a fresh run / the last step when
    asked."""

    every: int
    fn: Callable[[int], dict[str, Any]]
    at_start: bool = False
    at_end: bool = True


B = TypeVar("B")  # what a job's `next_batch` returns and its `step` takes


class Job(Generic[B]):
    """One training job over batches of type B. Subclasses set the attributes and implement `next_batch`, `step` and
    `finish`."""

    name: str  # the progress bar's label
    unit: str = "images"  # what `samples_per_step` counts (logged as <unit>_per_s)
    cfg: Any  # the whole config (saved with every run and checkpoint)
    run: RunConfig
    device: torch.device
    samples_per_step: int  # global, all ranks
    checkpoint_model: nn.Module | None = None  # saved in the published layout (load_pretrained reads it)
    flops_per_step: float | None = None  # model FLOPs of one optimizer step, all ranks: MFU where the peak is known
    data_hint: str = "raise data.num_workers"  # what a data-bound run can change

    def modules(self) -> dict[str, nn.Module]:
        """Every other checkpointed module (whole-tensor state, strict on load)."""
        return {}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The job's own train state (called on every rank at a checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def begin(self, start: int, resumed_from: Path | None) -> dict[str, Any]:
        """Before the first step (the data position is `start`); returns a row to log at `start`, or {}."""
        return {}

    def next_batch(self, step: int) -> B:
        """The data of `step` (timed as data wait), handed to `step`."""
        raise NotImplementedError

    def step(self, step: int, batch: B) -> StepOutput:
        raise NotImplementedError

    def metrics(self) -> dict[str, Any]:
        """Extra values for each logged row (called on every rank)."""
        return {}

    def evaluations(self) -> list[Evaluation]:
        return []

    def finish(self, log: MetricsLog | None) -> dict[str, Path]:
        """Export and plots after the last step (every rank calls it; the main rank returns the paths)."""
        raise NotImplementedError


def start_process(run: RunConfig, loader_workers: int | None = 0,
                  dali_threads: int | None = None) -> tuple[torch.device, torch.Generator, ThreadBudget]:
    """The job's device (the local GPU under torchrun), its thread budget (vtp_fast.threads: torch threads set
    here for the whole run; loader workers and DALI threads for the caller; None: from the budget), and every RNG
    seeded from run.seed (the returned CPU generator is the job's own)."""
    device = dist.init_from_env() if dist.launched_distributed() else pick_device(run.device)
    threads = apply_budget(budget(run.threads, loader_workers, dali_threads))
    return device, seed_everything(run.seed), threads


def all_finite(terms: dict[str, Tensor]) -> bool:
    """Whether every term is finite on every rank: a step is taken or skipped by all ranks together (the one
    host sync of a step)."""
    finite = torch.isfinite(torch.stack([v.float() for v in terms.values()])).all().float()
    return bool(dist.all_reduce_sum(finite).item() == dist.world_size())


def skipped(terms: dict[str, Tensor], aux: dict[str, Tensor] | None = None,
            scalars: dict[str, float] | None = None) -> StepOutput | None:
    """The StepOutput of a skipped step when any of `terms` and `aux` is non-finite on any rank (all_finite),
    naming this rank's non-finite ones; None when the step is to be taken."""
    aux = aux or {}
    values = {**terms, **aux}
    if all_finite(values):
        return None
    bad = [k for k, v in values.items() if not torch.isfinite(v).all()]
    return StepOutput(terms, aux, scalars or {}, finite=False, bad_terms=bad)


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(job: Job) -> dict[str, Path]:
    """Train `job` from its newest checkpoint (run.resume) to run.end; returns the exported paths (main rank)."""
    r, main = job.run, dist.rank() == 0
    out = Path(r.out_dir)
    ckpt = Checkpointer(out / "checkpoints", keep=r.keep_checkpoints, format=r.checkpoint_format,
                        async_save=r.async_checkpoint)
    resumed_from = ckpt.resolve(r.resume)
    start, saved_rng = _resume(job, resumed_from) if resumed_from is not None else (0, None)
    end = r.end
    if start > end:
        raise ConfigError(f"run.stop_at: step {end} is before the checkpoint being resumed ({resumed_from})")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.sweep()
        save_config(job.cfg, out / "config.yaml")
    log = _Log(out, start, r.tensorboard) if main else None
    _write(log, start, job.begin(start, resumed_from))
    evaluations = job.evaluations()
    _evaluate(log, None, [ev for ev in evaluations if ev.at_start and start == 0], 0)
    bar = tqdm(total=end, initial=start, desc=job.name, unit="step", disable=not main, dynamic_ncols=True)
    if saved_rng is not None:  # last, after everything above that may draw: the run continues the saved streams
        set_rng_state(saved_rng)
    try:
        _steps(job, ckpt, log, bar, range(start, end), evaluations)
        ckpt.finish_pending()
    finally:
        ckpt.close()
    bar.close()
    if log is not None:
        log.close()
    return job.finish(log.metrics if log is not None else None)


def _steps(job: Job, ckpt: Checkpointer, log: _Log | None, bar, steps: range, evaluations: list[Evaluation]) -> None:
    """The steps of `steps` (range(start, end)): data, step, skipped-step accounting, logged rows, evaluations and
    the checkpoint schedule."""
    r, main, end = job.run, log is not None, steps.stop
    bad_streak, window, stalls = 0, Window(), Stalls(job, bar if main else None)
    openmp_wait = OpenMPWait(torch.get_num_threads())
    for step in steps:
        openmp_wait.update()
        t0 = time.perf_counter()
        batch = job.next_batch(step)
        t1 = time.perf_counter()
        result = job.step(step, batch)
        window.add(t1 - t0, time.perf_counter() - t1)
        done = step + 1
        if not result.finite:
            bad_streak += 1
            _write(log, done, {"skipped": True, "bad_terms": result.bad_terms})
            if main:
                bar.write(f"step {done}: non-finite loss in {result.bad_terms}; step skipped "
                          f"({bad_streak}/{r.max_bad_steps} in a row)")
            if bad_streak >= r.max_bad_steps:
                raise TrainingDiverged(f"{bad_streak} consecutive steps with non-finite losses "
                                       f"({', '.join(result.bad_terms)}); stopped at step {done}; last good "
                                       f"checkpoint: {ckpt.latest() or 'none written yet'}")
            continue
        bad_streak = 0
        if done % r.log_every == 0 or done == end:
            row = {**_step_row(job, result), **stalls.row(window), "torch_threads": torch.get_num_threads()}
            _write(log, done, row)
            bar.set_postfix({"loss": f"{row['loss/total']:.4g}", f"{job.unit}/s": f"{row[f'{job.unit}_per_s']:.0f}"})
            window = Window()
        _evaluate(log, bar, [ev for ev in evaluations if done % ev.every == 0 or (ev.at_end and done == end)], done)
        ckpt.finish_pending()  # a background save started at the step before
        if done % r.checkpoint_every == 0 or done == end:
            _save(job, ckpt, done)
        bar.update(1)


class _Log:
    """The main rank's metrics: JSONL (vtp_fast.train.common.MetricsLog) and, when asked and installed,
    TensorBoard scalars."""

    def __init__(self, out: Path, start: int, tensorboard: bool):
        self.metrics = MetricsLog(out / "metrics.jsonl", resume_at=start)
        self.tb = None
        if tensorboard and optional.available("tensorboard"):  # optional: not a dependency
            self.tb = optional.module("tensorboard").SummaryWriter(str(out / "tb"))

    def write(self, step: int, row: dict[str, Any]) -> None:
        self.metrics.write(step=step, **row)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _write(log: _Log | None, step: int, row: dict[str, Any]) -> None:
    if log is not None and row:
        log.write(step, row)


def _evaluate(log: _Log | None, bar, due: list[Evaluation], step: int) -> None:
    """Run the evaluations due at `step` (on every rank), log their rows and say them under the progress bar."""
    for ev in due:
        row = ev.fn(step)
        _write(log, step, row)
        if bar is not None and log is not None and row:
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))


def _resume(job: Job, path: Path) -> tuple[int, dict | None]:
    """Load the checkpoint at `path` into the job; -> (its step, the RNG streams to restore before the loop)."""
    state = Checkpointer.load(path, job.checkpoint_model, job.modules(), job.optimizers())
    job.load_state_dict(state)
    if (warning := resume_threads(state.get("torch_threads"))) is not None and dist.rank() == 0:
        warnings.warn(warning, stacklevel=1)
    saved_rng = state.get("rng") or ({"torch_cpu": state["rng_cpu"]} if "rng_cpu" in state else None)
    return int(state["step"]), saved_rng


def _step_row(job: Job, result: StepOutput) -> dict[str, Any]:
    """A logged step: terms and aux averaged over ranks, the schedules, peak memory, the job's own."""
    world = dist.world_size()
    mean = lambda v: (dist.all_reduce_sum(v.float().clone()) / world).item()  # noqa: E731
    return {**{f"loss/{k}": mean(v) for k, v in result.terms.items()}, **{k: mean(v) for k, v in result.aux.items()},
            **result.scalars, "memory_mb": memory_mb(job.device), **job.metrics()}


def _save(job: Job, ckpt: Checkpointer, step: int) -> None:
    """A checkpoint of every rank's state (collective), in run.checkpoint_format."""
    state = {"step": step, **job.state_dict(), "rng": rng_state(), "config": to_dict(job.cfg),
             "torch_threads": torch.get_num_threads()}
    ckpt.save(step, job.checkpoint_model, job.modules(), job.optimizers(), state)
