"""Triton kernels (installed as `vtp_fast.kernels`); each op's semantics live in `vtp_fast/ops`."""

from functools import cache


@cache
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index` (grid sizing)."""
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count
