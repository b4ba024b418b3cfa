"""The training jobs' config schemas, in one place: the run (declared once, shared by every job), the optimizer,
pretraining's sections and the DiT's. The other layers' schemas live beside their code (index in
vtp_fast/config.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from vtp_fast.config import ConfigError
from vtp_fast.data.batch import BatchShape
from vtp_fast.data.emoji import STYLES
from vtp_fast.data.views import ViewConfig
from vtp_fast.losses.objective import ObjectiveConfig
from vtp_fast.models.presets import vtp_config


@dataclass
class RunConfig:
    """How a job runs (vtp_fast.train.loop): length, logging, checkpoints, resume, device and precision."""

    out_dir: str = "runs/run"
    steps: int = 300  # the schedules' length
    stop_at: int = 0  # stop (checkpoint and export) at this step; 0: at `steps` (resume to continue)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    checkpoint_format: Literal["full", "sharded"] = "full"  # sharded: every rank writes its shards (DCP)
    async_checkpoint: bool = False  # sharded only: write in the background while training goes on
    resume: str = "none"  # none | auto (newest checkpoint in out_dir, if any) | a checkpoint directory
    device: str = "auto"
    threads: int = 0  # torch intra-op threads; 0: from the thread budget (vtp_fast.threads)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU
    compile: bool = False  # torch.compile the training forward, as run.compile_scope says
    # blocks: every transformer block (short compiles, one graph per block shape); whole: the job's training forward
    # as one graph (pretraining: the student with its heads and losses, and the teacher; the DiT: the model)
    compile_scope: Literal["blocks", "whole"] = "blocks"
    activation_checkpointing: Literal["none", "per_block", "selective"] = "none"  # vtp_fast.compile
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    tensorboard: bool = True

    def validate(self) -> None:
        for key in ("steps", "log_every", "checkpoint_every", "max_bad_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"run.{key}: must be >= 1, got {getattr(self, key)}")
        if self.stop_at < 0:
            raise ConfigError(f"run.stop_at: must be >= 0, got {self.stop_at}")
        if self.async_checkpoint and self.checkpoint_format != "sharded":
            raise ConfigError("run.async_checkpoint: needs run.checkpoint_format=sharded")
        if self.compile_as == "whole" and self.distributed == "fsdp":
            raise ConfigError("run.compile_scope=whole: not with run.distributed=fsdp (FSDP2 gathers each block's "
                              "shards around its forward); compile per block (run.compile_scope=blocks)")

    @property
    def compile_as(self) -> str | None:
        """What the job compiles: run.compile_scope when run.compile is on, else None."""
        return self.compile_scope if self.compile else None

    @property
    def end(self) -> int:
        """The step this invocation stops at."""
        return min(self.stop_at or self.steps, self.steps)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate after warm-up
    min_lr: float = 1e-5  # end of the cosine decay
    warmup_steps: int = 50
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # cosine schedule to this value (DINOv2: 0.04 -> 0.2); null: constant
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    fused: bool = False  # torch's fused AdamW on the CPU too (one pass per tensor; last-bit differences from foreach)

    @property
    def final_lr(self) -> float:
        """The learning rate the cosine decay ends at."""
        return self.min_lr

    def validate(self) -> None:
        values = {"lr": self.lr, "min_lr": self.final_lr, "weight_decay": self.weight_decay,
                  "grad_clip": self.grad_clip}
        for key, value in values.items():
            if value < 0:
                raise ConfigError(f"optim.{key}: must be >= 0, got {value}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")


# ---------------------------------------------------------------------------------------------- pretraining
@dataclass
class ModelConfig:
    preset: str = "vtp-tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # VTPConfig fields
    rope_dtype: Literal["bf16", "fp32"] = "bf16"
    init: str | None = None  # continue from a published tokenizer: a directory or a Hub id (adds heads, teacher)

    @property
    def patch_size(self) -> int:
        return vtp_config(self.preset, **self.overrides).vision_patch_size


@dataclass
class EmojiConfig:
    """The bundled emoji set (vtp_fast.data.emoji), used when data.shards is null or "emoji"."""

    root: str | None = None  # a prepared emoji dir; null: prepare it in the cache ($VTP_FAST_CACHE)
    train_styles: tuple[str, ...] = ("google", "twitter", "fluent")
    eval_styles: tuple[str, ...] = ("openmoji",)  # held out: never trained on

    def validate(self) -> None:
        for key in ("train_styles", "eval_styles"):
            bad = [s for s in getattr(self, key) if s not in STYLES]
            if bad or not getattr(self, key):
                raise ConfigError(f"data.emoji.{key}: {list(getattr(self, key))} must be a non-empty subset of "
                                  f"{list(STYLES)}")
        if set(self.train_styles) & set(self.eval_styles):
            raise ConfigError("data.emoji.eval_styles: must not overlap data.emoji.train_styles (held-out "
                              "evaluation)")


@dataclass
class DataConfig:
    # WebDataset shards ('dir', 'a/shard-{00000..00099}.tar'), or "emoji": the emoji set written as shards in the
    # cache; null: the emoji set decoded in memory
    shards: str | None = None
    decoder: Literal["auto", "torchvision", "nvjpeg", "dali"] = "auto"  # shards: auto = DALI when importable
    dali_threads: int | None = None  # null: from the thread budget (vtp_fast.threads)
    eval_shards: str | None = None  # held-out shards for PSNR and zero-shot (with shards); null: no zero-shot
    image_size: int = 64
    eval_images: int = 512
    num_workers: int | None = None  # DataLoader workers; null: from the thread budget (vtp_fast.threads)
    sampling: Literal["epochs", "resampled"] = "epochs"  # resampled: shards drawn with replacement (StepBatches)
    synthetic: bool = False  # random pixels and tokens instead of the emoji set (benchmarks, profiles, GPUs offline)
    emoji: EmojiConfig = field(default_factory=EmojiConfig)

    def validate(self) -> None:
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be >= 0 (or null: the budget's), got {self.num_workers}")
        if self.dali_threads is not None and self.dali_threads < 1:
            raise ConfigError(f"data.dali_threads: must be >= 1 (or null), got {self.dali_threads}")


@dataclass
class BatchConfig:
    """Global sizes per optimizer step (all ranks, all accumulation micro-steps). Balanced batch: every pair
    feeds CLIP; SSL and reconstruction use subsets (paper: 16k / 4k / 2k)."""

    size: int = 64
    ssl: int = 16
    rec: int = 32
    accumulation: int = 1

    def validate(self) -> None:
        if self.size < 1 or self.accumulation < 1:
            raise ConfigError("batch.size and batch.accumulation: must be >= 1")
        for key in ("ssl", "rec"):
            if not 0 <= getattr(self, key) <= self.size:
                raise ConfigError(f"batch.{key}: {getattr(self, key)} must be between 0 and batch.size={self.size} "
                                  "(subsets of the CLIP batch)")

    @property
    def groups(self) -> int:
        """Virtual groups of a micro-step's global batch (see BatchShape): the most ranks it can be split over."""
        return math.gcd(self.size, self.ssl, self.rec) // self.accumulation

    def per_rank(self, world: int, patch: int) -> BatchShape:
        parts = world * self.accumulation
        for key in ("size", "ssl", "rec"):
            if getattr(self, key) % parts:
                raise ConfigError(f"batch.{key}: {getattr(self, key)} is not divisible by world size x accumulation "
                                  f"= {parts}")
        return BatchShape(self.size // parts, self.ssl // parts, self.rec // parts, patch, self.groups // world)


@dataclass
class SSLConfig:
    """DINOv2 defaults are noted; the defaults here are sized for the CPU configs."""

    prototypes: int = 4096  # DINOv2: 65536
    hidden: int = 512  # DINOv2: 2048
    bottleneck: int = 128  # DINOv2: 256
    head_layers: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    teacher_temp_warmup: float = 0.04  # linear warm-up from this to teacher_temp
    teacher_temp_warmup_steps: int = 100
    momentum_start: float = 0.992  # teacher EMA momentum, cosine to momentum_end
    momentum_end: float = 1.0
    centering: Literal["centering", "sinkhorn_knopp"] = "centering"
    center_momentum: float = 0.9
    views: ViewConfig = field(default_factory=ViewConfig)

    def validate(self) -> None:
        if not 0 <= self.momentum_start <= self.momentum_end <= 1:
            raise ConfigError("ssl.momentum_start/momentum_end: need 0 <= start <= end <= 1")
        for key in ("student_temp", "teacher_temp", "teacher_temp_warmup"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"ssl.{key}: must be > 0")


@dataclass
class PretrainRunConfig(RunConfig):
    out_dir: str = "runs/pretrain-tiny"
    eval_every: int = 50  # zero-shot accuracy and PSNR on the held-out style
    generative_probe_every: int = 0  # >0: every N steps, gFID of a small DiT trained on the current latents
    probe_images: int = 512
    probe_dit_steps: int = 300

    def validate(self) -> None:
        super().validate()
        if self.eval_every < 1:
            raise ConfigError(f"run.eval_every: must be >= 1, got {self.eval_every}")
        if self.generative_probe_every < 0 or self.probe_images < 2 or self.probe_dit_steps < 1:
            raise ConfigError("run.generative_probe_every >= 0, run.probe_images >= 2, run.probe_dit_steps >= 1")


@dataclass
class GANConfig:
    """Stage 2: the PatchGAN discriminator and its optimizer."""

    channels: int = 64
    layers: int = 3
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    start_step: int = 0  # no adversarial term and no discriminator update before this step


@dataclass
class PretrainConfig:
    stage: Literal[1, 2] = 1  # 1: pretraining; 2: encoder frozen, pixel decoder fine-tuned with a GAN loss
    gan: GANConfig = field(default_factory=GANConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: PretrainRunConfig = field(default_factory=PretrainRunConfig)

    def validate(self) -> None:
        o = self.objective
        if self.stage == 2 and (o.gan <= 0 or o.clip > 0 or o.ssl > 0):
            raise ConfigError("stage: 2 fine-tunes the pixel decoder only: set objective.gan > 0, objective.clip=0 "
                              "and objective.ssl=0")
        if self.stage == 1 and o.gan > 0:
            raise ConfigError("objective.gan: the adversarial term belongs to stage 2 (set stage=2)")
        uses_ssl = self.objective.ssl > 0 and (self.objective.dino or self.objective.ibot or self.objective.koleo)
        if uses_ssl and self.batch.ssl == 0:
            raise ConfigError("batch.ssl: must be > 0 when objective.ssl > 0")
        if self.batch.rec == 0:
            raise ConfigError("batch.rec: must be > 0 (reconstruction is always on)")
        if uses_ssl:
            patch = self.model.patch_size
            views = self.ssl.views
            if views.global_size % patch:
                raise ConfigError(f"ssl.views.global_size: must be a multiple of the patch size {patch}")
            if views.local_crops and views.local_size % patch:
                raise ConfigError(f"ssl.views.local_size: must be a multiple of the patch size {patch}")


# ---------------------------------------------------------------------------------------------- the DiT
@dataclass
class DiTRunConfig(RunConfig):
    out_dir: str = "runs/dit"
    steps: int = 2000
    log_every: int = 50
    checkpoint_every: int = 500
    tensorboard: bool = False

    def validate(self) -> None:
        super().validate()
        if self.distributed != "ddp":
            raise ConfigError("run.distributed: the DiT trains under DDP only")


@dataclass
class DiTOptimConfig(OptimConfig):
    """The DiT's AdamW and schedule: no weight decay, cosine to a tenth of the peak unless min_lr is set."""

    lr: float = 2e-4
    min_lr: float | None = None  # null: lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.0

    @property
    def final_lr(self) -> float:
        """optim.min_lr, or a tenth of the peak when it is null."""
        return self.lr * 0.1 if self.min_lr is None else self.min_lr

    def validate(self) -> None:
        super().validate()
        if self.weight_decay_end is not None:
            raise ConfigError("optim.weight_decay_end: the DiT keeps its weight decay constant (set null)")


@dataclass
class DiTTrainConfig:
    latents: str = ""  # a latent set directory (vtp-fast extract-latents)
    preset: str = "dit-tiny"
    overrides: dict = field(default_factory=dict)  # DiTConfig fields
    batch: int = 128
    ema: float = 0.999  # the EMA's decay once warmed up: step s uses min(ema, (1 + s) / (10 + s))
    mu: float = 0.0  # logit-normal timestep location (the paper: -0.75 for L)
    sigma: float = 1.0
    cos_weight: float = 1.0
    cos_over: Literal["sample", "position"] = "sample"  # cosine term per sample, or per position (LightningDiT)
    optim: DiTOptimConfig = field(default_factory=DiTOptimConfig)
    run: DiTRunConfig = field(default_factory=DiTRunConfig)

    def validate(self) -> None:
        if not self.latents:
            raise ConfigError("latents: a latent set directory is required (vtp-fast extract-latents)")
        if self.batch < 1:
            raise ConfigError(f"batch: must be >= 1, got {self.batch}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema: must be in [0, 1), got {self.ema}")
