"""Issue 14: one thread budget from the CPUs a process may use (affinity, local ranks, OMP_NUM_THREADS), fitted to
what other processes leave free."""

import os
import subprocess
import sys

import pytest

from vtp_fast import threads


@pytest.fixture
def cpus(monkeypatch):
    def set_cpus(n, local_ranks=None, omp=None):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))
        for key, value in (("LOCAL_WORLD_SIZE", local_ranks), ("OMP_NUM_THREADS", omp)):
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, str(value))
    return set_cpus


def test_the_budget_splits_the_process_cpus(cpus):
    cpus(2)
    b = threads.budget()
    assert (b.cpus, b.torch_threads, b.loader_workers, b.dali_threads) == (2, 2, 0, 2)
    cpus(32)
    b = threads.budget()
    assert (b.cpus, b.torch_threads, b.loader_workers, b.dali_threads) == (32, 24, 8, 4)
    cpus(64, local_ranks=8)  # torchrun, 8 ranks on a 64-CPU node: 8 each
    b = threads.budget()
    assert (b.cpus, b.torch_threads, b.loader_workers) == (8, 6, 2)


def test_explicit_settings_win(cpus):
    cpus(16, omp=1)
    b = threads.budget()
    assert b.torch_threads == 1 and b.source == "OMP_NUM_THREADS"
    b = threads.budget(threads=3, workers=0, dali_threads=1)
    assert (b.torch_threads, b.loader_workers, b.dali_threads, b.source) == (3, 0, 1, "run.threads")
    assert "3 thread(s) (run.threads)" in b.describe()


class _Share:
    def __init__(self, *values):
        self.values = list(values)

    def others(self):
        return self.values.pop(0)


def test_rebalance_fits_torch_threads_to_the_cpus_others_leave(cpus, monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_applied", None)
    try:
        cpus(4)
        threads.apply_budget(threads.budget(workers=0))
        assert torch.get_num_threads() == 4
        share = _Share(2.2, 2.0, 0.1, None)
        assert threads.rebalance(share) == (2, 2.2)  # another job keeps 2 CPUs busy
        assert threads.rebalance(share) is None and torch.get_num_threads() == 2  # unchanged
        assert threads.rebalance(share) == (4, 0.1) and torch.get_num_threads() == 4  # it finished
        assert threads.rebalance(share) is None  # cannot tell: left as is
        cpus(4, local_ranks=2)  # torchrun's ranks share the CPUs by design: left as budgeted
        threads.apply_budget(threads.budget(workers=0))
        assert torch.get_num_threads() == 2 and threads.rebalance(_Share(2.0)) is None
        cpus(4)
        threads.apply_budget(threads.budget(threads=3))  # run.threads: never changed
        assert threads.rebalance(_Share(3.0)) is None and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_cpu_share_sees_another_process_working():
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat")
    share = threads.CpuShare()
    spin = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"
    subprocess.run([sys.executable, "-c", spin], check=True)
    assert share.others() >= 0.5  # one process spun for 1.5 s on (some of) these CPUs
