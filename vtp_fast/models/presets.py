"""Named model sizes. The published S/B/L share the text tower (768 wide, 12 blocks) and use a decoder of the
encoder's size; `vtp-l-light` is the paper's ViT-L encoder with a 4-layer decoder; tiny/nano are for CPUs."""

from __future__ import annotations

from vtp_fast.config import ConfigError, from_dict
from vtp_fast.models.vtp import VTPConfig


def _sym(width: int, depth: int, heads: int, **extra) -> dict:
    return {"vision_embed_dim": width, "vision_depth": depth, "vision_num_heads": heads,
            "decoder_embed_dim": width, "decoder_depth": depth, "decoder_num_heads": heads, **extra}


PRESETS: dict[str, dict] = {
    "vtp-s": _sym(384, 12, 6),
    "vtp-b": _sym(768, 12, 12),
    "vtp-l": _sym(1024, 24, 16),
    "vtp-l-light": _sym(1024, 24, 16, decoder_depth=4),
    # CPU sizes: 64 px images (4x4 tokens), head dim 64 (tiny) / 32 (nano), small text towers.
    "vtp-tiny": _sym(192, 4, 3, image_size=64, text_embed_dim=256, text_num_heads=4, text_depth=4,
                     text_context_length=32),
    "vtp-nano": _sym(64, 2, 2, image_size=64, text_embed_dim=64, text_num_heads=2, text_depth=2,
                     text_context_length=16),
}


def vtp_config(preset: str, **overrides) -> VTPConfig:
    """The VTPConfig of a named preset, with field overrides (e.g. train_clip=False)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r} (choices: {', '.join(PRESETS)})")
    return from_dict(VTPConfig, {**PRESETS[preset], **overrides})
