"""bench/peers.py: rows against a peer carry what the comparison needs; a case without its peer says why it is
skipped instead of failing or writing rows."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PEERS = Path(__file__).parents[1] / "bench" / "peers.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_peers", PEERS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_clip_loss_quick_writes_one_row_per_implementation_with_the_comparison_fields(tmp_path):
    """open_clip is installed, so this case needs no path. Through the command line, as the lead runs it."""
    out = tmp_path / "rows.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(PEERS), "--cases", "clip_loss", "--quick", "--rounds", "2", "--out",
                        str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["impl"], row["variant"]) for row in rows] == [("vtp_fast", "eager_fp32"), ("peer", "eager_fp32")]
    ours, peer = rows
    for row in rows:
        assert row["bench"] == "peers" and row["case"] == "clip_loss" and row["device"] == "cpu"
        # where and with what it ran (env_info), and which peer
        assert {"torch", "git", "device_name", "date", "peer", "peer_path", "peer_commit", "peer_version"} <= set(row)
        assert Path(row["peer_path"]).is_dir() and row["peer_path"].endswith("open_clip")
        # an installed package inside some checkout's ignored venv is no checkout: its commit is unknown
        assert row["peer_commit"] == "unknown" or len(row["peer_commit"]) == 40
        assert row["repeats"] == 2 and 0 < row["q1_ms"] <= row["median_ms"] <= row["q3_ms"]
        # FLOPs counted once (same for both rows); GFLOP/s is those FLOPs over this row's median
        assert row["flops"] == ours["flops"] > 0
        assert row["gflop_per_s"] == pytest.approx(row["flops"] / (row["median_ms"] / 1e3) / 1e9)
    # 32 x 64 features: forward logits 2 * 32 * 32 * 64 at least once, backward twice that
    assert ours["flops"] >= 3 * 2 * 32 * 32 * 64
    assert ours["ratio_vs_peer"] == pytest.approx(peer["median_ms"] / ours["median_ms"])
    assert ours["ratio_peer_variant"] == "eager_fp32" and "ratio_vs_peer" not in peer
    # same inputs, same loss: the loss and all gradients agree to float32 rounding
    assert ours["max_abs_diff_vs_peer"] < 1e-5 and ours["weights_matched"] is True
    assert "| clip_loss |" in r.stdout  # the summary table


def test_cases_without_their_peer_are_skipped_and_say_why(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # an importable-looking peer path must not leak
    empty = tmp_path / "not_lightningdit"
    empty.mkdir()
    rows = load().run("cpu", quick=True, vtp_repo=str(tmp_path / "missing"), lightningdit_repo=str(empty),
                      cases=["codec", "dit_step", "dino_loss"])
    assert rows == []
    lines = capsys.readouterr().out.splitlines()
    assert f"skip codec: --vtp-repo {tmp_path / 'missing'} is not a directory" in lines
    dit = next(line for line in lines if line.startswith("skip dit_step: "))
    assert "cannot import models.lightningdit" in dit and str(empty) in dit
    dino = next(line for line in lines if line.startswith("skip dino_loss: "))
    assert "no --dinov2-repo given" in dino


def test_unknown_case_is_an_error():
    with pytest.raises(ValueError, match="unknown case 'codecs'"):
        load().run("cpu", quick=True, cases=["codecs"])
