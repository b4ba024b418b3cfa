"""What a tokenizer's training forward (`VTP.forward_train`) reads, returns and reports to the step that runs it.

The model computes each objective's inputs; the step (vtp_fast.train.step) feeds them to the losses. `TrainHooks`
lets the step watch the forward part by part: each part runs in `region(name)`, each objective's trunk tokens pass
`boundary(name, ...)`, and `ready(name, inputs)` hands over an objective's inputs before its region closes, so the
step computes that loss inside the region (the profiler times a region as the model's part and its loss together).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

N_GLOBAL = 2  # global crops per SSL image (DINOv2's multi-crop)


class TrainViews(Protocol):
    """What a training forward reads of a batch (vtp_fast.data.batch.Batch is one). The SSL fields are None when
    the step has no SSL subset."""

    images: Tensor  # (n, 3, H, W) plain images, normalised
    tokens: Tensor  # (n, L) their captions' CLIP token ids
    global_crops: Tensor | None  # (2 ssl, 3, G, G)
    local_crops: Tensor | None  # (L ssl, 3, l, l); no rows without local crops
    masks: Tensor | None  # (2 ssl, N) bool: iBOT's masked tokens of each global crop
    mask_index: Tensor | None  # (M,) the masked tokens' flat indices into (2 ssl * N)


@dataclass(frozen=True)
class TrainParts:
    """Which parts a training forward runs. clip: every image through the trunk, the CLIP image and text features;
    ssl: the global and local crops through the trunk and the SSL head; reconstruction always, of the first `rec`
    images (None: all), as the decoder's tokens and, with `images`, the reconstructed images too; frozen_trunk: the
    trunk runs without gradients (stage 2 trains the pixel decoder alone)."""

    clip: bool
    ssl: bool
    rec: int | None = None
    images: bool = False
    frozen_trunk: bool = False


@dataclass
class ClipInputs:
    """The CLIP loss's inputs."""

    image: Tensor  # (n, E) L2-normalised image features
    text: Tensor  # (n, E) L2-normalised text features
    logit_scale: Tensor  # () the learnable log-scale


@dataclass
class RecInputs:
    """The reconstruction loss's inputs, and the reconstruction itself."""

    tokens: Tensor  # (n_rec, h * w, 3 * p * p) the pixel decoder's output before its pixel shuffle
    target: Tensor  # (n_rec, 3, H, W) the images to reconstruct
    recon: Tensor | None  # (n_rec, 3, H, W) the reconstructed images when TrainParts.images, else None


@dataclass
class SSLInputs:
    """The DINO, iBOT and KoLeo losses' inputs: the student's side of what the EMA teacher's targets are matched
    against (the teacher embeds the same global crops and masked tokens with its own trunk and head)."""

    global_cls: Tensor  # (2 ssl, D) the global crops' CLS tokens from the trunk, view-major (KoLeo's rows)
    global_emb: list[Tensor]  # N_GLOBAL x (ssl, d) the head's embedding of each global view's CLS token
    local_emb: list[Tensor]  # local views x (ssl, d); empty without local crops
    patch_emb: Tensor  # (M, d) the embeddings of the global crops' masked patch tokens
    weight: Tensor  # (K, d) the head's prototypes (the logits are taken inside the losses)


@dataclass
class TrainOutputs:
    """Every active objective's inputs from one training forward (None: the part did not run)."""

    rec: RecInputs
    clip: ClipInputs | None = None
    ssl: SSLInputs | None = None


class TrainHooks:
    """How the step watches a training forward (see the module docstring); this default watches nothing. Part
    names: "trunk", "clip", "rec", "ssl"."""

    def region(self, name: str) -> AbstractContextManager:
        return nullcontext()

    def boundary(self, name: str, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tensors

    def ready(self, name: str, inputs: ClipInputs | RecInputs | SSLInputs) -> None:
        pass
