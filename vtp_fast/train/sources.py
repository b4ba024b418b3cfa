"""Where pretraining's images come from: the training source (emoji set in memory, emoji shards, any WebDataset
shards, or synthetic pairs) and the held-out images that evaluation reads."""

from __future__ import annotations

from pathlib import Path

import torch

from vtp_fast.config import ConfigError
from vtp_fast.data.emoji import load_emoji
from vtp_fast.data.emoji_prepare import prepare_emoji
from vtp_fast.data.pairs import PairSource, emoji_pairs, synthetic_pairs
from vtp_fast.data.shard_source import ShardSet, ShardSource
from vtp_fast.data.shards import emoji_samples as write_emoji_samples
from vtp_fast.data.shards import write_shards
from vtp_fast.train.config import PretrainConfig


def emoji_shards(root: Path, styles: tuple[str, ...]) -> Path:
    """The prepared emoji styles written as shards next to them (once; cached)."""
    out = root.parent / f"shards-{root.name}-{'-'.join(styles)}"
    if not (out / "manifest.json").exists():
        samples, total = write_emoji_samples(root, styles)
        write_shards(samples, out, per_shard=1000, total=total)
    return out


def load_pairs(cfg: PretrainConfig, context_length: int) -> tuple[PairSource, Path | None]:
    """The training source, and the prepared emoji dir when the held-out emoji style serves evaluation."""
    if cfg.data.synthetic:
        return synthetic_pairs(max(4096, 4 * cfg.batch.size), cfg.data.image_size, context_length, cfg.run.seed), None
    if cfg.data.shards and cfg.data.shards != "emoji":
        return ShardSource(ShardSet(cfg.data.shards), cfg.data.image_size, context_length), None
    emoji = cfg.data.emoji
    root = Path(emoji.root) if emoji.root else prepare_emoji(size=cfg.data.image_size)
    if cfg.data.shards == "emoji":
        shards = ShardSet(str(emoji_shards(root, tuple(emoji.train_styles))))
        return ShardSource(shards, cfg.data.image_size, context_length), root
    pairs = emoji_pairs(root, emoji.train_styles, context_length)
    if pairs.images.shape[1] != cfg.data.image_size:
        raise ConfigError(f"data.image_size: {cfg.data.image_size} but {root} holds {pairs.images.shape[1]} px images")
    return pairs, root


def no_eval_note(cfg: PretrainConfig) -> str:
    """Why a run has no held-out metrics: evaluation runs on real held-out images only, never on noise."""
    if cfg.data.synthetic:
        return "synthetic data: no held-out PSNR or zero-shot (there are no real images to measure them on)"
    return ("no data.eval_shards: no held-out PSNR or zero-shot; name held-out shards with data.eval_shards=... "
            "to measure them (reconstructions.png shows training images)")


def first_images(pairs: PairSource, n: int) -> torch.Tensor:
    """The first `n` usable training images (plain, uint8 (k, S, S, 3)), for the reconstruction grid and the
    generative probe of a run without held-out images."""
    ids, images = pairs.plain_images(n)
    if not ids:
        raise ConfigError("data.shards: no usable sample in the training shards")
    return images


def shard_eval_set(cfg: PretrainConfig, context_length: int) -> tuple[torch.Tensor, list[str]]:
    """The first `data.eval_images` usable samples of the held-out shards: plain images and captions."""
    source = ShardSource(ShardSet(cfg.data.eval_shards), cfg.data.image_size, context_length)
    ids, images = source.plain_images(cfg.data.eval_images)
    if not ids:
        raise ConfigError(f"data.eval_shards: {cfg.data.eval_shards} holds no usable sample")
    captions = [source.shards[i].caption.decode("utf-8").strip() for i in ids]  # usable: valid UTF-8
    return images, captions


def held_out_set(cfg: PretrainConfig, root: Path | None, context_length: int) -> tuple[torch.Tensor | None,
                                                                                      list[str] | None]:
    """The held-out images (uint8) and captions that evaluation reads: the first `data.eval_images` usable samples
    of data.eval_shards, or a fixed draw of the held-out emoji styles; (None, None) when the run has none
    (synthetic data, shards without data.eval_shards: evaluation never runs on noise)."""
    if cfg.data.eval_shards:
        return shard_eval_set(cfg, context_length)
    if root is None:
        return None, None
    held_out = load_emoji(root, cfg.data.emoji.eval_styles)
    idx = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(0))[: cfg.data.eval_images]
    return held_out.images[idx], [held_out.captions[i] for i in idx.tolist()]


def describe_data(cfg: PretrainConfig) -> str:
    d = cfg.data
    if d.synthetic:
        return "synthetic"
    if d.shards:
        return f"shards {d.shards}" + (f", held-out {d.eval_shards}" if d.eval_shards else "")
    return f"emoji {', '.join(d.emoji.train_styles)}, held-out {', '.join(d.emoji.eval_styles)}"
