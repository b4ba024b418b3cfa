"""Every benchmark still runs on the CPU (tiny shapes) so it cannot rot; rows carry what they need."""

import importlib.util
from pathlib import Path

import pytest

BENCH = sorted((Path(__file__).parents[1] / "bench").glob("bench_*.py"))


@pytest.mark.parametrize("path", BENCH, ids=[p.stem for p in BENCH])
def test_bench_quick_run(path, tmp_path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.run("cpu", quick=True)
    assert rows and all(r["median_ms"] > 0 for r in rows)
    assert {"reference", "compiled_reference"} <= {r["backend"] for r in rows}
    from vtp_fast.benchmark import write_rows

    write_rows(rows, tmp_path / "rows.jsonl")
    import json

    first = json.loads((tmp_path / "rows.jsonl").read_text().splitlines()[0])
    assert {"torch", "git", "device_name", "date"} <= set(first)
