"""The compile gate for the Triton kernels (vtp_fast.measure.gate): each case's launches planned offline, each
distinct launch compiled through Triton's own `warmup` path against a GPUTarget for the arch (every autotune
configuration that survives pruning), each compiled kernel's ptxas log read into a Row."""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from collections.abc import Callable, Iterator

import torch

from vtp_fast.kernels import SMEM_LIMIT
from vtp_fast.measure.gate_cases import CASES, DTYPES
from vtp_fast.measure.gate_rows import SM_COUNT, SPILL_LIMIT, Row, mma_kind, parse_ptxas


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

