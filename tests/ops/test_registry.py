"""The op registry: the four pieces of every op, auto resolution, explicit requests that cannot run."""

from pathlib import Path

import pytest

from vtp_fast.ops import REGISTRY, BackendUnavailable, use_backend
from vtp_fast.ops.registry import new_op

ROOT = Path(__file__).resolve().parents[2]
KERNEL_BACKENDS = {"native", "triton"}


@pytest.mark.parametrize("op", sorted(REGISTRY))
def test_every_op_has_its_pieces(op):
    """Reference (registered, lowest priority), test and benchmark always; a kernel file for every backend of
    our own (Triton in kernels/, C++/CUDA in csrc/)."""
    entry = REGISTRY[op]
    ref = entry.backends["reference"]
    assert ref.available and set(ref.devices) >= {"cpu", "cuda"}
    assert all(b.priority >= ref.priority or b.priority < 0 for b in entry.backends.values())
    assert (ROOT / "vtp_fast" / "ops" / f"{op}.py").is_file()
    assert (ROOT / "tests" / "ops" / f"test_{op}.py").is_file()
    assert (ROOT / "bench" / f"bench_{op}.py").is_file()
    if "triton" in entry.backends:
        assert (ROOT / "kernels" / f"{op}.py").is_file()
    if "native" in entry.backends:
        assert list((ROOT / "csrc").glob(f"{op}.cpp")) and list((ROOT / "csrc").glob(f"{op}.cu"))


def test_auto_resolution_prefers_priority_and_falls_back():
    attn = REGISTRY["attention"]
    assert attn.resolve("cpu").name == "sdpa"  # flash-attn / xformers never run on the CPU
    assert attn.resolve("cpu").name in {b.name for b in attn.runnable("cpu")}


def test_requested_backend_that_cannot_run_raises(monkeypatch):
    attn = REGISTRY["attention"]
    with use_backend("attention", "flash_attn"), pytest.raises(BackendUnavailable, match="flash_attn"):
        attn.resolve("cpu")
    monkeypatch.setenv("VTP_FAST_BACKEND_ATTENTION", "no_such_backend")
    with pytest.raises(BackendUnavailable, match="unknown backend 'no_such_backend'.*choices: reference, sdpa"):
        attn.resolve("cpu")
    monkeypatch.setenv("VTP_FAST_BACKEND_ATTENTION", "reference")
    assert attn.resolve("cpu").name == "reference"
    monkeypatch.setenv("VTP_FAST_BACKEND_ATTENTION", "auto")
    assert attn.resolve("cpu").name == "sdpa"


def test_layers_resolve_at_construction():
    from vtp_fast.nn.attention import SelfAttention

    with use_backend("attention", "reference"):
        layer = SelfAttention(32, 2)
    assert layer.backend.name == "reference"
    assert SelfAttention(32, 2).backend.name == "sdpa"


def test_requesting_a_device_it_does_not_run_on(monkeypatch):
    monkeypatch.setenv("VTP_FAST_BACKEND_ATTENTION", "flash_attn")
    with pytest.raises(BackendUnavailable):
        REGISTRY["attention"].resolve("cpu")


def test_use_backend_unknown_op_and_double_definition():
    with pytest.raises(KeyError, match="unknown op"), use_backend("nope", "x"):
        pass
    with pytest.raises(ValueError, match="defined twice"):
        new_op("attention", None)
