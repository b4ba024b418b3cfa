"""Stall and straggler accounting for the training loop (vtp_fast.train.loop), which times each step's data
(`Job.next_batch`) apart from its compute (`Job.step`). Every logged row carries, over the steps since the last one:
the data-wait share of the step time (the worst rank's), seconds per step, its spread across ranks (slowest /
fastest) and the slowest rank, samples/s, and MFU where the job knows its FLOPs and the device's peak is known. A
warning names the cause when the data wait exceeds 10% of the step (naming the rank), or when one rank is the
slowest, by more than 10%, in three logged windows in a row. On a GPU a step's time is taken up to the host sync of
its finite check (the optimizer's kernels may still run). Under DDP / FSDP the gradient collectives make every rank
wait for the slowest inside the step: a rank slow to compute then shows as equal step times (its lag is the others'
wait, which this does not split out), while a rank slow to load shows as its own data wait.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vtp_fast import distributed as dist
from vtp_fast.train.flops import peak_tflops


@dataclass
class Window:
    """This rank's step times since the last logged row: data wait and compute, in seconds."""

    data: float = 0.0
    compute: float = 0.0
    steps: int = 0

    def add(self, data: float, compute: float) -> None:
        self.data, self.compute, self.steps = self.data + data, self.compute + compute, self.steps + 1


class Stalls:
    """Stall and straggler accounting over logged windows. `row` is collective (every rank calls it)."""

    DATA_SHARE, SPREAD, STREAK = 0.10, 1.10, 3

    def __init__(self, job, bar):
        self.job, self.bar = job, bar  # bar: the main rank's progress bar (warnings go under it), else None
        self.peak = peak_tflops(job.device)
        self.data_warned, self.slowest, self.streak = False, None, 0
        self.said: list[str] = []  # this window's warnings, logged in its row

    def row(self, w: Window) -> dict[str, Any]:
        ranks = dist.all_gather_floats([w.data, w.compute, w.steps])
        per_step = [(d + c) / max(n, 1) for d, c, n in ranks]  # seconds per step, each rank
        shares = [d / max(d + c, 1e-12) for d, c, _ in ranks]
        share = max(shares)
        seconds = max(per_step)  # the step ends when its slowest rank does
        row = {f"{self.job.unit}_per_s": self.job.samples_per_step / seconds, "step_s": seconds,
               "data_wait_share": share}
        if len(ranks) > 1:
            slowest = max(range(len(ranks)), key=per_step.__getitem__)
            row |= {"step_s_spread": seconds / max(min(per_step), 1e-12), "slowest_rank": slowest}
            self._straggler(slowest, row["step_s_spread"])
        if self.peak and self.job.flops_per_step:
            row["mfu"] = self.job.flops_per_step / seconds / (self.peak * 1e12 * len(ranks))
        self._data(share, shares.index(share) if len(ranks) > 1 else None)
        if self.said:
            row["warning"], self.said = " | ".join(self.said), []
        return row

    def _data(self, share: float, rank: int | None) -> None:
        if share > self.DATA_SHARE and not self.data_warned:
            where = f" on rank {rank}" if rank is not None else ""
            self._warn(f"data wait is {share:.0%} of the step{where} (over {self.DATA_SHARE:.0%}): the input "
                       f"pipeline is the bottleneck; {self.job.data_hint}")
        self.data_warned = share > self.DATA_SHARE  # said again only after it clears and comes back

    def _straggler(self, slowest: int, spread: float) -> None:
        lagging = spread > self.SPREAD
        self.streak = self.streak + 1 if lagging and slowest == self.slowest else int(lagging)
        self.slowest = slowest if lagging else None
        if self.streak == self.STREAK:
            self._warn(f"rank {slowest} was the slowest in {self.STREAK} logged windows in a row (step time "
                       f"x{spread:.2f} the fastest rank's): a straggler; check that rank's device clocks and "
                       "temperature, and its data")

    def _warn(self, message: str) -> None:
        self.said.append(message)
        if self.bar is not None:
            self.bar.write(f"vtp-fast: warning: {message}")
