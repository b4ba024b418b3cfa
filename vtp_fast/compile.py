"""`apply_compile`: torch.compile every transformer block of a built model (a VTP, a DiT), in place.

Per-block compilation keeps compile times short and graphs reusable across blocks of one shape, and, done with
`nn.Module.compile` (in place), keeps state-dict keys free of `_orig_mod.` prefixes.
"""

from __future__ import annotations

from torch import nn

from vtp_fast.models.dit import DiT
from vtp_fast.models.vtp import VTP


def transformer_blocks(model: VTP | DiT) -> list[nn.Module]:
    if isinstance(model, DiT):
        return list(model.blocks)
    blocks = list(model.trunk.blocks)
    if model.pixel_decoder is not None:
        blocks += list(model.pixel_decoder.blocks)
    if model.config.train_clip:
        blocks += list(model.text_transformer.resblocks)
    return blocks


def apply_compile(model: VTP | DiT, **options) -> VTP | DiT:
    for block in transformer_blocks(model):
        block.compile(**options)
    return model
