"""The multi-style emoji image-text set, built from npm packages (`vtp_fast.data.emoji_prepare`).

Every base emoji of ``emoji-datasource`` (skin-tone variants and the "Component" category left out) is
drawn in up to four styles: Google Noto and Twitter Twemoji (64x64 PNG), Microsoft Fluent 3D (256x256 WebP)
and OpenMoji (SVG, rendered with resvg). Each image is composited onto white and resized to ``size``x``size``
RGB; its caption is the lower-case Unicode name ("kissing cat face with closed eyes"), its label the category.

``prepare_emoji`` (vtp_fast.data.emoji_prepare) renders everything once into a cache folder and returns it;
``load_emoji`` reads that folder back as an :class:`EmojiSet` of tensors.

Prepared folder (``<cache>/emoji/prepared-<size>/``):

- ``images_<style>.npy``: (N_style, size, size, 3) uint8, rows in emoji.json ``sort_order``.
- ``index_<style>.jsonl``: one JSON object per row (key, unified, caption, category, subcategory,
  short_names).
- ``LICENSES.md``: package, version, licence and what it supplies, one table row per package.
- ``manifest.json``: size, package specs, sorted categories and per-style counts (images, unmatched emoji,
  corrupt files, unused files); written last, it marks the folder complete.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vtp_fast.config import UserError

STYLES: tuple[str, ...] = ("google", "twitter", "fluent", "openmoji")


class EmojiDataError(UserError, RuntimeError):
    """The emoji data cannot be fetched, read or found; the message says what to do."""


@dataclass
class EmojiSet:
    """Emoji images with their captions and category labels, one row per (emoji, style).

    ``images`` is (N, S, S, 3) uint8 RGB; ``labels`` is (N,) int64 indexing ``category_names``, the sorted
    categories of the whole prepared set (so labels agree whichever styles were loaded).
    """

    images: torch.Tensor
    captions: list[str]
    keys: list[str]
    styles: list[str]
    categories: list[str]
    category_names: list[str]
    labels: torch.Tensor

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        fields = (self.captions, self.keys, self.styles, self.categories, self.labels)
        lengths = {len(field) for field in fields}
        if lengths != {n}:
            raise ValueError(f"EmojiSet fields disagree in length: {n} images but field lengths {lengths}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, idx: Sequence[int] | torch.Tensor) -> EmojiSet:
        """The rows ``idx`` (a sequence or 1-D tensor of row indices), in that order."""
        index = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        rows = index.tolist()
        return EmojiSet(
            images=self.images[index],
            captions=[self.captions[i] for i in rows],
            keys=[self.keys[i] for i in rows],
            styles=[self.styles[i] for i in rows],
            categories=[self.categories[i] for i in rows],
            category_names=list(self.category_names),
            labels=self.labels[index],
        )


def load_emoji(root: Path, styles: Sequence[str] = STYLES) -> EmojiSet:
    """Load the prepared folder ``root`` (from :func:`prepare_emoji`), styles stacked in the order given."""
    root = Path(root)
    manifest = _read_manifest(root)
    _check_styles(styles)
    category_names: list[str] = manifest["categories"]
    label_of = {name: i for i, name in enumerate(category_names)}
    arrays, entries, row_styles = [], [], []
    for style in styles:
        index = [json.loads(line) for line in (root / f"index_{style}.jsonl").read_text("utf-8").splitlines()]
        arrays.append(np.load(root / f"images_{style}.npy"))
        entries += index
        row_styles += [style] * len(index)
    return EmojiSet(
        images=torch.from_numpy(np.concatenate(arrays)),
        captions=[e["caption"] for e in entries],
        keys=[e["key"] for e in entries],
        styles=row_styles,
        categories=[e["category"] for e in entries],
        category_names=list(category_names),
        labels=torch.tensor([label_of[e["category"]] for e in entries], dtype=torch.long),
    )


def _check_styles(styles: Sequence[str]) -> None:
    """Reject an empty, repeated or unknown style list with a ValueError."""
    if isinstance(styles, str) or not styles:
        raise ValueError(f"styles must be a non-empty sequence of style names from {STYLES}, got {styles!r}")
    for style in styles:
        if style not in STYLES:
            raise ValueError(f"unknown emoji style {style!r}; choose from {STYLES}")
    if len(set(styles)) != len(styles):
        raise ValueError(f"emoji styles repeat in {list(styles)}; give each once")


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished prepared folder (its manifest is written last)."""
    return (folder / "manifest.json").is_file()


def _read_manifest(folder: Path) -> dict:
    """The manifest of a prepared folder, or an EmojiDataError saying how to make one."""
    if not is_complete(folder):
        raise EmojiDataError(f"{folder} is no prepared emoji folder; load the path prepare_emoji() returns")
    return json.loads((folder / "manifest.json").read_text("utf-8"))

