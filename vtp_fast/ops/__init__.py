"""The dispatch layer: one module per op, each a pure-PyTorch reference plus its backend registrations."""

from vtp_fast.ops import attention, clip_loss, masked_gather, pixel_shuffle_l1  # noqa: F401 - registers the ops
from vtp_fast.ops.registry import REGISTRY, BackendUnavailable, default_device, use_backend

__all__ = ["REGISTRY", "BackendUnavailable", "default_device", "use_backend"]
