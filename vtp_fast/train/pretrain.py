"""`vtp-fast pretrain`: multi-objective VTP pretraining (reconstruction + CLIP + DINO/iBOT), the main job.

Runs on one CPU or GPU, or under `torchrun` (DDP by default, FSDP2 as an option). Checkpoints are atomic and
`run.resume=auto` continues bit for bit; metrics go to JSONL and TensorBoard; at the end the run writes the
tokenizer in the published layout, loss / zero-shot / PSNR curves and a reconstruction grid.
"""

from __future__ import annotations

import math
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from vtp_fast import distributed as dist
from vtp_fast.config import ConfigError, UserError, save_config, to_dict
from vtp_fast.data.emoji import STYLES, default_cache_dir, load_emoji, prepare_emoji
from vtp_fast.data.pairs import (
    BadSample,
    BadSampleCount,
    BatchShape,
    PairSet,
    ShardSource,
    StepBatches,
    describe_pairs,
    emoji_pairs,
    normalize_u8,
    pick_decoder,
    synthetic_pairs,
)
from vtp_fast.data.shards import ShardSet, write_shards
from vtp_fast.data.shards import emoji_samples as write_emoji_samples
from vtp_fast.eval.metrics import psnr
from vtp_fast.eval.plots import image_grid, plot_curves
from vtp_fast.eval.probe import zero_shot_names
from vtp_fast.losses.clip import clamp_logit_scale_
from vtp_fast.losses.objective import Objective, ObjectiveConfig
from vtp_fast.models.presets import vtp_config
from vtp_fast.models.pretrained import load_pretrained, load_state_strict, save_pretrained
from vtp_fast.models.vtp import VTP
from vtp_fast.ops import building_for
from vtp_fast.train.checkpoint import Checkpointer
from vtp_fast.train.common import (
    MetricsLog,
    OptimConfig,
    autocast,
    pick_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from vtp_fast.train.optim import cosine_schedule, make_adamw, param_groups
from vtp_fast.train.step import SSLConfig, Student, Teacher


@dataclass
class ModelConfig:
    preset: str = "vtp-tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # VTPConfig fields
    rope_dtype: Literal["bf16", "fp32"] = "bf16"
    init: str | None = None  # continue from a published checkpoint directory (adds heads and teacher)


@dataclass
class DataConfig:
    # WebDataset shards ('dir', 'a/shard-{00000..00099}.tar'), or "emoji": the emoji set written as shards in the
    # cache; null: the emoji set decoded in memory
    shards: str | None = None
    decoder: Literal["auto", "torchvision", "nvjpeg", "dali"] = "auto"  # shards: auto = DALI when importable
    dali_threads: int = 2
    eval_shards: str | None = None  # held-out shards for PSNR and zero-shot (with shards); null: no zero-shot
    root: str | None = None  # a prepared emoji dir; null: prepare it in the cache ($VTP_FAST_CACHE)
    image_size: int = 64
    train_styles: tuple[str, ...] = ("google", "twitter", "fluent")
    eval_styles: tuple[str, ...] = ("openmoji",)  # held out: never trained on
    eval_images: int = 512
    num_workers: int = 0
    synthetic: bool = False  # random pixels and tokens instead of the emoji set (benchmarks, profiles, GPUs offline)

    def validate(self) -> None:
        for key in ("train_styles", "eval_styles"):
            bad = [s for s in getattr(self, key) if s not in STYLES]
            if bad or not getattr(self, key):
                raise ConfigError(f"data.{key}: {list(getattr(self, key))} must be a non-empty subset of "
                                  f"{list(STYLES)}")
        if set(self.train_styles) & set(self.eval_styles):
            raise ConfigError("data.eval_styles: must not overlap data.train_styles (held-out evaluation)")


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

    def per_rank(self, world: int) -> BatchShape:
        parts = world * self.accumulation
        for key in ("size", "ssl", "rec"):
            if getattr(self, key) % parts:
                raise ConfigError(f"batch.{key}: {getattr(self, key)} is not divisible by world size x accumulation "
                                  f"= {parts}")
        return BatchShape(self.size // parts, self.ssl // parts, self.rec // parts)


@dataclass
class PretrainRunConfig:
    out_dir: str = "runs/pretrain-tiny"
    steps: int = 300
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50  # zero-shot accuracy and PSNR on the held-out style
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: str = "none"  # none | auto (newest checkpoint in out_dir, if any) | a checkpoint directory
    device: str = "auto"
    threads: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU
    compile: bool = False  # torch.compile every transformer block
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    tensorboard: bool = True
    generative_probe_every: int = 0  # >0: every N steps, gFID of a small DiT trained on the current latents
    probe_images: int = 512
    probe_dit_steps: int = 300

    def validate(self) -> None:
        if self.generative_probe_every < 0 or self.probe_images < 2 or self.probe_dit_steps < 1:
            raise ConfigError("run.generative_probe_every >= 0, run.probe_images >= 2, run.probe_dit_steps >= 1")
        for key in ("steps", "log_every", "eval_every", "checkpoint_every", "max_bad_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"run.{key}: must be >= 1, got {getattr(self, key)}")


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
        if uses_ssl and self.ssl.views.global_size % 16:
            raise ConfigError("ssl.views.global_size: must be a multiple of the patch size 16")
        if uses_ssl and self.ssl.views.local_crops and self.ssl.views.local_size % 16:
            raise ConfigError("ssl.views.local_size: must be a multiple of the patch size 16")


class TrainingDiverged(UserError, RuntimeError):
    """Too many consecutive steps with non-finite losses; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------- schedules
def schedules(cfg: PretrainConfig, step: int) -> dict[str, float]:
    o, s, total = cfg.optim, cfg.ssl, cfg.run.steps
    progress = min(1.0, step / max(1, total - 1))
    wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
    warm = s.teacher_temp_warmup_steps
    return {
        "step": step,
        "lr": cosine_schedule(step, total, o.warmup_steps, o.lr, o.min_lr),
        "weight_decay": wd_end + 0.5 * (o.weight_decay - wd_end) * (1 + math.cos(math.pi * progress)),
        "momentum": s.momentum_end - 0.5 * (s.momentum_end - s.momentum_start) * (1 + math.cos(math.pi * progress)),
        "teacher_temp": (s.teacher_temp_warmup + (s.teacher_temp - s.teacher_temp_warmup) * step / warm
                         if step < warm else s.teacher_temp),
    }


# ---------------------------------------------------------------------------------------------- building
@dataclass
class Trainer:
    """Everything a step needs, built from a config (also used by `vtp-fast profile` and `bench`)."""

    cfg: PretrainConfig
    device: torch.device
    objective: Objective
    student: Student
    wrapped: torch.nn.Module  # the student under DDP / FSDP (itself on one process)
    teacher: Teacher | None
    optimizer: torch.optim.Optimizer
    shape: BatchShape
    disc: torch.nn.Module | None = None  # stage 2
    disc_wrapped: torch.nn.Module | None = None
    disc_optimizer: torch.optim.Optimizer | None = None

    @property
    def model(self) -> VTP:
        return self.student.model

    @property
    def causal_text(self) -> bool:
        """Whether token padding may be trimmed (causal text tower pooled at the end-of-text token)."""
        c = self.model.config
        return c.train_clip and not c.text_no_causal_mask and c.text_pool_type == "argmax"

    def modules(self) -> dict[str, torch.nn.Module]:
        """Checkpointed modules besides the published model."""
        mods: dict[str, torch.nn.Module] = {}
        if self.student.uses_ssl:
            mods.update(head=self.student.head, dino_loss=self.student.dino_loss, ibot_loss=self.student.ibot_loss,
                        teacher=self.teacher)
        if self.disc is not None:
            mods["discriminator"] = self.disc
        return mods

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts = {"optimizer": self.optimizer}
        if self.disc_optimizer is not None:
            opts["disc_optimizer"] = self.disc_optimizer
        return opts

    def plain_model(self) -> VTP | None:
        """The tokenizer with whole weights, for evaluation and export, on the main rank (None on the others).
        Under FSDP the shards are gathered (every rank must call this) into a fresh copy."""
        if not hasattr(self.wrapped, "reshard"):  # not FSDP-sharded
            return self.model if dist.rank() == 0 else None
        state = dist.full_state_dict(self.model)
        if dist.rank() != 0:
            return None
        copy = VTP(self.model.config, rope_dtype=self.model.rope_dtype).to(self.device)
        load_state_strict(copy, state, "gathered FSDP shards")
        return copy

    def autocast(self):
        return autocast(self.cfg.run.precision, self.device)


def build_trainer(cfg: PretrainConfig, device: torch.device) -> Trainer:
    with building_for(device):  # every layer and loss resolves its ops' backends for the training device
        return _build_trainer(cfg, device)


def _build_trainer(cfg: PretrainConfig, device: torch.device) -> Trainer:
    objective = Objective(cfg.objective.term_weights())
    overrides = {**cfg.model.overrides, "train_clip": "clip" in objective, "train_reconstruction": True,
                 "image_size": cfg.data.image_size}
    if cfg.model.init:
        model = load_pretrained(cfg.model.init, device, rope_dtype=cfg.model.rope_dtype)
        if "clip" in objective and not model.config.train_clip:
            raise ConfigError(f"model.init: {cfg.model.init} has no text tower but objective.clip > 0")
    else:
        model = VTP(vtp_config(cfg.model.preset, **overrides), rope_dtype=cfg.model.rope_dtype)
    world = dist.world_size()
    shape = cfg.batch.per_rank(world)
    student = Student(model, objective, cfg.ssl, n_rec=shape.rec, lpips_vgg_path=cfg.objective.lpips_vgg_path,
                      freeze_encoder=cfg.stage == 2)
    student.to(device)
    teacher = Teacher(student).to(device) if student.uses_ssl else None
    # fixed order: compile, then shard/wrap, then the optimizer (FSDP replaces the parameters)
    if cfg.run.compile:
        from vtp_fast.compile import apply_compile

        apply_compile(model)
    if world > 1 and cfg.run.distributed == "fsdp":
        from vtp_fast.compile import transformer_blocks

        wrapped = dist.apply_fsdp(student, transformer_blocks(model), mixed_precision=device.type == "cuda")
        if teacher is not None:
            dist.apply_fsdp(teacher, list(teacher.trunk.blocks), mixed_precision=device.type == "cuda",
                            reshard_root=True)
    else:
        wrapped = dist.apply_ddp(student, device)
    optimizer = make_adamw(param_groups({"student": student}, cfg.optim.weight_decay), cfg.optim.lr, cfg.optim.betas)
    trainer = Trainer(cfg, device, objective, student, wrapped, teacher, optimizer, shape)
    if "gan" in objective:
        from vtp_fast.models.discriminator import PatchDiscriminator

        trainer.disc = PatchDiscriminator(cfg.gan.channels, cfg.gan.layers).to(device)
        trainer.disc_wrapped = dist.apply_ddp(trainer.disc, device)
        trainer.disc_optimizer = make_adamw([{"params": list(trainer.disc.parameters()), "weight_decay": 0.0}],
                                            cfg.gan.lr, cfg.gan.betas)
    return trainer


def emoji_shards(root: Path, styles: tuple[str, ...]) -> Path:
    """The prepared emoji styles written as shards next to them (once; cached)."""
    out = root.parent / f"shards-{root.name}-{'-'.join(styles)}"
    if not (out / "manifest.json").exists():
        samples, total = write_emoji_samples(root, styles)
        write_shards(samples, out, per_shard=1000, total=total)
    return out


def load_pairs(cfg: PretrainConfig, context_length: int) -> tuple[PairSet | ShardSource, Path | None]:
    """The training source, and the prepared emoji dir when the held-out emoji style serves evaluation."""
    if cfg.data.synthetic:
        return synthetic_pairs(max(4096, 4 * cfg.batch.size), cfg.data.image_size, context_length, cfg.run.seed), None
    if cfg.data.shards and cfg.data.shards != "emoji":
        return ShardSource(ShardSet(cfg.data.shards), cfg.data.image_size, context_length), None
    root = Path(cfg.data.root) if cfg.data.root else prepare_emoji(default_cache_dir(), size=cfg.data.image_size)
    if cfg.data.shards == "emoji":
        shards = ShardSet(str(emoji_shards(root, tuple(cfg.data.train_styles))))
        return ShardSource(shards, cfg.data.image_size, context_length), root
    pairs = emoji_pairs(root, cfg.data.train_styles, context_length)
    if pairs.images.shape[1] != cfg.data.image_size:
        raise ConfigError(f"data.image_size: {cfg.data.image_size} but {root} holds {pairs.images.shape[1]} px images")
    return pairs, root


def no_eval_note(cfg: PretrainConfig) -> str:
    """Why a run has no held-out metrics: evaluation runs on real held-out images only, never on noise."""
    if cfg.data.synthetic:
        return "synthetic data: no held-out PSNR or zero-shot (there are no real images to measure them on)"
    return ("no data.eval_shards: no held-out PSNR or zero-shot; name held-out shards with data.eval_shards=... "
            "to measure them (reconstructions.png shows training images)")


def _usable(source: ShardSource, n: int) -> list[tuple[int, torch.Tensor]]:
    """(index, plain uint8 image) of the first `n` usable samples of `source` (bad ones skipped)."""
    found = []
    for i in range(len(source)):
        try:
            plain, _, _ = source.sample(i)
        except BadSample:
            continue
        found.append((i, plain))
        if len(found) == n:
            break
    return found


def first_images(pairs: PairSet | ShardSource, n: int) -> torch.Tensor:
    """The first `n` usable training images (plain, uint8), for the reconstruction grid and the generative probe
    of a run without held-out images."""
    if not isinstance(pairs, ShardSource):
        return pairs.images[:n]
    found = _usable(pairs, n)
    if not found:
        raise ConfigError("data.shards: no usable sample in the training shards")
    return torch.stack([plain for _, plain in found])


def shard_eval_set(cfg: PretrainConfig, context_length: int) -> tuple[torch.Tensor, list[str]]:
    """The first `data.eval_images` usable samples of the held-out shards: plain images and captions."""
    source = ShardSource(ShardSet(cfg.data.eval_shards), cfg.data.image_size, context_length)
    found = _usable(source, cfg.data.eval_images)
    if not found:
        raise ConfigError(f"data.eval_shards: {cfg.data.eval_shards} holds no usable sample")
    captions = [source.shards[i].caption.decode("utf-8").strip() for i, _ in found]  # usable: valid UTF-8
    return torch.stack([plain for _, plain in found]), captions


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- the step
def adversarial_term(t: Trainer, terms: dict, active: bool) -> None:
    """Stage 2: the generator's hinge loss on the reconstructions, scaled by VQGAN's adaptive weight, as the
    'gan' term (zero before gan.start_step). The discriminator gets no gradient from it."""
    recon = terms.pop("_recon")
    if not active:
        terms["gan"] = recon.sum() * 0.0
        return
    from vtp_fast.losses.gan import adaptive_weight, generator_hinge

    t.disc.requires_grad_(False)
    gen = generator_hinge(t.disc(recon))
    t.disc.requires_grad_(True)
    rec = sum(t.objective.weights[k] * terms[k] for k in ("rec_l1", "rec_mse", "rec_lpips") if k in t.objective)
    weight = adaptive_weight(rec, gen, t.model.pixel_decoder.proj_out.weight)
    terms["gan"] = weight * gen
    terms["gan_weight"] = weight  # logged only (not an objective term)


def forward_backward(t: Trainer, micro_batches: list[dict], sched: dict[str, float]) -> dict[str, torch.Tensor]:
    """Teacher targets, student terms and backward for each micro-batch (gradients accumulate, synchronised
    across ranks on the last one). Returns the detached term values averaged over the micro-batches; in stage 2
    also '_fake' / '_real' images of the last micro-batch for the discriminator."""
    logs_sum: dict[str, torch.Tensor] = {}
    n_micro = len(micro_batches)
    probe = t.student.probe
    for i, batch in enumerate(micro_batches):
        sync = i == n_micro - 1 or not hasattr(t.wrapped, "no_sync")
        with (nullcontext() if sync else t.wrapped.no_sync()), t.autocast():
            with probe.region("teacher"):
                targets = t.teacher(batch, t.student, sched["teacher_temp"]) if t.teacher is not None else None
            terms = t.wrapped(batch, targets)
            if t.disc is not None:
                recon = terms["_recon"].detach()
                adversarial_term(t, terms, sched["step"] >= t.cfg.gan.start_step)
                if "gan_weight" in terms:
                    logs_sum["gan_weight"] = terms.pop("gan_weight").float()
            total, logs = t.objective(terms)
        with probe.region("backward"):
            (total / n_micro).backward()
        for k, v in logs.items():
            logs_sum[k] = logs_sum.get(k, 0) + v.float() / n_micro
    dist.average_replicated_grads(t.wrapped)
    if t.disc is not None:
        logs_sum["_fake"], logs_sum["_real"] = recon, batch["images"][: recon.shape[0]]
    return logs_sum


def discriminator_step(t: Trainer, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """One hinge-loss update of the discriminator on real images and (detached) reconstructions."""
    from vtp_fast.losses.gan import discriminator_hinge

    with t.autocast():
        logits = t.disc_wrapped(torch.cat([real, fake]))
        loss = discriminator_hinge(*logits.chunk(2))
    loss.backward()
    t.disc_optimizer.step()
    t.disc_optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def train_step(t: Trainer, micro_batches: list[dict], sched: dict[str, float]) -> tuple[dict, bool]:
    """One optimizer step over `accumulation` micro-batches. Returns (detached logs, finite?). A non-finite step
    changes nothing: gradients are dropped, the optimizer, EMA and loss centres are left as they were."""
    for group in t.optimizer.param_groups:
        group["lr"] = sched["lr"]
    t.optimizer.param_groups[0]["weight_decay"] = sched["weight_decay"]  # the decayed group (optim.param_groups)
    saved_centers = ([m.center.clone() for m in (t.student.dino_loss, t.student.ibot_loss)]
                     if t.student.uses_ssl else [])
    logs_sum = forward_backward(t, micro_batches, sched)
    fake, real = logs_sum.pop("_fake", None), logs_sum.pop("_real", None)
    values = torch.stack(list(logs_sum.values()))
    finite = torch.isfinite(values).all().float()
    finite = bool(dist.all_reduce_sum(finite.clone()).item() == dist.world_size())  # the one sync per step
    if finite:
        with t.student.probe.region("optimizer"):
            clip = t.cfg.optim.grad_clip
            grad_norm = torch.nn.utils.clip_grad_norm_(t.student.parameters(), clip if clip > 0 else float("inf"))
            t.optimizer.step()
            if t.model.config.train_clip:
                clamp_logit_scale_(t.model.logit_scale)  # open_clip's cap, outside the graph
        if t.teacher is not None:
            with t.student.probe.region("ema"):
                t.teacher.update(t.student, sched["momentum"])
        if fake is not None and sched["step"] >= t.cfg.gan.start_step:
            logs_sum["disc"] = discriminator_step(t, fake, real)
        logs_sum["grad_norm"] = dist.full_tensor(grad_norm).detach()  # a DTensor under FSDP
    else:
        for module, center in zip((t.student.dino_loss, t.student.ibot_loss), saved_centers, strict=False):
            module.center.copy_(center)
        logs_sum["bad_terms"] = [k for k, v in logs_sum.items() if not torch.isfinite(v).all()]
    t.optimizer.zero_grad(set_to_none=True)
    return logs_sum, finite


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: VTP, eval_u8: torch.Tensor, eval_captions: list[str] | None, device: torch.device) -> dict:
    was_training = model.training
    model.eval()
    images = normalize_u8(eval_u8).to(device)
    recon = torch.cat([model.decode(model.encode(images[i:i + 128])) for i in range(0, len(images), 128)])
    result = {"eval_psnr": psnr(model.denormalize(recon), model.denormalize(images)).mean().item()}
    if model.config.train_clip and eval_captions is not None:
        zs = zero_shot_names(model, images, eval_captions)
        result.update(zero_shot_top1=zs["top1"], zero_shot_top5=zs["top5"], zero_shot_chance=zs["chance"])
    model.train(was_training)
    return result


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------- the run
def pretrain(cfg: PretrainConfig) -> dict[str, Path]:
    device = dist.init_from_env() if dist.launched_distributed() else pick_device(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    rank, world, main = dist.rank(), dist.world_size(), dist.rank() == 0
    out = Path(cfg.run.out_dir)
    seed_everything(cfg.run.seed)
    t = build_trainer(cfg, device)
    with dist.main_first():  # rank 0 prepares the emoji set and its shards once
        pairs, root = load_pairs(cfg, t.model.config.text_context_length)
    if cfg.data.eval_shards:
        eval_u8, eval_captions = shard_eval_set(cfg, t.model.config.text_context_length)
    elif root is None:  # synthetic data, or shards without a held-out set: no evaluation (never on noise)
        eval_u8, eval_captions = None, None
    else:
        held_out = load_emoji(root, cfg.data.eval_styles)
        eval_idx = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(0))[: cfg.data.eval_images]
        eval_u8, eval_captions = held_out.images[eval_idx], [held_out.captions[i] for i in eval_idx.tolist()]

    ckpt = Checkpointer(out / "checkpoints", keep=cfg.run.keep_checkpoints)
    start, saved_rng, bad_count = 0, None, BadSampleCount()  # bad_count: distinct bad samples of the whole run
    resume_from = ckpt.resolve(cfg.run.resume)
    if resume_from is not None:
        state = Checkpointer.load(resume_from, t.model, t.modules())
        for name, opt in t.optimizers().items():
            dist.load_optimizer_state(opt, state[name])
        saved_rng = state.get("rng") or {"torch_cpu": state["rng_cpu"]}  # restored last, just before the loop
        start = int(state["step"])
        if "bad_samples" in state:
            bad_count.load_state_dict(state["bad_samples"])
    if main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.sweep()
        save_config(cfg, out / "config.yaml")
    log = MetricsLog(out / "metrics.jsonl", resume_at=start) if main else None
    tb = _tensorboard(out / "tb") if main and cfg.run.tensorboard else None

    probe_data = None
    if cfg.run.generative_probe_every and main:
        from vtp_fast.eval.latents import probe_set

        if root is not None:  # the emoji training styles, labelled by category
            emoji = load_emoji(root, cfg.data.train_styles)
            pick = torch.randperm(len(emoji), generator=torch.Generator().manual_seed(1))
            probe_data = probe_set(emoji.images[pick], emoji.labels[pick], emoji.category_names, cfg.run.probe_images)
        else:
            probe_data = probe_set(eval_u8 if eval_u8 is not None else first_images(pairs, cfg.run.probe_images),
                                   None, None, cfg.run.probe_images)
    from_shards = isinstance(pairs, ShardSource)
    decoder = pick_decoder(cfg.data.decoder) if from_shards else "torchvision"
    data = StepBatches(pairs, t.shape, cfg.ssl.views, seed=cfg.run.seed, rank=rank, world=world,
                       steps=cfg.run.steps * cfg.batch.accumulation, trim_text=t.causal_text,
                       decoder=decoder, dali_threads=cfg.data.dali_threads,
                       dali_device="gpu" if device.type == "cuda" else "cpu")
    on_gpu = decoder == "nvjpeg" or (decoder == "dali" and device.type == "cuda")  # decodes in this process
    loader = DataLoader(data, batch_size=None, sampler=range(start * cfg.batch.accumulation, len(data)),
                        num_workers=0 if on_gpu else cfg.data.num_workers,
                        pin_memory=device.type == "cuda" and not on_gpu,  # GPU-decoded batches are on the device
                        generator=torch.Generator().manual_seed(cfg.run.seed))  # base seed: not from the global RNG
    n_params = sum(p.numel() for p in t.model.parameters())
    if main:
        terms = ", ".join(f"{k}={w:g}" for k, w in t.objective.weights.items())
        print(f"vtp-fast pretrain: {cfg.model.preset} ({n_params / 1e6:.2f}M params) on {device} x{world}; "
              f"{describe_pairs(pairs)} ({describe_data(cfg)}; decoder {decoder if from_shards else 'none'}); "
              f"batch {cfg.batch.size} / ssl {cfg.batch.ssl} / rec {cfg.batch.rec}; objective {terms}; "
              f"{'resuming at step ' + str(start) + ' from ' + str(resume_from) if resume_from else 'from scratch'}"
              f" -> {out}")
        if eval_u8 is None:
            print(f"vtp-fast pretrain: {no_eval_note(cfg)}")
        skipped = dict(getattr(pairs, "skipped", None) or getattr(getattr(pairs, "shards", None), "problems", {}))
        if any(skipped.values()):
            log.write(step=start, **{f"skipped_{k}": v for k, v in skipped.items()})
    if start == 0 and eval_u8 is not None:
        model = t.plain_model()
        if main:
            log.write(step=0, **evaluate(model, eval_u8, eval_captions, device))

    t.wrapped.train()
    bad_streak, last_eval = 0, {}
    bar = tqdm(total=cfg.run.steps, initial=start, desc="pretrain", unit="step", disable=not main, dynamic_ncols=True)
    it, tic, images_seen = iter(loader), time.perf_counter(), 0
    if saved_rng is not None:  # last, after everything above that may draw: the run continues the saved streams
        set_rng_state(saved_rng)
    for step in range(start, cfg.run.steps):
        micro = [next(it) for _ in range(cfg.batch.accumulation)]
        for b in micro:
            bad_count.update(b)
        micro = [to_device(b, device) for b in micro]
        sched = schedules(cfg, step)
        logs, finite = train_step(t, micro, sched)
        images_seen += cfg.batch.size
        done = step + 1
        if not finite:
            bad_streak += 1
            if main:
                log.write(step=done, skipped=True, bad_terms=logs["bad_terms"])
                bar.write(f"step {done}: non-finite loss in {logs['bad_terms']}; step skipped "
                          f"({bad_streak}/{cfg.run.max_bad_steps} in a row)")
            if bad_streak >= cfg.run.max_bad_steps:
                last = ckpt.latest()
                raise TrainingDiverged(f"{bad_streak} consecutive steps with non-finite losses "
                                       f"({', '.join(logs['bad_terms'])}); stopped at step {done}; last good "
                                       f"checkpoint: {last or 'none written yet'}")
            continue
        bad_streak = 0
        if done % cfg.run.log_every == 0 or done == cfg.run.steps:
            values = {k: (dist.all_reduce_sum(v.float().clone()) / world).item() for k, v in logs.items()}
            bad_count.sync()
            elapsed = time.perf_counter() - tic
            losses = set(t.objective.weights) | {"total", "disc"}
            row = {**{f"loss/{k}" if k in losses else k: v for k, v in values.items()},
                   **{k: v for k, v in sched.items() if k != "step"},
                   "images_per_s": images_seen / elapsed, "memory_mb": memory_mb(device),
                   **bad_count.metrics()}
            tic, images_seen = time.perf_counter(), 0
            if main:
                log.write(step=done, **row)
                _tb_write(tb, done, row)
                bar.set_postfix(loss=f"{values['total']:.3f}", img_s=f"{row['images_per_s']:.0f}",
                                **{k: f"{v:.3f}" for k, v in last_eval.items() if k in ("zero_shot_top1",)})
        side_work = time.perf_counter()  # evaluation, probe and checkpoint time stays out of images_per_s
        if eval_u8 is not None and (done % cfg.run.eval_every == 0 or done == cfg.run.steps):
            model = t.plain_model()
            if main:
                last_eval = evaluate(model, eval_u8, eval_captions, device)
                log.write(step=done, **last_eval)
                _tb_write(tb, done, last_eval)
        if cfg.run.generative_probe_every and done % cfg.run.generative_probe_every == 0:
            model = t.plain_model()
            if main:
                from vtp_fast.downstream.generative_probe import generative_probe  # KNOWN in tests/test_layers.py

                probe = generative_probe(model, probe_data, out / "gen_probe" / f"step_{done:08d}",
                                         dit_steps=cfg.run.probe_dit_steps, seed=cfg.run.seed)
                log.write(step=done, **probe)
                _tb_write(tb, done, probe)
                bar.write(f"step {done}: generative probe gFID {probe['gen_probe_gfid']:.1f} "
                          f"({len(probe_data)} samples)")
        if done % cfg.run.checkpoint_every == 0 or done == cfg.run.steps:
            model_state = dist.full_state_dict(t.model)  # every rank: gathering FSDP shards is collective
            modules = {name: dist.full_state_dict(m) for name, m in t.modules().items()}
            optim_states = {name: dist.full_optimizer_state(opt) for name, opt in t.optimizers().items()}
            bad_count.sync()
            if main:
                ckpt.save(done, t.model, model_state, modules, {
                    "step": done, **optim_states, "rng": rng_state(), "config": to_dict(cfg),
                    "bad_samples": bad_count.state_dict()})
            dist.barrier()
        tic += time.perf_counter() - side_work
        bar.update(1)
    bar.close()
    if tb is not None:
        tb.close()
    model = t.plain_model()
    if not main:
        return {}
    return _finish(model, cfg, out, log, eval_u8 if eval_u8 is not None else first_images(pairs, 12), t.device,
                   note=None if eval_u8 is not None else no_eval_note(cfg))


def describe_data(cfg: PretrainConfig) -> str:
    d = cfg.data
    if d.synthetic:
        return "synthetic"
    if d.shards:
        return f"shards {d.shards}" + (f", held-out {d.eval_shards}" if d.eval_shards else "")
    return f"emoji {', '.join(d.train_styles)}, held-out {', '.join(d.eval_styles)}"


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


def _tb_write(tb, step: int, row: dict) -> None:
    if tb is not None:
        for k, v in row.items():
            if isinstance(v, (int, float)):
                tb.add_scalar(k, v, step)


def _finish(model: VTP, cfg: PretrainConfig, out: Path, log: MetricsLog, shown_u8: torch.Tensor,
            device: torch.device, note: str | None = None) -> dict[str, Path]:
    """Export, plots and the summary. `shown_u8`: the images of the reconstruction grid (held-out ones, or training
    images when the run has no held-out set, which `note` then says)."""
    model.eval()
    shown = normalize_u8(shown_u8[:12]).to(device)
    with torch.no_grad():
        recon = model.denormalize(model.decode(model.encode(shown))).clamp(0, 1)
    loss_series = {k.removeprefix("loss/"): log.series(k) for k in sorted({k for r in log.read() for k in r})
                   if k.startswith("loss/")}
    paths = {
        "checkpoint": save_pretrained(model, out / "checkpoint"),
        "reconstructions": image_grid([model.denormalize(shown).clamp(0, 1), recon], out / "reconstructions.png"),
        "loss_curves": plot_curves(loss_series, out / "loss.png", title=f"pretrain {cfg.model.preset}: loss terms"),
        "metrics": log.path,
        "config": out / "config.yaml",
    }
    rows = [r for r in log.read() if "eval_psnr" in r]
    if rows:
        paths["psnr_curve"] = plot_curves({"held-out PSNR (dB)": log.series("eval_psnr")}, out / "psnr.png",
                                          title="held-out reconstruction PSNR", ylabel="dB", log_y=False)
    if log.series("zero_shot_top1")[0]:
        paths["zero_shot_curve"] = plot_curves(
            {"top-1": log.series("zero_shot_top1"), "top-5": log.series("zero_shot_top5"),
             "chance": log.series("zero_shot_chance")}, out / "zero_shot.png",
            title="zero-shot accuracy on the held-out style (emoji names)", ylabel="accuracy", log_y=False)
    if cfg.run.tensorboard and (out / "tb").exists():
        paths["tensorboard"] = out / "tb"
    if not rows:
        summary = note or "no held-out evaluation"
    else:
        summary = f"held-out PSNR {rows[0]['eval_psnr']:.2f} -> {rows[-1]['eval_psnr']:.2f} dB"
    if rows and "zero_shot_top1" in rows[-1]:
        summary += (f"; zero-shot top-1 {rows[0]['zero_shot_top1']:.3f} -> {rows[-1]['zero_shot_top1']:.3f} "
                    f"(chance {rows[-1]['zero_shot_chance']:.4f}), top-5 {rows[-1]['zero_shot_top5']:.3f}")
    print(summary)
    for name, path in paths.items():
        print(f"  {name:16s} {path}")
    return paths

