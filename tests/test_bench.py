"""Every benchmark still runs on the CPU (tiny shapes) so it cannot rot; rows carry what they need."""

import importlib.util
import json
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
