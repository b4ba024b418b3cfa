"""The ahead-of-time compile gate (vtp_fast/measure/gate*.py): it compiles for sm_90 / sm_80 without a GPU, reads
ptxas' figures, fails what would fail or crawl on a GPU, and the CI subset of the real kernels passes it."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
import torch  # noqa: E402
import triton.language as tl  # noqa: E402

from vtp_fast import kernels  # noqa: E402
from vtp_fast.measure.gate_cuda import parse_nvcc_log  # noqa: E402
from vtp_fast.measure.gate_rows import mma_kind, parse_ptxas  # noqa: E402
from vtp_fast.measure.gate_triton import _launch_rows, check  # noqa: E402

ROOT = Path(__file__).parents[2]


@triton.jit
def _square_dot(a_ptr, out_ptr, K, BLOCK: tl.constexpr, PRECISION: tl.constexpr = "tf32"):
    """out = A[:, :K] @ A[:, :K]^T for one (BLOCK, K) tile of A, streamed over K (pipelined by num_stages)."""
    rows = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        a = tl.load(a_ptr + rows[:, None] * K + cols[None, :])
        b = tl.load(a_ptr + rows[None, :] * K + cols[:, None])
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(out_ptr + rows[:, None] * BLOCK + rows[None, :], acc)


def _rows(block: int, stages: int, arch: int, dtype=torch.bfloat16):
    with kernels.offline(arch, 132) as plan:
        a = torch.empty(block, 4096, dtype=dtype, device="meta")
        out = torch.empty(block, block, dtype=torch.float32, device="meta")
        kernels.launch(_square_dot, (1,), a, out, 4096, BLOCK=block, num_warps=8, num_stages=stages)
    assert len(plan.launches) == 1 and plan.launches[0].grid == (1,)  # recorded, not run
    return _launch_rows(plan.launches[0], arch, "test", "square", str(dtype))


def test_a_small_tile_compiles_clean_with_the_arch_mma():
    from vtp_fast.measure.gate_triton import _compiling_for

    for arch, mma in ((90, "wgmma"), (80, "mma")):
        with _compiling_for(arch, native=False):
            (row,) = _rows(64, 2, arch)
        assert row.status == "ok", row
        assert row.mma == mma and 0 < row.regs <= 255 and row.spill == 0 and 0 < row.smem <= kernels.SMEM_LIMIT[arch]


def test_shared_memory_over_the_sm_limit_fails():
    """256 x 256 bf16 tiles of A and B, 4 stages deep: 4 * 2 * 128 KB, far over either SM."""
    from vtp_fast.measure.gate_triton import _compiling_for

    with _compiling_for(80, native=False):
        (row,) = _rows(256, 4, 80)
    assert row.failed and "shared memory" in row.status and row.smem > kernels.SMEM_LIMIT[80]


def test_fp32_ieee_dot_uses_no_tensor_cores_and_big_tiles_spill():
    """An fp32 dot in ieee precision runs on the FMA units with its operands in registers: with a 128 x 128 fp32
    accumulator over 4 warps (128 values a thread) ptxas must spill, and the gate fails it."""
    from vtp_fast.measure.gate_triton import _compiling_for

    with _compiling_for(90, native=False):
        with kernels.offline(90, 132) as plan:
            a = torch.empty(128, 4096, dtype=torch.float32, device="meta")
            out = torch.empty(128, 128, dtype=torch.float32, device="meta")
            kernels.launch(_square_dot, (1,), a, out, 4096, BLOCK=128, PRECISION="ieee", num_warps=4, num_stages=1)
        (row,) = _launch_rows(plan.launches[0], 90, "test", "square", "float32")
    assert row.mma == "none" and row.smem <= kernels.SMEM_LIMIT[90]
    assert row.spill > 256 and row.failed and "spills" in row.status


def test_parse_ptxas_log():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    48 bytes stack frame, 120 bytes spill stores, 96 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]\n"
           "ptxas warning : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized "
           "due to the presence of Extern calls in the function 'k'.\n")
    assert parse_ptxas(log) == {"regs": 255, "stack": 48, "spill": 216, "warnings": ["C7515"]}
    assert mma_kind("wgmma.mma_async.sync.aligned.m64n64k16") == "wgmma"
    assert mma_kind("mma.sync.aligned.m16n8k16.row.col.f32.bf16") == "mma" and mma_kind("fma.rn.f32") == "none"


def test_parse_nvcc_log_one_row_per_kernel_and_arch():
    log = ("ptxas info    : Compiling entry function "
           "'_ZN8vtp_fast12_GLOBAL__N_118gather_rows_kernelI6float4EEvPKT_PS3_' for 'sm_80'\n"
           "ptxas info    : Function properties for x\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 20 registers, used 0 barriers, 380 bytes cmem[0]\n"
           "ptxas info    : Compiling entry function '_ZN8vtp_fast12_GLOBAL__N_116l1_partial_kernelIfEEvPKT_' for "
           "'sm_90a'\nptxas info    : Function properties for y\n"
           "    0 bytes stack frame, 400 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 64 registers, used 1 barriers, 128 bytes smem, 380 bytes cmem[0]\n")
    first, second = parse_nvcc_log(log, "x.cu")
    assert (first.arch, first.regs, first.spill, first.status) == (80, 20, 0, "ok")
    assert first.kernel == "gather_rows_kernel<float4>" or first.kernel.startswith("_ZN")  # without c++filt
    assert (second.arch, second.regs, second.smem) == (90, 64, 128)
    assert second.failed


def test_every_launch_goes_through_the_convention():
    """Launchers start kernels only through vtp_fast.kernels.launch and choose configurations by gpu_arch, so the
    gate sees exactly what a GPU gets."""
    for path in sorted((ROOT / "kernels").glob("*.py")):
        if path.name == "__init__.py":
            continue
        text = path.read_text()
        assert not re.search(r"\]\s*\[\s*grid\s*\]|\w\[\s*\(?\s*grid|\w\[\(triton\.cdiv", text), path
        assert ".is_cuda" not in text and 'type == "cuda"' not in text, path


def test_gate_covers_every_triton_kernel():
    """Every @triton.jit kernel that a launcher starts appears in the CI subset's rows on both archs."""
    rows = check([90, 80], ["bfloat16"], subset=True)
    failed = [r for r in rows if r.failed]
    assert not failed, "\n".join(f"sm_{r.arch} {r.op} {r.kernel} {r.config}: {r.status}" for r in failed)
    launched = {(r.arch, r.kernel) for r in rows}
    entries = []  # @triton.jit functions that a launcher starts (directly or through heuristics / autotune)
    for path in sorted((ROOT / "kernels").glob("*.py")):
        text = path.read_text()
        entries += [name for name in re.findall(r"@triton\.jit[^\n]*\ndef (\w+)\(", text)
                    if re.search(rf"launch\(\s*{name}\b|\({name}\)", text)]
    assert len(entries) >= 10, entries
    missing = [(arch, name) for name in entries for arch in (90, 80) if (arch, name) not in launched]
    assert not missing, f"kernels never compiled by the gate: {missing}"
    assert all(r.regs and r.regs <= 255 for r in rows if r.status == "ok")


def test_cli_subset_fp32_exits_zero():
    """The CI subset in fp32 (bf16 is compiled above); the full matrix is `make check-kernels`."""
    r = subprocess.run([sys.executable, "-m", "vtp_fast.cli", "kernels", "check", "--subset", "--dtypes", "float32"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"\d+ kernel configurations on sm_90, sm_80: 0 failed", r.stdout)
