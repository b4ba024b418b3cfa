"""WebDataset shards: round trip, DALI index format, rank split and resume over shards, the bad-data zoo."""

import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import assert_batches_equal, make_prepared_emoji
from vtp_fast.config import ConfigError
from vtp_fast.data import step_batches as step_batches_mod
from vtp_fast.data.batch import BatchShape
from vtp_fast.data.pairs import BAD_KINDS, BadSample, BadSampleCount
from vtp_fast.data.shard_source import ShardSet, ShardSource
from vtp_fast.data.shards import Sample, emoji_samples, expand, read_index, write_shards
from vtp_fast.data.step_batches import StepBatches, epoch_order
from vtp_fast.data.views import ViewConfig
from vtp_fast.text import tokenize

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


def test_a_failing_source_leaves_the_complete_shards_and_no_temp_file(tmp_path):
    def samples():
        for i in range(7):
            yield Sample(_png(np.full((8, 8, 3), i, dtype=np.uint8)), "png", f"sample {i}")
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError, match="the source broke"):
        write_shards(samples(), tmp_path, per_shard=5, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.idx", "shard-00000.tar"]
    assert (tmp_path / "shard-00000.tar").stat().st_mode & 0o777 == 0o644
    assert len(ShardSet(str(tmp_path))) == 5
    with pytest.raises(ValueError, match="per_shard"):
        write_shards(samples(), tmp_path, per_shard=0, progress=False)


def test_ranks_cover_every_sample_once_per_epoch_and_resume(emoji_shards):
    _, out = emoji_shards
    source = ShardSource(ShardSet(str(out)), 32, 16)
    shape = BatchShape(size=3, ssl=1, rec=1, patch=16)
    ranks = [StepBatches(source, shape, VIEWS, seed=5, rank=r, world=2) for r in range(2)]
    epoch = torch.cat([torch.cat([rb.positions(s)[0] for rb in ranks]) for s in range(4)])  # 4 steps x 6 = 24
    assert sorted(epoch.tolist()) == list(range(24))
    # a fresh object (a resumed run) continues with the same batch
    again = StepBatches(source, shape, VIEWS, seed=5, rank=1, world=2)
    a, b = ranks[1][3], again[3]
    assert_batches_equal(a, b)
    assert a.images.shape == (3, 3, 32, 32) and a.global_crops.shape == (2, 3, 32, 32)


def test_resampled_groups_read_one_shard_each_and_do_not_depend_on_the_world_size(emoji_shards):
    """Issue 13: the resampled mode draws, per virtual group, a run of consecutive samples of one shard (with
    replacement: no epochs), as a function of (seed, step, group): 1 or 2 ranks see the same global batch, and a
    fresh object (a resumed run) the same batches."""
    _, out = emoji_shards
    source = ShardSource(ShardSet(str(out)), 32, 16)  # 24 samples in shards of 10, 10, 4
    offsets = source.offsets.tolist()
    shape = BatchShape(size=8, ssl=4, rec=4, patch=16, groups=4)  # 4 groups of 2: SSL + reconstructed first
    one = StepBatches(source, shape, VIEWS, seed=5, sampling="resampled")
    halves = BatchShape(size=4, ssl=2, rec=2, patch=16, groups=2)
    two = [StepBatches(source, halves, VIEWS, seed=5, rank=r, world=2, sampling="resampled") for r in range(2)]
    seen = set()
    for step in range(6):
        ids, epochs = one.positions(step)
        assert (epochs == step).all()
        # one's slice is SSL samples of the 4 groups, then their other samples; the groups' runs:
        runs = torch.stack([ids[:4], ids[4:]], 1)
        for a, b in runs.tolist():
            shard = int(np.searchsorted(offsets, a, side="right")) - 1
            lo, hi = offsets[shard], offsets[shard + 1]
            assert lo <= b < hi and b == lo + (a - lo + 1) % (hi - lo)  # consecutive within one shard, wrapping
        seen.add(tuple(ids.tolist()))
        split = [r.positions(step)[0] for r in two]  # rank r holds groups 2r, 2r + 1
        assert torch.equal(torch.stack([torch.cat([s[:2] for s in split]), torch.cat([s[2:] for s in split])], 1),
                           runs)
    assert len(seen) == 6  # fresh draws every step
    assert_batches_equal(one[3], StepBatches(source, shape, VIEWS, seed=5, sampling="resampled")[3])
    with pytest.raises(ConfigError, match="unknown sampling"):
        StepBatches(source, shape, VIEWS, seed=5, sampling="bootstrap")


def test_windowed_shuffle_is_a_permutation(monkeypatch):
    monkeypatch.setattr(step_batches_mod, "FULL_SHUFFLE_MAX", 10)
    monkeypatch.setattr(step_batches_mod, "BLOCK", 7)
    monkeypatch.setattr(step_batches_mod, "WINDOW", 3)
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
            full, (h, w), caption = source.pixels(i)
            reasons[i] = None
            assert full.shape == (3, h, w) and full.dtype == torch.uint8
            assert source.encoded(i).size == (h, w)  # from the header alone
            tokens = tokenize(caption, 16)[0]
            assert tokens.shape == (16,) and tokens.max() == 49407  # end-of-text kept even when truncated
        except BadSample as e:
            reasons[i] = str(e)
    expected = {i: e for i, (_, e) in enumerate(zoo)}
    assert reasons == expected
    # a whole batch over the zoo (one epoch: every id drawn once): bad samples are replaced and each one counted
    # once, by kind, however many retries land on it
    batches = StepBatches(source, BatchShape(size=len(zoo), ssl=4, rec=2, patch=16), VIEWS, seed=0)
    batch = batches[0]
    assert batch.images.shape[0] == len(zoo)
    bad = {i: e for i, e in expected.items() if e is not None}
    assert dict(zip(batch.bad_ids.tolist(), [BAD_KINDS[k] for k in batch.bad_kinds.tolist()],
                    strict=True)) == bad
    assert not set(batch.ids.tolist()) & set(bad), "only usable samples reach the batch"
    count = BadSampleCount()
    count.update(batch)
    count.update(batches[1])  # the next epoch meets the same bad samples again: still counted once
    assert count.metrics() == {"data/bad_samples": len(bad), "data/bad_samples/corrupt_image": 3,
                               "data/bad_samples/empty_caption": 1, "data/bad_samples/no_caption": 1}
    resumed = BadSampleCount()
    resumed.load_state_dict(count.state_dict())  # what a checkpoint keeps
    assert resumed.metrics() == count.metrics()
    assert source.describe() == (f"{len(zoo) - len(bad)} usable pairs ({len(zoo)} samples, {len(bad)} bad: "
                                 "corrupt_image 3, empty_caption 1, no_caption 1)")


def test_a_bad_sample_is_replaced_by_a_spread_of_samples_not_always_its_neighbour(tmp_path):
    """Replacing a bad sample by the next id drew the sample after a run of bad ones once per bad one; the
    replacements are now pseudo-random, deterministic, and each bad sample is reported once naming shard and key."""
    good = _png(np.zeros((8, 8, 3), dtype=np.uint8))
    samples = [Sample(good if i % 10 < 5 else b"garbage", "png", f"s {i}") for i in range(40)]  # runs of 5 bad
    write_shards(samples, tmp_path, per_shard=20, progress=False)
    source = ShardSource(ShardSet(str(tmp_path)), 8, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = StepBatches(source, BatchShape(size=40, ssl=0, rec=0, patch=16), VIEWS, seed=3)
        batch = batches[0]
        again = batches[0]
    used = batch.ids.tolist()
    assert torch.equal(again.ids, batch.ids), "deterministic"
    assert all(i % 10 < 5 for i in used)
    drawn = batches.positions(0)[0].tolist()
    assert [j for i, j in zip(drawn, used, strict=True) if i % 10 < 5] == [i for i in drawn if i % 10 < 5]
    replacements = [j for i, j in zip(drawn, used, strict=True) if i % 10 >= 5]
    assert len(set(replacements)) >= 8, replacements  # next-id replacement: 4 ids (0, 10, 20, 30), 6 draws each
    assert max(used.count(i) for i in set(used)) <= 4, sorted(used)
    reports = [str(w.message) for w in caught if "bad sample" in str(w.message)]
    assert len(reports) == 20 == len(set(reports))  # once per bad sample, not per retry or per batch
    assert any("shard-00000.tar:000000005: bad sample (corrupt_image)" in r for r in reports)


def test_non_utf8_caption_is_a_bad_sample(tmp_path):
    import tarfile

    good = _png(np.zeros((8, 8, 3), dtype=np.uint8))
    path = tmp_path / "s-00000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("000000000.png", good), ("000000000.txt", "café".encode("latin-1")),
                           ("000000001.png", good), ("000000001.txt", "café".encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = ShardSource(ShardSet(str(path)), 16, 16)  # no .idx: built by scanning
    with pytest.raises(BadSample, match="caption_not_utf8"):
        source.pixels(0)
    assert source.pixels(1).text == source.encoded(1).text == "café"
    batch = StepBatches(source, BatchShape(size=2, ssl=0, rec=0, patch=16), VIEWS, seed=0)[0]
    assert batch.ids.tolist() == [1, 1] and batch.bad_ids.tolist() == [0]
    assert [BAD_KINDS[k] for k in batch.bad_kinds.tolist()] == ["caption_not_utf8"]


def _warned(caught, needle):
    return [str(w.message) for w in caught if needle in str(w.message)]


def test_every_damaged_shard_warns_once_names_the_file_and_is_counted(tmp_path):
    samples = [Sample(_png(np.full((8, 8, 3), i, dtype=np.uint8)), "png", f"sample {i}") for i in range(20)]
    write_shards(samples, tmp_path / "s", per_shard=5, progress=False)  # shards 0..3, 5 samples each
    d = tmp_path / "s"
    cut = d / "shard-00001.tar"
    second_image = read_index(d / "shard-00001.idx")[1][0]
    cut.write_bytes(cut.read_bytes()[: second_image[1] + 40])  # inside the second sample's image; stale idx kept
    boundary = d / "shard-00002.tar"
    groups = read_index(d / "shard-00002.idx")
    end_of_third = groups[2][-1][1] + 512  # the third sample's caption data (< 512 bytes) ends in this block
    boundary.write_bytes(boundary.read_bytes()[:end_of_third])  # cut between samples: no end-of-archive blocks
    (d / "shard-00002.idx").unlink()
    (d / "shard-00003.idx").write_text("v1.2 7\nnonsense\n")  # an unreadable index: rescanned
    (d / "shard-00004.tar").write_bytes(b"")  # an empty shard
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shards = ShardSet([str(d / "shard-{00000..00005}.tar")])  # 00005 does not exist
    assert len(_warned(caught, "shard-00001.tar: truncated shard; keeping its 1 complete samples")) == 1
    assert len(_warned(caught, "shard-00002.tar: truncated shard; keeping its 3 complete samples")) == 1
    assert len(_warned(caught, "shard-00003.idx: unreadable index")) == 1
    assert len(_warned(caught, "shard-00004.tar: empty shard; keeping its 0 complete samples")) == 1
    assert len(_warned(caught, "shard-00005.tar: missing shard")) == 1
    assert len(caught) == 5
    assert shards.problems == {"truncated_shard": 2, "unreadable_index": 1, "empty_shard": 1, "missing_shard": 1}
    assert {(p.name, k, n) for p, k, n in shards.damaged} == {
        ("shard-00001.tar", "truncated_shard", 1), ("shard-00002.tar", "truncated_shard", 3),
        ("shard-00003.idx", "unreadable_index", 0), ("shard-00004.tar", "empty_shard", 0),
        ("shard-00005.tar", "missing_shard", 0)}
    assert len(shards) == 5 + 1 + 3 + 5
    source = ShardSource(shards, 8, 16)
    assert [source.pixels(i).text for i in range(len(shards))] == [f"sample {i}" for i in (*range(6), 10, 11, 12,
                                                                                       *range(15, 20))]


def test_an_intact_shard_set_warns_nothing(tmp_path):
    write_shards([Sample(_png(np.zeros((8, 8, 3), np.uint8)), "png", "x")] * 3, tmp_path, per_shard=2,
                 progress=False)
    (tmp_path / "shard-00001.idx").unlink()  # only missing: rebuilt silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shards = ShardSet(str(tmp_path))
    assert len(shards) == 3 and not shards.problems


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


def test_a_data_set_smaller_than_the_batch_warns_with_both_numbers(tmp_path):
    write_shards([Sample(_png(np.zeros((8, 8, 3), np.uint8)), "png", "x")] * 3, tmp_path, progress=False)
    source = ShardSource(ShardSet(str(tmp_path)), 8, 16)
    with pytest.warns(UserWarning, match="holds 3 samples, fewer than the global batch of 8"):
        StepBatches(source, BatchShape(size=4, ssl=0, rec=0, patch=16), VIEWS, seed=0, world=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        StepBatches(source, BatchShape(size=3, ssl=0, rec=0, patch=16), VIEWS, seed=0)


def _idx_gz(path, array: np.ndarray) -> None:
    """Write `array` (uint8) as a gzipped IDX file, the format of the Fashion-MNIST files."""
    import gzip

    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_one_fashion_mnist_reader_serves_shards_and_labelled_sets(tmp_path, monkeypatch):
    from vtp_fast.data import shards as shards_mod
    from vtp_fast.data.labelled import load_images

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.array([0, 9, 3, 3, 1], dtype=np.uint8)
    _idx_gz(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _idx_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    got_images, got_labels = shards_mod.fashion_mnist("test", tmp_path)
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    samples, n = shards_mod.fashion_mnist_samples("test", tmp_path)
    assert n == 5 and [s.caption for s in samples][:2] == ["a photo of a t-shirt", "a photo of a ankle boot"]
    monkeypatch.setattr(shards_mod, "fashion_mnist_dir", lambda: tmp_path)
    data = load_images("fashion-mnist:test", size=32)
    assert data.images.shape == (5, 32, 32, 3) and data.labels.tolist() == [0, 9, 3, 3, 1]
    assert data.name == "fashion-mnist-t10k-32" and data.class_names[9] == "ankle boot"


def test_photo_folders_are_checked_resized_and_reported(tmp_path, capsys):
    """Issue 14: `data shards FOLDER` resizes and re-encodes photos on request, says how many captions came from
    file names, and skips (and lists) images that do not decode and empty captions instead of packing them."""
    from vtp_fast.cli import main

    folder = tmp_path / "photos"
    (folder / "beach").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (100, 200, 3), dtype=np.uint8)).save(folder / "beach" / "wave.jpg")
    (folder / "beach" / "wave.txt").write_text("a wave at sunset\n")
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / "red_boat.bmp")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("RGB", (50, 50)).save(folder / "blank.png")
    (folder / "blank.txt").write_text("  \n")
    out = tmp_path / "shards"
    assert main(["data", "shards", str(folder), "--out", str(out), "--short-side", "32"]) == 0
    captured = capsys.readouterr()
    assert "1 caption(s) taken from file names" in captured.out
    assert "2 sample(s) skipped" in captured.err
    skipped = (out / "skipped.txt").read_text()
    assert "broken.jpg\tunreadable image" in skipped and "blank.png\tempty caption" in skipped
    data = ShardSet(str(out))
    samples = [data[i] for i in range(len(data))]
    assert len(samples) == 2
    by_caption = {s.caption.decode(): s for s in samples}
    assert set(by_caption) == {"a wave at sunset", "red boat"}
    for s in samples:  # both re-encoded as JPEG, the shorter side down to 32 (never up)
        assert s.ext == "jpg" and min(Image.open(io.BytesIO(s.image)).size) == 32
    assert Image.open(io.BytesIO(by_caption["a wave at sunset"].image)).size == (64, 32)
    with pytest.raises(Exception, match="apply to photos"):
        from vtp_fast.cli import parse
        from vtp_fast.cli.data import cmd_data_shards

        cmd_data_shards(parse(["data", "shards", "fashion-mnist", "--out", str(tmp_path / "x"), "--quality", "80"]))
