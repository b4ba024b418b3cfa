"""The model FLOPs of each unit of work a scaling study runs, for its GPU plan (vtp_fast.study.plan), counted with
FlopCounterMode on the meta device (shapes only: seconds on a CPU at any size):

  tokenizer    one pretraining step's forward + backward (EMA teacher's forward included) with the real trainer at
               the real image size, views, heads and prototypes, at a small batch that keeps the config's
               clip : ssl : rec ratio, then scaled to the configured batch as a * B + q * B^2: the linear part
               (trunk, heads, teacher, text tower, pixel decoder) scales with the batch; the quadratic part is the
               CLIP logits (each rank builds local x global logits: N x N x E summed over the ranks, per
               accumulation micro-step), whose q is counted on the CLIP loss alone at two batch sizes with the
               feature width the step's count saw (a hook on the loss). iBOT masks are made deterministic at their
               expected size (mask_probability x mean mask_ratio of every global crop's tokens) so the count is
               exactly linear. LPIPS (VGG16 on the reconstruction and its target, the input gradient only) is
               counted separately on a meta VGG16 (its weights are never needed). With it: one image's encoder and
               decoder forward, and the latent shape.
  DiT          a training step's forward + backward (flow loss) at the configured batch (counted at batch 2,
               scaled linearly: every token's work is per sample), and one sample's forward.
  Inception    torch-fidelity's InceptionV3 at 299 x 299, one image.

Each distinct configuration is counted once per process.
"""

from __future__ import annotations

import copy
import math
from functools import cache

import torch

from vtp_fast.train.config import DiTTrainConfig, PretrainConfig
from vtp_fast.train.flops import count_step_flops, flops_of

MAX_BASE = 64  # the counted batch's largest size before the ratio is rounded
_CACHE: dict[str, object] = {}  # counts by config (a plan of the same shapes counts once per process)


def base_batch(size: int, ssl: int, rec: int) -> tuple[int, int, int]:
    """The smallest (size, ssl, rec) with the same ratio; rounded (non-zero parts kept >= 1) when that is over
    MAX_BASE pairs."""
    g = math.gcd(size, math.gcd(ssl, rec))
    b = (size // g, ssl // g, rec // g)
    if b[0] <= MAX_BASE:
        return b
    f = MAX_BASE / size
    return MAX_BASE, max(1, round(ssl * f)) if ssl else 0, max(1, round(rec * f)) if rec else 0


def _trainer_flops(pcfg: PretrainConfig, size: int, ssl: int, rec: int) -> tuple[int, object, tuple[int, int] | None]:
    """FLOPs of one forward + backward of the pretraining step at this batch (meta device), the trainer, and the
    (rows, feature width) the CLIP loss saw (None without CLIP)."""
    pcfg.batch.size, pcfg.batch.ssl, pcfg.batch.rec, pcfg.batch.accumulation = size, ssl, rec, 1
    return count_step_flops(pcfg)


def clip_logits_coefficient(width: int, n: int = 4) -> float:
    """q in FLOPs(ClipLoss forward + backward over n pairs) = linear(n) + q n^2: the logits' part, counted at n
    and 2n pairs of `width`-wide features (meta device, one process: local = global batch)."""
    from vtp_fast.losses.clip import ClipLoss
    from vtp_fast.ops.registry import building_for

    with building_for("cpu"):
        loss = ClipLoss()

    def count(rows: int) -> int:
        with torch.device("meta"):
            img, txt = torch.empty(rows, width, requires_grad=True), torch.empty(rows, width, requires_grad=True)
            scale = torch.zeros((), requires_grad=True)
        return flops_of(lambda: loss(img, txt, scale).backward())

    return (count(2 * n) - 2 * count(n)) / (2 * n * n)


@cache
def lpips_flops_per_image(size: int) -> int:
    """LPIPS-VGG forward on the reconstruction and its target (2 images) + the backward to the reconstruction
    (VGG frozen: input gradients only), per reconstructed image, at size x size."""
    import torchvision

    ends, starts = (4, 9, 16, 23, 30), (0, 4, 9, 16, 23)
    with torch.device("meta"):
        feats = torchvision.models.vgg16(weights=None).features.requires_grad_(False)
        stages = [feats[a:b] for a, b in zip(starts, ends, strict=True)]
        heads = [torch.empty(1, [m for m in s if isinstance(m, torch.nn.Conv2d)][-1].out_channels, 1, 1)
                 for s in stages]
        x = torch.empty(1, 3, size, size, requires_grad=True)
        y = torch.empty(1, 3, size, size)

    def run():
        h, total = torch.cat([x, y]), 0
        for stage, head in zip(stages, heads, strict=True):
            h = stage(h)
            fx, fy = torch.nn.functional.normalize(h, dim=1).chunk(2)
            total = total + torch.nn.functional.conv2d((fx - fy) ** 2, head).mean()
        total.backward()

    return flops_of(run)


def count_tokenizer_step(pcfg: PretrainConfig) -> dict:
    """Model FLOPs of one pretraining step of `pcfg` at its configured global batch (`pcfg` is left as it was), by
    part, with the batch it was counted at and the per-image encoder and decoder FLOPs."""
    pcfg = copy.deepcopy(pcfg)
    size, ssl, rec, accum = pcfg.batch.size, pcfg.batch.ssl, pcfg.batch.rec, pcfg.batch.accumulation
    perceptual = pcfg.objective.perceptual if pcfg.objective.rec else 0.0
    pcfg.objective.perceptual = 0.0  # LPIPS counted apart (no VGG weights needed)
    pcfg.model.init = None  # the preset's architecture (a checkpoint to continue from has the same shapes)
    pcfg.run.compile, pcfg.run.precision, pcfg.data.synthetic = False, "fp32", True
    b = base_batch(size, ssl, rec)
    key = repr(pcfg) + repr(b)
    if key not in _CACHE:
        f1, t, clip_shape = _trainer_flops(pcfg, *b)
        q = clip_logits_coefficient(clip_shape[1]) if clip_shape else 0.0
        _CACHE[key] = (f1, q, clip_shape, _codec_flops(t.model, pcfg.data.image_size),
                       t.model.config.vision_patch_size)
    f1, q, clip_shape, (enc_flops, dec_flops, latent_shape), patch = _CACHE[key]
    # FLOPs(B) = a B + q B^2: the CLIP logits are the quadratic part, everything else (trunk, text tower, heads,
    # teacher, pixel decoder) is per sample
    a = (f1 - q * b[0] ** 2) / b[0]
    linear = a * size
    quadratic = q * (size / accum) ** 2 * accum  # each micro-step: local x global logits of its own global batch
    lpips = lpips_flops_per_image(pcfg.data.image_size) * rec if perceptual and rec else 0
    return {"batch": {"size": size, "ssl": ssl, "rec": rec, "accumulation": accum},
            "counted_at": {"size": b[0], "ssl": b[1], "rec": b[2], "flops": f1},
            "clip_logits_coefficient": q, "clip_width": clip_shape[1] if clip_shape else None,
            "image_size": pcfg.data.image_size, "preset": pcfg.model.preset,
            "linear_flops": linear, "clip_logits_flops": quadratic, "lpips_flops": lpips,
            "step_flops": linear + quadratic + lpips, "perceptual": perceptual,
            "encoder_flops_per_image": enc_flops, "decoder_flops_per_image": dec_flops,
            "latent_shape": latent_shape, "patch": patch}


def _codec_flops(model, size: int) -> tuple[int, int, list[int]]:
    """Encoder and decoder forward FLOPs of one image (meta device), and the latent shape (C, h, w)."""
    with torch.no_grad():
        x = torch.empty(1, 3, size, size, device="meta")
        z = []
        enc = flops_of(lambda: z.append(model.encode(x)))
        dec = flops_of(lambda: model.decode(torch.empty_like(z[0])))
    return enc, dec, list(z[0].shape[1:])


def count_dit_step(dcfg: DiTTrainConfig, latent_shape: list[int], count_batch: int = 2) -> dict:
    """DiT training step FLOPs of `dcfg` at its configured batch and forward FLOPs of one sample, for latents of
    `latent_shape` (C, h, w)."""
    from vtp_fast.models.dit import DiT, dit_config
    from vtp_fast.ops.registry import building_for
    from vtp_fast.train.flow import flow_loss

    c, h, w = latent_shape
    key = repr(dcfg) + repr(latent_shape) + repr(count_batch)
    if key in _CACHE:
        return _CACHE[key]
    config = dit_config(dcfg.preset, **{"in_channels": c, "input_size": h, **dcfg.overrides})
    meta = torch.device("meta")
    torch.manual_seed(0)
    with building_for("cpu"), meta:
        model = DiT(config)
        x0 = torch.empty(count_batch, c, h, w)
        y = torch.zeros(count_batch, dtype=torch.long)
        tt = torch.empty(count_batch)
    train = flops_of(lambda: flow_loss(model, x0, y, mu=dcfg.mu, sigma=dcfg.sigma, cos_weight=dcfg.cos_weight,
                                     cos_over=dcfg.cos_over)["total"].backward())
    with torch.no_grad():
        forward = flops_of(lambda: model(x0, tt, y))
    _CACHE[key] = {"preset": dcfg.preset, "batch": dcfg.batch, "latents": latent_shape,
                   "step_flops": train / count_batch * dcfg.batch, "forward_flops_per_sample": forward / count_batch}
    return _CACHE[key]


@cache
def inception_flops_per_image() -> int:
    """torch-fidelity's InceptionV3 (FID's pool features) on one image, resized to 299 x 299 inside."""
    from vtp_fast.eval.inception import meta_inception

    model = meta_inception()
    x = torch.empty(1, 3, 299, 299, dtype=torch.uint8, device="meta")
    with torch.no_grad():
        return flops_of(lambda: model(x))
