"""One multi-objective pretraining step: the student (all trainable parts and the losses) and the EMA teacher.

One student pass serves every objective. The trunk runs once over a list of views: the plain images (CLIP for
every pair, reconstruction for the first `rec`), and for the first `ssl` samples the two global crops (iBOT-
masked) and the local crops. Semantic heads read the pre-bottleneck tokens; only reconstruction passes the 64-d
latent. The teacher (EMA of trunk + head) sees the unmasked global crops under no_grad.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from vtp_fast.config import ConfigError
from vtp_fast.data.batch import Batch
from vtp_fast.losses.clip import ClipLoss
from vtp_fast.losses.dino import DINOLoss, IBOTPatchLoss, KoLeoLoss
from vtp_fast.losses.objective import Objective
from vtp_fast.losses.reconstruction import ReconstructionLoss
from vtp_fast.models.heads import DINOHead
from vtp_fast.models.vit import TrunkOutput
from vtp_fast.models.vtp import VTP
from vtp_fast.ops import masked_gather as masked_gather_op
from vtp_fast.train.common import ema_update
from vtp_fast.train.config import SSLConfig
from vtp_fast.train.probe import Probe

N_GLOBAL = 2


class Student(nn.Module):
    """The trainable model, its SSL head and every loss of the objective; `forward(batch, targets)` returns the
    value of each active term, and the reconstructed images when the adversarial term needs them. Wrap this
    module in DDP/FSDP (its forward is the whole student step)."""

    def __init__(self, model: VTP, objective: Objective, ssl: SSLConfig, *, n_rec: int | None = None,
                 lpips_vgg_path: str | None = None, freeze_encoder: bool = False):
        """n_rec: reconstruction uses the first n_rec images of each batch (None: all of them).
        freeze_encoder (stage 2): only the pixel decoder trains; the trunk runs without gradients."""
        super().__init__()
        self.model, self.objective, self.ssl_cfg, self.n_rec = model, objective, ssl, n_rec
        self.freeze_encoder = freeze_encoder
        self.uses_ssl = any(t in objective for t in ("dino", "ibot", "koleo"))
        self.uses_clip = "clip" in objective
        if self.uses_clip and not model.config.train_clip:
            raise ConfigError("objective.clip > 0 needs a model with a text tower (train_clip)")
        dim = model.config.vision_embed_dim
        if self.uses_ssl:
            self.head = DINOHead(dim, ssl.prototypes, ssl.hidden, ssl.bottleneck, ssl.head_layers)
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
        if freeze_encoder:
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("pixel_decoder."))
        elif model.config.train_clip and not self.uses_clip:  # a loaded text tower the objective does not use
            for name, p in model.named_parameters():
                if not name.startswith(("trunk.", "pixel_decoder.")):
                    p.requires_grad_(False)
        self.gather = masked_gather_op.OP.resolve()
        self.probe = Probe()  # vtp-fast profile swaps in a TimingProbe

    def forward(self, batch: Batch, targets: dict | None = None) -> tuple[dict[str, Tensor], Tensor | None]:
        """targets: the Teacher's when SSL is on. -> (loss terms, reconstructed images (n_rec, 3, H, W) for the
        adversarial term, or None). Without CLIP only the reconstructed images go through the trunk."""
        m, probe = self.model, self.probe
        n_rec = batch.images.shape[0] if self.n_rec is None else self.n_rec
        images = batch.images if self.uses_clip else batch.images[:n_rec]
        views, masks = [images], [None]
        if self.uses_ssl:
            views += [batch.global_crops, batch.local_crops]
            masks += [batch.masks, None]
            if batch.local_crops.shape[0] == 0:  # no local crops configured
                views, masks = views[:2], masks[:2]
        with probe.region("trunk"), torch.no_grad() if self.freeze_encoder else nullcontext():
            outs = m.encode_views(views, masks)
        plain, terms, recon = outs[0], {}, None

        if self.uses_clip:
            with probe.region("clip"):
                cls, patch = probe.boundary("clip", plain.cls, plain.patch)
                img = m.clip_image_features_from_tokens(cls, patch)
                txt = m.clip_text_features(batch.tokens)
                terms["clip"] = self.clip_loss(img, txt, m.logit_scale)

        with probe.region("rec"):
            (patch,) = probe.boundary("rec", plain.patch[:n_rec])
            tokens = m.decoder_tokens(patch, plain.grid)  # (n, hw, 3p^2), before the pixel shuffle
            if self.rec_loss.needs_images or self.expose_recon:
                recon = m.tokens_to_images(tokens, plain.grid)
            terms.update(self.rec_loss(tokens, images[:n_rec], recon))
            recon = recon if self.expose_recon else None

        if self.uses_ssl:
            with probe.region("ssl"):
                self._ssl_terms(outs[1], outs[2] if len(outs) > 2 else None, batch, targets, terms)
        return terms, recon

    def _ssl_terms(self, glob: TrunkOutput, loc: TrunkOutput | None, batch: Batch, targets: dict,
                   terms: dict) -> None:
        """DINO (CLS of global and local views), iBOT (masked patch tokens) and KoLeo terms into `terms`."""
        tokens = [glob.cls, glob.patch] + ([loc.cls] if loc is not None else [])
        glob_cls, glob_patch, *loc_cls = self.probe.boundary("ssl", *tokens)
        n_glob = glob_cls.shape[0]
        packed = self.gather.impl.masked_gather(glob_patch, batch.mask_index)  # (M, D)
        emb = self.head.embed(torch.cat([glob_cls, packed] + loc_cls))  # one MLP call for every token, (rows, d)
        weight = self.head.prototypes(emb.dtype)  # (K, d): the logits happen inside the losses
        g_emb, p_emb = emb[:n_glob], emb[n_glob:n_glob + packed.shape[0]]
        l_emb = emb[n_glob + packed.shape[0]:]
        n_local_views = l_emb.shape[0] // (n_glob // N_GLOBAL) if n_glob else 0
        if "dino" in self.objective:
            terms["dino"] = self.dino_loss(list(g_emb.chunk(N_GLOBAL)),
                                           list(l_emb.chunk(n_local_views)) if n_local_views else [],
                                           targets["dino"], weight)
        if "ibot" in self.objective:
            terms["ibot"] = self.ibot_loss(p_emb, targets["ibot"], weight, batch.mask_weight, n_glob)
        if "koleo" in self.objective:  # per global view, never between two views of one image
            terms["koleo"] = sum(self.koleo_loss(c) for c in glob_cls.chunk(N_GLOBAL))


class Teacher(nn.Module):
    """EMA copy of the student's trunk and SSL head, never trained by gradients."""

    def __init__(self, student: Student):
        super().__init__()
        self.trunk = copy.deepcopy(student.model.trunk)
        self.head = copy.deepcopy(student.head)
        self.requires_grad_(False)

    def pairs(self, student: Student) -> tuple[list[Tensor], list[Tensor]]:
        """(teacher params, student params) in matching order."""
        mine = list(self.trunk.parameters()) + list(self.head.parameters())
        theirs = list(student.model.trunk.parameters()) + list(student.head.parameters())
        return mine, theirs

    @torch.no_grad()
    def update(self, student: Student, momentum: float) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student."""
        ema_update(*self.pairs(student), momentum)

    @torch.no_grad()
    def forward(self, batch: Batch, student: Student, temp: float,
                centers: dict[str, Tensor] | None = None) -> tuple[dict, dict[str, Tensor]]:
        """-> (targets, centres). targets (vtp_fast.losses.dino.Targets): 'dino', one per global view, and 'ibot'
        for the student's masked tokens, made with `centers` in force (default: the losses' own); centres: where
        each loss centre moves after this batch, applied by the step once it is taken (`apply_centers`). A
        forward, so FSDP's hooks gather the shards."""
        centers = centers or {}
        out = self.trunk(batch.global_crops)  # unmasked
        n_glob = out.cls.shape[0]
        packed = student.gather.impl.masked_gather(out.patch, batch.mask_index)  # (M, D)
        emb = self.head.embed(torch.cat([out.cls, packed]))  # (n_glob + M, d)
        weight = self.head.prototypes(emb.dtype)  # the teacher's own (EMA) prototypes
        targets, moved = {}, {}
        for name, rows in (("dino", emb[:n_glob]), ("ibot", emb[n_glob:])):
            if name in student.objective:
                loss = getattr(student, f"{name}_loss")
                made = loss.teacher_targets(rows, weight, temp, centers.get(name))
                targets[name] = made.chunk(N_GLOBAL) if name == "dino" else made
                if made.next_center is not None:
                    moved[name] = made.next_center
        return targets, moved


@torch.no_grad()
def apply_centers(student: Student, centers: dict[str, Tensor]) -> None:
    """Move the DINO / iBOT loss centres to where the teacher's batches put them (Teacher.forward)."""
    for name, center in centers.items():
        getattr(student, f"{name}_loss").center.copy_(center)
