"""Offline FID / KID (converted Inception weights, statistics, caching, errors) and SSIM.

The Inception extractor runs at a few images per second on these CPUs, so every set here has 2-3 images of
32x32 (resized to 299x299 inside the extractor); features are extracted once per module where possible.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from vtp_fast.eval import fid as F
from vtp_fast.eval import inception as I
from vtp_fast.eval.ssim import gaussian_window, ssim


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ts_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(I.fid_helper_source()), map_location="cpu")


def _noise(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sets(cache):
    """Two clearly different sets (uniform noise, black) and their features, extracted once with the default
    precision, and (``f_*32``) with the exact fp32 path torch-fidelity itself runs."""
    noise = _noise(3, 0)
    black = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    kw = {"device": "cpu", "cache_dir": cache, "progress": False}
    return {"noise": noise, "black": black, "f_noise": F.inception_features(noise, **kw),
            "f_black": F.inception_features(black, **kw),
            "f_noise32": F.inception_features(noise[:2], **kw, precision="fp32"),
            "f_black32": F.inception_features(black[:2], **kw, precision="fp32")}


# ---------------------------------------------------------------------------------------------- conversion
def test_converted_inception_matches_torchscript(cache, ts_model):
    """torch-fidelity's network with the converted weights == the fid-helper TorchScript network, on 299x299
    inputs (so torch-fidelity's resize is the identity) mapped to [-1, 1) the same way ((x - 128) / 128)."""
    x = _noise(2, 1, size=299)
    (ours,) = I.feature_extractor("cpu", cache, progress=False, precision="fp32")(x)
    with torch.no_grad():
        ref = ts_model((x.float() - 128) / 128)
    assert ours.shape == ref.shape == (2, 2048)
    err = (ours - ref).abs().max().item()
    print(f"converted Inception vs TorchScript: max abs diff {err:.3g} (features up to {ref.abs().max():.3g})")
    assert err < 1e-4  # measured ~1e-6: float32 summation-order differences only
    assert ref.std() > 0.05  # the comparison is not between two constant outputs


def test_converted_state_dict_layout(cache):
    state = torch.load(I.inception_weights(cache, progress=False), map_location="cpu", weights_only=True)
    bn_gammas = [v for k, v in state.items() if k.endswith(".bn.weight")]
    assert len(bn_gammas) == I.N_CONVS and all(bool((g == 1).all()) for g in bn_gammas)  # TF graph: no gamma
    bns = [m for m in I.feature_extractor("cpu", cache, progress=False, precision="fp32").modules()
           if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == I.N_CONVS and all(abs(m.eps - 1e-3) < 1e-12 for m in bns)
    assert torch.isnan(state["fc.weight"]).all() and state["fc.weight"].shape == (1008, 2048)  # no logits


def test_conversion_checks_shapes(ts_model):
    """Swapping two convolutions of different shapes must be caught, not silently converted."""
    state = {k: v.clone() for k, v in ts_model.state_dict().items()}
    good = I.convert_fid_helper_state_dict(state)
    assert len(good) == 6 * I.N_CONVS + 2
    keys = list(state)
    a, b = keys[0:4], keys[4:8]  # conv (32, 3, 3, 3) and conv_1 (32, 32, 3, 3)
    swapped = dict(state)
    for ka, kb in zip(a, b, strict=True):
        swapped[ka], swapped[kb] = state[kb], state[ka]
    with pytest.raises(RuntimeError, match="convolution mismatch"):
        I.convert_fid_helper_state_dict(swapped)


def test_inception_weights_cached_and_atomic(cache, monkeypatch):
    path = I.inception_weights(cache, progress=False)
    assert path.name == I.WEIGHTS_FILENAME and path.parent == cache / "fid"
    mtime = path.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("rebuilt although the converted file exists")

    monkeypatch.setattr(I, "_build_weights", boom)
    assert I.inception_weights(cache, progress=False) == path
    assert path.stat().st_mtime_ns == mtime
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temp leftovers


def test_damaged_weights_file_is_refused(tmp_path):
    bad = tmp_path / "fid" / I.WEIGHTS_FILENAME
    bad.parent.mkdir(parents=True)
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(RuntimeError, match="delete it to rebuild"):
        I.feature_extractor("cpu", tmp_path, progress=False)


def test_default_cache_dir_and_hub_install(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("VTP_FAST_CACHE", str(tmp_path / "c"))
    assert I.fid_dir() == tmp_path / "c" / "fid"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    dest = I.install_for_torch_fidelity(cache, progress=False)
    assert dest == tmp_path / "torch" / "hub" / "checkpoints" / I.WEIGHTS_FILENAME
    assert dest.stat().st_size == I.inception_weights(cache, progress=False).stat().st_size


def test_inception_score_refused(cache):
    with pytest.raises(ValueError, match="Inception Score is not supported"):
        I.feature_extractor("cpu", cache, features=("2048", "logits_unbiased"), progress=False)
    import torch_fidelity

    data = F.Uint8ImageDataset(_noise(2, 3))
    with pytest.raises(ValueError, match="Inception Score is not supported"):
        torch_fidelity.calculate_metrics(input1=data, isc=True, cuda=False, verbose=False, cache=False,
                                         **I.torch_fidelity_kwargs(cache, progress=False))


# ---------------------------------------------------------------------------------------------- FID math
def test_fid_from_stats_closed_form():
    """Diagonal covariances: FID = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    mu1, mu2 = np.array([0.0, 1.0, 2.0, -1.0]), np.array([1.0, 1.0, 0.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 0.25, 2.0])
    expected = 1 + 0 + 4 + 2.25 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0 + (3 - math.sqrt(2)) ** 2
    got = F.fid_from_stats(mu1, np.diag(a), mu2, np.diag(b))
    assert abs(got - expected) < 1e-10
    # a rotated (non-diagonal) version gives the same distance; torch inputs are accepted
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((4, 4)))
    got_rot = F.fid_from_stats(torch.from_numpy(q @ mu1), torch.from_numpy(q @ np.diag(a) @ q.T), q @ mu2,
                               q @ np.diag(b) @ q.T)
    assert abs(got_rot - expected) < 1e-9
    # rank-deficient singular covariance (one zero variance)
    a0 = a.copy()
    a0[1] = 0.0
    expected0 = expected - (2 - 1) ** 2 + 1.0
    assert abs(F.fid_from_stats(mu1, np.diag(a0), mu2, np.diag(b)) - expected0) < 1e-10
    with pytest.raises(ValueError, match="expected mu"):
        F.fid_from_stats(mu1, np.diag(a), mu2[:3], np.diag(b[:3]))


def test_fid_self_zero_and_different_large(sets):
    mu_n, s_n = F.features_to_stats(sets["f_noise"])
    mu_b, s_b = F.features_to_stats(sets["f_black"])
    assert mu_n.dtype == s_n.dtype == np.float64 and mu_n.shape == (2048,) and s_n.shape == (2048, 2048)
    self_fid = F.fid_from_stats(mu_n, s_n, mu_n, s_n)
    print(f"self FID from stats (3 images, rank-2 covariance): {self_fid:.3g}")
    assert abs(self_fid) < 1e-6
    diff = F.fid_from_stats(mu_n, s_n, mu_b, s_b)
    assert diff > 100, diff  # black vs noise: hundreds


@pytest.mark.parametrize("n", [20, 200])  # rank-deficient (19 < 64) and full-rank covariances
def test_fid_from_stats_agrees_with_torch_fidelity(n):
    """Against torch-fidelity's formula (sum of sqrt of the eigenvalues of s1 s2) on random statistics; D = 64
    keeps its general eigen-solver cheap."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 64)) @ rng.standard_normal((64, 64))
    y = 0.5 * rng.standard_normal((n, 64)) @ rng.standard_normal((64, 64)) + 1.0
    (m1, s1), (m2, s2) = F.features_to_stats(x), F.features_to_stats(y)
    ours = F.fid_from_stats(m1, s1, m2, s2)
    theirs = fid_statistics_to_metric({"mu": m1, "sigma": s1}, {"mu": m2, "sigma": s2}, False)
    assert ours > 1 and abs(theirs["frechet_inception_distance"] - ours) < 1e-6 * ours
    assert abs(F.fid_from_stats(m1, s1, m1, s1)) < 1e-9 * np.trace(s1)


def test_fid_stats_cache(sets, cache, monkeypatch):
    """An iterator of batches works, the statistics are cached as float64 npz, and the cache is hit."""
    two = sets["noise"][:2]
    mu, sigma = F.fid_stats(iter([two[:1], (two[1:], "labels")]), cache_key="noise2", device="cpu",
                            cache_dir=cache, progress=False)
    ref_mu, ref_sigma = F.features_to_stats(sets["f_noise"][:2])
    assert np.abs(mu - ref_mu).max() < 1e-4 and np.abs(sigma - ref_sigma).max() < 1e-4
    path = F.stats_path("noise2", cache)
    with np.load(path) as z:
        assert z["mu"].dtype == np.float64 and int(z["n"]) == 2

    def boom(*a, **k):
        raise AssertionError("features recomputed although the statistics are cached")

    monkeypatch.setattr(F, "inception_features", boom)
    mu2, sigma2 = F.fid_stats(two, cache_key="noise2", cache_dir=cache, progress=False)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    mu3, _ = F.fid_stats(None, cache_key="noise2", cache_dir=cache)
    assert np.array_equal(mu, mu3)
    with pytest.raises(ValueError, match="stale cache"):
        F.fid_stats(sets["noise"], cache_key="noise2", cache_dir=cache)
    with pytest.raises(ValueError, match="no cached statistics"):
        F.fid_stats(None, cache_key="missing", cache_dir=cache)
    with pytest.raises(ValueError, match="cache_key"):
        F.fid_stats(two, cache_key="../evil", cache_dir=cache)


def test_compute_fid_kid_self(sets, cache, monkeypatch):
    """The same 2 images as real and fake: FID ~ 0; KID (subset size 2 = the whole set, so every subset is the
    full set) equals the closed form of the unbiased MMD^2 of a set with itself, 2/m (mean off-diag K - mean
    diag K) with the cubic kernel K = (x.y / 2048 + 1)^3. The real side is cached under a key and reused."""
    x = sets["noise"][:2]
    kw = {"kid_subset_size": 2, "kid_subsets": 5, "device": "cpu", "cache_dir": cache, "progress": False}
    out = F.compute_fid_kid(x, x, real_cache_key="self2", **kw)
    assert out["n_real"] == out["n_fake"] == 2 and out["kid_subset_size"] == 2
    assert abs(out["fid"]) < 1e-6
    f = sets["f_noise"][:2].double().numpy()
    k = (f @ f.T / 2048 + 1) ** 3
    m = 2
    off = (k.sum() - np.trace(k)) / (m * (m - 1))
    expected = 2 / m * (off - np.trace(k) / m)
    assert abs(out["kid_mean"] - expected) < 1e-4 * abs(expected)
    # every subset is the same set in another order: only float32 summation order varies (measured ~1e-7)
    assert out["kid_std"] < 1e-4 * abs(expected)
    # the real features and statistics were cached; a second call extracts the fake set only
    assert F.features_path("self2", cache).is_file() and F.stats_path("self2", cache).is_file()
    calls = []
    real_features = F.inception_features

    def counting(images, **k):
        calls.append(k.get("desc"))
        return real_features(images, **k)

    monkeypatch.setattr(F, "inception_features", counting)
    again = F.compute_fid_kid(None, x, real_cache_key="self2", **kw)
    assert calls == ["fake"] and again == out


def test_compute_fid_kid_matches_torch_fidelity(sets, cache):
    """torch-fidelity's own pipeline (calculate_metrics on Datasets, with our registered extractor) sees the
    same features: its KID (2 vs 2 images, subset size 2) equals KID on our features."""
    import torch_fidelity
    from torch_fidelity.metric_kid import kid_features_to_metric

    real, fake = sets["noise"][:2], sets["black"][:2]
    theirs = torch_fidelity.calculate_metrics(
        input1=F.Uint8ImageDataset(real), input2=F.Uint8ImageDataset(fake), kid=True, kid_subset_size=2,
        kid_subsets=3, cuda=False, verbose=False, cache=False, save_cpu_ram=True,
        **I.torch_fidelity_kwargs(cache, progress=False))["kernel_inception_distance_mean"]
    ours = kid_features_to_metric(sets["f_noise32"], sets["f_black32"], kid_subset_size=2, kid_subsets=3,
                                  verbose=False)["kernel_inception_distance_mean"]
    assert ours > 0.1 and abs(theirs - ours) < 1e-4 * ours


def test_clear_errors(cache):
    x = _noise(3, 5)
    with pytest.raises(ValueError, match=r"needs at least 4 images in each set, got real=3, fake=3"):
        F.compute_fid_kid(x, x, kid_subset_size=4, cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match="at least 2 images"):
        F.compute_fid_kid(x[:1], x, kid_subset_size=2, cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match="at least 2 images"):
        F.fid_stats(x[:1], cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match="uint8"):
        F.fid_stats(x.float() / 255, cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels.*channels-last"):
        F.fid_stats(x.permute(0, 2, 3, 1).contiguous(), cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        F.compute_fid_kid(x[:, :1], x, kid_subset_size=2, cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        F.fid_stats(x[0], cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match="uint8"):  # a bad batch inside an iterator
        F.fid_stats(iter([x[:1], x.float()]), cache_dir=cache, progress=False)


# ---------------------------------------------------------------------------------------------- fast paths
def _smooth_images(n: int, size: int = 64) -> torch.Tensor:
    """n structured uint8 images (colour gradients, a disc, stripes): closer to real images than noise."""
    g = torch.Generator().manual_seed(7)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        c = torch.rand(3, 4, generator=g)
        img = c[:, :1, None] * xx + c[:, 1:2, None] * yy  # (3, size, size) gradients
        cx, cy, r = torch.rand(3, generator=g) * 0.5 + 0.25
        img = torch.where(((xx - cx) ** 2 + (yy - cy) ** 2 < (r / 2) ** 2), c[:, 2:3, None], img)
        img = img + 0.2 * torch.sin(xx * 40 * c[:, 3:4, None])
        out.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.stack(out)


@pytest.mark.parametrize("n_in", [32, 64, 299, 400])
def test_resize_matrix_matches_torch_fidelity(n_in):
    """The matmul form of the TF1 bilinear resize == torch-fidelity's gather form (exactly for 299 -> 299)."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = torch.randint(0, 256, (2, 3, n_in, n_in // 2 + 1), generator=torch.Generator().manual_seed(n_in))
    x = x.to(torch.uint8)
    ref = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
    mh, mw = I.tf1_resize_matrix(x.shape[2], 299), I.tf1_resize_matrix(x.shape[3], 299)
    ours = mh @ x.float() @ mw.T
    err = (ours - ref).abs().max().item()
    assert err < (1e-6 if n_in == 299 else 1e-4) * 255, err
    assert torch.allclose(mh.sum(1), torch.ones(299))  # two-tap weights sum to 1


def test_fast_paths_agree_with_fp32(cache):
    """The default (fast) precision and every fused variant against torch-fidelity's exact fp32 forward on a
    handful of structured 64x64 images, within the tolerances stated in vtp_fast.eval.fid (measured on 1,000 emoji
    by bench/bench_inception.py: fp32-fused ~2e-6 relative; bf16 ~2-3% relative L2, FID within 0.5%)."""
    x = _smooth_images(3)
    kw = {"device": "cpu", "cache_dir": cache, "progress": False, "batch_size": 3}
    ref = F.inception_features(x, **kw, precision="fp32")
    assert ref.shape == (3, 2048) and ref.std(0).mean() > 0.05  # distinct images, not a constant output
    tol = {"fp32-fused": 1e-4, "bf16": I.BF16_REL_L2_TOL}
    fast = {p: F.inception_features(x, **kw, precision=p) for p in tol}
    assert I.DEFAULT_PRECISION in tol  # the default is one of the fast paths checked here ...
    assert I.feature_extractor("cpu", cache, progress=False) is I.feature_extractor(  # ... and is what runs
        "cpu", cache, progress=False, precision=I.DEFAULT_PRECISION)
    for p, f in fast.items():
        assert f.dtype == torch.float32 and f.shape == ref.shape
        rel = ((f - ref).norm() / ref.norm()).item()
        print(f"{p}: relative L2 deviation from fp32 {rel:.3g} (tolerance {tol[p]})")
        assert rel < tol[p], (p, rel)
    # the fast paths are not accidentally the reference itself (bf16 really runs in bf16)
    assert ((fast["bf16"] - ref).norm() / ref.norm()).item() > 1e-4
    # the intermediate taps agree too (same layer order as torch-fidelity's forward)
    feats = ("64", "192", "768", "2048")
    with torch.no_grad():
        ref_all = I.feature_extractor("cpu", cache, features=feats, progress=False, precision="fp32")(x[:1])
        fused_all = I.feature_extractor("cpu", cache, features=feats, progress=False, precision="fp32-fused")(x[:1])
    for name, a, b in zip(feats, ref_all, fused_all, strict=True):
        assert a.shape == b.shape and ((a - b).norm() / a.norm()).item() < 1e-4, name


def test_cache_keys_differ_by_precision(cache):
    """Features / statistics of different precisions live under different cache files and never mix; the exact
    fp32 path keeps the historical file names."""
    paths = {p: (F.stats_path("k", cache, p), F.features_path("k", cache, p)) for p in I.PRECISIONS}
    assert len({s for s, _ in paths.values()}) == len({f for _, f in paths.values()}) == len(I.PRECISIONS)
    assert paths["fp32"] == (I.fid_dir(cache) / "stats" / "k.npz", I.fid_dir(cache) / "features" / "k.npy")
    assert F.stats_path("k", cache) == paths[I.DEFAULT_PRECISION][0] != paths["fp32"][0]
    with pytest.raises(ValueError, match="precision"):
        F.stats_path("k", cache, "fp16")
    with pytest.raises(ValueError, match="precision"):
        F.inception_features(_noise(1, 3), precision="float32", cache_dir=cache, progress=False)
    two = _noise(2, 4)
    mu32, _ = F.fid_stats(two, cache_key="prec", cache_dir=cache, progress=False, precision="fp32")
    assert F.stats_path("prec", cache, "fp32").is_file() and not F.stats_path("prec", cache).is_file()
    with pytest.raises(ValueError, match="no cached statistics"):  # the fp32 entry is not served to the default
        F.fid_stats(None, cache_key="prec", cache_dir=cache, progress=False)
    mu_fast, _ = F.fid_stats(two, cache_key="prec", cache_dir=cache, progress=False)
    assert F.stats_path("prec", cache).is_file()
    assert np.abs(mu_fast - mu32).max() < 0.1 * np.abs(mu32).max()
    assert np.array_equal(F.fid_stats(None, cache_key="prec", cache_dir=cache, precision="fp32")[0], mu32)


# ---------------------------------------------------------------------------------------------- SSIM
def _ssim_reference(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Direct float64 SSIM: loop over every valid 11x11 window with explicit Gaussian weights."""
    x = np.arange(11) - 5.0
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for ia, ib in zip(a, b, strict=True):
        vals = []
        for ca, cb in zip(ia, ib, strict=True):
            for i in range(ca.shape[0] - 10):
                for j in range(ca.shape[1] - 10):
                    pa, pb = ca[i:i + 11, j:j + 11], cb[i:i + 11, j:j + 11]
                    ma, mb = (w * pa).sum(), (w * pb).sum()
                    va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                    cov = (w * (pa - ma) * (pb - mb)).sum()
                    vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
        out.append(np.mean(vals))
    return np.array(out)


def test_ssim_matches_reference_and_properties():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 14, 13, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = ssim(a, b)
    ref = _ssim_reference(a.numpy(), b.numpy())
    assert got.shape == (2,) and np.abs(got.numpy() - ref).max() < 1e-10
    assert torch.allclose(ssim(b, a), got, atol=1e-12)  # symmetric
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ssim(a.float(), a.float()), torch.ones(2), atol=1e-5)
    # data_range: scaling both images and the range leaves SSIM unchanged
    assert torch.allclose(ssim(255 * a, 255 * b, data_range=255.0), got, atol=1e-10)


def test_ssim_decreases_with_noise():
    g = torch.Generator().manual_seed(1)
    base = torch.rand(1, 3, 32, 32, generator=g)
    noise = torch.randn(base.shape, generator=g)
    values = [ssim(base, (base + s * noise).clamp(0, 1)).item() for s in (0.0, 0.02, 0.1, 0.3)]
    assert values[0] == pytest.approx(1.0, abs=1e-5)
    assert all(x > y for x, y in zip(values, values[1:], strict=False)), values


def test_ssim_small_images_shrink_window():
    """7x9 images use a 7x7 window (one row of positions along H); 1x1 reduces to the luminance term."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(1, 1, 7, 9, generator=g, dtype=torch.float64), torch.rand(1, 1, 7, 9, generator=g,
                                                                                dtype=torch.float64)
    k = gaussian_window(7)
    w = torch.outer(k, k)
    vals = []
    for j in range(3):
        pa, pb = a[0, 0, :, j:j + 7], b[0, 0, :, j:j + 7]
        ma, mb = (w * pa).sum(), (w * pb).sum()
        va, vb, cov = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum(), (w * (pa - ma) * (pb - mb)).sum()
        vals.append((2 * ma * mb + 1e-4) * (2 * cov + 9e-4) / ((ma**2 + mb**2 + 1e-4) * (va + vb + 9e-4)))
    assert abs(ssim(a, b).item() - torch.stack(vals).mean().item()) < 1e-12
    pa, pb = torch.tensor([[[[0.2]]]]), torch.tensor([[[[0.6]]]])
    expected = (2 * 0.2 * 0.6 + 1e-4) / (0.2**2 + 0.6**2 + 1e-4)
    assert ssim(pa, pb).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(a, b[..., :8])
