"""WebDataset shards: round trip, DALI index format, rank split and resume over shards, the bad-data zoo."""

import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import make_prepared_emoji
from vtp_fast.data import pairs as pairs_mod
from vtp_fast.data.pairs import BatchShape, ShardSource, StepBatches, epoch_order
from vtp_fast.data.shards import Sample, ShardSet, emoji_samples, expand, read_index, write_shards
from vtp_fast.data.text import tokenize
from vtp_fast.data.views import ViewConfig

VIEWS = ViewConfig(global_size=32, local_size=16, local_crops=2)


@pytest.fixture(scope="module")
def emoji_shards(tmp_path_factory):
    root = make_prepared_emoji(tmp_path_factory.mktemp("prep") / "p", size=32)
    samples, total = emoji_samples(root, ("google", "twitter"))
    out = tmp_path_factory.mktemp("shards")
    write_shards(samples, out, per_shard=10, total=total, progress=False)
    return root, out


def test_round_trip_images_captions_labels_in_order(emoji_shards):
    from vtp_fast.data.emoji import load_emoji

    root, out = emoji_shards
    data = load_emoji(root, ("google", "twitter"))
    shards = ShardSet(str(out / "shard-{00000..00002}.tar"))
    assert len(shards) == len(data) == 24 and len(shards.shards) == 3
    for i in range(len(data)):
        raw = shards[i]
        img = np.asarray(Image.open(io.BytesIO(raw.image)))
        assert np.array_equal(img, data.images[i].numpy()), i
        assert raw.caption.decode() == data.captions[i] and raw.label == int(data.labels[i])
        assert raw.meta["style"] == data.styles[i]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 24 and manifest["shards"] == 3


def test_index_files_are_dalis_format(emoji_shards):
    _, out = emoji_shards
    lines = (out / "shard-00000.idx").read_text().splitlines()
    assert lines[0] == "v1.2 10"
    first = lines[1].split()
    assert first[0] == "png" and first[3] == "000000000.png"
    offset, size = int(first[1]), int(first[2])
    with open(out / "shard-00000.tar", "rb") as f:
        f.seek(offset)
        assert f.read(8) == b"\x89PNG\r\n\x1a\n" and size > 8
    assert len(read_index(out / "shard-00001.idx")) == 10


def test_brace_expansion_and_directories(emoji_shards):
    _, out = emoji_shards
    assert expand(str(out / "shard-{00000..00001}.tar")) == [out / "shard-00000.tar", out / "shard-00001.tar"]
    assert len(expand(str(out))) == 3


def test_a_directory_ignores_an_interrupted_writers_temp_file(tmp_path):
    write_shards([Sample(b"x", "png", "a caption", None)], tmp_path / "s", progress=False)
    (tmp_path / "s" / ".shard-abc123.tar").write_bytes(b"half a tar")  # what a killed writer leaves
    assert [p.name for p in expand(str(tmp_path / "s"))] == ["shard-00000.tar"]


def test_ranks_cover_every_sample_once_per_epoch_and_resume(emoji_shards):
    _, out = emoji_shards
    source = ShardSource(ShardSet(str(out)), 32, 16)
    shape = BatchShape(size=3, ssl=1, rec=1)
    ranks = [StepBatches(source, shape, VIEWS, seed=5, rank=r, world=2) for r in range(2)]
    epoch = torch.cat([torch.cat([rb.positions(s)[0] for rb in ranks]) for s in range(4)])  # 4 steps x 6 = 24
    assert sorted(epoch.tolist()) == list(range(24))
    # a fresh object (a resumed run) continues with the same batch
    again = StepBatches(source, shape, VIEWS, seed=5, rank=1, world=2)
    a, b = ranks[1][3], again[3]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a["images"].shape == (3, 3, 32, 32) and a["global_crops"].shape == (2, 3, 32, 32)


def test_windowed_shuffle_is_a_permutation(monkeypatch):
    monkeypatch.setattr(pairs_mod, "FULL_SHUFFLE_MAX", 10)
    monkeypatch.setattr(pairs_mod, "BLOCK", 7)
    monkeypatch.setattr(pairs_mod, "WINDOW", 3)
    n = 100
    ids = epoch_order(1, 0, n, torch.arange(n))
    assert sorted(ids.tolist()) == list(range(n)) and ids.tolist() != list(range(n))
    assert torch.equal(epoch_order(1, 0, n, torch.arange(40, 60)), ids[40:60])
    assert not torch.equal(epoch_order(1, 1, n, torch.arange(n)), ids)


def _png(array, mode=None, **save):
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG", **save)
    return buf.getvalue()


def _zoo() -> list[tuple[Sample, str | None]]:
    """(sample, expected bad-sample reason or None when it must be usable)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, format="JPEG")
    palette = Image.fromarray(rgb).convert("P")
    palette.info["transparency"] = 0
    pal = io.BytesIO()
    palette.save(pal, format="PNG", transparency=0)
    good = _png(rgb)
    return [
        (Sample(good, "png", "a good one"), None),
        (Sample(good[: len(good) // 2], "png", "truncated image"), "corrupt_image"),
        (Sample(b"", "jpg", "zero bytes"), "corrupt_image"),
        (Sample(b"not an image at all", "jpg", "garbage"), "corrupt_image"),
        (Sample(cmyk.getvalue(), "jpg", "cmyk"), None),
        (Sample(_png(rgb[..., 0]), "png", "grayscale"), None),
        (Sample(pal.getvalue(), "png", "palette with transparency"), None),
        (Sample(_png(rgb[..., 0].astype(np.uint16) * 257), "png", "16-bit"), None),
        (Sample(_png(np.dstack([rgb, rgb[..., :1]])), "png", "alpha"), None),
        (Sample(_png(rgb[:4, :4]), "png", "smaller than any crop"), None),
        (Sample(_png(rng.integers(0, 255, (1, 200, 3), dtype=np.uint8)), "png", "extreme aspect"), None),
        (Sample(good, "png", None), "no_caption"),
        (Sample(good, "png", "   "), "empty_caption"),
        (Sample(good, "png", "word " * 200), None),
    ]


def test_bad_data_zoo_is_harmless_and_counted(tmp_path):
    zoo = _zoo()  # (a non-UTF-8 caption has its own test below: it needs raw bytes in the tar)
    write_shards([s for s, _ in zoo], tmp_path / "zoo", per_shard=4, progress=False)
    shards = ShardSet(str(tmp_path / "zoo"))
    source = ShardSource(shards, 32, 16)
    reasons = {}
    for i in range(len(zoo)):
        try:
            plain, full, caption = source.sample(i)
            reasons[i] = None
            assert plain.shape == (32, 32, 3) and plain.dtype == torch.uint8
            assert full.shape[0] == 3 and 0 <= full.min() and full.max() <= 1
            tokens = tokenize(caption, 16)[0]
            assert tokens.shape == (16,) and tokens.max() == 49407  # end-of-text kept even when truncated
        except pairs_mod.BadSample as e:
            reasons[i] = str(e)
    expected = {i: e for i, (_, e) in enumerate(zoo)}
    assert reasons == expected
    # a whole batch over the zoo: bad samples are replaced and counted, the batch keeps its size
    batches = StepBatches(source, BatchShape(size=len(zoo), ssl=4, rec=2), VIEWS, seed=0)
    batch = batches[0]
    assert batch["images"].shape[0] == len(zoo)
    bad = [expected[i] is not None for i in range(len(zoo))]

    def run_of_bad(i):  # a bad id is replaced by the next id, which may be bad too: each try counts
        k = 0
        while bad[(i + k) % len(zoo)]:
            k += 1
        return k

    ids = batches.positions(0)[0].tolist()
    assert int(batch["bad_samples"]) == sum(run_of_bad(i) for i in ids) >= sum(bad)
    assert not any(bad[i] for i in batch["ids"].tolist()), "only usable samples reach the batch"


def test_non_utf8_caption_is_decoded_with_replacement(tmp_path):
    import tarfile

    good = _png(np.zeros((8, 8, 3), dtype=np.uint8))
    path = tmp_path / "s-00000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("000000000.png", good), ("000000000.txt", "café".encode("latin-1"))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = ShardSource(ShardSet(str(path)), 16, 16)  # no .idx: built by scanning
    _, _, caption = source.sample(0)
    assert caption == "caf\ufffd"  # the invalid byte replaced, the sample kept
    tokens = tokenize(caption, 16)[0]
    assert tokens[0] == 49406 and (tokens == 49407).any()


def test_truncated_tar_and_missing_shard(tmp_path):
    samples = [Sample(_png(np.full((8, 8, 3), i, dtype=np.uint8)), "png", f"sample {i}") for i in range(10)]
    write_shards(samples, tmp_path / "s", per_shard=5, progress=False)
    tar = tmp_path / "s" / "shard-00001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: 3 * 1024 + 600])  # cut inside the fourth member (header + one data block each)
    (tmp_path / "s" / "shard-00001.idx").unlink()  # its index is gone too: rebuilt by scanning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shards = ShardSet([str(tmp_path / "s" / "shard-{00000..00002}.tar")])  # 00002 does not exist
    assert shards.problems["missing_shard"] == 1
    assert any("missing shard" in str(w.message) for w in caught)
    assert 5 < len(shards) < 10  # the complete samples before the cut are kept
    for i in range(len(shards)):
        assert shards[i].image[:4] == b"\x89PNG"
