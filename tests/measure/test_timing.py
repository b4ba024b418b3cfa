"""vtp_fast.measure.timing: the order side-by-side benchmarks run their variants in."""

from vtp_fast.measure.timing import alternating, time_interleaved


def test_rounds_alternate_their_order():
    assert list(alternating("ABC", 3)) == [(0, "A"), (0, "B"), (0, "C"), (1, "C"), (1, "B"), (1, "A"),
                                           (2, "A"), (2, "B"), (2, "C")]


def test_time_interleaved_runs_each_step_once_a_round_in_that_order(monkeypatch):
    monkeypatch.delenv("VTP_FAST_BENCH_TINY", raising=False)
    calls = []
    steps = [lambda name=name: calls.append(name) for name in "AB"]
    rows = time_interleaved(steps, "cpu", rounds=3, warmup=1)
    assert calls == ["A", "B"] + ["A", "B", "B", "A", "A", "B"]  # warm-up, then the rounds
    assert len(rows) == 2
