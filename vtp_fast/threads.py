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
    OpenMP waiting  an idle OpenMP thread spins GOMP_SPINCOUNT times before it sleeps (`prepare_openmp`, called by
                    the command line before torch loads; an explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept)
Why the last rule: an OpenMP team waits at every barrier for its slowest thread, and libgomp's default spin
(300,000 iterations) keeps a waiting thread on its core long after its work is done, taking it from any other job
on the same cores. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) frees the core but makes every parallel region of a
lone job pay a wake-up. SPIN_COUNT keeps a lone job's speed (1.03x libgomp's default) and cuts two jobs sharing 2
cores from 21x to 3.2x their lone step time; PASSIVE gets a pair to 1.26x at 1.44x for a lone job, so it is the
user's choice when jobs will share cores (bench/contention.py, rows in bench/results/cpu/contention.jsonl). None of
this changes a result: only the thread count does, and it is fixed.
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


# Iterations an idle OpenMP thread spins before it sleeps (libgomp's GOMP_SPINCOUNT; its default is 300,000).
SPIN_COUNT = 10_000


def prepare_openmp() -> None:
    """Set the OpenMP wait (SPIN_COUNT) for this process and its children unless the user chose one. Effective only
    before torch is first imported (libgomp reads it when it loads): the command line calls it first thing."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)


def openmp_waiting() -> str:
    """The OpenMP wait settings in this process's environment, for the logs."""
    chosen = [f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ]
    return ", ".join(chosen) or "libgomp's default"


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
