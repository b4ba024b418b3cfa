"""Optional dependencies, each probed in exactly one place and turned into a boolean.

Nothing else in the package imports flash-attn, xformers, NVIDIA apex, DALI, the native extension, TensorBoard,
resvg or open_clip directly: it asks here. Probes run once (cached) and never raise; `reason(name)` says why
something is missing. `package_dir` finds the files of a package (LPIPS heads, the FID weights) without importing it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from functools import cache
from pathlib import Path
from types import ModuleType

# name -> (module to import, attribute that proves it is the right package)
_PROBES: dict[str, tuple[str, str]] = {
    "native": ("vtp_fast._C", "cuda_compiled"),
    "triton": ("triton", "jit"),
    "flash_attn": ("flash_attn", "flash_attn_func"),
    "xformers": ("xformers.ops", "memory_efficient_attention"),
    # PyPI's `apex` is an unrelated package; NVIDIA apex is recognised by its fused optimizer.
    "apex": ("apex.optimizers", "FusedAdam"),
    "dali": ("nvidia.dali", "pipeline_def"),
    "tensorboard": ("torch.utils.tensorboard", "SummaryWriter"),  # run metrics as TensorBoard scalars
    "resvg": ("resvg_py", "svg_to_bytes"),  # renders the OpenMoji style of the emoji set
    # ImageNet class names and CLIP's 80 prompt templates for zero-shot (pip install open_clip_torch)
    "open_clip": ("open_clip.zero_shot_metadata", "OPENAI_IMAGENET_TEMPLATES"),
}


@cache
def _probe(name: str) -> tuple[ModuleType | None, str]:
    module_name, attr = _PROBES[name]
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return None, f"import {module_name} failed: {type(e).__name__}: {e}".splitlines()[0]
    if not hasattr(module, attr):
        return None, f"{module_name} has no {attr} (a different package of the same name?)"
    return module, ""


def available(name: str) -> bool:
    """True when the optional dependency `name` (a key of the probe table) imports and looks right."""
    return _probe(name)[0] is not None


def module(name: str) -> ModuleType:
    """The imported optional module; raises RuntimeError with the reason when it is unavailable."""
    mod, why = _probe(name)
    if mod is None:
        raise RuntimeError(f"optional dependency {name!r} is unavailable: {why}")
    return mod


def reason(name: str) -> str:
    """Why `name` is unavailable ('' when it is available)."""
    return _probe(name)[1]


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (None when it is not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def triton_interpreter() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def native_cuda_compiled() -> bool:
    """True when the native extension was built with its CUDA sources."""
    return available("native") and bool(module("native").cuda_compiled())


NAMES = tuple(_PROBES)
