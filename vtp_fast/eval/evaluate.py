"""A tokenizer's scores: rFID / PSNR / SSIM of its reconstructions, gFID of a DiT's samples, zero-shot accuracy,
linear probe. FID/KID use the offline Inception of `vtp_fast.eval.fid`; on a 2-core CPU it embeds a few images
per second, so sample counts here are small (hundreds to a few thousand) and every figure carries its count.

`data` is any image source of vtp_fast.data.labelled (a set in memory, an image folder tree, shards): images are
read a chunk at a time (`stream`, decoded by `workers` processes), only the picked ones for FID.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from vtp_fast.config import InputError
from vtp_fast.data.images import normalize_u8
from vtp_fast.data.labelled import Fetched, LabelledImages, stream, take, warn_bad
from vtp_fast.eval.metrics import psnr
from vtp_fast.eval.ssim import ssim
from vtp_fast.models.vtp import VTP


def to_uint8_nchw(images: Tensor) -> Tensor:
    """(N, 3, H, W) floats in [0, 1] -> uint8 (N, 3, H, W)."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8)


def _chunks(ids: Tensor, size: int) -> list[Tensor]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def _read(data: LabelledImages, ids: Tensor, size: int, workers: int) -> Iterator[Fetched]:
    """The usable images of `ids`, `size` at a time (chunks with none left out); the skipped ones warned about."""
    bad = []
    for got in stream(data, _chunks(ids, size), workers):
        bad += got.bad
        if len(got.ids):
            yield got
    warn_bad(bad, data.name)


def pick(data: LabelledImages, n: int, seed: int = 0, skip: int = 0) -> Tensor:
    """n image indices of the set (all of them in order when n >= len), the same for every tokenizer. `skip` > 0
    gives n others, disjoint from the first `skip` of the same seed (the second half of a real-vs-real floor)."""
    if skip + n > len(data):
        if skip:
            raise InputError(f"{data.name} has {len(data)} images, fewer than the {skip + n} that two disjoint sets "
                             "need; lower the sample count")
        return torch.arange(len(data))
    return torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[skip:skip + n].sort().values


def require(data: LabelledImages, n: int, what: str) -> None:
    if len(data) < n:
        raise InputError(f"{what}: the reference set {data.name} has {len(data)} images, fewer than the {n} asked "
                         "for; lower the sample count or use a larger set")


@torch.no_grad()
def held_out_scores(model: VTP, images_u8: Tensor, captions: list[str] | None) -> dict:
    """Pretraining's periodic evaluation (vtp-fast pretrain): PSNR of the reconstructions of held-out uint8 images
    (N, S, S, 3), and with a text tower and captions, zero-shot accuracy among the set's distinct captions."""
    from vtp_fast.eval.probe import zero_shot_names

    was_training = model.training
    model.eval()
    images = normalize_u8(images_u8).to(next(model.parameters()).device)
    recon = torch.cat([model.decode(model.encode(images[i:i + 128])) for i in range(0, len(images), 128)])
    result = {"eval_psnr": psnr(model.denormalize(recon), model.denormalize(images)).mean().item()}
    if model.config.train_clip and captions is not None:
        zs = zero_shot_names(model, images, captions)
        result.update(zero_shot_top1=zs["top1"], zero_shot_top5=zs["top5"], zero_shot_chance=zs["chance"])
    model.train(was_training)
    return result


@torch.no_grad()
def reconstruction_scores(model: VTP, data: LabelledImages, n: int = 1000, *, batch: int = 64,
                          kid_subset_size: int | None = None, kid_subsets: int = 100, progress: bool = True,
                          workers: int = 0) -> dict:
    """rFID, KID (mean and std over subsets), PSNR and SSIM of n reconstructions against their originals."""
    from vtp_fast.eval.fid import compute_fid_kid

    require(data, n, "rfid")
    idx = pick(data, n)
    device = next(model.parameters()).device
    model.eval()
    originals, recons = [], []
    for got in _read(data, idx, batch, workers):
        x = normalize_u8(got.images).to(device)
        originals.append(model.denormalize(x).clamp(0, 1).cpu())
        recons.append(model.denormalize(model.decode(model.encode(x))).clamp(0, 1).float().cpu())
    a, b = torch.cat(originals), torch.cat(recons)
    scores = compute_fid_kid(to_uint8_nchw(a), to_uint8_nchw(b), kid_subset_size=kid_subset_size or min(1000, n),
                             kid_subsets=kid_subsets, real_cache_key=f"{data.name}-n{n}", progress=progress)
    return {"rfid": scores["fid"], "rkid": scores["kid_mean"], "rkid_std": scores["kid_std"],
            "psnr": psnr(b, a).mean().item(),
            "ssim": ssim(b, a).mean().item(), "n": len(a)}


def generation_scores(samples: Tensor, data: LabelledImages, n: int | None = None, *,
                      kid_subset_size: int | None = None, kid_subsets: int = 100, progress: bool = True,
                      workers: int = 0) -> dict:
    """gFID and KID (mean and std over subsets) of generated images (N, 3, H, W) in [0, 1] (or uint8) against the
    n reference images `pick(data, n)`."""
    from vtp_fast.eval.fid import compute_fid_kid

    n = n or len(samples)
    require(data, n, "gfid")
    real = take(data, pick(data, n), workers).images.permute(0, 3, 1, 2).contiguous()  # (n, 3, H, W) uint8
    fake = samples if samples.dtype == torch.uint8 else to_uint8_nchw(samples)
    scores = compute_fid_kid(real, fake, kid_subset_size=kid_subset_size or min(1000, n, len(fake)),
                             kid_subsets=kid_subsets, real_cache_key=f"{data.name}-n{n}", progress=progress)
    return {"gfid": scores["fid"], "gkid": scores["kid_mean"], "gkid_std": scores["kid_std"], "n_fake": len(fake),
            "n_real": n}
