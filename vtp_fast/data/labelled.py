"""Labelled image sets (`LabelledImages`): what latents are extracted from, what FID/KID references and the
linear probe read, by name (`load_images`): the emoji set, Fashion-MNIST, or WebDataset shards with labels."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vtp_fast.config import InputError


@dataclass
class LabelledImages:
    images: torch.Tensor  # (N, S, S, 3) uint8
    labels: torch.Tensor  # (N,) int64
    class_names: list[str]
    captions: list[str]
    name: str  # identifies the set (cache keys)

    def __len__(self) -> int:
        return self.images.shape[0]


def probe_set(images: torch.Tensor, labels: torch.Tensor | None, class_names: list[str] | None,
              n: int) -> LabelledImages:
    """The first n images (uint8 (N, S, S, 3)) with their labels (one class when unlabelled)."""
    images = images[:n]
    if labels is None or not class_names:
        labels, class_names = torch.zeros(len(images), dtype=torch.long), ["all"]
    return LabelledImages(images, labels[:n].clone(), list(class_names), [], f"gen-probe-{len(images)}")


def load_images(spec: str, size: int = 64) -> LabelledImages:
    """A labelled image set by name:
    'emoji' / 'emoji:google,twitter' (styles; labels = the 9 categories, captions = emoji names),
    'fashion-mnist' / 'fashion-mnist:test' (Debian's dataset-fashion-mnist, padded to 32 and resized to `size`),
    or a directory of WebDataset shards with .cls labels."""
    kind, _, arg = spec.partition(":")
    if kind == "emoji":
        from vtp_fast.data.emoji import STYLES, default_cache_dir, load_emoji, prepare_emoji

        styles = tuple(arg.split(",")) if arg else STYLES
        data = load_emoji(prepare_emoji(default_cache_dir(), size=size), styles)
        return LabelledImages(data.images, data.labels, data.category_names, data.captions,
                              f"emoji-{size}-{arg.replace(',', '+') or 'all'}")
    if kind == "fashion-mnist":
        from vtp_fast.data.shards import FASHION_CLASSES, fashion_mnist

        split = "t10k" if arg == "test" else "train"  # the IDX files' name, kept in the set's name (cache keys)
        raw_images, raw_labels = fashion_mnist("test" if arg == "test" else "train")
        imgs, labels = torch.from_numpy(raw_images.copy()), torch.from_numpy(raw_labels.astype(np.int64))
        x = torch.nn.functional.pad(imgs[:, None].float(), (2, 2, 2, 2), value=0.0)  # (N, 1, 32, 32)
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        rgb = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous()
        captions = [f"a photo of a {FASHION_CLASSES[i]}" for i in labels]
        return LabelledImages(rgb, labels, list(FASHION_CLASSES), captions,
                              f"fashion-mnist-{split}-{size}")
    path = Path(spec)
    if path.is_dir():
        from vtp_fast.data.images import center_crop_resize, open_rgb
        from vtp_fast.data.shards import ShardSet

        shards = ShardSet(str(path))
        images, labels, captions = [], [], []
        for i in range(len(shards)):
            raw = shards[i]
            if raw.image is None or raw.label is None:
                continue
            images.append(torch.from_numpy(np.asarray(center_crop_resize(open_rgb(raw.image), size)).copy()))
            labels.append(raw.label)
            captions.append((raw.caption or b"").decode("utf-8", errors="replace"))
        n_classes = max(labels) + 1 if labels else 0
        return LabelledImages(torch.stack(images), torch.tensor(labels), [str(c) for c in range(n_classes)], captions,
                              f"shards-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}-{size}")
    raise InputError(f"unknown data set {spec!r}: use emoji[:styles], fashion-mnist[:test] or a shards directory")
