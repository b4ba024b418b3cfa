"""Shared test setup: markers for device-bound tests, the reference fixture, small models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
