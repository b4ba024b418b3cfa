"""Shared by the evaluation tests: a private cache root holding the converted Inception weights."""

import pytest

from vtp_fast.eval import inception


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache root holding the converted weights (converted once per test module)."""
    root = tmp_path_factory.mktemp("vtp_cache")
    inception.inception_weights(root, progress=False)
    return root
