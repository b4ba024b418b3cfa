"""The DALI (CPU operators) and PIL decoding paths build the same batches: shapes, ids, tokens, masks, and
pixels that agree in geometry and statistics (DALI's resampling and colour operators differ in detail)."""

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
from vtp_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from vtp_fast.data.batch import BatchShape
from vtp_fast.data.pairs import BAD_KINDS, BadSampleCount, ShardSource, StepBatches, pick_decoder
from vtp_fast.data.shards import Sample, ShardSet, write_shards
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

    def picky(self, encoded, size):
        if any(e == victim for e in encoded):
            raise RuntimeError("[png_parser] simulated failure")
        return real(self, encoded, size)

    monkeypatch.setattr(dali_mod.DaliDecoder, "decode", picky)
    shape = BatchShape(size=24, ssl=2, rec=2, patch=16)
    views = ViewConfig(global_size=64, local_size=32, local_crops=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = StepBatches(source, shape, views, seed=3, decoder="dali")[0]
    assert batch.bad_ids.tolist() == [5] and BAD_KINDS[int(batch.bad_kinds[0])] == "decoder_error"
    assert 5 not in batch.ids.tolist() and batch.images.shape == (24, 3, 64, 64)
    pil = StepBatches(source, shape, views, seed=3)[0]
    assert not torch.equal(pil.images, batch.images)  # decoded by DALI, not the PIL fallback
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
    assert pick_decoder("torchvision") == "torchvision"
    assert pick_decoder("auto") == ("dali" if optional.available("dali") else
                                    "nvjpeg" if torch.cuda.is_available() else "torchvision")
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
    first = dec.decode(encoded[:4], 32)
    kept = first.clone()
    for k in (4, 8):
        dec.decode(encoded[k:k + 4], 32)
    assert torch.equal(first, kept)
