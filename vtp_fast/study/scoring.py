"""The study's measurements at any scale: its image sets opened as streamed sources, and every FID-like figure from
ADM's suite (vtp_fast.eval.adm) on features streamed a batch at a time, never a whole set in memory.

Sets (`open_sets`): the labelled and held-out sets of vtp_fast.data.labelled (a named set in memory, an image folder
tree or labelled shards decoded on demand by `workers` DataLoader processes), each cut to its first max_images.

Image streams (`ImageStream`): what adm.extract_features reads, `batches(start, stop, size)` -> uint8 (b, 3, H, W):
real images of a source by id, reconstructions of them, a tokenizer's decodes of Gaussian latents (noise seeded by
the image's index, vtp_fast.downstream.sample), or a sample set's .npz. Under torchrun every rank embeds its slice
of a set (so every stage that scores runs on every rank); rank 0 computes the metrics.

Figures (`generation_metrics`): FID, sFID, Inception Score (null with the reason where the Inception weights have no
head), k-NN precision / recall (k = 3) of adm.adm_metrics, and KID (torch-fidelity's unbiased MMD, subsets of
kid_subset_size) on the same pool features, against one reference: ADM's reference batch when the study names one
(`adm_reference`: FID / sFID against its precomputed statistics, KID / precision / recall against its images), else
`samples` real images of the labelled set. Reference features (and the held-out originals of rFID) are computed once
and kept in <out>/reference/ (.npz, named by what they are features of).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from vtp_fast import distributed as dist
from vtp_fast.data.labelled import Fetched, LabelledImages, open_images, stream, warn_bad
from vtp_fast.eval.adm import STAT_KEYS, SetFeatures, adm_metrics, extract_features, load_head, resolve_weights
from vtp_fast.eval.evaluate import to_uint8_nchw
from vtp_fast.io import atomic_file, atomic_write_text
from vtp_fast.study.config import StudyConfig


def device() -> torch.device:
    """Where scoring, sampling and latent extraction run: this rank's GPU, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------------------------------------------- sets
class First:
    """The first n images of a source decoded on demand (the same interface: len, name, size, class_names, fetch)."""

    def __init__(self, source, n: int):
        self.source, self.n = source, n
        self.name, self.size, self.class_names = f"{source.name}-first{n}", source.size, source.class_names
        self.labels = getattr(source, "labels", None)  # where the source knows them without decoding (folders)

    def __len__(self) -> int:
        return self.n

    def fetch(self, ids) -> Fetched:
        return self.source.fetch(ids)


def first(source, n: int):
    """`source` cut to its first n images (n = 0: all of them); a set in memory stays one."""
    if not n or len(source) <= n:
        return source
    if isinstance(source, LabelledImages):
        return LabelledImages(source.images[:n], source.labels[:n], source.class_names, source.captions[:n],
                              f"{source.name}-first{n}")
    return First(source, n)


@dataclass
class Sets:
    train: object  # an image source of vtp_fast.data.labelled
    held_out: object
    workers: int  # DataLoader processes decoding a source on demand (the thread budget's)


def open_sets(cfg: StudyConfig, size: int) -> Sets:
    """The study's labelled and held-out sets at `size` px, each its first max_images."""
    from vtp_fast.threads import budget

    train, held_out = (first(open_images(spec, size), cfg.max_images) for spec in (cfg.data, cfg.held_out))
    return Sets(train, held_out, budget().loader_workers)


# ---------------------------------------------------------------------------------------------------- streams
class ImageStream:
    """n images made on demand, as adm.extract_features reads a set: `make(start, stop, size)` yields uint8
    (b, 3, H, W) batches of images [start, stop) (fewer where some could not be used: counted in `skipped`)."""

    def __init__(self, name: str, n: int, make: Callable[[int, int, int], Iterator[torch.Tensor]]):
        self.name, self.n, self.make, self.stats, self.skipped = name, n, make, {}, 0

    def __len__(self) -> int:
        return self.n

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[torch.Tensor]:
        yield from (x for x in self.make(start, stop, batch_size) if x.shape[0])


def fetched(source, ids: torch.Tensor, start: int, stop: int, size: int, workers: int) -> Iterator[Fetched]:
    """The images of ids[start:stop], `size` at a time, decoded by `workers` processes; the unusable ones warned
    about."""
    chunks = [ids[i:min(stop, i + size)] for i in range(start, stop, size)]
    for got in stream(source, chunks, workers):
        warn_bad(got.bad, source.name)
        yield got


def real_images(source, ids: torch.Tensor, workers: int) -> ImageStream:
    """The images ids (k,) of a labelled source."""

    def make(start: int, stop: int, size: int) -> Iterator[torch.Tensor]:
        for got in fetched(source, ids, start, stop, size, workers):
            s.skipped += len(got.bad)
            yield got.images.permute(0, 3, 1, 2).contiguous()  # (b, S, S, 3) -> (b, 3, S, S)

    s = ImageStream(f"{source.name}[{len(ids)}]", len(ids), make)  # `make` counts its skipped images
    return s


def labels_of(source, ids: torch.Tensor, workers: int) -> torch.Tensor:
    """The labels (k,) of images ids (k,) of a source: from its label table where it has one, else read with the
    images (streamed; those that cannot be decoded left out)."""
    known = getattr(source, "labels", None)
    if known is not None:
        return torch.as_tensor(known)[ids]
    return torch.cat([got.labels for got in fetched(source, ids, 0, len(ids), 256, workers)])


def gaussian_decodes(tokenizer, meta: dict, n: int, seed: int = 0) -> ImageStream:
    """The tokenizer's decoder on n Gaussian latents with the latent set's per-channel mean and std (`meta`): image
    i from sample_noise(seed, i), the same on any number of ranks."""
    from vtp_fast.downstream.sample import sample_noise

    dev = next(tokenizer.parameters()).device
    mean, std = (torch.tensor(meta[k], device=dev).view(1, -1, 1, 1) for k in ("mean", "std"))

    @torch.no_grad()
    def make(start: int, stop: int, size: int) -> Iterator[torch.Tensor]:
        for i in range(start, stop, size):
            z = sample_noise(seed, i, min(stop, i + size), (meta["channels"], *meta["grid"])).to(dev)  # (b, C, h, w)
            yield to_uint8_nchw(tokenizer.denormalize(tokenizer.decode(z * std + mean))).cpu()

    return ImageStream(f"ceiling of {meta.get('tokenizer', '')}", n, make)


# ---------------------------------------------------------------------------------------------------- features
def weights(cfg: StudyConfig) -> Path:
    """The Inception weights the study runs (adm.resolve_weights of cfg.inception_weights)."""
    return resolve_weights(cfg.inception_weights or None, progress=False)


def _network(cfg: StudyConfig) -> str:
    return f"inception {cfg.inception_precision} {weights(cfg)}"


@cache
def _head(path: Path) -> tuple[torch.Tensor | None, str | None]:
    return load_head(path)


def features(images, cfg: StudyConfig) -> SetFeatures:
    """ADM's Inception features of a set (an ImageStream or an adm image set), on every rank."""
    return extract_features(images, weights=weights(cfg), precision=cfg.inception_precision, device=device(),
                            progress=False)


def _save_features(path: Path, f: SetFeatures) -> None:
    arrays = {"pool": f.pool.numpy(), "n": np.array(f.n), "skipped": np.array(f.skipped),
              "precomputed": np.array(list(f.precomputed), dtype=str)}
    for name, keys in STAT_KEYS.items():
        if f.stats[name] is not None:
            arrays |= dict(zip(keys, f.stats[name], strict=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as out:
        np.savez(out, **arrays)


def _load_features(path: Path) -> SetFeatures:
    with np.load(path) as z:
        stats = {name: tuple(z[k] for k in keys) if keys[0] in z else None for name, keys in STAT_KEYS.items()}
        return SetFeatures(int(z["n"]), torch.from_numpy(z["pool"]), stats, tuple(z["precomputed"].tolist()),
                           skipped=int(z["skipped"]))


def kept(folder: Path, what: str, compute: Callable[[], SetFeatures]) -> SetFeatures | None:
    """The features of `what` kept in folder/<hash of what>.npz, or computed on every rank and kept by rank 0.
    Returned on rank 0 (None on the others)."""
    path = folder / f"{hashlib.sha1(what.encode()).hexdigest()[:12]}.npz"
    if dist.broadcast_object(path.is_file() if dist.rank() == 0 else None):
        return _load_features(path) if dist.rank() == 0 else None
    f = compute()
    if dist.rank() == 0:
        _save_features(path, f)
        atomic_write_text(folder / f"{path.stem}.txt", what + "\n")
    dist.barrier()
    return f if dist.rank() == 0 else None


def reference(cfg: StudyConfig, out: Path, sets: Sets) -> SetFeatures | None:
    """The generative figures' reference (module docstring), on rank 0."""
    from vtp_fast.data.image_sets import open_image_set
    from vtp_fast.eval.evaluate import pick

    if cfg.adm_reference:
        path = Path(cfg.adm_reference).expanduser().resolve()
        return kept(out / "reference", f"adm reference {path}, {_network(cfg)}",
                    lambda: features(open_image_set(path, "adm_reference"), cfg))
    ids = pick(sets.train, cfg.samples)
    return kept(out / "reference", f"{sets.train.name}: {len(ids)} images (pick seed 0), {_network(cfg)}",
                lambda: features(real_images(sets.train, ids, sets.workers), cfg))


# ---------------------------------------------------------------------------------------------------- metrics
def generation_metrics(samples: SetFeatures, ref: SetFeatures, cfg: StudyConfig) -> dict:
    """gFID, gKID (mean, std over subsets), sFID, Inception Score, precision, recall of `samples` against `ref`; a
    figure that cannot be computed is None with `<name>_unavailable` saying why."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    head, reason = _head(weights(cfg))
    suite = adm_metrics(samples, ref, head, reason, device=device())
    out = {"gfid": suite.pop("fid"), **suite}
    k = min(cfg.kid_subset_size, samples.n, ref.n)
    if k >= 2:
        kid = kid_features_to_metric(ref.pool, samples.pool, kid_subsets=cfg.kid_subsets, kid_subset_size=k,
                                     rng_seed=2020, verbose=False)
        out |= {"gkid": kid["kernel_inception_distance_mean"], "gkid_std": kid["kernel_inception_distance_std"]}
    else:
        out |= {"gkid": None, "gkid_std": None, "gkid_unavailable": f"{samples.n} samples, {ref.n} reference images"}
    out["n_fake"], out["n_real"] = out.pop("n"), out.pop("n_ref")
    return out | {"kid_subset_size": k, "skipped": samples.skipped}


def score_images(images, cfg: StudyConfig, out: Path, sets: Sets) -> dict:
    """generation_metrics of a set (ImageStream or adm image set) against the study's reference: on every rank, the
    figures on rank 0 ({} on the others)."""
    ref = reference(cfg, out, sets)
    got = features(images, cfg)
    return generation_metrics(got, ref, cfg) if dist.rank() == 0 else {}


def reconstruction_scores(model, cfg: StudyConfig, out: Path, sets: Sets) -> dict:
    """rFID, rKID (mean, std over subsets), PSNR and SSIM of `samples` held-out reconstructions against their
    originals (pick seed 0, the same for every tokenizer), streamed: on every rank, the figures on rank 0."""
    from vtp_fast.data.images import normalize_u8
    from vtp_fast.eval.evaluate import pick, require
    from vtp_fast.eval.metrics import psnr
    from vtp_fast.eval.ssim import ssim

    held, n = sets.held_out, cfg.samples
    require(held, n, "rfid")
    ids = pick(held, n)
    originals = kept(out / "reference", f"{held.name}: {n} held-out images (pick seed 0), {_network(cfg)}",
                     lambda: features(real_images(held, ids, sets.workers), cfg))
    dev = device()
    sums = torch.zeros(3, dtype=torch.float64, device=dev)  # PSNR, SSIM, images
    model.eval()

    @torch.no_grad()
    def make(start: int, stop: int, size: int) -> Iterator[torch.Tensor]:
        for got in fetched(held, ids, start, stop, size, sets.workers):
            x = normalize_u8(got.images).to(dev)  # (b, 3, S, S)
            a = model.denormalize(x).clamp(0, 1)
            b = model.denormalize(model.decode(model.encode(x))).clamp(0, 1).float()
            sums.add_(torch.stack([psnr(b, a).sum(), ssim(b, a).sum(), torch.tensor(float(len(b)), device=dev)])
                      .double())
            yield to_uint8_nchw(b).cpu()

    recon = features(ImageStream(f"reconstructions of {held.name}", len(ids), make), cfg)
    dist.all_reduce_sum(sums)
    if dist.rank() != 0:
        return {}
    g = generation_metrics(recon, originals, cfg)
    return {"rfid": g["gfid"], "rkid": g["gkid"], "rkid_std": g["gkid_std"], "psnr": (sums[0] / sums[2]).item(),
            "ssim": (sums[1] / sums[2]).item()}


def zero_shot(model, data, features: Path, workers: int) -> dict:
    """Zero-shot figures of a held-out source, on every rank (the figures on rank 0, {} on the others): a set in
    memory with captions (the emoji names) classifies each image among its distinct captions
    (vtp_fast.eval.probe.zero_shot_names); any other set is embedded into features/<set name> (streamed, over the
    ranks, resumable) and classified among its class names, ImageNet's with open_clip's names and templates
    (vtp_fast.eval.classify); a set where that cannot be done gets `zero_shot_unavailable` and the reason."""
    from vtp_fast.config import InputError
    from vtp_fast.eval.classify import zero_shot_stored
    from vtp_fast.eval.features import extract_features as embed

    if isinstance(data, LabelledImages) and data.captions and all(data.captions):
        if dist.rank() != 0:
            return {}
        from vtp_fast.data.images import normalize_u8
        from vtp_fast.eval.probe import zero_shot_names

        zs = zero_shot_names(model, normalize_u8(data.images), data.captions) | {"classes": "captions"}
    else:
        store = embed(model, data, features / data.name, workers=workers, progress=False)
        if dist.rank() != 0:
            return {}
        try:
            zs = zero_shot_stored(model, store, "auto")
        except InputError as e:
            return {"zero_shot_unavailable": str(e)}
    return {"zero_shot_top1": zs["top1"], "zero_shot_top5": zs["top5"], "zero_shot_chance": zs["chance"],
            "zero_shot_classes": zs["classes"]}
