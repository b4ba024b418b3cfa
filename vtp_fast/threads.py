"""One thread budget per process: torch intra-op threads, DataLoader workers and DALI decode threads, set in one
place from the CPUs the process may use, so that jobs, loader workers and decoders do not fight over the cores.

    cpus            the process's CPU affinity (what `taskset`, cgroups cpusets and SLURM allot it), shared
                    equally among the local ranks under torchrun (LOCAL_WORLD_SIZE)
    loader workers  data.num_workers, else 0 up to 2 CPUs (the main process decodes), else cpus // 4, at most 8
    DALI threads    data.dali_threads, else cpus // 4, between 2 and 4 (they decode while the step waits for data)
    torch threads   run.threads, else $OMP_NUM_THREADS when set (torchrun sets 1 per rank when it launches several),
                    else the cpus the workers leave (at least 1); fixed for the whole run and restored on resume
                    (`resume_threads`): how reductions are split follows the thread count, so a count that followed
                    the machine's load would make the numbers follow it too
    OpenMP runtime  Intel's (the intel-openmp package) in place of torch's libgomp, loaded by the command line
                    before torch (`prepare_openmp`; VTP_FAST_OPENMP=gnu keeps libgomp)
    OpenMP waiting  how long an idle OpenMP thread waits before it sleeps follows the load (`OpenMPWait`): Intel's
                    default 200 ms while the process has its CPUs, 0 while other processes use them; libgomp
                    spins SPIN_COUNT times (its wait cannot change once loaded); explicit OMP_WAIT_POLICY,
                    KMP_BLOCKTIME or GOMP_SPINCOUNT are kept
Why the last two rules: an OpenMP team waits at every barrier for its slowest thread, and a thread that keeps
waiting on its core long after its work is done takes it from any other job on the same cores; sleeping at once
frees the core but makes every parallel region of a lone job pay a wake-up. No fixed wait serves both, so the wait
follows the load, which only Intel's runtime allows. Tiny pretraining on 2 cores, per step against libgomp's
default alone (bench/contention.py, rows in bench/results/cpu/contention.jsonl): this budget 0.99x alone, 1.88x
for each of two jobs at once; Intel's fixed default 1.00x / 2.05x; libgomp with SPIN_COUNT 1.01x / 3.30x;
libgomp's default 9.65x for a pair; PASSIVE 1.50x / 1.85x. None of this changes a result: only the thread count
does, and it is fixed.
`vtp-fast info` prints the budget.

Imports nothing from the rest of vtp_fast (every layer may ask for the budget).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def local_ranks() -> int:
    """Processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE; 1 otherwise)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def process_cpus() -> int:
    """CPUs this process may run on (its affinity), divided among the local ranks of a torchrun launch."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // local_ranks())


SOURCE_CPUS = "the CPUs the loader workers leave"


@dataclass(frozen=True)
class ThreadBudget:
    cpus: int
    torch_threads: int
    loader_workers: int
    dali_threads: int
    source: str  # what decided torch_threads

    def describe(self) -> str:
        return (f"{self.cpus} CPU(s) for this process: torch {self.torch_threads} thread(s) ({self.source}), "
                f"{self.loader_workers} loader worker(s), {self.dali_threads} DALI thread(s); "
                f"OpenMP waiting: {openmp_waiting()}")


def budget(threads: int = 0, workers: int | None = None, dali_threads: int | None = None) -> ThreadBudget:
    """The budget, with the explicit settings (run.threads > 0, data.num_workers, data.dali_threads) kept."""
    cpus = process_cpus()
    if workers is None:
        workers = 0 if cpus <= 2 else min(8, cpus // 4)
    if dali_threads is None:
        dali_threads = min(4, max(2, cpus // 4))
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if threads > 0:
        torch_threads, source = threads, "run.threads"
    elif omp.isdigit() and int(omp) > 0:
        torch_threads, source = int(omp), "OMP_NUM_THREADS"
    else:
        torch_threads, source = max(1, cpus - workers), SOURCE_CPUS
    return ThreadBudget(cpus, torch_threads, workers, dali_threads, source)


# Iterations an idle libgomp thread spins before it sleeps (GOMP_SPINCOUNT; libgomp's default is 300,000).
SPIN_COUNT = 10_000


def prepare_openmp() -> None:
    """Choose this process's OpenMP runtime and its wait; effective only before torch is first imported (the runtime
    reads its settings when it loads): the command line calls it first thing.

    Intel's runtime (libiomp5, the intel-openmp package on x86-64 Linux) is loaded ahead of torch, so torch's OpenMP
    calls bind to it rather than to its own libgomp (glibc resolves a symbol in the libraries loaded globally
    first): its wait can change while the process runs (`OpenMPWait`), libgomp's cannot. VTP_FAST_OPENMP=gnu
    keeps libgomp. For libgomp (and the processes this one starts) the spin is SPIN_COUNT unless the user chose
    OMP_WAIT_POLICY or GOMP_SPINCOUNT. Neither runtime nor wait changes a result: they split work the same way."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    if "torch" in sys.modules or os.environ.get("VTP_FAST_OPENMP", "intel") == "gnu":
        return
    if (path := intel_openmp_path()) is not None:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def intel_openmp_path() -> str | None:
    """libiomp5.so of the installed intel-openmp package, if any."""
    try:
        files = importlib.metadata.files("intel-openmp") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [f.locate() for f in files if f.name == "libiomp5.so"]
    return str(found[0]) if found and Path(found[0]).exists() else None


def openmp_runtime() -> ctypes.CDLL | None:
    """Intel's runtime when torch's OpenMP calls go to it in this process, else None (libgomp)."""
    lib = ctypes.CDLL(None)  # the global scope: what torch's calls resolve to
    return lib if hasattr(lib, "kmp_set_blocktime") else None


def openmp_waiting() -> str:
    """The OpenMP runtime and its wait settings, for the logs."""
    chosen = [f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME") if k in os.environ]
    if "torch" in sys.modules and openmp_runtime() is not None:
        return "Intel's, " + (", ".join(chosen) or f"{OpenMPWait.ALONE_MS} ms alone, "
                                                   f"{OpenMPWait.SHARING_MS} ms while other processes use the CPUs")
    chosen += [f"GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}"] if "GOMP_SPINCOUNT" in os.environ else []
    return "libgomp, " + (", ".join(chosen) or "its default")


class OpenMPWait:
    """How long an idle OpenMP thread of this process waits before it sleeps, following the machine's load: Intel's
    default (ALONE_MS) while the process has its CPUs to itself, so a lone job pays no wake-ups, and SHARING_MS
    while other processes keep at least SHARING_CPUS of them busy beyond what the budget leaves them (its loader
    workers, other local ranks), so a thread that has finished its share frees its core at once. `update()` is called
    by the thread that runs the steps (the wait belongs to the teams that thread starts) at every step; it measures
    every WINDOW_S from /proc/stat and this process's CPU time. Does nothing under libgomp or when the user chose a
    wait (KMP_BLOCKTIME, OMP_WAIT_POLICY). The thread count, and with it every result, stays as it was."""

    ALONE_MS, SHARING_MS = 200, 0
    SHARING_CPUS = 0.5
    WINDOW_S = 0.5

    def __init__(self, torch_threads: int):
        user_chose = "KMP_BLOCKTIME" in os.environ or "OMP_WAIT_POLICY" in os.environ
        self._runtime = None if user_chose else openmp_runtime()
        self.sharing = False
        if self._runtime is not None:
            self._lines = {f"cpu{c}" for c in os.sched_getaffinity(0)}  # their lines in /proc/stat
            self._spare = len(self._lines) - torch_threads  # what the budget leaves to others
            self._last = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        """(wall seconds, seconds the process's CPUs were busy, this process's CPU seconds)."""
        busy = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *ticks = line.split()
                if name in self._lines:  # user nice system idle iowait irq softirq steal ...
                    busy += sum(int(t) for t in ticks[:8]) - int(ticks[3]) - int(ticks[4])
        own = os.times()
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system

    def update(self) -> None:
        if self._runtime is None or time.monotonic() - self._last[0] < self.WINDOW_S:
            return
        now = self._sample()
        others = ((now[1] - self._last[1]) - (now[2] - self._last[2])) / (now[0] - self._last[0])
        self._last = now
        sharing = others - self._spare >= self.SHARING_CPUS
        if sharing != self.sharing:
            self._runtime.kmp_set_blocktime(self.SHARING_MS if sharing else self.ALONE_MS)
            self.sharing = sharing


_applied: ThreadBudget | None = None


def apply_budget(b: ThreadBudget) -> ThreadBudget:
    """Set torch's intra-op threads to the budget's, for the whole run (the loader workers and DALI threads are
    passed on by their callers)."""
    import torch

    global _applied
    torch.set_num_threads(b.torch_threads)
    _applied = b
    return b


def resume_threads(saved: int | None) -> str | None:
    """Continue a checkpoint's run with the torch thread count it was saved with (`saved`; None for a checkpoint
    that did not record it), so that it continues bit for bit. When the user chose the count (run.threads,
    OMP_NUM_THREADS) and it differs, theirs is kept and the returned warning says the bits will differ."""
    import torch

    current = torch.get_num_threads()
    if saved is None or saved == current:
        return None
    if _applied is not None and _applied.source != SOURCE_CPUS:
        return (f"resuming with {current} torch thread(s) ({_applied.source}) where the checkpoint's run used "
                f"{saved}: the numbers will differ from an uninterrupted run in the last bits")
    torch.set_num_threads(saved)
    return None
