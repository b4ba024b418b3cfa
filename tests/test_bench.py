"""Every benchmark still runs on the CPU (tiny shapes) so it cannot rot; rows carry what they need."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vtp_fast.measure.rows import RowLog, row_writer, write_rows
from vtp_fast.ops import REGISTRY

BENCH = Path(__file__).parents[1] / "bench"
NAMES = sorted(p.stem.removeprefix("bench_") for p in BENCH.glob("bench_*.py"))


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timing_is_sane(row: dict) -> bool:
    """A measured time: positive and finite (0 means nothing was timed), between its quartiles when it has them
    (inclusive quartiles stay within the measured range), from at least one repeat."""
    m = row["median_ms"]
    ok = isinstance(m, float) and math.isfinite(m) and m > 0
    if "q3_ms" in row:
        ok = ok and 0 < row["q1_ms"] <= m <= row["q3_ms"] and row["repeats"] >= 1
    return ok


@pytest.mark.parametrize("name", NAMES)
def test_bench_quick_run(name, tmp_path):
    module = load(name)
    emitted = []
    rows = module.run("cpu", quick=True, emit=emitted.append)
    assert rows and all(timing_is_sane(r) for r in rows if name != "parity")  # parity measures errors, not time
    assert emitted == rows  # every row handed out as it was measured, none added or changed afterwards
    assert all(r["device"] == "cpu" and isinstance(r["backend"], str) and r["backend"] for r in rows)
    assert set(module.TABLE_COLUMNS) <= set().union(*rows) | {"peak_mem_mb"}
    if name in REGISTRY:  # an op: every backend against the reference and torch.compile of it
        assert {"reference", "compiled_reference"} <= {r["backend"] for r in rows}
    if name == "step":
        assert [r["mode"] for r in rows] == list(module.BRIEF) and rows[0]["speedup_vs_eager"] == 1.0
        assert all(r["flops"] > 0 and r["ceiling_share"] > 0 for r in rows)
    if name == "parity":  # fp32 on the CPU is exact; bf16 stays within bf16 precision
        assert all(r["max_abs_error"] <= (1e-5 if r["dtype"] == "float32" else 0.1 * r["max_abs_value"])
                   for r in rows)
    write_rows(rows, tmp_path / "rows.jsonl")
    first = json.loads((tmp_path / "rows.jsonl").read_text().splitlines()[0])
    assert {"torch", "git", "device_name", "date"} <= set(first)
    assert first["device"] == "cpu" and first["device_name"].startswith("CPU")  # never the name of a GPU it skipped


def test_rows_are_emitted_as_they_are_measured(tmp_path):
    """A sweep stopped after its first measurement (as a time limit stops it) has already written that row."""
    class Stop(Exception):
        pass

    path = tmp_path / "rows.jsonl"
    write = row_writer(path)

    def emit(row):
        write(row)
        raise Stop

    with pytest.raises(Stop):
        load("masked_gather").run("cpu", quick=True, emit=emit)
    (row,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert row["bench"] == "masked_gather" and timing_is_sane(row) and row["device"] == "cpu"


def test_a_row_must_name_its_device_and_backend():
    rows = RowLog()
    with pytest.raises(ValueError, match="device"):
        rows.add({"bench": "x", "backend": "reference"})
    with pytest.raises(ValueError, match="backend"):
        rows.add({"bench": "x", "device": "cpu"})
    assert rows.rows == []


def test_data_rows_are_labelled_by_what_decoded():
    """The label follows the device the decoded images came back on, not the decoder requested."""
    label = load("data")._label
    assert label("torchvision", {"cpu"}) == ("cpu", "PIL (torchvision path)")
    assert label("dali", {"cpu"}) == ("cpu", "DALI CPU")
    assert label("dali", {"cuda"}) == ("cuda", "DALI mixed (GPU)")
    assert label("nvjpeg", {"cuda"}) == ("cuda", "torchvision nvJPEG (GPU)")
    assert label("nvjpeg", {"cpu"})[0] == "cpu" and "nvJPEG" not in label("nvjpeg", {"cpu"})[1]
    assert label("dali", {"cpu", "cuda"})[0] == "cpu"  # a mixed run claims no GPU


def test_pytest_benchmark_cases_run_once_and_match_the_reference():
    """bench/pytest_ops.py (the pytest-benchmark entry) runs every case once, each checking its result."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(BENCH / "pytest_ops.py"),
                        "--benchmark-disable"], capture_output=True, text=True, timeout=600,
                       cwd=BENCH.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout


def test_matmul_bound_counts_the_gemms_and_only_them():
    """bench/matmul_bound.py: a matmul's FLOPs are counted exactly (2 M N K), an elementwise op adds time but no
    GEMM, and the bound is the whole time over the GEMMs' time."""
    from bench.matmul_bound import measure

    a, b = torch.randn(192, 256), torch.randn(256, 320)
    x = torch.randn(1 << 20)

    def call():
        (a @ b).sum()
        x.mul(2).add(1).exp()
    row = measure("toy", call, repeats=3, warmup=1, ceiling=100.0)
    assert row["gemm_gflop"] == pytest.approx(2 * 192 * 256 * 320 / 1e9)
    assert 0 < row["gemm_ms"] < row["total_ms"]
    assert row["max_speedup_if_rest_free"] == pytest.approx(row["total_ms"] / row["gemm_ms"])
    assert row["gemm_ceiling_share"] == pytest.approx(row["gemm_gflop_per_s"] / 100.0)


def test_study_time_exports_a_revision_and_groups_stage_times(tmp_path):
    """bench/study_time.py: a revision's tree is exported at its commit, and the study's stage seconds are summed
    by what each stage does."""
    from bench.study_time import ROOT, export, stage_kinds

    commit = export("HEAD", tmp_path / "tree")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert commit == head and (tmp_path / "tree" / "vtp_fast" / "study" / "run.py").is_file()
    assert stage_kinds({"rec-100-c64: pretrain 100 steps": 30.0, "clip+ssl+ae-100-c64: pretrain 100 steps": 60.0,
                        "floor: real vs the reference": 5.0, "rec-100-c64: rFID, PSNR, zero-shot, probe": 7.0,
                        "rec-100-c64: DiT seed 0 to 600 steps, 500 samples": 9.0,
                        "rec-100-c64: DiT seed 1 to 600 steps, 500 samples": 8.0}) == {
        "pretrain": 90.0, "floor": 5.0, "rFID": 7.0, "DiT": 17.0}
