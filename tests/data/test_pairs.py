"""One protocol for every source of pairs: the emoji set held in memory and the same set written as PNG shards are
the same source to StepBatches (PNG decodes exactly and the images are at the plain size already), so nothing
downstream can tell them apart."""

import pytest
import torch

from tests.data.test_decoders import require_dali
from tests.helpers import assert_batches_equal, make_prepared_emoji
from vtp_fast.data.batch import BatchShape
from vtp_fast.data.pairs import emoji_pairs
from vtp_fast.data.shard_source import ShardSet, ShardSource
from vtp_fast.data.shards import emoji_samples, write_shards
from vtp_fast.data.step_batches import StepBatches
from vtp_fast.data.views import ViewConfig

VIEWS = ViewConfig(global_size=32, local_size=16, local_crops=2)
SHAPE = BatchShape(size=8, ssl=4, rec=2, patch=16)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    root = make_prepared_emoji(tmp / "prep", size=32)
    samples, total = emoji_samples(root, ("google", "twitter"))
    write_shards(samples, tmp / "shards", per_shard=10, total=total, progress=False)
    return emoji_pairs(root, ("google", "twitter"), 16), ShardSource(ShardSet(str(tmp / "shards")), 32, 16)


def test_the_emoji_set_in_memory_and_as_shards_gives_the_same_batches(both):
    pairs, shards = both
    assert pairs.in_memory and not shards.in_memory
    memory, read = (StepBatches(s, SHAPE, VIEWS, seed=4, trim_text=True) for s in both)
    assert memory.decoder.name == read.decoder.name == "torchvision"
    for step in range(4):  # 24 samples: the fourth batch is in the second epoch
        assert_batches_equal(memory[step], read[step])
    ids, images = shards.plain_images(5)
    assert ids == pairs.plain_images(5)[0] == list(range(5)) and torch.equal(images, pairs.plain_images(5)[1])
    assert (pairs.describe(), shards.describe()) == ("24 pairs", "24 usable pairs")
    assert not any(pairs.skipped.values()) and not shards.skipped


def test_dali_decodes_the_shards_to_the_pixels_held_in_memory(both):
    """DALI's PNG decoding is exact too: the same plain images, tokens, ids and masks (its views are resampled
    by its own operators)."""
    require_dali()
    pairs, shards = both
    memory = StepBatches(pairs, SHAPE, VIEWS, seed=4, decoder="dali")
    assert memory.decoder.name == "torchvision"  # an in-memory set has nothing to decode
    dali = StepBatches(shards, SHAPE, VIEWS, seed=4, decoder="dali", dali_device="cpu")
    assert dali.decoder.name == "dali" and not dali.decoder.on_gpu
    a, b = memory[1], dali[1]
    for k in ("images", "tokens", "ids", "masks", "mask_index"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
