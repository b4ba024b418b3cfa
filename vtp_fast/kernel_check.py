"""The ahead-of-time compile gate: every Triton kernel compiled for a GPU target, on a machine with or without one.

    vtp-fast kernels check [--arch 90,80] [--dtypes bfloat16,float32] [--ops attention,...] [--subset]
                           [--cuda] [--json rows.jsonl] [--markdown table.md]

Each case calls an op's real launchers (kernels/<op>.py) on `meta` tensors of a real training shape inside
`vtp_fast.kernels.offline(arch, sms)`, so the launchers pick tiles, warps, stages and splits exactly as they
would on that GPU and record their launches instead of running them. Each recorded launch is then compiled
through Triton's own `warmup` path (specialisation, heuristics, and for an autotuned kernel every configuration
that survives the kernel's `prune_configs_by`) against a `GPUTarget` for the arch, and the ptxas log of every
compiled kernel is parsed: registers, spill bytes, stack, shared memory, the MMA instructions used (wgmma on
sm_90, mma.sync, or none: FMA) and ptxas performance warnings (C7515: serialised wgmma).

A kernel fails the gate when it does not compile, uses more shared memory than the SM has (it would raise
OutOfResources at launch), spills more than `SPILL_LIMIT` bytes, or when an autotuned launch is left with no
configuration that fits. The CUDA sources (csrc/*.cu) get the same report from `nvcc -Xptxas -v` (`--cuda`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vtp_fast.kernels import SMEM_LIMIT

# SM count of the GPU each arch stands for (A100, A10/A40, L40, H100/H200).
SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132}
SPILL_LIMIT = 256  # bytes (stores + loads) a kernel may spill
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Row:
    """One compiled kernel configuration."""
    arch: int
    op: str
    case: str
    dtype: str
    kernel: str
    config: str
    status: str = "ok"  # ok | FAIL: <why> | not offered: <why>
    smem: int | None = None
    regs: int | None = None
    spill: int | None = None  # bytes stored + loaded
    stack: int | None = None
    mma: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.status.startswith("FAIL")


# ------------------------------------------------------------------------------------------------ cases
def _t(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _attention(b: int, h: int, side: int, d: int, rope: bool, varlen: bool) -> Callable[[torch.dtype], None]:
    """ViT attention over CLS + side^2 patch tokens (dense), or 2 global + 8 local multi-crop views (varlen)."""
    def case(dtype: torch.dtype) -> None:
        from vtp_fast.kernels import attention as k

        if varlen:
            lens = [side * side + 1] * (2 * b) + [37] * (8 * b)  # 16x16 global and 6x6 local views (+ CLS)
            total = sum(lens)
            q = _t(total, h, d, dtype=dtype)
            seq_len = _t(len(lens), dtype=torch.int32)
            args = dict(seq_start=seq_len, seq_len=seq_len, lmax=max(lens), causal=False, layout="varlen")
            rope_rows = total
        else:
            n = side * side + 1
            q = _t(b, h, n, d, dtype=dtype)
            seq_len = _t(b, dtype=torch.int32)
            args = dict(seq_start=seq_len, seq_len=seq_len, lmax=n, causal=False, layout="dense")
            rope_rows = n
        sin = cos = _t(rope_rows, d, dtype=dtype) if rope else None
        out, lse, qs, ks = k.forward(q, q, q, sin, cos, **args)
        k.backward(torch.empty_like(out), qs, ks, q, out, lse, sin, cos, **args)
    return case


def _clip(n: int, big_n: int, e: int) -> Callable[[torch.dtype], None]:
    def case(dtype: torch.dtype) -> None:
        from vtp_fast.kernels import clip_loss as k

        x, big = _t(n, e, dtype=dtype), _t(big_n, e, dtype=dtype)
        scale = _t(dtype=torch.float32)
        k.forward(x, x, big, big, scale, 0)
        norm = _t(2, 2, n, dtype=torch.float32)
        k.backward(x, x, big, big, scale, norm, scale, 0)
    return case


def _prototype_ce(n: int, protos: int, d: int) -> Callable[[torch.dtype], None]:
    def case(dtype: torch.dtype) -> None:
        from vtp_fast.kernels import prototype_ce as k

        x, w, c = _t(n, d, dtype=dtype), _t(protos, d, dtype=dtype), _t(protos, dtype=torch.float32)
        _, stats = k.forward(x, x, w, w, c, 0.1, 0.04)
        k.backward(_t(n, dtype=torch.float32), x, x, w, w, c, stats, 0.1, 0.04)
    return case


def _masked_gather(rows: int, m: int, d: int) -> Callable[[torch.dtype], None]:
    def case(dtype: torch.dtype) -> None:
        from vtp_fast.kernels import masked_gather as k

        x, index = _t(rows, d, dtype=dtype), _t(m, dtype=torch.int64)
        k.gather(x, index)
        k.scatter(_t(m, d, dtype=dtype), index, _t(d, dtype=dtype), rows)
    return case


def _pixel_shuffle_l1(b: int, side: int, p: int) -> Callable[[torch.dtype], None]:
    def case(dtype: torch.dtype) -> None:
        from vtp_fast.kernels import pixel_shuffle_l1 as k

        tokens = _t(b, side * side, 3 * p * p, dtype=dtype)
        target = _t(b, 3, side * p, side * p, dtype=torch.float32)
        k.shuffle(tokens, side, side, p)
        k.l1(tokens, target, p)
        k.l1_backward(_t(dtype=torch.float32), tokens, target, p, True, False)
    return case


# op -> [(case name, dtypes it accepts, case, in the CI subset)]; shapes are the training shapes of VTP-B/L at
# 256 px (257 tokens of 12/16 heads of 64), a 16k-gathered CLIP batch, a 65,536-prototype DINO head.
ALL_DTYPES = tuple(DTYPES)
CASES: dict[str, list[tuple[str, tuple[str, ...], Callable[[torch.dtype], None], bool]]] = {
    "attention": [
        ("B64 H12 N257 d64 rope", ALL_DTYPES, _attention(64, 12, 16, 64, rope=True, varlen=False), True),
        ("B64 H12 N257 d64", ALL_DTYPES, _attention(64, 12, 16, 64, rope=False, varlen=False), False),
        ("B32 H8 N257 d128 rope", ALL_DTYPES, _attention(32, 8, 16, 128, rope=True, varlen=False), True),
        ("multicrop B32 H16 d64 rope", ALL_DTYPES, _attention(32, 16, 16, 64, rope=True, varlen=True), False),
    ],
    "clip_loss": [
        ("n512 N16384 E768", ALL_DTYPES, _clip(512, 16384, 768), True),
        ("n256 N32768 E1024", ALL_DTYPES, _clip(256, 32768, 1024), False),
    ],
    "prototype_ce": [
        ("n4096 K65536 d256", ALL_DTYPES, _prototype_ce(4096, 65536, 256), True),
        ("n512 K65536 d256", ALL_DTYPES, _prototype_ce(512, 65536, 256), False),
    ],
    "masked_gather": [
        ("R65536 M3072 d1024", ALL_DTYPES, _masked_gather(256 * 256, 3072, 1024), True),
    ],
    "pixel_shuffle_l1": [
        ("B64 16x16 p16", ALL_DTYPES, _pixel_shuffle_l1(64, 16, 16), True),
    ],
}


# ------------------------------------------------------------------------------------------------ compiling
class _Target:
    """A stand-in Triton driver: compiles for GPUTarget("cuda", arch, 32) without a GPU (never launches)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")


@contextlib.contextmanager
def _compiling_for(arch: int, native: bool) -> Iterator[None]:
    """Triton compiles for `arch` (the real driver when `native`), into a fresh cache, printing ptxas logs."""
    from triton import knobs
    from triton.runtime import driver

    cache = tempfile.mkdtemp(prefix="vtp-kcheck-")
    saved = knobs.cache.dir, knobs.nvidia.dump_ptxas_log, driver._active  # _active: None until first use
    knobs.cache.dir, knobs.nvidia.dump_ptxas_log = cache, True
    if not native:
        driver.set_active(_Target(arch))
    try:
        yield
    finally:
        knobs.cache.dir, knobs.nvidia.dump_ptxas_log, driver._active = saved
        shutil.rmtree(cache, ignore_errors=True)


_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill": re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads"),
    "warning": re.compile(r"ptxas (?:warning|info)\s*:.*?\b(C\d{4})\b.*|ptxas warning\s*:\s*(.*)"),
}


def parse_ptxas(log: str) -> dict:
    """registers, spill bytes (stores + loads), stack bytes and warning codes from a `ptxas -v` log of one
    entry function."""
    regs = _PTXAS["regs"].search(log)
    stack = _PTXAS["stack"].search(log)
    spill = _PTXAS["spill"].search(log)
    warnings = []
    for m in _PTXAS["warning"].finditer(log):
        code = m.group(1) or m.group(2).strip()[:60]
        if code not in warnings:
            warnings.append(code)
    return {"regs": int(regs.group(1)) if regs else None, "stack": int(stack.group(1)) if stack else None,
            "spill": int(spill.group(1)) + int(spill.group(2)) if spill else None, "warnings": warnings}


def mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return "none"


def _jit_function(kernel):
    """The JITFunction under heuristics / autotune wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _kernel_name(kernel) -> str:
    return _jit_function(kernel).fn.__name__


def _config_text(meta: dict) -> str:
    keep = {k: v for k, v in meta.items() if k.isupper() and k.startswith("BLOCK")}
    keep.update({k: meta[k] for k in ("num_warps", "num_stages") if k in meta})
    return " ".join(f"{k.lower()}={v}" for k, v in keep.items())


def _compile_one(kernel, grid: tuple, args: tuple, meta: dict, arch: int, row: Row) -> Row:
    """Compile one launch configuration and fill in the row's resource figures and status."""
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = kernel.warmup(*args, grid=grid, **meta)
    except Exception as e:  # noqa: BLE001 - any compiler error is this row's result
        row.status = f"FAIL: compile: {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
        return row
    stats = parse_ptxas(log.getvalue())
    row.regs, row.stack, row.spill, row.warnings = stats["regs"], stats["stack"], stats["spill"], stats["warnings"]
    row.smem = compiled.metadata.shared
    if "num_warps" not in row.config:  # the compiler's defaults
        row.config += f" num_warps={compiled.metadata.num_warps} num_stages={compiled.metadata.num_stages}"
        row.config = row.config.strip()
    row.mma = mma_kind(compiled.asm.get("ptx", ""))
    limit = SMEM_LIMIT.get(arch)
    if limit is not None and row.smem > limit:
        row.status = f"FAIL: shared memory {row.smem} B > {limit} B"
    elif row.spill is not None and row.spill > SPILL_LIMIT:
        row.status = f"FAIL: spills {row.spill} B > {SPILL_LIMIT} B"
    return row


def _launch_rows(launch, arch: int, op: str, case: str, dtype: str) -> list[Row]:
    """Rows for one recorded launch: one per configuration an autotuner keeps after its own pruning."""
    from triton.runtime.autotuner import Autotuner

    kernel = launch.kernel
    name = _kernel_name(kernel)
    # a JITFunction caches compiled kernels per device index, not per target: each arch starts afresh, and
    # nothing compiled for a stand-in target stays behind for a real launch
    _jit_function(kernel).device_caches.clear()
    if not isinstance(kernel, Autotuner):
        row = Row(arch, op, case, dtype, name, _config_text(launch.meta))
        return [_compile_one(kernel, launch.grid, launch.args, launch.meta, arch, row)]
    # Autotuner.warmup's own steps, one configuration at a time so that each gets its own ptxas log
    kernel.nargs = dict(zip(kernel.arg_names, launch.args, strict=False))
    try:
        configs = kernel.prune_configs(dict(launch.meta))
    finally:
        kernel.nargs = None
    rows = []
    for config in configs:
        meta = {**launch.meta, **config.all_kwargs()}
        rows.append(_compile_one(kernel.fn, launch.grid, launch.args, meta, arch,
                                 Row(arch, op, case, dtype, name, _config_text(meta))))
    usable = [r for r in rows if not r.status.startswith("FAIL: shared memory")]
    if not usable:
        rows.append(Row(arch, op, case, dtype, name, "autotune", status="FAIL: no configuration fits"))
    else:  # a configuration over the SM's shared memory is dropped at launch: fine only if pruning removes it
        for r in rows:
            if r.status.startswith("FAIL: shared memory"):
                r.status += " (survives pruning)"
    return rows


def _check_case(arch: int, op: str, case_name: str, dtype: str, native: bool) -> list[Row]:
    """Rows of one (arch, op, case, dtype): the case's launches planned offline, each distinct one compiled."""
    from vtp_fast import kernels

    case = next(c for name, _, c, _ in CASES[op] if name == case_name)
    with _compiling_for(arch, native), kernels.offline(arch, SM_COUNT.get(arch, 132)) as plan:
        try:
            case(DTYPES[dtype])
        except NotImplementedError as e:  # the launcher does not offer this dtype on this arch
            return [Row(arch, op, case_name, dtype, "-", "-", status=f"not offered: {e}")]
        rows, seen = [], set()
        for launch in plan.launches:
            key = (_kernel_name(launch.kernel), _config_text(launch.meta),
                   tuple(str(a.dtype) for a in launch.args if isinstance(a, torch.Tensor)))
            if key not in seen:
                seen.add(key)
                rows += _launch_rows(launch, arch, op, case_name, dtype)
                _jit_function(launch.kernel).device_caches.clear()
    return rows


def check(archs: list[int], dtypes: list[str], ops: list[str] | None = None, subset: bool = False,
          native: bool = False, progress: Callable[[str], None] | None = None, jobs: int = 1) -> list[Row]:
    """Compile every case of `ops` (default: all) for each arch and dtype; one Row per kernel configuration.
    `jobs` > 1 compiles cases in that many forked processes (not with `native`: a CUDA context does not fork)."""
    units = [(arch, op, name, dtype, native) for arch in archs for op, cases in CASES.items()
             if not ops or op in ops for name, accepted, _, in_subset in cases if in_subset or not subset
             for dtype in dtypes if dtype in accepted]
    if jobs <= 1 or native or len(units) < 2:
        rows = []
        for unit in units:
            if progress:
                progress("sm_{} {} [{}] {}".format(*unit[:4]))
            rows += _check_case(*unit)
        return rows
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(_check_case, *unit) for unit in units]
        rows = []
        for unit, future in zip(units, futures, strict=True):
            rows += future.result()  # in the order of the units, whichever finishes first
            if progress:
                progress("sm_{} {} [{}] {}".format(*unit[:4]))
    return rows


# ------------------------------------------------------------------------------------------------ CUDA sources
def check_cuda(archs: list[int], root: Path | None = None) -> list[Row]:
    """`nvcc -Xptxas -v` over csrc/*.cu for each arch (sm_90 as 90a, as the native build compiles it); one Row
    per kernel instantiation. Rows carry status 'not offered' when no CUDA toolkit is found."""
    root = root or Path(__file__).resolve().parents[1]
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


# ------------------------------------------------------------------------------------------------ report
COLUMNS = ["arch", "op", "case", "dtype", "kernel", "config", "status", "smem", "regs", "spill", "stack", "mma",
           "warnings"]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        d = asdict(r)
        d["arch"] = f"sm_{r.arch}"
        d["smem"] = "" if r.smem is None else f"{r.smem / 1024:.1f} KB"
        d["warnings"] = ", ".join(r.warnings)
        lines.append("| " + " | ".join("" if d[c] is None else str(d[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def write_json(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(asdict(r)) + "\n")


def main(args) -> int:
    """`vtp-fast kernels check`: print the table, write it where asked, exit 1 on any failure."""
    import sys

    import torch.cuda

    if args.arch == "native":
        if not torch.cuda.is_available():
            raise ValueError("--arch native needs a visible GPU; name the archs instead, e.g. --arch 90,80")
        major, minor = torch.cuda.get_device_capability()
        archs, native = [10 * major + minor], True
    else:
        archs, native = [int(a) for a in args.arch.split(",")], False
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"--dtypes: unknown {unknown}; choices: {', '.join(DTYPES)}")
    ops = args.ops.split(",") if args.ops else None
    if ops and set(ops) - set(CASES) - {"csrc"}:
        raise ValueError(f"--ops: unknown {sorted(set(ops) - set(CASES) - {'csrc'})}; choices: "
                         f"{', '.join(CASES)}, csrc")
    progress = (lambda m: print(f"  compiling {m}", file=sys.stderr, flush=True)) if args.verbose else None
    rows = check(archs, dtypes, [o for o in ops if o != "csrc"] if ops else None, subset=args.subset,
                 native=native, progress=progress, jobs=args.jobs) if ops != ["csrc"] else []
    if args.cuda:
        rows += check_cuda(archs)
    text = table(rows)
    failed = [r for r in rows if r.failed]
    summary = (f"{len(rows)} kernel configurations on {', '.join(f'sm_{a}' for a in archs)}: "
               f"{len(failed)} failed (limits: spills <= {SPILL_LIMIT} B, shared memory per arch "
               f"{', '.join(f'sm_{a} {SMEM_LIMIT[a] // 1024} KB' for a in archs if a in SMEM_LIMIT)})")
    print(text)
    print(summary)
    if args.markdown:
        from vtp_fast.benchmark import env_info

        env = env_info("cpu")
        where = (f"`vtp-fast kernels check {' '.join(sys.argv[3:])}`".replace("  ", " ") + f": Triton {env['triton']}, "
                 f"torch {env['torch']}, git {env['git']}, {env['date']}; "
                 + ("compiled by the GPU's driver" if native else "compiled offline for GPUTarget(cuda, arch)"))
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(f"{where}\n\n{text}\n\n{summary}\n")
    if args.json:
        write_json(rows, Path(args.json))
    for r in failed:
        print(f"FAIL sm_{r.arch} {r.op} [{r.case}] {r.dtype} {r.kernel} {r.config}: {r.status}", file=sys.stderr)
    return 1 if failed else 0
