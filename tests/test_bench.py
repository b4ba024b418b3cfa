"""Every benchmark still runs on the CPU (tiny shapes) so it cannot rot; rows carry what they need."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vtp_fast.benchmark import write_rows
from vtp_fast.ops import REGISTRY

BENCH = Path(__file__).parents[1] / "bench"
NAMES = sorted(p.stem.removeprefix("bench_") for p in BENCH.glob("bench_*.py"))


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_bench_quick_run(name, tmp_path):
    module = load(name)
    rows = module.run("cpu", quick=True)
    assert rows and all(r["median_ms"] >= 0 for r in rows if name != "parity")  # parity measures errors, not time
    assert set(module.TABLE_COLUMNS) <= set().union(*rows) | {"peak_mem_mb"}
    if name in REGISTRY:  # an op: every backend against the reference and torch.compile of it
        assert {"reference", "compiled_reference"} <= {r["backend"] for r in rows}
    if name == "step":
        assert [r["mode"] for r in rows] == ["eager", "compiled"] and rows[0]["speedup_vs_eager"] == 1.0
    if name == "parity":  # fp32 on the CPU is exact; bf16 stays within bf16 precision
        assert all(r["max_abs_error"] <= (1e-5 if r["dtype"] == "float32" else 0.1 * r["max_abs_value"])
                   for r in rows)
    write_rows(rows, tmp_path / "rows.jsonl")
    first = json.loads((tmp_path / "rows.jsonl").read_text().splitlines()[0])
    assert {"torch", "git", "device_name", "date"} <= set(first)


def test_pytest_benchmark_cases_run_once_and_match_the_reference():
    """bench/pytest_ops.py (the pytest-benchmark entry) runs every case once, each checking its result."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(BENCH / "pytest_ops.py"),
                        "--benchmark-disable"], capture_output=True, text=True, timeout=600,
                       cwd=BENCH.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout
