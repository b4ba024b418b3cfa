"""The dispatch layer: one module per op, each a pure-PyTorch reference plus its backend registrations."""

from vtp_fast.ops import (  # noqa: F401 - importing registers the ops
    attention,
    clip_loss,
    masked_gather,
    pixel_shuffle_l1,
    prototype_ce,
)
from vtp_fast.ops.registry import REGISTRY, BackendUnavailable, building_for, default_device, use_backend

__all__ = ["REGISTRY", "BackendUnavailable", "building_for", "default_device", "use_backend"]
