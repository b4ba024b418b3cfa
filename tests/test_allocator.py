"""The process's malloc setting (vtp_fast.allocator): freed blocks are reused instead of faulted in afresh, the
command line sets it, and a user's own choice is kept. Each case in a fresh process (the setting is
process-wide)."""

import os
import subprocess
import sys

import pytest

STEPS = """
import resource, sys, torch
import vtp_fast.cli  # sets the allocator as every command does
from vtp_fast.allocator import allocator_setting
sizes = [(1 << 18) * k for k in (1, 3, 7, 2, 5, 9, 4)]  # 1 to 9 MiB of float32, as a step's activations

def step():
    kept = []
    for n in sizes:
        t = torch.empty(n)
        t.fill_(1.0)  # first touch: a fault per page the process has not used before
        kept.append(t)

for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
print(allocator_setting())
"""


def run(**env) -> tuple[float, str]:
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", STEPS], env={**base, **env}, capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    return float(out[-2]), out[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_command_line_keeps_freed_memory_for_the_next_step():
    faults, setting = run()
    default_faults, default_setting = run(VTP_FAST_MALLOC="default")
    assert setting.startswith("glibc, mmap threshold 32 MiB"), setting
    assert default_setting == "glibc default (VTP_FAST_MALLOC=default)"
    # glibc's default maps most of each step's 31 MiB afresh (about 6,400 faults a step here); kept, a fraction
    assert default_faults > 1000 and faults < default_faults / 3, (faults, default_faults)


def test_a_users_own_malloc_settings_are_kept():
    _, setting = run(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536")
    assert setting == "the user's (GLIBC_TUNABLES / MALLOC_*)"
    _, setting = run(MALLOC_TRIM_THRESHOLD_="1")
    assert setting == "the user's (GLIBC_TUNABLES / MALLOC_*)"
