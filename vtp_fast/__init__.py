"""vtp_fast: a fast engine for pre-training VTP-style visual tokenizers and judging them by generation."""

from vtp_fast.models.presets import PRESETS, vtp_config
from vtp_fast.models.pretrained import CheckpointError, load_pretrained, save_pretrained
from vtp_fast.models.vtp import VTP, VTPConfig

__version__ = "0.1.0"
__all__ = ["PRESETS", "VTP", "VTPConfig", "CheckpointError", "load_pretrained", "save_pretrained", "vtp_config"]
