"""Shared test setup: markers for device-bound tests, the reference fixture, small models, a synthetic emoji set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import make_prepared_emoji
from vtp_fast import optional

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL_TINY = FIXTURES / "vtp_official_tiny"


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    can_triton = optional.available("triton") and (has_cuda or optional.triton_interpreter())
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "triton" in item.keywords and not can_triton:
            item.add_marker(pytest.mark.skip(reason="needs a GPU or TRITON_INTERPRET=1 (CI runs these in a "
                                                    "second pass under the interpreter)"))


@pytest.fixture
def official_tiny_dir() -> Path:
    return OFFICIAL_TINY


@pytest.fixture(scope="module")
def emoji_cache(tmp_path_factory) -> Path:
    """A VTP_FAST_CACHE holding a prepared emoji-format set (so nothing is downloaded); one per test module, so
    caches written under it (FID statistics) never leak between modules."""
    root = tmp_path_factory.mktemp("cache")
    make_prepared_emoji(root / "emoji" / "prepared-64", size=64)
    return root


@pytest.fixture
def emoji_env(emoji_cache, monkeypatch) -> Path:
    """`emoji_cache` as this test's VTP_FAST_CACHE."""
    monkeypatch.setenv("VTP_FAST_CACHE", str(emoji_cache))
    return emoji_cache
