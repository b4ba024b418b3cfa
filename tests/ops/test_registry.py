"""The op registry: the four pieces of every op, auto resolution, explicit requests that cannot run."""

import dataclasses
from pathlib import Path

import pytest

from tests.helpers import cpu_backend
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


@pytest.mark.parametrize("op", sorted(name for name, entry in REGISTRY.items() if "native" in entry.backends))
def test_native_ops_resolve_native_by_default_and_honour_a_request(op):
    entry = REGISTRY[op]
    cpu_backend(entry, "native")
    assert entry.resolve("cpu").name == "native"
    with use_backend(op, "reference"):
        assert entry.resolve("cpu").name == "reference"


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


def test_models_resolve_for_the_device_they_are_built_for(monkeypatch, tmp_path):
    """On a GPU machine (simulated: VTP_FAST_DEVICE=cuda) layers resolve for CUDA by default; `building_for` and
    `load_pretrained(device=...)` resolve for the device the model will run on."""
    from vtp_fast import VTP, load_pretrained, save_pretrained, vtp_config
    from vtp_fast.ops.registry import Backend, building_for

    def backends(model):
        return [v for m in model.modules() for v in vars(m).values() if isinstance(v, Backend)]

    path = save_pretrained(VTP(vtp_config("vtp-nano")), tmp_path / "nano")
    monkeypatch.setenv("VTP_FAST_DEVICE", "cuda")
    shuffle = REGISTRY["pixel_shuffle_l1"]  # as if the native extension had no CUDA: CPU and CUDA choices differ
    monkeypatch.setitem(shuffle.backends, "native", dataclasses.replace(shuffle.backends["native"], devices=("cpu",)))
    assert shuffle.resolve().name == shuffle.resolve("cuda").name != shuffle.resolve("cpu").name
    assert REGISTRY["clip_loss"].resolve().name == REGISTRY["clip_loss"].resolve("cuda").name
    with building_for("cpu"):
        assert REGISTRY["clip_loss"].resolve().name == REGISTRY["clip_loss"].resolve("cpu").name
    found = backends(load_pretrained(path, device="cpu"))
    assert found and all("cpu" in b.devices for b in found)
