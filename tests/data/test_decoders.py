"""The DALI (CPU operators) and PIL decoding paths build the same batches: shapes, ids, tokens, masks, plain
images that differ only as the decoded pixels do (every decoder, the nvJPEG path's code included, on small, tall
and wide images), and views that agree in geometry and statistics (DALI's resampling and colour operators differ
in detail)."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from bench.bench_data import synthetic_jpegs
from tests.data.test_shards import _zoo
from tests.helpers import assert_batches_equal, png_with_bad_pixels, random_png
from vtp_fast import optional
from vtp_fast.constants import IMAGENET_MEAN, IMAGENET_STD, normalize
from vtp_fast.data.batch import BatchShape
from vtp_fast.data.decoders import pick_decoder
from vtp_fast.data.pairs import BAD_KINDS, BadSampleCount
from vtp_fast.data.shard_source import ShardSet, ShardSource
from vtp_fast.data.shards import Sample, write_shards
from vtp_fast.data.step_batches import StepBatches
from vtp_fast.data.views import ViewConfig


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("jpegs")
    write_shards(synthetic_jpegs(24, 96), out, per_shard=10, progress=False)
    return ShardSource(ShardSet(str(out)), 64, 16)


def require_dali():
    if not optional.available("dali"):
        pytest.skip(f"DALI unavailable: {optional.reason('dali')}")


def batches(source, views, step=0):
    shape = BatchShape(size=8, ssl=4, rec=4, patch=16)
    return [StepBatches(source, shape, views, seed=3, decoder=d)[step] for d in ("torchvision", "dali")]


def test_same_structure_ids_tokens_masks(source):
    require_dali()
    pil, dali = (vars(b) for b in batches(source, ViewConfig(global_size=64, local_size=32, local_crops=2)))
    assert all(v is not None for v in [*pil.values(), *dali.values()])
    for k in pil:
        assert pil[k].shape == dali[k].shape and pil[k].dtype == dali[k].dtype, k
    for k in ("ids", "tokens", "masks", "mask_index", "mask_weight"):
        assert torch.equal(pil[k], dali[k]), k


def test_same_geometry_without_colour_jitter(source):
    require_dali()
    views = ViewConfig(global_size=64, local_size=32, local_crops=2, jitter_prob=0.0, grayscale_prob=0.0)
    pil, dali = (vars(b) for b in batches(source, views))
    for k in ("images", "global_crops", "local_crops"):  # normalised units (1 ~ 0.23 of the pixel range)
        assert (pil[k] - dali[k]).abs().mean() < 0.05, k


def test_same_statistics_with_the_full_recipe(source):
    require_dali()
    pil, dali = (vars(b) for b in batches(source, ViewConfig(global_size=64, local_size=32, local_crops=2), step=1))
    for k in ("images", "global_crops", "local_crops"):
        for stat in (torch.mean, torch.std):
            a, b = stat(pil[k], dim=(0, 2, 3)), stat(dali[k], dim=(0, 2, 3))
            assert (a - b).abs().max() < 0.25, (k, stat.__name__, a, b)
        assert -2.2 < dali[k].min() and dali[k].max() < 2.7  # within the normalised range of [0, 1] pixels


def test_dali_path_survives_the_bad_data_zoo(tmp_path):
    require_dali()
    zoo = _zoo()
    write_shards([s for s, _ in zoo], tmp_path, per_shard=5, progress=False)
    source = ShardSource(ShardSet(str(tmp_path)), 32, 16)
    views = ViewConfig(global_size=32, local_size=16, local_crops=1)
    batch = StepBatches(source, BatchShape(size=len(zoo), ssl=4, rec=2, patch=16), views, seed=0, decoder="dali")[0]
    assert batch.images.shape == (len(zoo), 3, 32, 32) and torch.isfinite(batch.images).all()
    bad = {i: e for i, (_, e) in enumerate(zoo) if e is not None}  # one epoch: every bad sample met, each once
    assert dict(zip(batch.bad_ids.tolist(), [BAD_KINDS[k] for k in batch.bad_kinds.tolist()],
                    strict=True)) == bad
    assert not set(batch.ids.tolist()) & set(bad)


@pytest.mark.parametrize("decoder", ["torchvision", "dali", pytest.param("nvjpeg", marks=pytest.mark.cuda)])
def test_a_run_over_corrupt_pngs_starts_and_resumes_with_every_decoder(tmp_path, decoder):
    """The crash of issue 10: DALI failed on a corrupt PNG, the batch fell back to PIL and the run died (rc 139) on
    resume. Corrupt files (truncated: caught by the CRC check before any decoder; garbage pixels with valid CRCs:
    caught when the decoder fails) are skipped, reported once naming shard and key, and counted, and a fresh
    object at a later step (a resumed run) builds the batch an uninterrupted run builds."""
    if decoder == "dali":
        require_dali()
    rng = np.random.default_rng(1)
    samples = [Sample(random_png(rng, 24), "png", f"caption {i}") for i in range(16)]
    samples[3] = Sample(samples[3].image[:60], "png", "truncated")
    samples[9] = Sample(png_with_bad_pixels(), "png", "garbage pixels")
    write_shards(samples, tmp_path, per_shard=6, progress=False)
    source = ShardSource(ShardSet(str(tmp_path)), 16, 16)
    views = ViewConfig(global_size=16, local_size=16, local_crops=1)
    shape = BatchShape(size=8, ssl=2, rec=2, patch=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = StepBatches(source, shape, views, seed=1, decoder=decoder)
        first = [run[s] for s in range(4)]  # two epochs: every bad sample met at least twice
    reports = [str(w.message) for w in caught if "bad sample" in str(w.message)]
    assert sorted(r.split(": bad")[0].rsplit("/", 1)[1] for r in reports) == ["shard-00000.tar:000000003",
                                                                               "shard-00001.tar:000000009"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = StepBatches(ShardSource(ShardSet(str(tmp_path)), 16, 16), shape, views, seed=1, decoder=decoder)
        later = resumed[3]
    assert_batches_equal(first[3], later)
    count = BadSampleCount()
    for b in first:
        assert not {3, 9} & set(b.ids.tolist()) and torch.isfinite(b.images).all()
        count.update(b)
    assert count.metrics() == {"data/bad_samples": 2, "data/bad_samples/corrupt_image": 2}


def test_a_decoder_failure_on_an_image_pil_reads_marks_that_sample_only(source, monkeypatch):
    """An image PIL decodes but the decoder rejects: the sample found by decoding alone is a decoder_error, the
    batch is rebuilt by the same decoder without it (not by PIL)."""
    require_dali()
    from vtp_fast.data import dali as dali_mod

    victim = source.shards[5].image
    real = dali_mod.DaliDecoder.decode
    done: list[torch.Tensor] = []  # what DALI decoded, in order

    def picky(self, encoded, size):
        if any(e == victim for e in encoded):
            raise RuntimeError("[png_parser] simulated failure")
        done.append(real(self, encoded, size))
        return done[-1]

    monkeypatch.setattr(dali_mod.DaliDecoder, "decode", picky)
    shape = BatchShape(size=24, ssl=2, rec=2, patch=16)
    views = ViewConfig(global_size=64, local_size=32, local_crops=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = StepBatches(source, shape, views, seed=3, decoder="dali")[0]
    assert batch.bad_ids.tolist() == [5] and BAD_KINDS[int(batch.bad_kinds[0])] == "decoder_error"
    assert 5 not in batch.ids.tolist() and batch.images.shape == (24, 3, 64, 64)
    assert done[-1] is batch.images  # the batch rebuilt by DALI, not by the PIL fallback (same plain pixels)
    assert len([w for w in caught if "000000005: bad sample (decoder_error" in str(w.message)]) == 1


def _transparent_images() -> dict[str, bytes]:
    """32x32 images, left half fully transparent (its colour: red or black), right half opaque."""
    def png(img, **kw):
        buf = io.BytesIO()
        img.save(buf, format="PNG", **kw)
        return buf.getvalue()

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, 16:, 2], rgba[:, 16:, 3] = 255, 255  # right: opaque magenta
    la = np.zeros((32, 32, 2), np.uint8)
    la[:, 16:, 0], la[:, 16:, 1] = 90, 255  # left transparent black, right opaque gray
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (16, 0, 32, 32))  # right: opaque blue; index 0 (red) transparent
    return {"rgba": png(Image.fromarray(rgba, "RGBA")), "la": png(Image.fromarray(la, "LA")),
            "palette": png(pal, transparency=0)}


def _alpha_batches(tmp_path, decoders):
    images = _transparent_images()
    write_shards([Sample(x, "png", k) for k, x in images.items()], tmp_path, progress=False)
    src = ShardSource(ShardSet(str(tmp_path)), 32, 16)
    views = ViewConfig(global_size=32, local_size=16, local_crops=1, jitter_prob=0.0, grayscale_prob=0.0)
    ids, epochs = torch.arange(3), torch.zeros(3, dtype=torch.long)
    shape = BatchShape(size=3, ssl=0, rec=0, patch=16)
    return {d: StepBatches(src, shape, views, seed=0, decoder=d).assemble(ids, epochs) for d in decoders}


def _check_alpha_rule(batches):
    white = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    expected_right = torch.tensor([[255, 0, 255], [90, 90, 90], [0, 0, 255]]) / 255
    expected_right = (expected_right - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for d, b in batches.items():
        x = b.images.cpu()  # (3, 3, 32, 32): rgba, la, palette
        for k in range(3):
            assert torch.allclose(x[k, :, :, :12].mean((1, 2)), white, atol=0.02), (d, k)  # composited on white
            assert torch.allclose(x[k, :, :, 20:].mean((1, 2)), expected_right[k], atol=0.02), (d, k)
    ref = batches["torchvision"].images.cpu()
    for b in batches.values():
        assert (b.images.cpu() - ref).abs().mean() < 0.02


def test_one_alpha_rule_pil_and_dali(tmp_path):
    """RGBA, LA and palette-with-transparency images: both decoders composite on white (DALI alone drops alpha:
    a transparent red area came out red)."""
    require_dali()
    _check_alpha_rule(_alpha_batches(tmp_path, ("torchvision", "dali")))


@pytest.mark.cuda
def test_one_alpha_rule_nvjpeg(tmp_path):
    _check_alpha_rule(_alpha_batches(tmp_path, ("torchvision", "nvjpeg")))


def test_decoder_choice():
    assert pick_decoder("torchvision").name == "torchvision"
    assert pick_decoder("auto").name == ("dali" if optional.available("dali") else
                                         "nvjpeg" if torch.cuda.is_available() else "torchvision")
    assert pick_decoder("dali", in_memory=True).name == "torchvision"  # an in-memory set has nothing to decode
    with pytest.raises(ValueError, match="unknown decoder 'pil'"):
        pick_decoder("pil")
    if optional.available("dali"):
        assert pick_decoder("dali", dali_device="cpu").on_gpu is False
        assert pick_decoder("dali").on_gpu == torch.cuda.is_available()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="nvjpeg needs a CUDA device"):
            pick_decoder("nvjpeg")


def test_dali_outputs_are_zero_copy_and_survive_later_batches(source):
    """DLPack hands DALI's buffers to torch without a copy; the dynamic executor must not recycle a buffer that a
    tensor still references (the training step may hold a batch while the next one is decoded)."""
    require_dali()
    from vtp_fast.data.dali import DaliDecoder

    dec = DaliDecoder(4, threads=1)
    encoded = [source.shards[i].image for i in range(12)]
    first = dec.decoded(encoded[:4])  # views of DALI's buffers (the plain images are cut from these)
    kept = [x.clone() for x in first]
    for k in (4, 8):
        dec.decoded(encoded[k:k + 4])
    assert all(torch.equal(a, b) for a, b in zip(first, kept, strict=True))


# ---------------------------------------------------------------- plain images of odd shapes, every decoder
PLAIN = 32  # the plain images' side: the small, tall and wide images are upscaled, the ordinary one shrunk
SHAPES = ((7, 5), (3, 3), (20, 2000), (2000, 20), (320, 240))  # (W, H): small, tall, wide, ordinary
OTHER_DECODERS = ["dali", "nvjpeg-cpu", pytest.param("nvjpeg", marks=pytest.mark.cuda)]


def _waves(w: int, h: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: waves plus noise, so a different filter, scale or crop position shows."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    waves = np.stack([128 + 90 * np.sin(x / 3 + c) * np.cos(y / 4 - c) for c in range(3)], -1)
    return np.clip(waves + np.random.default_rng(seed).normal(0, 20, waves.shape), 0, 255).astype(np.uint8)


def _encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format={"png": "PNG", "jpg": "JPEG"}[fmt], quality=90)
    return buf.getvalue()


def _plain(tmp_path, encoded: list[bytes], fmt: str, decoder: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(plain images (B, 3, PLAIN, PLAIN) as `decoder`'s batches carry them (normalised, on the CPU), the
    (3, H, W) uint8 pixels it decoded). "nvjpeg-cpu": the nvJPEG path's code with torchvision's CPU decoder."""
    from vtp_fast.data.images import as_uint8, open_rgb

    if decoder == "nvjpeg-cpu":
        from vtp_fast.data.nvjpeg import NvjpegDecoder

        dec = NvjpegDecoder("cpu")
        return dec.decode(encoded, PLAIN), dec.decoded(encoded)
    root = tmp_path / "shards"
    if not root.exists():
        write_shards([Sample(e, fmt, f"image {i}") for i, e in enumerate(encoded)], root, progress=False)
    n = len(encoded)
    shape = BatchShape(size=n, ssl=0, rec=0, patch=16)
    data = StepBatches(ShardSource(ShardSet(str(root)), PLAIN, 16), shape, ViewConfig(), seed=0, decoder=decoder)
    images = data.assemble(torch.arange(n), torch.zeros(n, dtype=torch.long)).images.cpu()
    if decoder == "torchvision":
        return images, [as_uint8(open_rgb(e)) for e in encoded]
    return images, [x.cpu() for x in data.decoder.decoded(encoded)]


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalised (3, S, S) images -> max |a - b| in uint8 levels."""
    return ((a - b) * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255).abs().max()


@pytest.mark.parametrize("fmt", ["png", "jpg"])
@pytest.mark.parametrize("decoder", OTHER_DECODERS)
def test_plain_images_of_small_tall_and_wide_images_agree_with_pil(tmp_path, fmt, decoder):
    """Every decoder's plain image is PIL's to decoder rounding. The bound, in uint8 levels, comes from the decoded
    pixels themselves: the shared resize (antialiased bilinear) averages with non-negative weights that sum to 1,
    so exactly filtered images differ by at most max |decoded difference|; each side is within 1 level of its exact
    value (the CPU's uint8 kernel rounds after each of its two passes, a GPU's float kernel once), hence + 2 where
    anything differs before the rounding (the pixels, or the device). PNG decodes exactly everywhere, and
    libjpeg-turbo (PIL, DALI's CPU decoder, torchvision's CPU decoder) decodes these JPEGs identically: the plain
    images must then be identical. (While each decoder resized in its own way: up to 98 levels, 1.7 normalised
    units, on the 320 x 240 image; 11 to 21 levels on the small, tall and wide ones.)"""
    if decoder == "dali":
        require_dali()
    encoded = [_encode(_waves(w, h), fmt) for w, h in SHAPES]
    ref, ref_px = _plain(tmp_path, encoded, fmt, "torchvision")
    got, px = _plain(tmp_path, encoded, fmt, decoder)
    assert got.shape == ref.shape == (len(SHAPES), 3, PLAIN, PLAIN)
    for k, (w, h) in enumerate(SHAPES):
        assert px[k].shape == ref_px[k].shape == (3, h, w), (w, h)
        raw = float((px[k].int() - ref_px[k].int()).abs().max())
        limit = raw + 2 if raw or decoder == "nvjpeg" else 0
        assert _levels(got[k], ref[k]) <= limit + 1e-3, ((w, h), float(_levels(got[k], ref[k])), raw)


@pytest.mark.parametrize("decoder", ["torchvision", *OTHER_DECODERS])
def test_the_plain_image_is_the_centred_square(tmp_path, decoder):
    """Images red but for a green centred square (side min(W, H), offsets rounded down), as PNGs: every decoder's
    plain image is green to its edges (a resize that reaches past the square, or a crop off centre, shows red),
    exactly on the CPU (the resize of a flat area is flat), to 1 level on a GPU."""
    if decoder == "dali":
        require_dali()
    encoded = []
    for w, h in (*SHAPES, (6, 9)):
        img = np.zeros((h, w, 3), np.uint8)
        img[...] = (200, 30, 30)
        side = min(w, h)
        top, left = (h - side) // 2, (w - side) // 2
        img[top:top + side, left:left + side] = (30, 200, 30)
        encoded.append(_encode(img, "png"))
    green = torch.tensor([30, 200, 30], dtype=torch.uint8).view(3, 1, 1).expand(3, PLAIN, PLAIN)
    got, _ = _plain(tmp_path, encoded, "png", decoder)
    for k in range(len(encoded)):
        assert _levels(got[k], normalize(green)) <= (1 if decoder == "nvjpeg" else 0) + 1e-3, k
