"""Every benchmark still runs on the CPU (tiny shapes) so it cannot rot; rows carry what they need."""

import importlib.util
import json
from pathlib import Path

import pytest

from vtp_fast.benchmark import write_rows
from vtp_fast.ops import REGISTRY

BENCH = Path(__file__).parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("op", sorted(REGISTRY))
def test_op_bench_quick_run(op, tmp_path):
    module = load(op)
    rows = module.run("cpu", quick=True)
    assert rows and all(r["median_ms"] > 0 for r in rows)
    assert {"reference", "compiled_reference"} <= {r["backend"] for r in rows}
    assert set(module.TABLE_COLUMNS) <= set(rows[0]) | {"peak_mem_mb"}
    write_rows(rows, tmp_path / "rows.jsonl")
    first = json.loads((tmp_path / "rows.jsonl").read_text().splitlines()[0])
    assert {"torch", "git", "device_name", "date"} <= set(first)


def test_step_bench_eager_and_compiled_side_by_side():
    rows = load("step").run("cpu", quick=True)
    assert [r["mode"] for r in rows] == ["eager", "compiled"]
    assert all(r["steps_per_s"] > 0 for r in rows) and rows[0]["speedup_vs_eager"] == 1.0
