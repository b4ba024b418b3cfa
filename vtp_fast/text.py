"""Captions -> CLIP BPE token ids (the open_clip package ships the vocabulary).

The text tower's input format: data loading tokenizes captions with it and `VTP.tokenize` is the model's
convenience for it, so it sits below both (it imports nothing from vtp_fast).
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor


@cache
def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer  # imported lazily: open_clip takes seconds to import

    return SimpleTokenizer()


def tokenize(texts: list[str] | str, context_length: int = 77) -> Tensor:
    """(B,) captions -> (B, context_length) int64: start, BPE ids, end-of-text, zero padding.

    Over-long captions are truncated with the end-of-text token kept last (the text tower pools there).
    """
    if isinstance(texts, str):
        texts = [texts]
    return _tokenizer()(list(texts), context_length=context_length).to(torch.int64)
