"""The process's malloc setting (vtp_fast.allocator): freed blocks are reused instead of faulted in afresh, the
command line sets it, and a user's own choice is kept. Each case in a fresh process (the setting is
process-wide)."""

import os
import subprocess
import sys

import pytest

STEPS = """
import ctypes, resource
import vtp_fast.cli  # sets the allocator as every command does
from vtp_fast.allocator import allocator_setting
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size = 16 << 20  # a 16 MiB block, as a layer's activations: 4,096 pages


def faults_to_fill():  # page faults while the block is written once (each page the process has not used before)
    block = libc.malloc(size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(block, 1, size)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
    return faults


print(faults_to_fill(), faults_to_fill())
print(allocator_setting())
"""


def run(**env) -> tuple[list[int], str]:
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", STEPS], env={**base, **env}, capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    return [int(f) for f in out[-2].split()], out[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_command_line_keeps_freed_memory_for_the_next_step():
    (first, again), setting = run()
    (default_first, default_again), default_setting = run(VTP_FAST_MALLOC="default")
    assert setting.startswith("glibc, mmap threshold 32 MiB"), setting
    assert default_setting == "glibc default (VTP_FAST_MALLOC=default)"
    assert first > 4000 and default_first > 4000  # fresh pages either way, the first time
    # glibc's default unmaps the freed block, and the same block again faults in every page; kept, none
    assert default_again > 4000 and again < 100, (again, default_again)


def test_a_users_own_malloc_settings_are_kept():
    _, setting = run(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536")
    assert setting == "the user's (GLIBC_TUNABLES / MALLOC_*)"
    _, setting = run(MALLOC_TRIM_THRESHOLD_="1")
    assert setting == "the user's (GLIBC_TUNABLES / MALLOC_*)"
