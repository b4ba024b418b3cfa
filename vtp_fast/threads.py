"""One thread budget per process: torch intra-op threads, DataLoader workers and DALI decode threads, set in one
place from the CPUs the process may use, so that jobs, loader workers and decoders do not fight over the cores.

    cpus            the process's CPU affinity (what `taskset`, cgroups cpusets and SLURM allot it), shared
                    equally among the local ranks under torchrun (LOCAL_WORLD_SIZE)
    loader workers  data.num_workers, else 0 up to 2 CPUs (the main process decodes), else cpus // 4, at most 8
    DALI threads    data.dali_threads, else cpus // 4, between 2 and 4 (they decode while the step waits for data)
    torch threads   run.threads, else $OMP_NUM_THREADS when set (torchrun sets 1 per rank when it launches several),
                    else the cpus the workers leave (at least 1), and then fewer while other processes keep some
                    of these CPUs busy (`CpuShare`, checked by the training loop at every logged step)
Why the last rule: an OpenMP team waits at every barrier for its slowest thread, so more threads than free cores
make each parallel region wait for a descheduled thread. Two tiny pretraining jobs with 2 threads each on 2 cores
ran 3.9x slower per step than one alone; with one thread each, 1.5x (bench/contention.py). Letting idle threads
sleep instead (OMP_WAIT_POLICY=PASSIVE) helped the pair but cost a lone job 40%, so it is not set here.
`vtp-fast info` prints the budget.

Imports nothing from the rest of vtp_fast (every layer may ask for the budget).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


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
                f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


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


class CpuShare:
    """The CPUs of this process's affinity kept busy by other processes between two calls of `others`: the busy
    time of those CPUs in /proc/stat less this process's own CPU time (its threads; its loader workers, being other
    processes, count as others: they need cores too)."""

    def __init__(self):
        try:
            self.cpus = sorted(os.sched_getaffinity(0))
        except AttributeError:
            self.cpus = []
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        """(machine busy CPU-seconds on our CPUs, own CPU-seconds, wall seconds), None without /proc/stat."""
        import time

        try:
            with open("/proc/stat") as f:
                lines = [line.split() for line in f if line.startswith("cpu") and line[3].isdigit()]
        except OSError:
            return None
        mine = {f"cpu{c}" for c in self.cpus}
        tick = os.sysconf("SC_CLK_TCK")
        # user, nice, system, idle, iowait, irq, softirq, steal (guest time is inside user and nice)
        busy = sum(sum(map(int, x[1:9])) - int(x[4]) - int(x[5]) for x in lines if x[0] in mine) / tick
        t = os.times()
        return busy, t.user + t.system, time.monotonic()

    def others(self) -> float | None:
        """CPUs (on average) busy with other processes since the last call; None where it cannot be told."""
        now = self._sample()
        last, self._last = self._last, now
        if now is None or last is None or now[2] - last[2] < 0.5:
            return None
        return max(0.0, (now[0] - last[0]) - (now[1] - last[1])) / (now[2] - last[2])


def rebalance(share: CpuShare) -> tuple[int, float] | None:
    """When the budget in force (`apply_budget`) chose torch's threads itself, fit them to the CPUs other processes
    leave free (at least 1, at most the budget's); returns (the new thread count, CPUs busy elsewhere) when it
    changed, else None. Not with several local ranks, which share the CPUs by design (torchrun also sets
    OMP_NUM_THREADS then)."""
    b = _applied
    if b is None or b.source != SOURCE_CPUS or local_ranks() > 1 or (others := share.others()) is None:
        return None
    import torch

    want = max(1, min(b.torch_threads, b.cpus - round(others)))
    if want == torch.get_num_threads():
        return None
    torch.set_num_threads(want)
    return want, others


_applied: ThreadBudget | None = None


def apply_budget(b: ThreadBudget) -> ThreadBudget:
    """Set torch's intra-op threads to the budget's (the loader workers and DALI threads are passed on by their
    callers); `rebalance` adjusts them from then on."""
    import torch

    global _applied
    torch.set_num_threads(b.torch_threads)
    _applied = b
    return b
