"""The performance model (vtp_fast/measure/perf_*.py): FLOP and byte counts against hand computations, the bound and
its kind, the kernels' declared work (and the fallback without one), and `vtp-fast bench --model`."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from vtp_fast.cli import main
from vtp_fast.measure import perf_model as pm
from vtp_fast.measure.perf_estimate import estimate, model_rows
from vtp_fast.measure.perf_report import estimate_bench_row, latest_results

# The model with the kernels' work as DEFAULT_WORK states it, whatever kernels/*.py declare at the moment.
DEFAULT = {op: pm.DEFAULT_WORK[op] for op in pm.OPS}


def est(op, shape_name, pass_, **kw):
    return estimate(op, pm.SHAPES[op][shape_name], pass_, work=DEFAULT[op], shape_name=shape_name, **kw)


def test_attention_counts_by_hand():
    # ViT-L, 64 images: 1024 (sequence, head) pairs of 257 tokens, d = 64
    fwd = est("attention", "vit_l b64", "fwd")
    assert fwd["gflop"] * 1e9 == pytest.approx(17_314_349_056)  # 4 * 257^2 * 64 = 16,908,544 per head
    assert fwd["mb"] * 1e6 == pytest.approx(135_794_688)  # (q, k, v, out: 131,584 B + lse 1,028 B) per head
    assert fwd["bound_us"] == pytest.approx(135_794_688 / 4.3e12 * 1e6)
    bwd = est("attention", "vit_l b64", "bwd")
    assert bwd["gflop"] == pytest.approx(2.5 * fwd["gflop"])  # FlashAttention-2: 5 GEMM units against 2
    assert (bwd["gemms_min"], bwd["gemms_kernel"]) == (5, 7)
    # 64-wide tiles pad 257 tokens to 320: 1 - 257^2 / 320^2 of the MMA work is padding
    assert fwd["padding"] == pytest.approx(0.35499, abs=1e-4)
    assert bwd["kernel_gflop"] * 1e9 == pytest.approx(7 * 2 * 320**2 * 64 * 1024)
    # forward RoPE: each of 5 query-block programs rotates its q block and all 5 k tiles: 1920 rows against 514
    assert "x3.7" in fwd["note"]


def test_attention_multicrop_sums_views_and_pads_local_crops():
    mc = est("attention", "multicrop vit_b b64", "fwd")
    heads = 12
    useful = 128 * heads * 257**2 + 512 * heads * 37**2
    assert mc["gflop"] * 1e9 == pytest.approx(4 * 64 * useful)
    padded = 128 * heads * 320**2 + 512 * heads * 64**2  # a 37-token view still fills one 64 x 64 tile
    assert mc["padding"] == pytest.approx(1 - useful / padded)


def test_clip_loss_counts_by_hand():
    fwd = est("clip_loss", "n128 N32k E768", "fwd")
    assert fwd["gflop"] * 1e9 == pytest.approx(12_884_901_888)  # 2 directions x 2 * 128 * 32768 * 768
    assert fwd["mb"] * 1e6 == pytest.approx(101_056_512)  # image, text, all_image, all_text read once
    bwd = est("clip_loss", "n128 N32k E768", "bwd")
    assert bwd["gflop"] == pytest.approx(3 * fwd["gflop"])  # rebuild the logits once, dq, dk
    # rows and cols kernels each rebuild u once per 256-wide E chunk: 2 * (chunks + 1) units per direction
    assert (bwd["gemms_min"], bwd["gemms_kernel"]) == (3, 8)
    assert est("clip_loss", "n64 N16k E512", "bwd")["gemms_kernel"] == 6
    assert est("clip_loss", "n512 N32k E1024", "bwd")["gemms_kernel"] == 10
    # n = 64 rows in the forward's 128-row tile: half of its MMA work is padding
    assert est("clip_loss", "n64 N16k E512", "fwd")["padding"] == pytest.approx(0.5)


def test_prototype_ce_counts_by_hand():
    fwd = est("prototype_ce", "ibot n4096", "fwd")
    assert fwd["gflop"] * 1e9 == pytest.approx(274_877_906_944)  # student + teacher: 2 x 2 * 4096 * 65536 * 256
    bwd = est("prototype_ce", "ibot n4096", "bwd")
    assert bwd["gflop"] * 1e9 == pytest.approx(549_755_813_888)  # both logits rebuilt once, dx, dw
    assert bwd["kernel_gflop"] * 1e9 == pytest.approx(824_633_720_832)  # grad_student and grad_weight: 3 each
    assert bwd["bound_us"] == pytest.approx(549_755_813_888 / 790e12 * 1e6)


def test_memory_ops_bytes_by_hand():
    gather = est("masked_gather", "vit_b M4096", "fwd")
    assert gather["gflop"] == 0
    assert gather["mb"] * 1e6 == 12_615_680  # 4096 rows of 768 bf16 read + written, 4096 int64 indices
    scatter = est("masked_gather", "vit_b M4096", "bwd")
    assert scatter["mb"] * 1e6 == (4096 + 32768) * 768 * 2 + 8 * 4096  # read M rows, write all R rows
    l1 = est("pixel_shuffle_l1", "b64 fp32 target", "fwd")
    assert l1["mb"] * 1e6 == 64 * 196_608 * (2 + 4)  # bf16 tokens + fp32 target, 196,608 values per image
    l1_bwd = est("pixel_shuffle_l1", "b64 fp32 target", "bwd")
    assert l1_bwd["mb"] * 1e6 == 64 * 196_608 * (2 + 4 + 2)  # and the tokens' gradient written


def test_bound_kinds():
    # masked_gather and the pixel loss move bytes only
    for op in ("masked_gather", "pixel_shuffle_l1"):
        assert {r["bound"] for r in model_rows() if r["op"] == op} == {"memory"}
    # attention's arithmetic intensity is about N / 2 FLOP per byte forward, 0.625 N backward: below the ridge
    # 790e12 / 4.3e12 = 184 at N = 257 (memory-bound), above it from N ~ 370 (compute-bound)
    assert est("attention", "vit_b b256", "fwd")["bound"] == "memory"
    assert est("attention", "vit_b b256", "bwd")["bound"] == "memory"
    long = {"seqs": ((16, 1025),), "h": 16, "d": 64, "rope": True}
    assert estimate("attention", long, "fwd", work=DEFAULT["attention"])["bound"] == "compute"
    assert estimate("attention", long, "bwd", work=DEFAULT["attention"])["bound"] == "compute"
    # clip_loss intensity is ~n FLOP per byte forward: 128 rows against 32k are memory-bound, 512 compute-bound
    assert est("clip_loss", "n128 N32k E768", "fwd")["bound"] == "memory"
    assert est("clip_loss", "n512 N16k E768", "fwd")["bound"] == "compute"
    assert est("prototype_ce", "ibot n4096", "fwd")["bound"] == "compute"


def test_expected_fractions_are_consistent():
    rows = model_rows(pm.PASSES + ("fwd+bwd",))
    assert {(r["op"], r["pass"]) for r in rows} >= {(op, p) for op in pm.OPS for p in pm.PASSES}
    for r in rows:
        assert r["model_us"] == pytest.approx(r["bound_us"] / r["expected"])
        # a kernel never beats a minimal-work kernel, which never beats the bound
        assert 0 < r["expected"] <= r["expected_min"] + 1e-12 <= 1 + 1e-12, r
    # today's attention backward (7 units, padding, RoPE per tile, fp32 delta in PyTorch) is far below minimal work
    bwd = est("attention", "vit_b b256", "bwd")
    assert bwd["expected"] < 0.5 * bwd["expected_min"]


def test_declared_work_replaces_the_default_key_by_key():
    fixed = pm.merge_work("attention", {"bwd": {"gemms": 5, "rope": "once", "passes": 1, "glue_bytes": 4}})
    assert fixed["fwd"] == pm.DEFAULT_WORK["attention"]["fwd"]
    assert fixed["bwd"]["tile"] == (64, 64) and fixed["bwd"]["gemms"] == 5
    shape = pm.SHAPES["attention"]["vit_b b256"]
    today = estimate("attention", shape, "bwd", work=DEFAULT["attention"])
    better = estimate("attention", shape, "bwd", work={"bwd": {"gemms": 5, "rope": "once", "passes": 1,
                                                               "glue_bytes": 4}})
    assert better["gemms_kernel"] == 5 and better["note"] == ""
    assert better["gflop"] == today["gflop"] and better["model_us"] < today["model_us"]
    clip = estimate("clip_loss", pm.SHAPES["clip_loss"]["n128 N32k E768"], "bwd",
                    work={"bwd": {"gemms": 3, "recomputes": 1, "block_d": 0}})
    assert clip["gemms_kernel"] == 3
    for bad in ({"bwd": {"gemms": -1}}, {"bwd": {"tile": (64,)}}, {"bwd": {"rope": "sometimes"}}, {"back": {}}):
        with pytest.raises(ValueError):
            pm.merge_work("attention", bad)


def test_kernel_modules_work_is_read_or_defaulted(monkeypatch):
    pm.kernel_work.cache_clear()
    try:
        for op in pm.OPS:  # whatever kernels/*.py declare must be well formed
            work, source = pm.kernel_work(op)
            assert set(work) == set(pm.PASSES) and ("WORK" in source or source.startswith("default"))
        pm.kernel_work.cache_clear()
        modules = {"vtp_fast.kernels.attention": SimpleNamespace(WORK={"fwd": {"gemms": 3}}),
                   "vtp_fast.kernels.clip_loss": SimpleNamespace()}
        monkeypatch.setattr(pm.optional, "package_dir", lambda name: Path("/site-packages") / name)  # "installed"
        monkeypatch.setattr(pm.importlib, "import_module", lambda name: modules[name])
        work, source = pm.kernel_work("attention")
        assert work["fwd"]["gemms"] == 3 and work["bwd"] == pm.DEFAULT_WORK["attention"]["bwd"]
        assert source == "kernels/attention.py WORK"
        work, source = pm.kernel_work("clip_loss")  # no WORK attribute: the default counts
        assert work == pm.merge_work("clip_loss", None) and "no WORK" in source
        work, source = pm.kernel_work("prototype_ce")  # import fails: the default, with the reason
        assert source.startswith("default (import failed")
    finally:
        pm.kernel_work.cache_clear()


def _row(bench, **kw):
    return {"bench": bench, "backend": "triton", "dtype": "bfloat16", **kw}


def test_bench_rows_map_to_the_model():
    r = estimate_bench_row(_row("attention", case="rope", **{"pass": "fwd+bwd"}, shape=[64, 16, 257, 64],
                                median_ms=2.0))
    model = estimate("attention", pm.SHAPES["attention"]["vit_l b64"], "fwd+bwd")
    assert r["bound_us"] == pytest.approx(model["bound_us"])
    assert r["achieved"] == pytest.approx(model["bound_us"] / 2000)
    views = [[64, 16, 257, 64], [256, 16, 37, 64]]
    packed = estimate_bench_row({**_row("attention", case="multicrop", shape=views, median_ms=1.0),
                                 "pass": "fwd", "backend": "triton (packed varlen)"})
    per_view = estimate_bench_row({**_row("attention", case="multicrop", shape=views, median_ms=1.0),
                                   "pass": "fwd", "backend": "triton (per view)"})
    assert packed["bound_us"] == pytest.approx(per_view["bound_us"])
    assert per_view["launches"] == 2 * packed["launches"]
    scatter = estimate_bench_row(_row("masked_gather", op="scatter", shape=[256, 256, 768], masked=26000,
                                      median_ms=0.1))
    assert scatter["mb"] * 1e6 == pytest.approx((26000 + 65536) * 768 * 2 + 8 * 26000)
    # other backends, fp32 matmul ops and unreadable rows are not modelled
    assert estimate_bench_row({**_row("clip_loss", op="fwd", shape=[128, 32768, 768], median_ms=1.0),
                               "backend": "compiled_reference"}) is None
    assert estimate_bench_row(_row("clip_loss", op="fwd", shape=[128, 32768, 768], median_ms=1.0,
                                   dtype="float32")) is None
    assert estimate_bench_row(_row("clip_loss", op="fwd", shape=[128], median_ms=1.0)) is None


def test_latest_results(tmp_path):
    assert latest_results(tmp_path / "missing") is None
    (tmp_path / "2026-12-01.jsonl").write_text("")
    (tmp_path / "2026-12-09").mkdir()
    (tmp_path / "2026-12-09" / "rows.jsonl").write_text("")
    assert latest_results(tmp_path) == tmp_path / "2026-12-09" / "rows.jsonl"


def test_cli_prints_the_model_beside_measured_rows(tmp_path, capsys):
    rows = [_row("prototype_ce", op="fwd", shape=[4096, 65536, 256], median_ms=1.0),
            {**_row("prototype_ce", op="fwd", shape=[4096, 65536, 256], median_ms=9.0), "backend": "reference"},
            _row("pixel_shuffle_l1", op="l1_fwd", shape=[64, 16, 16, 16], target_dtype="float32", median_ms=0.05)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"cut short")
    assert main(["bench", "--model", "--report", str(path)]) == 0
    out = capsys.readouterr().out
    for op in pm.OPS:
        assert f"| {op} |" in out
    # the measured prototype_ce forward: bound 274.9 GFLOP / 790 TFLOP/s = 348 us against 1 ms: 35%
    line = next(x for x in out.splitlines() if x.startswith("| prototype_ce | ibot n4096 | fwd |"))
    assert line.endswith("| 1 | 35% |")
    assert "## Measured (backend triton)" in out
    measured = [x for x in out.split("## Measured")[1].splitlines() if x.startswith("| prototype_ce")]
    assert len(measured) == 1 and "| 35% |" in measured[0]  # the reference row is not the kernel's
    l1 = next(x for x in out.splitlines() if x.startswith("| pixel_shuffle_l1 | b64 fp32 target | fwd |"))
    assert l1.endswith(f"| 0.05 | {100 * 75_497_472 / 4.3e12 / 50e-6:.0f}% |")


def test_cli_model_without_measured_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("vtp_fast.cli.tools.bench_dir", lambda: tmp_path)
    assert main(["bench", "--model"]) == 0
    out = capsys.readouterr().out
    assert all(f"| {op} |" in out for op in pm.OPS) and "No measured rows" in out
