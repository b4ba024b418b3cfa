"""The shared training loop's stall and straggler accounting (vtp_fast.train.loop, vtp_fast.train.stalls), on a job
small enough to time: data wait against compute, the spread of step times across ranks with the slowest rank named,
MFU, and the warnings that name the cause. Also the FLOP count MFU rests on, against a real step's.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn

from vtp_fast.train import loop, stalls
from vtp_fast.train.config import RunConfig
from vtp_fast.train.loop import Job, StepOutput


class Regression(Job):
    """Least squares on random batches; sleeps where the test wants time to go."""

    name, unit, data_hint = "regression", "samples", "make the test's loader faster"

    def __init__(self, out, steps: int = 8, data_s: float = 0.0, step_s: float = 0.0, nan_at: int | None = None,
                 sync: bool = False):
        self.run = self.cfg = RunConfig(out_dir=str(out), steps=steps, log_every=2, checkpoint_every=steps,
                                        tensorboard=False)
        self.device, self.samples_per_step, self.data_s, self.step_s = torch.device("cpu"), 8, data_s, step_s
        self.nan_at = nan_at  # this step's loss is NaN (on this process)
        self.sync = sync  # decide finiteness with the other ranks every step (a collective, as real jobs do)
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05)

    def modules(self):
        return {"model": self.model}

    def optimizers(self):
        return {"optimizer": self.opt}

    def next_batch(self, step):
        time.sleep(self.data_s)
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        return x, x.sum(1, keepdim=True)

    def step(self, step, batch):
        time.sleep(self.step_s)
        x, y = batch
        loss = (self.model(x) - y).square().mean() * (float("nan") if step == self.nan_at else 1.0)
        if self.sync and not loop.all_finite({"total": loss.detach()}):
            return StepOutput({"total": loss.detach()}, finite=False, bad_terms=["total"])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return StepOutput({"total": loss.detach()})

    def finish(self, log):
        return {}


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_data_bound_run_reports_its_data_wait_and_says_why(tmp_path, capsys):
    loop.run(Regression(tmp_path / "slow-data", data_s=0.03))
    logged = [r for r in rows(tmp_path / "slow-data") if "loss/total" in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8]
    assert all(r["data_wait_share"] > 0.5 and r["samples_per_s"] < 8 / 0.03 for r in logged)
    assert "data wait" in logged[0]["warning"] and "make the test's loader faster" in logged[0]["warning"]
    assert not any("warning" in r for r in logged[1:]), "said once while it lasts"
    assert capsys.readouterr().out.count("vtp-fast: warning: data wait") == 1
    assert "step_s_spread" not in logged[0] and "mfu" not in logged[0]  # one process; no known peak on a CPU


def test_a_compute_bound_run_does_not_warn(tmp_path, capsys):
    loop.run(Regression(tmp_path / "slow-step", step_s=0.03))
    logged = [r for r in rows(tmp_path / "slow-step") if "loss/total" in r]
    assert all(r["data_wait_share"] < 0.1 and r["step_s"] >= 0.03 for r in logged)
    assert not any("warning" in r for r in logged) and "warning" not in capsys.readouterr().out


def test_mfu_is_the_model_flops_over_the_step_time_and_the_peak(tmp_path, monkeypatch):
    monkeypatch.setattr(stalls, "peak_tflops", lambda device: 2.0)
    job = Regression(tmp_path / "mfu", step_s=0.01)
    job.flops_per_step = 1e9
    loop.run(job)
    for r in [r for r in rows(tmp_path / "mfu") if "loss/total" in r]:
        assert r["mfu"] == pytest.approx(1e9 / r["step_s"] / 2e12)


def _worker(rank, out, world, job_kw):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    tdist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        job = Regression(out / "run", steps=8, **job_kw[rank])
        loop.run(job)
        torch.save(job.model.state_dict(), out / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_a_rank_that_is_always_slowest_is_named(tmp_path):
    """Ranks that do not wait for each other inside every step: their step times differ, and the slowest is named.
    (With a collective in every step, as under DDP, the others' waiting evens the step times out: the next test.)"""
    mp.start_processes(_worker, args=(tmp_path, 2, [{}, {"step_s": 0.04}]), nprocs=2, start_method="spawn")
    logged = [r for r in rows(tmp_path / "run") if "loss/total" in r]
    assert len(logged) == 4 and all(r["slowest_rank"] == 1 and r["step_s_spread"] > 2 for r in logged)
    assert [("straggler" in r.get("warning", "")) for r in logged] == [False, False, True, False]
    assert "rank 1 was the slowest in 3 logged windows" in logged[2]["warning"]


def test_a_rank_slow_to_load_is_named_even_when_every_step_syncs(tmp_path):
    kw = [{"sync": True}, {"sync": True, "data_s": 0.03}]
    mp.start_processes(_worker, args=(tmp_path, 2, kw), nprocs=2, start_method="spawn")
    logged = [r for r in rows(tmp_path / "run") if "loss/total" in r]
    assert all(r["data_wait_share"] > 0.5 for r in logged)
    assert "data wait" in logged[0]["warning"] and "on rank 1" in logged[0]["warning"]


def test_a_step_non_finite_on_one_rank_is_skipped_on_every_rank(tmp_path):
    kw = [{"sync": True}, {"sync": True, "nan_at": 4}]
    mp.start_processes(_worker, args=(tmp_path, 2, kw), nprocs=2, start_method="spawn")
    skipped = [r for r in rows(tmp_path / "run") if r.get("skipped")]
    assert [(r["step"], r["bad_terms"]) for r in skipped] == [(5, ["total"])]  # logged by rank 0, finite itself
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a), "both took the same 7 steps on the same batches"


def test_the_counted_step_flops_match_a_real_step(tmp_path):
    """The meta-device count MFU uses (profile.step_flops) against FlopCounterMode over a real step of the same
    run: equal up to the iBOT masks (expected count there, drawn here)."""
    from tests.helpers import make_prepared_emoji
    from tests.train.test_pretrain import emoji_root, small_config  # noqa: F401 - fixture
    from vtp_fast.data.pairs import emoji_pairs
    from vtp_fast.data.step_batches import StepBatches
    from vtp_fast.train.flops import count_flops, step_flops
    from vtp_fast.train.trainer import build_trainer, schedules

    root = make_prepared_emoji(tmp_path / "emoji", size=32)
    cfg = small_config(root, tmp_path / "run")
    t = build_trainer(cfg, torch.device("cpu"))
    batch = StepBatches(emoji_pairs(root, cfg.data.emoji.train_styles, 16), t.shape, cfg.ssl.views, seed=0)[0]
    real = count_flops(t, batch, schedules(cfg, 0))
    assert step_flops(cfg, t.model.config) == pytest.approx(real, rel=0.05)
