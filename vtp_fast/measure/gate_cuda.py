"""The compile gate for the CUDA sources (vtp_fast.measure.gate): `nvcc -Xptxas -v` over csrc/*.cu, one Row per
kernel instantiation and arch."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from vtp_fast.measure.gate_rows import SPILL_LIMIT, Row, parse_ptxas


def check_cuda(archs: list[int], root: Path | None = None) -> list[Row]:
    """`nvcc -Xptxas -v` over csrc/*.cu for each arch (sm_90 as 90a, as the native build compiles it); one Row
    per kernel instantiation. Rows carry status 'not offered' when no CUDA toolkit is found."""
    root = root or Path(__file__).resolve().parents[2]
    sources = sorted((root / "csrc").glob("*.cu"))
    nvcc = _nvcc()
    if nvcc is None:
        return [Row(a, "csrc", s.name, "-", "-", "-", status="not offered: no nvcc") for a in archs for s in sources]
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in [root / "csrc", *cpp_extension.include_paths()]]
    gencode = []
    for a in archs:
        code = f"{a}a" if a == 90 else str(a)
        gencode += ["-gencode", f"arch=compute_{code},code=sm_{code}"]
    rows = []
    for src in sources:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [nvcc, "-c", str(src), "-o", f"{tmp}/out.o", "-std=c++20", "-O3", "--expt-relaxed-constexpr",
                   "-Xptxas", "-v", "-DVTP_FAST_WITH_CUDA=1",
                   f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *gencode, *includes]
            r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            rows += [Row(a, "csrc", src.name, "-", "-", "-", status=f"FAIL: nvcc: {r.stderr.strip()[-160:]}")
                     for a in archs]
            continue
        rows += parse_nvcc_log(r.stderr + r.stdout, src.name)
    return rows


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)a?'")


def parse_nvcc_log(log: str, source: str) -> list[Row]:
    """Split an `nvcc -Xptxas -v` log into one Row per (entry function, arch)."""
    rows = []
    parts = _ENTRY.split(log)  # [before, name, arch, body, name, arch, body, ...]
    for i in range(1, len(parts) - 2, 3):
        mangled, arch, body = parts[i], int(parts[i + 1]), parts[i + 2]
        stats = parse_ptxas(body)
        smem = re.search(r"(\d+) bytes smem", body)
        row = Row(arch, "csrc", source, "-", mangled, "-", smem=int(smem.group(1)) if smem else 0,
                  regs=stats["regs"], spill=stats["spill"], stack=stats["stack"], mma="none",
                  warnings=stats["warnings"])
        if row.spill is not None and row.spill > SPILL_LIMIT:
            row.status = f"FAIL: spills {row.spill} B > {SPILL_LIMIT} B"
        rows.append(row)
    for row, name in zip(rows, _short_names([r.kernel for r in rows]), strict=True):
        row.kernel = name
    return rows


def _short_names(mangled: list[str]) -> list[str]:
    """Kernel names with their template arguments (c++filt), e.g. 'l1_partial_kernel<c10::BFloat16, 8>'; the
    mangled names when c++filt is missing."""
    tool = shutil.which("c++filt")
    if tool is None or not mangled:
        return mangled
    out = subprocess.run([tool], input="\n".join(mangled), capture_output=True, text=True).stdout.splitlines()
    if len(out) != len(mangled):
        return mangled
    names = []
    for full, raw in zip(out, mangled, strict=True):
        m = re.search(r"(\w+)(<[^()]*>)?\(", full)  # the function name (and template arguments) before its parameters
        names.append(m.group(1) + (m.group(2) or "") if m else raw)
    return names

