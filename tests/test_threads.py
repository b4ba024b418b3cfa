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


INTEL = threads.intel_openmp_path() is not None  # intel-openmp is a dependency on x86-64 Linux
GNU = {"VTP_FAST_OPENMP": "gnu"}
CLEAN = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
                                                             "VTP_FAST_OPENMP")}


@pytest.mark.parametrize("env, want", [
    ({}, "Intel's, 200 ms alone, 0 ms while" if INTEL else f"libgomp, GOMP_SPINCOUNT={threads.SPIN_COUNT}"),
    ({"KMP_BLOCKTIME": "5"}, "Intel's, KMP_BLOCKTIME=5" if INTEL else f"libgomp, GOMP_SPINCOUNT={threads.SPIN_COUNT}"),
    (GNU, f"libgomp, GOMP_SPINCOUNT={threads.SPIN_COUNT}"),
    ({**GNU, "OMP_WAIT_POLICY": "ACTIVE"}, "libgomp, OMP_WAIT_POLICY=ACTIVE"),
    ({**GNU, "GOMP_SPINCOUNT": "7"}, "libgomp, GOMP_SPINCOUNT=7")])
def test_the_command_line_chooses_the_openmp_runtime_before_torch_loads(env, want):
    """An OpenMP runtime reads its wait settings once, when torch loads it: the command line chooses the runtime
    (Intel's when installed, unless VTP_FAST_OPENMP=gnu) and sets libgomp's spin before anything imports torch,
    and keeps the user's own settings."""
    probe = ("import sys, os, vtp_fast.cli; loaded = 'torch' in sys.modules; import torch; "
             "print(loaded, os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", probe], env={**CLEAN, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "False", "torch was loaded before the command line could choose the OpenMP runtime"
    if want.startswith("libgomp"):
        assert want.split("=")[1] in out[1:]
    info = subprocess.run([sys.executable, "-m", "vtp_fast.cli", "info"], env={**CLEAN, **env}, capture_output=True,
                          text=True, check=True).stdout
    assert f"OpenMP waiting: {want}" in info


# Two torch threads' worth of the work whose split follows the thread count: matmuls (MKL), a whole-tensor sum,
# LayerNorm's weight gradient (per-thread partial sums), softmax; the hash of every gradient.
WORK = """
import hashlib, torch
torch.set_num_threads(2); torch.manual_seed(0)
x, w = torch.randn(512, 384), torch.randn(1152, 384, requires_grad=True)
ln = torch.nn.LayerNorm(384)
y = torch.nn.functional.linear(ln(x), w).view(512, 3, 384).softmax(-1)
(y.square().sum() + y.sum(0).pow(3).mean()).backward()
print(hashlib.sha256(w.grad.numpy().tobytes() + ln.weight.grad.numpy().tobytes()).hexdigest())
"""


@pytest.mark.skipif(not INTEL, reason="intel-openmp is not installed (not x86-64 Linux)")
def test_intels_runtime_splits_work_as_libgomp_does():
    """Which runtime runs torch's threads changes no result: the same thread count splits the same way."""
    runs = {}
    for name, env in (("intel", {}), ("gnu", GNU)):
        probe = "import vtp_fast.cli\nfrom vtp_fast import threads\n" + WORK + "print(threads.openmp_runtime())"
        runs[name] = subprocess.run([sys.executable, "-c", probe], env={**CLEAN, **env}, capture_output=True,
                                    text=True, check=True).stdout.split("\n")
    assert runs["intel"][1] != "None" and runs["gnu"][1] == "None"  # each ran on the runtime it names
    assert runs["intel"][0] == runs["gnu"][0]


class FakeRuntime:
    def __init__(self):
        self.calls = []

    def kmp_set_blocktime(self, ms):
        self.calls.append(ms)


def test_the_openmp_wait_follows_other_processes_load(monkeypatch):
    """Waits sleep at once while other processes keep half a CPU busy beyond what the budget leaves them (loader
    workers), and go back to Intel's default when they stop; never while the user chose a wait."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for key in ("KMP_BLOCKTIME", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(key, raising=False)
    runtime = FakeRuntime()
    monkeypatch.setattr(threads, "openmp_runtime", lambda: runtime)
    clock = [100.0]
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock[0])
    samples = iter([(100.0, 0.0, 0.0),  # (wall, the CPUs' busy seconds, this process's CPU seconds)
                    (101.0, 3.9, 3.0),  # others 0.9 CPU, the budget leaves them 1 (a loader worker): alone
                    (102.0, 7.5, 5.0),  # others 1.6 CPU: sharing
                    (103.0, 11.5, 8.0),  # others 1.0 CPU: alone again
                    ])
    monkeypatch.setattr(threads.OpenMPWait, "_sample", lambda self: next(samples))
    wait = threads.OpenMPWait(torch_threads=3)
    states = []
    for t in (100.2, 101.0, 101.3, 102.0, 103.0):  # 100.2 and 101.3: under WINDOW_S since the last measurement
        clock[0] = t
        wait.update()
        states.append(wait.sharing)
    assert states == [False, False, False, True, False]
    assert runtime.calls == [threads.OpenMPWait.SHARING_MS, threads.OpenMPWait.ALONE_MS]
    monkeypatch.setenv("KMP_BLOCKTIME", "50")
    assert threads.OpenMPWait(torch_threads=3)._runtime is None


@pytest.mark.skipif(not INTEL, reason="intel-openmp is not installed (not x86-64 Linux)")
def test_the_openmp_wait_sleeps_beside_a_busy_process():
    """On the real runtime: with a process spinning on every CPU beside it, the wait goes to SHARING_MS."""
    cpus = len(os.sched_getaffinity(0))
    probe = ("import time, vtp_fast.cli, torch\nfrom vtp_fast import threads\n"
             "wait = threads.OpenMPWait(torch.get_num_threads())\nx = torch.randn(256, 256)\n"
             "end = time.monotonic() + 3 * wait.WINDOW_S\n"
             "while time.monotonic() < end:\n    x @ x\n    wait.update()\n"
             "print(wait.sharing, threads.openmp_runtime().kmp_get_blocktime())")
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus)]
    try:
        out = subprocess.run([sys.executable, "-c", probe], env=CLEAN, capture_output=True, text=True,
                             check=True).stdout.split()
    finally:
        for p in load:
            p.kill()
    assert out == ["True", str(threads.OpenMPWait.SHARING_MS)]
