"""The CPU roofline (issue 22, item 2): measured ceilings, bf16 flag detection, shares of a ceiling, and the rows
that carry them."""

import dataclasses
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from vtp_fast.measure import rows as row_log
from vtp_fast.measure.ceilings import Ceilings, cpu_ceilings, cpu_flags, native_bf16, share_of_ceiling
from vtp_fast.measure.rows import RowLog

SMALL = {"size": 128, "copy_mib": 4}  # a tiny measurement: the numbers mean little, the code path is the same

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu sse
"""


def fake(**kw) -> Ceilings:
    base = dict(fp32_gflops=100.0, bf16_gflops=400.0, copy_gbps=20.0, threads=2, cpu="test", native_bf16=("amx_bf16",),
                fp32_size=128, bf16_size=128, fp32_ms=1.0, bf16_ms=1.0, copy_ms=1.0, copy_mib=4, method="fake")
    return Ceilings(**{**base, **kw})


def test_ceilings_are_measured_positive_and_cached():
    c = cpu_ceilings(**SMALL)
    for v in (c.fp32_gflops, c.bf16_gflops, c.copy_gbps, c.fp32_ms, c.bf16_ms, c.copy_ms):
        assert isinstance(v, float) and math.isfinite(v) and v > 0
    assert c.threads == torch.get_num_threads() and c.fp32_size <= 128 and c.copy_mib == 4
    # GFLOP/s is 2 n^3 over the median time, GB/s read + write bytes over it
    assert c.fp32_gflops == pytest.approx(2 * c.fp32_size**3 / (c.fp32_ms * 1e-3) / 1e9)
    assert c.copy_gbps == pytest.approx(2 * 4 * 2**20 / (c.copy_ms * 1e-3) / 1e9)
    assert c.native_bf16 == native_bf16(cpu_flags())
    assert cpu_ceilings(**SMALL) is c  # once per process
    assert "fp32 matmul" in c.describe() and f"{c.threads} thread(s)" in c.describe()


def test_ceilings_at_a_thread_count_restore_torchs():
    before = torch.get_num_threads()
    c = cpu_ceilings(threads=1, **SMALL)
    assert c.threads == 1 and torch.get_num_threads() == before


def test_native_bf16_from_cpuinfo_flags():
    flags = cpu_flags(CPUINFO)  # the first processor's line
    assert {"avx512_bf16", "amx_bf16", "avx2"} <= flags and "bugs" not in flags
    assert native_bf16(flags) == ("amx_bf16", "avx512_bf16")
    assert native_bf16(cpu_flags(CPUINFO.replace(" avx512_bf16 amx_bf16", ""))) == ()
    assert native_bf16(cpu_flags("processor\t: 0\nFeatures\t: fp asimd bf16\n")) == ()  # ARM: no x86 flags line
    assert cpu_flags("") == frozenset()
    assert "emulated" in fake(native_bf16=()).describe() and "native: amx_bf16" in fake().describe()


def test_share_of_ceiling():
    c = fake()
    assert share_of_ceiling(50e9, 1.0, "fp32", c) == pytest.approx(0.5)
    assert share_of_ceiling(50e9, 0.5, torch.float32, c) == pytest.approx(1.0)
    assert share_of_ceiling(100e9, 1.0, torch.bfloat16, c) == pytest.approx(0.25)
    assert share_of_ceiling(100e9, 2.0, "bfloat16", c) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="float16"):
        share_of_ceiling(1e9, 1.0, torch.float16, c)


def test_cpu_rows_with_flops_get_their_share(monkeypatch):
    monkeypatch.setattr(row_log, "cpu_ceilings", lambda *a, **k: fake())
    rows = RowLog()
    fp32 = rows.add({"bench": "x", "device": "cpu", "backend": "b", "dtype": "float32", "tflop_per_s": 0.025})
    bf16 = rows.add({"bench": "x", "device": "cpu", "backend": "b", "dtype": "bfloat16", "tflop_per_s": 0.1})
    gpu = rows.add({"bench": "x", "device": "cuda", "backend": "b", "dtype": "bfloat16", "tflop_per_s": 500.0})
    fp16 = rows.add({"bench": "x", "device": "cpu", "backend": "b", "dtype": "float16", "tflop_per_s": 0.1})
    none = rows.add({"bench": "x", "device": "cpu", "backend": "b", "dtype": "float32", "tflop_per_s": None})
    assert fp32["ceiling_share"] == pytest.approx(0.25) and bf16["ceiling_share"] == pytest.approx(0.25)
    assert all("ceiling_share" not in r for r in (gpu, fp16, none))


def test_roofline_bench_rows(monkeypatch):
    spec = importlib.util.spec_from_file_location("roofline", Path(__file__).parents[2] / "bench" / "roofline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "QUICK", (SMALL["size"], SMALL["copy_mib"]))
    emitted = []
    rows = module.run("cpu", quick=True, emit=emitted.append)
    assert emitted == rows and [(r["case"], r["dtype"]) for r in rows] == [
        ("matmul", "float32"), ("matmul", "bfloat16"), ("copy", "float32")]
    c = cpu_ceilings(**SMALL)
    assert rows[0]["gflop_per_s"] == c.fp32_gflops and rows[1]["gflop_per_s"] == c.bf16_gflops
    assert rows[2]["gb_per_s"] == c.copy_gbps and all(r["median_ms"] > 0 and r["device"] == "cpu" for r in rows)
    assert set(module.TABLE_COLUMNS) <= set().union(*rows)
    assert dataclasses.asdict(c)["threads"] == rows[0]["threads"]
