"""The C allocator of a process: glibc's malloc keeps the memory one step's tensors free for the next step.

PyTorch's CPU tensors come from malloc. By default glibc maps every block of 128 KiB and more afresh from the
kernel and unmaps it when freed (the threshold rises to the largest block freed, at most 32 MiB), and gives the
top of its heap back once 128 KiB of it are free. Then every step of a model takes its activations from fresh
pages, and the kernel zeroes each page on first touch: a fault per 4 KiB that the process pays in system time.
On this project's 2-core machine that was up to a fifth of VTP-S's encode + decode, as much as where glibc's
drifting threshold settled in the process allowed (`bench/allocator.py`).

`prepare_allocator` sets the mmap threshold to glibc's ceiling (MMAP_THRESHOLD, 32 MiB on 64-bit; blocks under it
come from the heap) and the trim threshold to TRIM_THRESHOLD (1 GiB: free memory at the top of the heap is kept up
to that). The price: the process keeps up to that much freed memory mapped (what `ru_maxrss` shows stays at the
peak). It changes no result: only where a tensor's memory comes from. VTP_FAST_MALLOC=default keeps glibc's
behaviour, as do malloc settings of the user's own (GLIBC_TUNABLES with glibc.malloc, or MALLOC_*_ variables);
outside glibc (no `mallopt`) nothing is done.

Imports nothing from the rest of vtp_fast.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30

_setting: str | None = None


def _user_settings() -> bool:
    return "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(
        k.startswith("MALLOC_") and k.endswith("_") for k in os.environ)


def prepare_allocator() -> str:
    """Keep freed memory for reuse (see the module docstring), once per process; -> `allocator_setting()`."""
    global _setting
    if _setting is None:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
        if os.environ.get("VTP_FAST_MALLOC", "") == "default":
            _setting = "glibc default (VTP_FAST_MALLOC=default)"
        elif _user_settings():
            _setting = "the user's (GLIBC_TUNABLES / MALLOC_*)"
        elif mallopt is None:
            _setting = "the C library's own (no mallopt)"
        elif mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1:
            _setting = f"glibc, mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB"
        else:
            _setting = "glibc default (mallopt refused)"
    return _setting


def allocator_setting() -> str:
    """How this process's malloc was set: by `prepare_allocator`, or glibc's default when it was not called."""
    return _setting or "glibc default"
