"""Labelled image sets, and latent extraction: a tokenizer's latents of a data set, for training a DiT on them.

A latent set is a directory: `latents-00000.safetensors`, ... (each `latents` (n, C, h, w) float32 and `labels`
(n,) int64) and `meta.json` (channels, grid, per-channel mean/std, class names, the tokenizer it came from and
its config). As in the paper's protocol, every image (center-cropped to a square by `load_images`) is encoded
together with its horizontal mirror (`flip=False` skips the mirrors).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from vtp_fast.config import InputError
from vtp_fast.data.pairs import normalize_u8
from vtp_fast.io import atomic_dir
from vtp_fast.models.vtp import VTP


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
        from vtp_fast.data.shards import FASHION_CLASSES, fashion_mnist_dir, read_idx_gz

        split = "t10k" if arg == "test" else "train"
        imgs = torch.from_numpy(read_idx_gz(fashion_mnist_dir() / f"{split}-images-idx3-ubyte.gz").copy())
        labels = torch.from_numpy(read_idx_gz(fashion_mnist_dir() / f"{split}-labels-idx1-ubyte.gz").astype(np.int64))
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


def tokenizer_fingerprint(model: VTP) -> str:
    """A short hash of the tokenizer's weights: latents from another tokenizer are refused."""
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().flatten()[:1024].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def extract_latents(model: VTP, data: LabelledImages, out: str | Path, *, flip: bool = True, batch: int = 128,
                    per_file: int = 16384, tokenizer: str = "", progress: bool = True) -> dict:
    """Encode every image (and, with `flip`, its horizontal mirror) into latent shards + meta.json under `out`,
    written to a temp dir and renamed. Returns the meta."""
    if len(data) == 0:
        raise InputError(f"extract-latents: the data set {data.name} holds no images")
    model.eval()
    device = next(model.parameters()).device
    out = Path(out)
    with atomic_dir(out) as tmp:  # .NAME.tmp-XXXXXXXX, renamed to `out` whole
        chunks, labels, total = [], [], 0
        sums = sq = None
        copies = (False, True) if flip else (False,)
        bar = tqdm(total=len(data) * len(copies), desc="extract-latents", unit="img", disable=not progress)
        files = 0

        def flush():
            nonlocal chunks, labels, files
            if chunks:
                save_file({"latents": torch.cat(chunks).contiguous(), "labels": torch.cat(labels).contiguous()},
                          str(tmp / f"latents-{files:05d}.safetensors"))
                files += 1
                chunks, labels = [], []

        for mirrored in copies:
            for i in range(0, len(data), batch):
                x = normalize_u8(data.images[i:i + batch]).to(device)
                if mirrored:
                    x = x.flip(-1)
                z = model.encode(x).float().cpu()  # (b, C, h, w)
                chunks.append(z)
                labels.append(data.labels[i:i + batch])
                s = z.double().sum((0, 2, 3))
                q = z.double().pow(2).sum((0, 2, 3))
                sums, sq = (s, q) if sums is None else (sums + s, sq + q)
                total += z.shape[0]
                bar.update(z.shape[0])
                if sum(c.shape[0] for c in chunks) >= per_file:
                    flush()
        flush()
        bar.close()
        count = total * z.shape[2] * z.shape[3]
        mean = sums / count
        std = (sq / count - mean**2).clamp_min(1e-12).sqrt()
        meta = {"channels": z.shape[1], "grid": [z.shape[2], z.shape[3]], "count": total, "flipped_copies": flip,
                "mean": mean.tolist(), "std": std.tolist(), "class_names": data.class_names, "data": data.name,
                "tokenizer": tokenizer, "tokenizer_fingerprint": tokenizer_fingerprint(model),
                "image_size": int(data.images.shape[1])}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


@dataclass
class LatentSet:
    latents: torch.Tensor  # (N, C, h, w) float32, normalised per channel
    labels: torch.Tensor  # (N,)
    meta: dict

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(self.meta["mean"]).view(1, -1, 1, 1)

    @property
    def std(self) -> torch.Tensor:
        return torch.tensor(self.meta["std"]).view(1, -1, 1, 1)


def load_latents(path: str | Path) -> LatentSet:
    """All shards of a latent set, normalised with its per-channel statistics."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise InputError(f"{path}: not a latent set (no meta.json); make one with vtp-fast extract-latents")
    meta = json.loads(meta_file.read_text())
    parts = [load_file(f) for f in sorted(path.glob("latents-*.safetensors"))]
    if not parts:
        raise InputError(f"{path}: no latent shards")
    z = torch.cat([p["latents"] for p in parts])
    if z.shape[1] != meta["channels"] or list(z.shape[2:]) != meta["grid"]:
        raise InputError(f"{path}: latents {tuple(z.shape[1:])} do not match meta.json ({meta['channels']}, "
                         f"{meta['grid']})")
    labels = torch.cat([p["labels"] for p in parts])
    n_classes = len(meta["class_names"])
    if labels.numel() and (labels.min() < 0 or labels.max() >= max(n_classes, 1)):
        raise InputError(f"{path}: labels up to {int(labels.max())} but {n_classes} class names in meta.json")
    latents = LatentSet(z, labels, meta)
    latents.latents = (z - latents.mean) / latents.std  # normalised with the statistics in meta.json
    return latents


def check_tokenizer(meta: dict, model: VTP) -> None:
    """Refuse a tokenizer that did not make these latents (channels or weights differ)."""
    c = model.config.vision_feature_bottleneck
    if meta["channels"] != c:
        raise InputError(f"the latents have {meta['channels']} channels but the tokenizer makes {c}")
    fp = tokenizer_fingerprint(model)
    if meta.get("tokenizer_fingerprint") and meta["tokenizer_fingerprint"] != fp:
        raise InputError(f"the latents were made by another tokenizer ({meta.get('tokenizer') or 'unknown'}, "
                         f"fingerprint {meta['tokenizer_fingerprint']} != {fp}); re-extract them")
