"""The DALI (CPU operators) and PIL decoding paths build the same batches: shapes, ids, tokens, masks, and
pixels that agree in geometry and statistics (DALI's resampling and colour operators differ in detail)."""

import pytest
import torch

from bench.bench_data import synthetic_jpegs
from tests.data.test_shards import _zoo
from vtp_fast import optional
from vtp_fast.data.pairs import BatchShape, ShardSource, StepBatches, pick_decoder
from vtp_fast.data.shards import ShardSet, write_shards
from vtp_fast.data.views import ViewConfig


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("jpegs")
    write_shards(synthetic_jpegs(24, 96), out, per_shard=10, progress=False)
    return ShardSource(ShardSet(str(out)), 64, 16)


def require_dali():
    if not optional.available("dali"):
        pytest.fail(f"DALI is a declared dependency of the data pipeline but unavailable: {optional.reason('dali')}")


def batches(source, views, step=0):
    shape = BatchShape(size=8, ssl=4, rec=4)
    return [StepBatches(source, shape, views, seed=3, decoder=d)[step] for d in ("torchvision", "dali")]


def test_same_structure_ids_tokens_masks(source):
    require_dali()
    pil, dali = batches(source, ViewConfig(global_size=64, local_size=32, local_crops=2))
    assert set(pil) == set(dali)
    for k in pil:
        assert pil[k].shape == dali[k].shape and pil[k].dtype == dali[k].dtype, k
    for k in ("ids", "tokens", "masks", "mask_index", "mask_weight"):
        assert torch.equal(pil[k], dali[k]), k


def test_same_geometry_without_colour_jitter(source):
    require_dali()
    views = ViewConfig(global_size=64, local_size=32, local_crops=2, jitter_prob=0.0, grayscale_prob=0.0)
    pil, dali = batches(source, views)
    for k in ("images", "global_crops", "local_crops"):  # normalised units (1 ~ 0.23 of the pixel range)
        assert (pil[k] - dali[k]).abs().mean() < 0.05, k


def test_same_statistics_with_the_full_recipe(source):
    require_dali()
    pil, dali = batches(source, ViewConfig(global_size=64, local_size=32, local_crops=2), step=1)
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
    batch = StepBatches(source, BatchShape(size=len(zoo), ssl=4, rec=2), ViewConfig(global_size=32, local_size=16,
                                                                                      local_crops=1),
                        seed=0, decoder="dali")[0]
    assert batch["images"].shape == (len(zoo), 3, 32, 32) and torch.isfinite(batch["images"]).all()
    assert int(batch["bad_samples"]) >= sum(e is not None for _, e in zoo)


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
