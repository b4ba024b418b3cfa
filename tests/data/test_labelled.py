"""Labelled image sources at any scale: ADM's centre crop (against a direct transcription of guided-diffusion's),
ImageFolder trees and labelled shards decoded on demand, streamed by DataLoader workers, bad images skipped and
counted, the small named sets behind the same interface."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vtp_fast.config import InputError
from vtp_fast.data.images import adm_center_crop, open_rgb
from vtp_fast.data.labelled import FolderImages, LabelledImages, ShardImages, load_images, open_images, stream, take
from vtp_fast.data.shards import Sample, write_shards

SIZES = [(500, 375), (375, 500), (130, 70), (40, 30), (1000, 1000), (257, 129), (64, 64), (2000, 63)]


def center_crop_arr(pil_image, image_size):
    """guided-diffusion's image_datasets.center_crop_arr, transcribed as published (ADM's protocol)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def noise_image(rng: np.random.Generator, wh: tuple[int, int]) -> Image.Image:
    """Smooth random colours (so resampling filters differ visibly), W x H."""
    small = rng.integers(0, 256, (max(2, wh[1] // 8), max(2, wh[0] // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize(wh, Image.BILINEAR)


@pytest.mark.parametrize("wh", SIZES)
@pytest.mark.parametrize("size", [32, 64])
def test_adm_center_crop_equals_guided_diffusions(wh, size):
    img = noise_image(np.random.default_rng(sum(wh)), wh)
    ours = np.asarray(adm_center_crop(img, size))
    assert ours.shape == (size, size, 3)
    assert np.array_equal(ours, center_crop_arr(img, size))
    if min(wh) >= 2 * size:  # the BOX halving matters: a single bicubic resize gives other pixels
        w, h = wh
        s = size / min(wh)
        direct = np.asarray(img.resize((round(w * s), round(h * s)), Image.BICUBIC))
        top, left = (direct.shape[0] - size) // 2, (direct.shape[1] - size) // 2
        assert not np.array_equal(ours, direct[top:top + size, left:left + size])


TREE = {"b_cat": 3, "a_dog": 4, "c_fox": 5}  # images per class (b_cat: and a broken one)


def make_tree(root: Path, per_class: dict = TREE, seed: int = 0, corrupt: bool = True) -> Path:
    """An ImageFolder tree: classes b_cat, a_dog, c_fox (sorted: a_dog=0, b_cat=1, c_fox=2) of PNG / JPEG / RGBA
    images of assorted sizes, one nested folder, hidden files, an empty class folder, and (corrupt) one broken
    JPEG in b_cat."""
    rng = np.random.default_rng(seed)
    for name, n in per_class.items():
        for i in range(n):
            wh = SIZES[(i + len(name) * n) % len(SIZES)]
            img = noise_image(rng, (max(wh[0] // 4, 20), max(wh[1] // 4, 20)))
            folder = root / name / ("nested" if i == 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            if i % 3 == 1:
                img.convert("RGBA").save(folder / f"img{i}.png")
            else:
                img.save(folder / f"img{i}.{'jpg' if i % 3 else 'JPEG'}", quality=90)
        (root / name / ".hidden.png").write_bytes(b"not an image")
    if corrupt:
        (root / "b_cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / ".cache").mkdir()
    (root / "empty_class").mkdir()
    return root


def test_folder_tree_is_read_in_imagefolder_order_with_adm_crops(tmp_path):
    root = make_tree(tmp_path / "tree")
    src = open_images(str(root), size=32)
    assert isinstance(src, FolderImages) and src.size == 32
    assert src.class_names == ["a_dog", "b_cat", "c_fox", "empty_class"]  # sorted folders, index = label
    rel = [f.decode() for f in src.files]
    assert len(src) == 4 + 3 + 1 + 5 and not any(".hidden" in r for r in rel)
    assert rel[:4] == sorted(rel[:4]) and all(r.startswith("a_dog/") for r in rel[:4])
    assert src.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 5
    got = src.fetch(range(len(src)))
    broken = rel.index("b_cat/broken.jpg")
    assert [i for i, _ in got.bad] == [broken] and "broken.jpg" in got.bad[0][1]
    assert got.ids.tolist() == [i for i in range(len(src)) if i != broken]
    assert got.images.shape == (len(src) - 1, 32, 32, 3) and got.images.dtype == torch.uint8
    for k, i in enumerate(got.ids.tolist()):  # the pretraining decoders' PIL path (alpha on white), ADM's crop
        want = center_crop_arr(open_rgb(root / rel[i]), 32)
        assert np.array_equal(got.images[k].numpy(), want), rel[i]
    assert got.labels.tolist() == src.labels[got.ids.numpy()].tolist()


def test_streaming_with_workers_gives_what_one_process_reads(tmp_path):
    src = open_images(str(make_tree(tmp_path / "tree")), size=32)
    chunks = [torch.arange(i, min(len(src), i + 3)) for i in range(0, len(src), 3)]
    here = list(stream(src, chunks, workers=0))
    there = list(stream(src, chunks, workers=2))
    assert len(here) == len(there) == len(chunks)
    for a, b in zip(here, there, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.bad == b.bad
    with pytest.warns(UserWarning, match="1 image.* skipped"):
        picked = take(src, [5, 4, 0], workers=0)  # the order asked for, the broken one (4: b_cat/broken) left out
    assert picked.ids.tolist() == [5, 0]


def test_labelled_shards_are_a_source_and_load_images_decodes_them(tmp_path):
    rng = np.random.default_rng(1)
    samples = []
    for i in range(7):
        buf = io.BytesIO()
        noise_image(rng, SIZES[i % len(SIZES)]).save(buf, format="JPEG", quality=90)
        samples.append(Sample(buf.getvalue(), "jpg", f"caption {i}", i % 3 if i != 5 else None))
    write_shards(samples, tmp_path / "shards", per_shard=3)
    src = open_images(str(tmp_path / "shards"), size=48)
    assert isinstance(src, ShardImages) and len(src) == 7 and src.class_names is None
    got = src.fetch(range(7))
    assert got.ids.tolist() == [0, 1, 2, 3, 4, 6] and "no label" in got.bad[0][1]  # sample 5 has no .cls
    raw = src.shards[6]
    assert np.array_equal(got.images[-1].numpy(), center_crop_arr(open_rgb(raw.image), 48))
    there = list(stream(src, [range(0, 4), range(4, 7)], workers=2))  # forked after this process read the shards
    assert torch.equal(torch.cat([f.images for f in there]), got.images)
    with pytest.warns(UserWarning, match="skipped"):
        mem = load_images(str(tmp_path / "shards"), size=48)
    assert isinstance(mem, LabelledImages) and mem.class_names == ["0", "1", "2"]
    assert torch.equal(mem.images, got.images) and mem.captions[0] == "caption 0"


def test_named_sets_stay_in_memory_behind_the_same_interface(emoji_env):
    data = open_images("emoji:google", size=64)
    assert isinstance(data, LabelledImages) and load_images("emoji:google").name == data.name
    got = data.fetch(torch.tensor([3, 1]))
    assert torch.equal(got.images, data.images[[3, 1]]) and got.labels.tolist() == data.labels[[3, 1]].tolist()
    assert got.captions == [data.captions[3], data.captions[1]] and data.size == 64
    with pytest.raises(InputError, match="unknown data set"):
        open_images("nowhere")
    with pytest.raises(InputError, match="no images in class folders"):
        (emoji_env / "empty").mkdir()
        open_images(str(emoji_env / "empty"))
