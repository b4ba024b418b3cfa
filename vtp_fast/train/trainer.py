"""Pretraining's trainer: the student, teacher, optimizers and (stage 2) discriminator built from a config, the
schedules, and one optimizer step over the objective (`train_step`), which `vtp-fast pretrain`, `profile` and
`bench` run."""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from vtp_fast import distributed as dist
from vtp_fast.compile import transform_blocks
from vtp_fast.config import ConfigError
from vtp_fast.constants import autocast
from vtp_fast.data.batch import Batch, BatchShape
from vtp_fast.losses.clip import clamp_logit_scale_
from vtp_fast.losses.gan import adaptive_weight, discriminator_hinge, generator_hinge
from vtp_fast.losses.objective import Objective
from vtp_fast.models.discriminator import PatchDiscriminator
from vtp_fast.models.presets import vtp_config
from vtp_fast.models.pretrained import load_pretrained, load_state_strict
from vtp_fast.models.vtp import VTP
from vtp_fast.ops import building_for
from vtp_fast.train.config import PretrainConfig
from vtp_fast.train.loop import StepOutput, skipped
from vtp_fast.train.optim import clip_grad_norm, cosine_schedule, make_adamw, param_groups, set_group, set_lr
from vtp_fast.train.step import Student, Teacher


# ---------------------------------------------------------------------------------------------- schedules
@dataclass(frozen=True)
class Schedule:
    """Pretraining's scheduled values at one optimizer step."""

    step: int
    lr: float
    weight_decay: float  # of the "decay" parameter group
    momentum: float  # the EMA teacher's
    teacher_temp: float

    def scalars(self) -> dict[str, float]:
        """The values logged with the step (all but the step itself)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "step"}


def schedules(cfg: PretrainConfig, step: int) -> Schedule:
    o, s, total = cfg.optim, cfg.ssl, cfg.run.steps
    progress = min(1.0, step / max(1, total - 1))
    wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
    warm = s.teacher_temp_warmup_steps
    return Schedule(
        step=step,
        lr=cosine_schedule(step, total, o.warmup_steps, o.lr, o.final_lr),
        weight_decay=wd_end + 0.5 * (o.weight_decay - wd_end) * (1 + math.cos(math.pi * progress)),
        momentum=s.momentum_end - 0.5 * (s.momentum_end - s.momentum_start) * (1 + math.cos(math.pi * progress)),
        teacher_temp=(s.teacher_temp_warmup + (s.teacher_temp - s.teacher_temp_warmup) * step / warm
                      if step < warm else s.teacher_temp),
    )


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


def _build_trainer(cfg: PretrainConfig, device: torch.device, local: bool = False) -> Trainer:
    """local: as one process whatever the launch (cfg.batch is one rank's, nothing wrapped in DDP / FSDP), for
    counting a step's FLOPs on the meta device."""
    objective = Objective(cfg.objective.term_weights())
    overrides = {**cfg.model.overrides, "train_clip": "clip" in objective, "train_reconstruction": True,
                 "image_size": cfg.data.image_size}
    if cfg.model.init:
        model = load_pretrained(cfg.model.init, device, rope_dtype=cfg.model.rope_dtype)
        if "clip" in objective and not model.config.train_clip:
            raise ConfigError(f"model.init: {cfg.model.init} has no text tower but objective.clip > 0")
    else:
        model = VTP(vtp_config(cfg.model.preset, **overrides), rope_dtype=cfg.model.rope_dtype)
    world = 1 if local else dist.world_size()
    shape = cfg.batch.per_rank(world, model.config.vision_patch_size)
    student = Student(model, objective, cfg.ssl, n_rec=shape.rec, lpips_vgg_path=cfg.objective.lpips_vgg_path,
                      freeze_encoder=cfg.stage == 2)
    student.to(device)
    teacher = Teacher(student).to(device) if student.uses_ssl else None
    # fixed order: activation checkpointing, compile, then shard/wrap, then the optimizer (FSDP replaces the
    # parameters); the teacher, copied above, runs without gradients: its blocks stay plain, and it is compiled
    # only as a whole, beside the student
    transform_blocks(model, cfg.run.activation_checkpointing, cfg.run.compile_as, whole=(student, teacher))
    if world > 1 and cfg.run.distributed == "fsdp":
        wrapped = dist.apply_fsdp(student, model.transformer_blocks(), mixed_precision=device.type == "cuda")
        if teacher is not None:
            dist.apply_fsdp(teacher, list(teacher.trunk.blocks), mixed_precision=device.type == "cuda",
                            reshard_root=True)
    else:
        wrapped = student if local else dist.apply_ddp(student, device)
    optimizer = make_adamw(param_groups({"student": student}, cfg.optim.weight_decay), cfg.optim.lr, cfg.optim.betas,
                           fused=cfg.optim.fused)
    trainer = Trainer(cfg, device, objective, student, wrapped, teacher, optimizer, shape)
    if "gan" in objective:
        trainer.disc = PatchDiscriminator(cfg.gan.channels, cfg.gan.layers).to(device)
        trainer.disc_wrapped = trainer.disc if local else dist.apply_ddp(trainer.disc, device)
        trainer.disc_optimizer = make_adamw([{"params": list(trainer.disc.parameters()), "weight_decay": 0.0}],
                                            cfg.gan.lr, cfg.gan.betas)
    return trainer


# ---------------------------------------------------------------------------------------------- the step
@dataclass
class Gradients:
    """What the forward-backward of one optimizer step leaves: the detached loss terms and extra logged values
    averaged over the micro-batches, where the teacher's batches moved the loss centres (applied once the step is
    taken), and in stage 2 the last micro-batch's reconstructions and real images for the discriminator."""

    terms: dict[str, torch.Tensor]
    aux: dict[str, torch.Tensor]
    centers: dict[str, torch.Tensor]
    fake: torch.Tensor | None = None
    real: torch.Tensor | None = None


def adversarial_term(t: Trainer, terms: dict, recon: torch.Tensor, active: bool) -> torch.Tensor | None:
    """Stage 2: the generator's hinge loss on the reconstructions, scaled by VQGAN's adaptive weight, as the
    'gan' term of `terms` (zero before gan.start_step). Returns the adaptive weight (None when inactive). The
    discriminator gets no gradient from it."""
    if not active:
        terms["gan"] = recon.sum() * 0.0
        return None
    t.disc.requires_grad_(False)
    gen = generator_hinge(t.disc(recon))
    t.disc.requires_grad_(True)
    rec = sum(t.objective.weights[k] * terms[k] for k in ("rec_l1", "rec_mse", "rec_lpips") if k in t.objective)
    weight = adaptive_weight(rec, gen, t.model.last_layer())
    terms["gan"] = weight * gen
    return weight


def forward_backward(t: Trainer, micro_batches: list[Batch], sched: Schedule) -> Gradients:
    """Teacher targets, student terms and backward for each micro-batch (gradients accumulate, synchronised
    across ranks on the last one; each micro-batch's targets use the centres the previous one left)."""
    out = Gradients({}, {}, {})
    n_micro = len(micro_batches)
    probe = t.student.probe
    for i, batch in enumerate(micro_batches):
        sync = i == n_micro - 1 or not hasattr(t.wrapped, "no_sync")
        with (nullcontext() if sync else t.wrapped.no_sync()), t.autocast():
            targets = None
            if t.teacher is not None:
                with probe.region("teacher"):
                    targets, out.centers = t.teacher(batch, sched.teacher_temp, out.centers)
            terms, recon = t.wrapped(batch, targets)
            if t.disc is not None:
                with probe.region("gan"):
                    weight = adversarial_term(t, terms, recon, sched.step >= t.cfg.gan.start_step)
                if weight is not None:
                    out.aux["gan_weight"] = weight.detach().float()
                out.fake, out.real = recon.detach(), batch.images[: recon.shape[0]]
            with probe.region("objective"):
                total, logs = t.objective(terms)
        with probe.region("backward"):
            (total / n_micro).backward()
        for k, v in logs.items():
            out.terms[k] = out.terms.get(k, 0) + v.float() / n_micro
    dist.average_replicated_grads(t.wrapped)
    return out


def discriminator_step(t: Trainer, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """One hinge-loss update of the discriminator on real images and (detached) reconstructions."""
    with t.autocast():
        logits = t.disc_wrapped(torch.cat([real, fake]))
        loss = discriminator_hinge(*logits.chunk(2))
    loss.backward()
    t.disc_optimizer.step()
    t.disc_optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def train_step(t: Trainer, micro_batches: list[Batch], sched: Schedule) -> StepOutput:
    """One optimizer step over `accumulation` micro-batches. A non-finite step changes nothing: gradients are
    dropped, the optimizer, EMA and loss centres are left as they were."""
    set_lr(t.optimizer, sched.lr)
    set_group(t.optimizer, "decay", weight_decay=sched.weight_decay)
    g = forward_backward(t, micro_batches, sched)
    scalars = sched.scalars()
    with t.student.probe.region("checks"):  # the finite check waits for the device
        skip = skipped(g.terms, g.aux, scalars)
    if skip is not None:
        t.optimizer.zero_grad(set_to_none=True)
        return skip
    with t.student.probe.region("optimizer"):
        grad_norm = clip_grad_norm(t.student.parameters(), t.cfg.optim.grad_clip)
        t.optimizer.step()
        if t.model.config.train_clip:
            clamp_logit_scale_(t.model.logit_scale)  # open_clip's cap, outside the graph
    if t.teacher is not None:
        t.teacher.apply_centers(g.centers)
        with t.student.probe.region("ema"):
            t.teacher.update(t.student, sched.momentum)
    if g.fake is not None and sched.step >= t.cfg.gan.start_step:
        with t.student.probe.region("discriminator"):
            g.terms["disc"] = discriminator_step(t, g.fake, g.real)
    g.aux["grad_norm"] = dist.full_tensor(grad_norm).detach()  # a DTensor under FSDP
    with t.student.probe.region("zero_grad"):
        t.optimizer.zero_grad(set_to_none=True)
    return StepOutput(g.terms, g.aux, scalars)
