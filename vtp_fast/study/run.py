"""`vtp-fast study`: the paper's scaling study, as stages that each write their result and are skipped once done.

For every objective mix and tokenizer budget (and the full objective with wide latents) a tokenizer is pretrained,
scored on the held-out set (rFID / rKID, PSNR, SSIM, zero-shot, linear probe), its latents of the labelled set are
extracted (vtp_fast.eval.latents: sharded over the ranks, resumable), and a DiT is trained on the memory-mapped
latents once per seed; `samples` images (class-balanced, or in the labelled set's class frequencies) are drawn from
it by the distributed sampler (vtp_fast.downstream.sample: an ADM .npz, resumable) and scored by ADM's suite (FID,
sFID, Inception Score, precision, recall) and KID against the reference (ADM's reference batch, or real images of
the labelled set; vtp_fast.study.scoring), along DiT training for the largest budget. The labelled and held-out sets
are streamed, never held in memory. Every figure is read against the instrument's own range at the same sample
count: the floor (real images against the reference) and each tokenizer's ceiling (its decoder applied to Gaussian
latents, which is what an untrained DiT would produce).

An interrupted study continues at the first stage without a result; a progress line names each stage with the time
elapsed and an estimate of the time left.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vtp_fast import distributed as dist
from vtp_fast.config import load_config, save_config
from vtp_fast.io import atomic_write_text
from vtp_fast.study import scoring
from vtp_fast.study.config import MIXES, StudyConfig, resolve
from vtp_fast.study.scoring import Sets, device

# Seconds per unit on 2 idle CPU cores at the CPU study's shapes: a tokenizer step per mix, a DiT step, an image
# through the Inception network, one Euler step of one sample, an image encoded into latents. A stage's estimate is
# its work at these rates; once a stage of a kind has run, the rest of that kind are scaled by measured / estimated.
RATES = {"tokenizer:rec": 0.32, "tokenizer:clip+ae": 0.5, "tokenizer:ssl+ae": 0.55, "tokenizer:clip+ssl+ae": 0.7,
         "dit_step": 0.03, "inception": 0.08, "euler": 2e-4, "encode": 0.005, "probe": 20.0}


@dataclass
class Stage:
    name: str
    kind: str  # stages of a kind share one measured / estimated ratio
    estimate: float  # seconds, from RATES
    result: Path  # the stage is done when this file exists
    run: Callable[[], object]  # under torchrun every rank runs it


class Progress:
    """`study [k/n] <stage> | 12.3 min elapsed, about 45 min left`: the time left is the estimate of every stage
    still to run, each scaled by the ratio measured / estimated of the stages of its kind that have run.

    Each stage's measured seconds are added up in `times` (stage name -> seconds, over every invocation, an
    interrupted stage's part included) and kept in `times_file` (on the main rank) when one is given."""

    def __init__(self, stages: list[Stage], times_file: Path | None = None):
        self.todo = [s for s in stages if not s.result.is_file()]
        self.total, self.done = len(stages), len(stages) - len(self.todo)
        self.spent: dict[str, list[float]] = {}  # kind -> [measured seconds, estimated seconds]
        self.times_file = times_file
        self.times: dict[str, float] = (json.loads(times_file.read_text())
                                        if times_file is not None and times_file.is_file() else {})
        self.t0 = time.perf_counter()

    def left(self) -> float:
        def ratio(kind: str) -> float:
            s = self.spent.get(kind)
            return s[0] / max(s[1], 1e-9) if s else 1.0

        return sum(s.estimate * ratio(s.kind) for s in self.todo)

    def run(self, stage: Stage) -> None:
        self.done += 1
        if dist.rank() == 0:
            print(f"study [{self.done}/{self.total}] {stage.name} | {(time.perf_counter() - self.t0) / 60:.1f} min "
                  f"elapsed, about {self.left() / 60:.0f} min left", flush=True)
        t = time.perf_counter()
        try:
            stage.run()
            dist.barrier()
        finally:  # an interrupted stage's time counts too: the next invocation continues its work
            elapsed = time.perf_counter() - t
            self.times[stage.name] = self.times.get(stage.name, 0.0) + elapsed
            if self.times_file is not None and dist.rank() == 0:
                atomic_write_text(self.times_file, json.dumps(self.times, indent=1))
        s = self.spent.setdefault(stage.kind, [0.0, 0.0])
        s[0] += elapsed
        s[1] += stage.estimate
        self.todo.remove(stage)


def _save(path: Path, result: dict) -> dict:
    """Written atomically: a killed stage never leaves a result that looks done."""
    atomic_write_text(path, json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------------------------------------- stages
def pretrain_config(cfg: StudyConfig, out: Path, mix: str, steps: int, channels: int):
    from vtp_fast.train.config import PretrainConfig

    w = MIXES[mix]
    overrides = [f"run.out_dir={out}", f"run.checkpoint_every={min(steps, 300)}", "run.resume=auto",
                 "run.tensorboard=false",
                 *cfg.tokenizer_overrides, f"run.steps={steps}",
                 f"model.overrides={{vision_feature_bottleneck: {channels}}}",
                 f"objective.rec={w['rec']}", f"objective.clip={w['clip']}", f"objective.ssl={w['ssl']}"]
    if w["ssl"] == 0:
        overrides.append("batch.ssl=0")
    pcfg = load_config(PretrainConfig, [resolve(cfg.tokenizer)], overrides)
    if w["clip"] == 0:  # no pairs that only CLIP would use: the step encodes none, and none is loaded either
        pcfg.batch.size = max(pcfg.batch.rec, pcfg.batch.ssl)
    return pcfg


def tokenizer_step(cfg: StudyConfig, mix: str, channels: int) -> dict:
    """Model FLOPs of one pretraining step of this (mix, channels) at the configured global batch, by part
    (vtp_fast.measure.study_flops.count_tokenizer_step): for each tokenizer's result and the GPU plan."""
    from vtp_fast.measure.study_flops import count_tokenizer_step

    pcfg = pretrain_config(cfg, Path("/nonexistent/plan"), mix, 1, channels)
    return {"mix": mix, "channels": channels, **count_tokenizer_step(pcfg)}


def train_tokenizer(out: Path, mix: str, steps: int, channels: int, cfg: StudyConfig) -> dict:
    """Pretrain one tokenizer; its compute is the model FLOPs of one step at the configured batch (forward +
    backward, teacher included; `tokenizer_step`) times the steps."""
    from vtp_fast.eval.evaluate import held_out_scores
    from vtp_fast.train.pretrain import pretrain

    pcfg = pretrain_config(cfg, out, mix, steps, channels)
    t0 = time.perf_counter()
    pretrain(pcfg, held_out_scores)  # on every rank under torchrun
    seconds = time.perf_counter() - t0
    if dist.rank() != 0:
        return {}
    flops = tokenizer_step(cfg, mix, channels)["step_flops"]
    return _save(out / "result.json", {"mix": mix, "steps": steps, "channels": channels, "seconds": seconds,
                                       "seconds_per_step": seconds / steps, "tokenizer_gflops": flops * steps / 1e9,
                                       "checkpoint": str(out / "checkpoint")})


def score_tokenizer(run_dir: Path, cfg: StudyConfig, sets: Sets) -> dict:
    """rFID / rKID, PSNR, SSIM of held-out reconstructions, zero-shot, the linear probe (last layer: class token +
    mean patch token, and the latent; vtp_fast.eval.classify on features stored in run_dir/features, computed over
    the ranks and removed once the scores are written) and the report's reconstruction examples."""
    import shutil

    from vtp_fast.data.images import normalize_u8
    from vtp_fast.data.labelled import take
    from vtp_fast.eval import evaluate
    from vtp_fast.eval.classify import probe_eval
    from vtp_fast.models.pretrained import load_pretrained

    model = load_pretrained(run_dir / "tokenizer" / "checkpoint").to(device())
    scores = scoring.reconstruction_scores(model, cfg, run_dir.parent, sets)
    features = run_dir / "features"
    if model.config.train_clip:
        scores |= scoring.zero_shot(model, sets.held_out, features, sets.workers)
    probe = probe_eval(model, sets.train, sets.held_out, features, probe={"epochs": cfg.probe_epochs},
                       workers=sets.workers, progress=False)
    if dist.rank() != 0:
        return {}
    scores |= probe
    with torch.no_grad():  # the same held-out images for every tokenizer: the report's reconstruction grid
        x = take(sets.held_out, evaluate.pick(sets.held_out, 8, seed=1)).images  # (8, S, S, 3) uint8
        recon = model.denormalize(model.decode(model.encode(normalize_u8(x).to(device())))).clamp(0, 1).cpu()
    torch.save({"original": x.permute(0, 3, 1, 2).contiguous(), "recon": evaluate.to_uint8_nchw(recon)},
               run_dir / "recon_examples.pt")
    result = _save(run_dir / "scores.json", scores)
    shutil.rmtree(features, ignore_errors=True)  # gigabytes at ImageNet scale: the scores are what is kept
    return result


def score_floor(out: Path, cfg: StudyConfig, sets: Sets) -> dict:
    """Real against the reference: `samples` real images of the labelled set (others than the reference's own when
    the study is its own reference): the best any generator can score at this count."""
    from vtp_fast.eval.evaluate import pick

    ids = pick(sets.train, cfg.samples, skip=0 if cfg.adm_reference else cfg.samples)
    g = scoring.score_images(scoring.real_images(sets.train, ids, sets.workers), cfg, out, sets)
    return _save(out / "floor.json", g) if dist.rank() == 0 else {}


def score_ceiling(run_dir: Path, cfg: StudyConfig, sets: Sets) -> dict:
    """The tokenizer's decoder on Gaussian latents (the latent set's per-channel mean and std): what a DiT that has
    learned nothing generates."""
    from vtp_fast.data.latents import load_latents
    from vtp_fast.models.pretrained import load_pretrained

    tokenizer = load_pretrained(run_dir / "tokenizer" / "checkpoint").to(device()).eval()
    images = scoring.gaussian_decodes(tokenizer, load_latents(run_dir / "latents").meta, cfg.samples)
    g = scoring.score_images(images, cfg, run_dir.parent, sets)
    return _save(run_dir / "ceiling.json", g) if dist.rank() == 0 else {}


def extract(run_dir: Path, cfg: StudyConfig, sets: Sets) -> None:
    """The labelled set's latents (and their mirrors'), in shards of latent_shard images dealt over the ranks;
    a killed extraction keeps its finished shards."""
    from vtp_fast.eval.latents import extract_latents
    from vtp_fast.models.pretrained import load_pretrained

    checkpoint = run_dir / "tokenizer" / "checkpoint"
    extract_latents(load_pretrained(checkpoint).to(device()), sets.train, run_dir / "latents",
                    per_shard=cfg.latent_shard, workers=sets.workers, tokenizer=str(checkpoint), progress=False)


def sample_classes(cfg: StudyConfig, meta: dict, sets: Sets) -> tuple[int, ...]:
    """The classes the sampler cycles through (sample i: classes[i % len]): every class of the latent set once
    ("balanced"), or the labels of the labelled set's reference images ("data": its class frequencies)."""
    from vtp_fast.downstream.sample import class_ids
    from vtp_fast.eval.evaluate import pick

    if cfg.sample_classes == "balanced":
        return tuple(class_ids(meta["class_names"], None))
    return tuple(scoring.labels_of(sets.train, pick(sets.train, cfg.samples), sets.workers).tolist())


def score_dit(run_dir: Path, seed: int, stop: int, previous: int, cfg: StudyConfig, sets: Sets) -> dict:
    """Train (resume) this seed's DiT to `stop` on the memory-mapped latent set, draw `samples` images of
    `sample_classes` with the distributed sampler (resumable, an ADM .npz), score them with ADM's suite."""
    from vtp_fast.data.image_sets import open_image_set
    from vtp_fast.downstream.sample import SampleSpec, sample_images
    from vtp_fast.models.pretrained import load_pretrained
    from vtp_fast.train.dit import DiTTrainConfig, load_dit, train_dit

    work = run_dir / f"dit-s{seed}"
    dcfg = load_config(DiTTrainConfig, [resolve(cfg.dit)] if cfg.dit else [], [
        "run.log_every=50", f"optim.warmup_steps={min(100, cfg.dit_steps // 10 + 1)}", *cfg.dit_overrides,
        f"latents={run_dir / 'latents'}", f"run.steps={cfg.dit_steps}", f"run.stop_at={stop}",
        f"run.out_dir={work / 'run'}", f"run.checkpoint_every={max(1, stop - previous)}", "run.resume=auto",
        f"run.seed={seed}"])
    t0 = time.perf_counter()
    train_dit(dcfg)  # on every rank under torchrun
    seconds = time.perf_counter() - t0
    dist.barrier()  # rank 0 exported the DiT every rank samples from
    dit, meta = load_dit(work / "run" / "dit", device())
    tokenizer = load_pretrained(run_dir / "tokenizer" / "checkpoint").to(device()).eval()
    spec = SampleSpec(n=cfg.samples, classes=sample_classes(cfg, meta, sets), steps=cfg.sample_steps, seed=seed,
                      batch=cfg.sample_batch, chunk=cfg.sample_chunk, precision="auto")
    samples = work / f"samples-{stop}"
    sample_images(dit, meta, tokenizer, samples, spec, progress=False)
    dist.barrier()  # rank 0 wrote the .npz every rank reads a slice of
    g = scoring.score_images(open_image_set(samples / "samples.npz", "samples"), cfg, run_dir.parent, sets)
    if dist.rank() != 0:
        return {}
    result = _save(work / f"at-{stop}.json", {"seed": seed, "dit_steps": stop, "dit_seconds": seconds, **g})
    if not cfg.keep_samples:  # after the result: a killed stage finds its samples
        (samples / "samples.npz").unlink(missing_ok=True)
    return result


# ---------------------------------------------------------------------------------------------------- the study
def stages(cfg: StudyConfig, out: Path, sets: Sets) -> list[Stage]:
    """Every tokenizer first (a pretraining run needs nothing else), then the floor, then each tokenizer's scores,
    latents, ceiling and DiT seeds, the largest budget first (its DiT curve is the instrument's own check). Every
    stage runs on every rank under torchrun (training, extraction, sampling and Inception features are split over
    them); rank 0 writes the results."""
    n, r = cfg.samples, RATES
    runs = [(out / f"{mix}-{budget}-c{channels}", mix, budget, channels) for mix, budget, channels in cfg.runs]
    plan = [Stage(f"{run_dir.name}: pretrain {budget} steps", f"tokenizer:{mix}", budget * r[f"tokenizer:{mix}"],
                  run_dir / "tokenizer" / "result.json",
                  lambda run_dir=run_dir, mix=mix, budget=budget, channels=channels:
                  train_tokenizer(run_dir / "tokenizer", mix, budget, channels, cfg))
            for run_dir, mix, budget, channels in runs]
    plan.append(Stage("floor: real vs the reference", "score", 2 * n * r["inception"], out / "floor.json",
                      lambda: score_floor(out, cfg, sets)))
    for run_dir, _, budget, _ in sorted(runs, key=lambda r: -r[2]):
        name = run_dir.name
        plan += [
            Stage(f"{name}: rFID, PSNR, zero-shot, probe", "score", 2 * n * r["inception"] + r["probe"],
                  run_dir / "scores.json", lambda run_dir=run_dir: score_tokenizer(run_dir, cfg, sets)),
            Stage(f"{name}: latents", "latents", 2 * len(sets.train) * r["encode"], run_dir / "latents" / "meta.json",
                  lambda run_dir=run_dir: extract(run_dir, cfg, sets)),
            Stage(f"{name}: ceiling (decoded Gaussian latents)", "score", n * r["inception"], run_dir / "ceiling.json",
                  lambda run_dir=run_dir: score_ceiling(run_dir, cfg, sets)),
        ]
        for seed in range(cfg.dit_seeds):
            previous = 0
            for stop in cfg.curve_for(budget):
                cost = (stop - previous) * r["dit_step"] + n * (cfg.sample_steps * r["euler"] + r["inception"])
                plan.append(Stage(f"{name}: DiT seed {seed} to {stop} steps, {n} samples", "dit", cost,
                                  run_dir / f"dit-s{seed}" / f"at-{stop}.json",
                                  lambda run_dir=run_dir, seed=seed, stop=stop, previous=previous:
                                  score_dit(run_dir, seed, stop, previous, cfg, sets)))
                previous = stop
    return plan


def run_study(cfg: StudyConfig, out: str | Path, *, note: str = "") -> Path:
    """Run (or continue) the study into `out`, then write study.json, study.md and the plots there."""
    from vtp_fast.study.report import report

    dist.init_from_env()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if dist.rank() == 0:
        save_config(cfg, out / "study.yaml")
    size = pretrain_config(cfg, out, cfg.mixes[0], cfg.budgets[0], cfg.channels).data.image_size
    plan = stages(cfg, out, scoring.open_sets(cfg, size))
    progress = Progress(plan, out / "stage_seconds.json")
    for stage in plan:
        if not stage.result.is_file():
            progress.run(stage)
    if dist.rank() == 0:
        report(cfg, out, progress.times, time.perf_counter() - progress.t0, note=note)
    return out
