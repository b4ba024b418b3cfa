"""Issues 14 and 20: one thread budget from the CPUs a process may use (affinity, local ranks, OMP_NUM_THREADS),
fixed for a run and restored on resume, and the OpenMP wait set before torch loads."""

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


def test_resume_keeps_the_saved_thread_count_unless_the_user_chose_one(cpus, monkeypatch):
    """Issue 20: the thread count is fixed for a run and restored on resume (reductions split by thread count); a
    count the user set is kept, with a warning that the bits will differ."""
    import torch

    before = torch.get_num_threads()
    try:
        cpus(4)
        threads.apply_budget(threads.budget(workers=0))
        assert torch.get_num_threads() == 4
        assert threads.resume_threads(3) is None and torch.get_num_threads() == 3  # the checkpoint's count
        assert threads.resume_threads(None) is None and torch.get_num_threads() == 3  # an older checkpoint
        threads.apply_budget(threads.budget(threads=2))
        warning = threads.resume_threads(3)
        assert torch.get_num_threads() == 2 and "2 torch thread(s) (run.threads)" in warning
        assert "checkpoint's run used 3" in warning and "differ" in warning
        assert threads.resume_threads(2) is None
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("env, want", [({}, f"GOMP_SPINCOUNT={threads.SPIN_COUNT}"),
                                       ({"OMP_WAIT_POLICY": "ACTIVE"}, "OMP_WAIT_POLICY=ACTIVE"),
                                       ({"GOMP_SPINCOUNT": "7"}, "GOMP_SPINCOUNT=7")])
def test_the_command_line_sets_the_openmp_wait_before_torch_loads(env, want):
    """libgomp reads its wait settings once, when torch loads it: the command line sets them before anything imports
    torch, and keeps the user's own."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    probe = ("import sys, os, vtp_fast.cli; loaded = 'torch' in sys.modules; import torch; "
             "print(loaded, os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", probe], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "False", "torch was loaded before the command line could set the OpenMP wait"
    assert want.split("=")[1] in out[1:]
    info = subprocess.run([sys.executable, "-m", "vtp_fast.cli", "info"], env={**clean, **env}, capture_output=True,
                          text=True, check=True).stdout
    assert f"OpenMP waiting: {want}" in info
