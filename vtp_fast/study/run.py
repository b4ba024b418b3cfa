"""`vtp-fast study`: the paper's scaling study, as stages that each write their result and are skipped once done.

For every objective mix and tokenizer budget (and the full objective with wide latents) a tokenizer is pretrained,
scored on the held-out set (rFID / rKID, PSNR, SSIM, zero-shot, linear probe), its latents of the labelled set are
extracted, and a DiT is trained on them once per seed and scored by gKID / gFID of its samples against real images
(along DiT training for the largest budget). Every figure is read against the instrument's own range at the same
sample count: the floor (real images against other real images) and each tokenizer's ceiling (its decoder applied to
Gaussian latents, which is what an untrained DiT would produce).

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
from vtp_fast.study.config import MIXES, StudyConfig, resolve

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
    run: Callable[[], object]
    everywhere: bool = False  # under torchrun: every rank runs it (training); else rank 0 does, the others wait


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
            if stage.everywhere or dist.rank() == 0:
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


def device() -> torch.device:
    """Where scoring, sampling and latent extraction run: this rank's GPU, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


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


def train_tokenizer(out: Path, mix: str, steps: int, channels: int, cfg: StudyConfig) -> dict:
    """Pretrain one tokenizer; its compute is the model FLOPs of one step at the configured batch (forward +
    backward, teacher included; vtp_fast.study.plan) times the steps."""
    from vtp_fast.eval.evaluate import held_out_scores
    from vtp_fast.study.plan import tokenizer_step
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


def score_tokenizer(run_dir: Path, cfg: StudyConfig, held_out, train_set) -> dict:
    from vtp_fast.data.pairs import normalize_u8
    from vtp_fast.eval import evaluate
    from vtp_fast.eval.probe import zero_shot_names
    from vtp_fast.models.pretrained import load_pretrained

    model = load_pretrained(run_dir / "tokenizer" / "checkpoint").to(device())
    scores = evaluate.reconstruction_scores(model, held_out, cfg.samples, kid_subset_size=cfg.kid_subset_size,
                                            progress=False)
    scores.pop("n")
    if model.config.train_clip:
        zs = zero_shot_names(model, normalize_u8(held_out.images), held_out.captions)
        scores |= {"zero_shot_top1": zs["top1"], "zero_shot_top5": zs["top5"], "zero_shot_chance": zs["chance"]}
    scores |= evaluate.linear_probe_scores(model, train_set, held_out, epochs=cfg.probe_epochs)
    with torch.no_grad():  # the same held-out images for every tokenizer: the report's reconstruction grid
        x = held_out.images[evaluate.pick(held_out, 8, seed=1)]  # (8, S, S, 3) uint8
        recon = model.denormalize(model.decode(model.encode(normalize_u8(x).to(device())))).clamp(0, 1).cpu()
    torch.save({"original": x.permute(0, 3, 1, 2).contiguous(), "recon": evaluate.to_uint8_nchw(recon)},
               run_dir / "recon_examples.pt")
    return _save(run_dir / "scores.json", scores)


def reference_labels(cfg: StudyConfig, train_set) -> torch.Tensor:
    """The labels of the real reference images: generated sets are drawn class for class like them."""
    from vtp_fast.eval.evaluate import pick

    return train_set.labels[pick(train_set, cfg.samples)]


def score_floor(out: Path, cfg: StudyConfig, train_set) -> dict:
    """Real against real: `samples` images against `samples` other images of the same set (the best any generator
    can score at this count)."""
    from vtp_fast.eval.evaluate import generation_scores, pick

    other = train_set.images[pick(train_set, cfg.samples, skip=cfg.samples)].permute(0, 3, 1, 2).contiguous()
    g = generation_scores(other, train_set, cfg.samples, kid_subset_size=cfg.kid_subset_size,
                          kid_subsets=cfg.kid_subsets, progress=False)
    return _save(out / "floor.json", g)


def score_ceiling(run_dir: Path, cfg: StudyConfig, train_set) -> dict:
    """The tokenizer's decoder on Gaussian latents (the latent set's per-channel mean and std): what a DiT that has
    learned nothing generates."""
    from vtp_fast.data.latents import load_latents
    from vtp_fast.eval.evaluate import generation_scores
    from vtp_fast.models.pretrained import load_pretrained

    tokenizer = load_pretrained(run_dir / "tokenizer" / "checkpoint").to(device())
    meta = load_latents(run_dir / "latents").meta
    mean, std = (torch.tensor(meta[k], device=device()).view(1, -1, 1, 1) for k in ("mean", "std"))
    gen = torch.Generator().manual_seed(0)
    images = []
    with torch.no_grad():
        for i in range(0, cfg.samples, 64):
            z = torch.randn(min(64, cfg.samples - i), meta["channels"], *meta["grid"], generator=gen).to(device())
            images.append(tokenizer.denormalize(tokenizer.decode(z * std + mean)).clamp(0, 1).cpu())
    g = generation_scores(torch.cat(images), train_set, cfg.samples, kid_subset_size=cfg.kid_subset_size,
                          kid_subsets=cfg.kid_subsets, progress=False)
    return _save(run_dir / "ceiling.json", g)


def extract(run_dir: Path, train_set) -> None:
    from vtp_fast.eval.latents import extract_latents
    from vtp_fast.models.pretrained import load_pretrained

    checkpoint = run_dir / "tokenizer" / "checkpoint"
    extract_latents(load_pretrained(checkpoint).to(device()), train_set, run_dir / "latents", tokenizer=str(checkpoint),
                    progress=False)


def score_dit(run_dir: Path, seed: int, stop: int, previous: int, cfg: StudyConfig, train_set) -> dict:
    """Train (resume) this seed's DiT to `stop`, sample one image per reference label, score them."""
    from vtp_fast.eval.evaluate import generation_scores
    from vtp_fast.models.pretrained import load_pretrained
    from vtp_fast.train.dit import DiTTrainConfig, generate, load_dit, train_dit

    work = run_dir / f"dit-s{seed}"
    dcfg = load_config(DiTTrainConfig, [resolve(cfg.dit)] if cfg.dit else [], [
        "run.log_every=50", f"warmup_steps={min(100, cfg.dit_steps // 10 + 1)}", *cfg.dit_overrides,
        f"latents={run_dir / 'latents'}", f"run.steps={cfg.dit_steps}", f"run.stop_at={stop}",
        f"run.out_dir={work / 'run'}", f"run.checkpoint_every={max(1, stop - previous)}", "run.resume=auto",
        f"run.seed={seed}"])
    t0 = time.perf_counter()
    train_dit(dcfg)  # on every rank under torchrun
    seconds = time.perf_counter() - t0
    if dist.rank() != 0:
        return {}
    dit, meta = load_dit(work / "run" / "dit", device())
    tokenizer = load_pretrained(run_dir / "tokenizer" / "checkpoint").to(device())
    images = generate(dit, meta, tokenizer, reference_labels(cfg, train_set), steps=cfg.sample_steps, seed=seed)
    g = generation_scores(images, train_set, cfg.samples, kid_subset_size=cfg.kid_subset_size,
                          kid_subsets=cfg.kid_subsets, progress=False)
    return _save(work / f"at-{stop}.json", {"seed": seed, "dit_steps": stop, "dit_seconds": seconds, **g})


# ---------------------------------------------------------------------------------------------------- the study
def load_sets(cfg: StudyConfig, size: int):
    from vtp_fast.data.labelled import LabelledImages, load_images

    train_set, held_out = load_images(cfg.data, size), load_images(cfg.held_out, size)
    if cfg.max_images and len(train_set) > cfg.max_images:
        n = cfg.max_images
        train_set = LabelledImages(train_set.images[:n], train_set.labels[:n], train_set.class_names,
                                   train_set.captions[:n], f"{train_set.name}-first{n}")
    return train_set, held_out


def stages(cfg: StudyConfig, out: Path, train_set, held_out) -> list[Stage]:
    """Every tokenizer first (a pretraining run needs nothing else), then the floor, then each tokenizer's scores,
    latents, ceiling and DiT seeds, the largest budget first (its DiT curve is the instrument's own check)."""
    n, r = cfg.samples, RATES
    runs = [(out / f"{mix}-{budget}-c{channels}", mix, budget, channels) for mix, budget, channels in cfg.runs]
    plan = [Stage(f"{run_dir.name}: pretrain {budget} steps", f"tokenizer:{mix}", budget * r[f"tokenizer:{mix}"],
                  run_dir / "tokenizer" / "result.json",
                  lambda run_dir=run_dir, mix=mix, budget=budget, channels=channels:
                  train_tokenizer(run_dir / "tokenizer", mix, budget, channels, cfg), everywhere=True)
            for run_dir, mix, budget, channels in runs]
    plan.append(Stage("floor: real vs real", "score", 2 * n * r["inception"], out / "floor.json",
                      lambda: score_floor(out, cfg, train_set)))
    for run_dir, _, budget, _ in sorted(runs, key=lambda r: -r[2]):
        name = run_dir.name
        plan += [
            Stage(f"{name}: rFID, PSNR, zero-shot, probe", "score", 2 * n * r["inception"] + r["probe"],
                  run_dir / "scores.json", lambda run_dir=run_dir: score_tokenizer(run_dir, cfg, held_out, train_set)),
            Stage(f"{name}: latents", "latents", 2 * len(train_set) * r["encode"], run_dir / "latents" / "meta.json",
                  lambda run_dir=run_dir: extract(run_dir, train_set)),
            Stage(f"{name}: ceiling (decoded Gaussian latents)", "score", n * r["inception"], run_dir / "ceiling.json",
                  lambda run_dir=run_dir: score_ceiling(run_dir, cfg, train_set)),
        ]
        for seed in range(cfg.dit_seeds):
            previous = 0
            for stop in cfg.curve_for(budget):
                cost = (stop - previous) * r["dit_step"] + n * (cfg.sample_steps * r["euler"] + r["inception"])
                plan.append(Stage(f"{name}: DiT seed {seed} to {stop} steps, {n} samples", "dit", cost,
                                  run_dir / f"dit-s{seed}" / f"at-{stop}.json",
                                  lambda run_dir=run_dir, seed=seed, stop=stop, previous=previous:
                                  score_dit(run_dir, seed, stop, previous, cfg, train_set), everywhere=True))
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
    train_set, held_out = load_sets(cfg, size)
    plan = stages(cfg, out, train_set, held_out)
    progress = Progress(plan, out / "stage_seconds.json")
    for stage in plan:
        if not stage.result.is_file():
            progress.run(stage)
    if dist.rank() == 0:
        report(cfg, out, progress.times, time.perf_counter() - progress.t0, note=note)
    return out
