"""What a scaling study runs: the objective mixes, the tokenizer budgets, the DiT and the metrics' sample counts.

The defaults are the CPU study on the emoji set; `configs/study/*.yaml` hold differences (the GPU-scale study: FID-50K
and ADM's suite against ADM's reference batch). `dry_run` shrinks any study to tiny shapes that run on a CPU in a
minute or two: every stage, the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from vtp_fast.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]  # the repository (configs/ is looked up here for relative paths)

MIXES = {  # objective weights (published 0.1 rec + 1 ssl + 1 clip for the full objective)
    "rec": {"rec": 1.0, "clip": 0.0, "ssl": 0.0},
    "clip+ae": {"rec": 0.1, "clip": 1.0, "ssl": 0.0},
    "ssl+ae": {"rec": 0.1, "clip": 0.0, "ssl": 1.0},
    "clip+ssl+ae": {"rec": 0.1, "clip": 1.0, "ssl": 1.0},
}


@dataclass
class StudyConfig:
    # tokenizers: every (mix, budget) pair, plus the full objective with `wide_channels` latent channels
    tokenizer: str = "configs/tokenizer/study_tiny.yaml"  # the pretraining config every tokenizer run starts from
    tokenizer_overrides: list[str] = field(default_factory=list)  # dotted overrides on top of it
    mixes: tuple[str, ...] = ("rec", "clip+ssl+ae")  # the ablations clip+ae and ssl+ae: mixes=[...] (CPU time)
    budgets: tuple[int, ...] = (100, 300, 900)  # tokenizer training steps, ascending
    channels: int = 64
    wide_channels: int = 256  # 0: no channel comparison
    wide_budget: int = 300  # the budget of the wide tokenizer; 0: the largest
    # data (vtp_fast.data.labelled.open_images: a named set, a shards directory or an image folder tree, streamed):
    # DiT latents, the real images of the floor (and the reference without adm_reference) and the linear probe's
    # training set; the held-out set scores reconstruction (rFID, PSNR), zero-shot and the probe
    data: str = "emoji:google,twitter,fluent"
    held_out: str = "emoji:openmoji"
    max_images: int = 0  # >0: at most this many images of each set (the first ones); 0: every image
    latent_shard: int = 4096  # images per latent shard (vtp_fast.eval.latents: resumable, dealt over the ranks)
    # the DiT trained on each tokenizer's latents: one run per seed, scored at each point of the curve (the largest
    # budget's tokenizers) or at its end (the others)
    dit: str = "configs/dit/study_tiny.yaml"  # a DiT training config (YAML); "": the DiTTrainConfig defaults
    dit_overrides: list[str] = field(default_factory=list)
    dit_steps: int = 600
    dit_curve: tuple[int, ...] = (150, 300, 600)  # ascending, ending at dit_steps
    dit_seeds: int = 3
    sample_steps: int = 50  # Euler steps
    sample_batch: int = 64  # the sampler's batch and chunk (vtp_fast.downstream.sample: chunks dealt over the ranks)
    sample_chunk: int = 1000
    # the samples' classes: "balanced", every class equally (ADM's protocol, for a class-balanced set like ImageNet),
    # or "data", the labelled set's class frequencies (sample i has the class of reference image i of the labelled
    # set), so that on an imbalanced set (the emoji categories) the samples compare with the floor's real images
    sample_classes: str = "data"
    keep_samples: bool = True  # false: each samples.npz is removed once scored (50K at 256 px: 9.8 GB each)
    # metrics: every DiT's `samples` images, each ceiling's `samples` decodes and the floor's `samples` real images are
    # scored by ADM's suite (FID, sFID, Inception Score, precision, recall) and KID against one reference: ADM's
    # reference batch `adm_reference` (.npz: its precomputed statistics for FID / sFID, its images for KID,
    # precision and recall) or, when "", `samples` real images of `data` (the floor: `samples` others). rFID / rKID:
    # `samples` held-out reconstructions against their originals. The CPU study's 500 fit its time; samples=1000
    # costs about 20 min more on 2 cores (bf16 Inception)
    samples: int = 500
    adm_reference: str = ""
    inception_precision: str = "bf16"  # fp32: torch-fidelity's exact network (numbers to publish); bf16 3x faster
    inception_weights: str = ""  # torch-fidelity's weights file (with the head the Inception Score needs); "": torch
    # hub's copy if there, else the offline conversion (no head: the Inception Score is reported unavailable)
    kid_subset_size: int = 250
    kid_subsets: int = 100
    probe_epochs: int = 60

    def validate(self) -> None:
        unknown = [m for m in self.mixes if m not in MIXES]
        if unknown or not self.mixes:
            raise ConfigError(f"mixes: unknown mix {unknown[0] if unknown else '(none given)'} "
                              f"(choices: {', '.join(MIXES)})")
        if not self.budgets or list(self.budgets) != sorted(set(self.budgets)) or self.budgets[0] < 1:
            raise ConfigError(f"budgets: positive, distinct and ascending, got {list(self.budgets)}")
        if self.wide_channels and self.wide_budget and self.wide_budget not in self.budgets:
            raise ConfigError(f"wide_budget: {self.wide_budget} is not one of the budgets {list(self.budgets)}")
        curve = list(self.dit_curve)
        if not curve or curve != sorted(set(curve)) or curve[0] < 1 or curve[-1] != self.dit_steps:
            raise ConfigError(f"dit_curve: distinct ascending steps ending at dit_steps ({self.dit_steps}), "
                              f"got {curve}")
        if self.dit_seeds < 1:
            raise ConfigError(f"dit_seeds: must be >= 1, got {self.dit_seeds}")
        if not 2 <= self.kid_subset_size <= self.samples:
            raise ConfigError(f"kid_subset_size: between 2 and samples ({self.samples}), got {self.kid_subset_size}")
        if self.samples < 4:
            raise ConfigError(f"samples: at least 4 (k-NN precision / recall with k = 3), got {self.samples}")
        for key in ("sample_batch", "sample_chunk", "latent_shard"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.sample_classes not in ("balanced", "data"):
            raise ConfigError(f"sample_classes: {self.sample_classes!r} (choices: balanced, data)")
        from vtp_fast.eval.inception import PRECISIONS

        if self.inception_precision not in PRECISIONS:
            raise ConfigError(f"inception_precision: {self.inception_precision!r} (choices: {', '.join(PRECISIONS)})")

    @property
    def runs(self) -> list[tuple[str, int, int]]:
        """(mix, budget, channels) of every tokenizer, smallest budget first."""
        runs = [(mix, b, self.channels) for b in self.budgets for mix in self.mixes]
        if self.wide_channels:
            runs.append(("clip+ssl+ae", self.wide_budget or self.budgets[-1], self.wide_channels))
        return runs

    def curve_for(self, budget: int) -> tuple[int, ...]:
        return self.dit_curve if budget == self.budgets[-1] else (self.dit_steps,)


def resolve(path: str) -> Path:
    """A config path as given, else relative to the repository."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else ROOT / p


def load_study(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    return load_config(StudyConfig, [resolve(str(path))] if path else [], overrides)


# Tiny shapes for --quick / --dry-run: every stage of any study runs on a CPU in a minute or two. The tokenizer and
# DiT overrides come after the study's own, so they win.
DRY_TOKENIZER = ["model.preset=vtp-nano", "model.init=null", "data.image_size=64", "data.shards=emoji",
                 "data.eval_shards=null", "data.num_workers=0", "data.eval_images=16", "batch.size=16", "batch.ssl=4",
                 "batch.rec=8", "batch.accumulation=1", "ssl.prototypes=64", "ssl.hidden=32", "ssl.bottleneck=16",
                 "ssl.views.global_size=64", "ssl.views.local_size=32", "ssl.views.local_crops=2",
                 "objective.perceptual=0", "run.precision=fp32", "run.compile=false", "run.eval_every=1000000",
                 "optim.warmup_steps=1", "ssl.teacher_temp_warmup_steps=2"]
DRY_DIT = ["preset=dit-nano", "batch=16", "run.precision=fp32", "run.compile=false", "optim.warmup_steps=1"]
DRY_DATA, DRY_HELD_OUT = "emoji:google,twitter,fluent", "emoji:openmoji"


def _here(path: str) -> bool:
    """A data set or reference on this machine (a directory or a file), not a named set."""
    return bool(path) and Path(path).exists()


def dry_run(cfg: StudyConfig) -> StudyConfig:
    """The same study at tiny shapes: three 1-3 step budgets, two mixes, two DiT seeds of 4 steps, 12 samples in
    chunks of 5, latents in shards of 32 images. The labelled and held-out sets stay the study's when both are on
    this machine (so a dry run on the cluster reads its shards or folders), else become the bundled emoji set; either
    way the first 96 images of each. adm_reference stays when it is on this machine."""
    mixes = tuple(dict.fromkeys((cfg.mixes[0], cfg.mixes[-1])))
    budgets = (1, 2, 3)  # the wide tokenizer keeps its place among the budgets
    wide = budgets[cfg.budgets.index(cfg.wide_budget)] if cfg.wide_budget in cfg.budgets[:-1] else 0
    data, held_out = (cfg.data, cfg.held_out) if _here(cfg.data) and _here(cfg.held_out) else (DRY_DATA, DRY_HELD_OUT)
    return replace(cfg, mixes=mixes, budgets=budgets, wide_budget=wide,
                   tokenizer_overrides=[*cfg.tokenizer_overrides, *DRY_TOKENIZER], data=data, held_out=held_out,
                   max_images=96, latent_shard=32, dit_overrides=[*cfg.dit_overrides, *DRY_DIT], dit_steps=4,
                   dit_curve=(2, 4), dit_seeds=2, sample_steps=2, sample_batch=4, sample_chunk=5, samples=12,
                   adm_reference=cfg.adm_reference if _here(cfg.adm_reference) else "", inception_precision="bf16",
                   kid_subset_size=6, kid_subsets=10, probe_epochs=5)
