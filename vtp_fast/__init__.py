"""vtp_fast: a fast engine for pre-training VTP-style visual tokenizers and judging them by generation.

The names below load on first use, so that importing a submodule (the command line does, to set the OpenMP wait
before torch loads: vtp_fast.threads) does not import torch first."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_HOMES = {"PRESETS": "vtp_fast.models.presets", "vtp_config": "vtp_fast.models.presets",
          "CheckpointError": "vtp_fast.models.pretrained", "load_pretrained": "vtp_fast.models.pretrained",
          "save_pretrained": "vtp_fast.models.pretrained", "VTP": "vtp_fast.models.vtp",
          "VTPConfig": "vtp_fast.models.vtp"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'vtp_fast' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
