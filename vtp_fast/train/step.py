"""One multi-objective pretraining step: the student (all trainable parts and the losses) and the EMA teacher.

One student pass serves every objective (`VTP.forward_train`: the trunk once over every view, then each
objective's part on its tokens); the student feeds each objective's inputs to its losses as the model hands them
over. The teacher (EMA of trunk + head) sees the unmasked global crops under no_grad and makes the DINO and iBOT
targets with the student's losses' target rules and centres.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vtp_fast.config import ConfigError
from vtp_fast.data.batch import Batch
from vtp_fast.losses.clip import ClipLoss
from vtp_fast.losses.dino import DINOLoss, IBOTPatchLoss, KoLeoLoss, Targets
from vtp_fast.losses.objective import Objective
from vtp_fast.losses.reconstruction import ReconstructionLoss
from vtp_fast.models.heads import DINOHead
from vtp_fast.models.training import N_GLOBAL, ClipInputs, RecInputs, SSLInputs, TrainHooks, TrainParts
from vtp_fast.models.vtp import VTP
from vtp_fast.train.common import ema_update
from vtp_fast.train.config import SSLConfig
from vtp_fast.train.probe import Probe


@dataclass
class TeacherTargets:
    """The teacher's targets for one batch: DINO's, one per global view, and iBOT's, for the student's masked
    tokens (None: the term is inactive)."""

    dino: list[Targets] | None = None
    ibot: Targets | None = None


class Student(nn.Module):
    """The trainable model, its SSL head and every loss of the objective; `forward(batch, targets)` returns the
    value of each active term, and the reconstructed images when the adversarial term needs them. Wrap this
    module in DDP/FSDP (its forward is the whole student step)."""

    def __init__(self, model: VTP, objective: Objective, ssl: SSLConfig, *, n_rec: int | None = None,
                 lpips_vgg_path: str | None = None, freeze_encoder: bool = False):
        """n_rec: reconstruction uses the first n_rec images of each batch (None: all of them).
        freeze_encoder (stage 2): only the pixel decoder trains; the trunk runs without gradients."""
        super().__init__()
        self.model, self.objective = model, objective
        self.uses_ssl = any(t in objective for t in ("dino", "ibot", "koleo"))
        self.uses_clip = "clip" in objective
        if self.uses_clip and not model.config.train_clip:
            raise ConfigError("objective.clip > 0 needs a model with a text tower (train_clip)")
        self.head = None
        if self.uses_ssl:
            self.head = DINOHead(model.config.vision_embed_dim, ssl.prototypes, ssl.hidden, ssl.bottleneck,
                                 ssl.head_layers)
            kw = {"student_temp": ssl.student_temp, "center_momentum": ssl.center_momentum,
                  "centering": ssl.centering}
            self.dino_loss = DINOLoss(ssl.prototypes, **kw)
            self.ibot_loss = IBOTPatchLoss(ssl.prototypes, **kw)
            self.koleo_loss = KoLeoLoss()
        if self.uses_clip:
            self.clip_loss = ClipLoss()
        self.rec_loss = ReconstructionLoss("rec_lpips" in objective, lpips_vgg_path, model.config.vision_patch_size,
                                           mse="rec_mse" in objective)
        self.expose_recon = "gan" in objective  # the adversarial term needs the reconstructions
        self.parts = TrainParts(clip=self.uses_clip, ssl=self.uses_ssl, rec=n_rec, frozen_trunk=freeze_encoder,
                                images=self.rec_loss.needs_images or self.expose_recon)
        if freeze_encoder:
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("pixel_decoder."))
        elif model.config.train_clip and not self.uses_clip:  # a loaded text tower the objective does not use
            for name, p in model.named_parameters():
                if not name.startswith(("trunk.", "pixel_decoder.")):
                    p.requires_grad_(False)
        self.probe = Probe()  # vtp-fast profile swaps in a TimingProbe

    def forward(self, batch: Batch, targets: TeacherTargets | None = None) -> tuple[dict[str, Tensor], Tensor | None]:
        """targets: the Teacher's when SSL is on. -> (loss terms, reconstructed images (n_rec, 3, H, W) for the
        adversarial term, or None)."""
        hooks = _Terms(self, batch, targets)
        out = self.model.forward_train(batch, self.parts, self.head, hooks)
        return hooks.terms, out.rec.recon if self.expose_recon else None

    def ema_parameters(self) -> list[Tensor]:
        """What the EMA teacher follows, in its order: the trunk's parameters, then the SSL head's."""
        return list(self.model.trunk.parameters()) + list(self.head.parameters())


class _Terms(TrainHooks):
    """One student forward's loss terms: the hooks on the model's training forward that feed each objective's
    inputs to its losses as soon as they are ready (inside its probe region, so a region times the model's part and
    its loss), and pass the probe's regions and boundaries through."""

    def __init__(self, student: Student, batch: Batch, targets: TeacherTargets | None):
        self.student, self.batch, self.targets = student, batch, targets
        self.terms: dict[str, Tensor] = {}

    def region(self, name: str):
        return self.student.probe.region(name)

    def boundary(self, name: str, *tensors: Tensor) -> tuple[Tensor, ...]:
        return self.student.probe.boundary(name, *tensors)

    def ready(self, name: str, inputs: ClipInputs | RecInputs | SSLInputs) -> None:
        s = self.student
        if name == "clip":
            self.terms["clip"] = s.clip_loss(inputs.image, inputs.text, inputs.logit_scale)
        elif name == "rec":
            self.terms.update(s.rec_loss(inputs.tokens, inputs.target, inputs.recon))
        else:
            self._ssl(inputs)

    def _ssl(self, s: SSLInputs) -> None:
        """DINO (CLS of global and local views), iBOT (masked patch tokens) and KoLeo terms."""
        student, targets = self.student, self.targets
        if "dino" in student.objective:
            self.terms["dino"] = student.dino_loss(s.global_emb, s.local_emb, targets.dino, s.weight)
        if "ibot" in student.objective:
            self.terms["ibot"] = student.ibot_loss(s.patch_emb, targets.ibot, s.weight, self.batch.mask_weight,
                                                   s.global_cls.shape[0])
        if "koleo" in student.objective:  # per global view, never between two views of one image
            self.terms["koleo"] = sum(student.koleo_loss(c) for c in s.global_cls.chunk(N_GLOBAL))


class Teacher(nn.Module):
    """EMA copy of the student's trunk and SSL head, never trained by gradients. Its targets follow the rules and
    centres of the student's DINO and iBOT losses, which it uses but does not hold in its state."""

    def __init__(self, student: Student):
        super().__init__()
        self.trunk = copy.deepcopy(student.model.trunk)
        self.head = copy.deepcopy(student.head)
        self.requires_grad_(False)
        self.losses = {name: loss for name, loss in (("dino", student.dino_loss), ("ibot", student.ibot_loss))
                       if name in student.objective}  # a plain dict: not submodules

    def pairs(self, student: Student) -> tuple[list[Tensor], list[Tensor]]:
        """(teacher params, student params) in matching order."""
        return list(self.trunk.parameters()) + list(self.head.parameters()), student.ema_parameters()

    @torch.no_grad()
    def update(self, student: Student, momentum: float) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student."""
        ema_update(*self.pairs(student), momentum)

    @torch.no_grad()
    def forward(self, batch: Batch, temp: float,
                centers: dict[str, Tensor] | None = None) -> tuple[TeacherTargets, dict[str, Tensor]]:
        """-> (targets, centres). The targets are made with `centers` in force (default: the losses' own);
        centres: where each loss centre moves after this batch, applied once the step is taken (`apply_centers`). A
        forward, so FSDP's hooks gather the shards."""
        centers = centers or {}
        out = self.trunk(batch.global_crops)  # unmasked
        emb = self.head.forward_train(out.cls, out.patch, batch.mask_index)
        made = {name: self.losses[name].teacher_targets(rows, emb.weight, temp, centers.get(name))
                for name, rows in (("dino", emb.glob), ("ibot", emb.patch)) if name in self.losses}
        targets = TeacherTargets(made["dino"].chunk(N_GLOBAL) if "dino" in made else None, made.get("ibot"))
        return targets, {name: m.next_center for name, m in made.items() if m.next_center is not None}

    @torch.no_grad()
    def apply_centers(self, centers: dict[str, Tensor]) -> None:
        """Move the DINO / iBOT loss centres to where the teacher's batches put them (`forward`)."""
        for name, center in centers.items():
            self.losses[name].center.copy_(center)
