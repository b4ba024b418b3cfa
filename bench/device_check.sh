#!/usr/bin/env bash
# The one prepared GPU run (../shared/GPU.md), built to bring back data whatever happens.
#
#   via the device tool:  VTP_FAST_GIT_REV=<rev> bash bench/device_check.sh
#                         (OUT is set by the tool; timeout_s 540: budget 480 + kill grace; carry: see --carry)
#   by hand:              OUT=bench/results/h200/$(date +%F) bash bench/device_check.sh
#   on a CPU (CI):        bash bench/device_check.sh --dry-run    (every stage's code path, tiny shapes)
#   what to carry:        bash bench/device_check.sh --carry      (git-ignored paths the run needs, one a line)
#   the stages and caps:  bash bench/device_check.sh --plan [--dry-run]
#
# Stages, cheap and most informative first, each with its own cap (the caps add up to less than $BUDGET) and
# capped again by what is left, so one slow stage cannot eat the rest; a failed stage never stops the run:
#   environment, build (pip -e, else CMake + PYTHONPATH), kernels check on this GPU, pytest -m cuda, parity,
#   op benchmarks (one stage per op), whole step, tokenizer, DiT, data pipeline, per-objective profile, report.
# Every benchmark appends its rows to rows.jsonl as each shape finishes: a stage stopped at its cap keeps them.
#
# Output ($OUT, at most 8 files, no folders; the device tool returns at most 8, two folders deep):
#   rows.jsonl          every benchmark row (device, backend, versions, git revision in each)
#   device_check.log    everything every command printed
#   report.md           stage table (status, seconds, rows), the rows as a table, the profile
#   info.txt            machine, versions, build path taken, `vtp-fast info`
#   kernels_check.txt   `vtp-fast kernels check` on this GPU
#   pytest-cuda.xml     `pytest -m cuda` (JUnit)
#   profile.json        per-objective phase times of one training step
#   attention.png       attention fwd+bwd TFLOP/s per backend against sequence length (from rows.jsonl)
#
# Environment: OUT, BUDGET (seconds, default 480; the device tool kills a command at 600 at most),
#   PYTHON (default python3), VTP_FAST_BUILD=auto|pip|cmake (auto: pip -e when setuptools can read
#   pyproject.toml, else CMake), VTP_FAST_CUDA_ARCHS (default 90a), VTP_FAST_GIT_REV (the revision recorded
#   in every row; the device tool's copy of the tree has no .git).
set -uo pipefail
{  # the whole script is read before it runs: editing this file during a run cannot change that run

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
CARRY=(wheelhouse)  # git-ignored paths the run uses when present (make wheelhouse): pass them as the tool's carry

# The stages, in order: name | function and arguments | cap (seconds) on the GPU | cap in the dry run.
# Each cap is also cut to what is left of the budget; the last stage's cap is kept back for it throughout.
PLAN=(
  "environment|environment|20|30"
  "build|build|95|45"
  "kernels check|kernels_check|40|40"
  "pytest -m cuda|pytest_cuda|50|30"
  "parity (fp32, bf16 vs the reference outputs)|bench parity|15|30"
  "op attention|bench_op attention|30|40"
  "op clip_loss|bench_op clip_loss|17|30"
  "op prototype_ce|bench_op prototype_ce|17|30"
  "op masked_gather|bench_op masked_gather|17|30"
  "op pixel_shuffle_l1|bench_op pixel_shuffle_l1|17|30"
  "whole step, eager vs compiled|bench step|45|60"
  "tokenizer encode + decode|bench tokenizer|15|30"
  "DiT step, eager vs compiled|bench dit|30|40"
  "data pipeline|bench data|20|40"
  "per-objective profile|profile|25|45"
  "report|report|10|20"
)

DRY=0 PLAN_ONLY=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --plan) PLAN_ONLY=1 ;;
    --carry) printf '%s\n' "${CARRY[@]}"; exit 0 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--dry-run] [--plan] | --carry | --help" >&2; exit 2 ;;
  esac
done

PY=$(command -v "${PYTHON:-python3}" || echo "${PYTHON:-python3}")
case $PY in /*) ;; */*) PY=$ROOT/$PY ;; esac  # PYTHON=.venv/bin/python3 works from anywhere
PYBIN=$(dirname "$PY")
[ -x "$PYBIN/cmake" ] && export PATH="$PYBIN:$PATH"  # that Python's own build tools (pip's cmake, ninja) first
if [ "$DRY" = 1 ]; then
  OUT=${OUT:-runs/device_check_dry_run}
  BUDGET=${BUDGET:-600}
  DEV=cpu
  # tiny shapes (--quick), each measurement run once, torch.compile through dynamo + AOT autograd without
  # Inductor's code generation, Triton backends through the interpreter: the code paths, not the numbers
  export VTP_FAST_BENCH_TINY=1 TORCH_COMPILE_OVERRIDE_BACKENDS=">=0:aot_eager"
  SIZE=(--quick)
else
  OUT=${OUT:-runs/device_check}
  BUDGET=${BUDGET:-480}
  DEV=cuda
  SIZE=()
fi
NAMES=() CALLS=() CAPS=()
for line in "${PLAN[@]}"; do
  IFS='|' read -r name call gpu_cap dry_cap <<<"$line"
  NAMES+=("$name") CALLS+=("$call") CAPS+=("$([ "$DRY" = 1 ] && echo "$dry_cap" || echo "$gpu_cap")")
done
RESERVE=${CAPS[-1]}  # seconds kept for the report
CAP_SUM=0; for c in "${CAPS[@]}"; do CAP_SUM=$((CAP_SUM + c)); done
if [ "$PLAN_ONLY" = 1 ]; then
  echo "budget ${BUDGET}s, stage caps add up to ${CAP_SUM}s"
  for i in "${!NAMES[@]}"; do printf '%4ss  %s\n' "${CAPS[i]}" "${NAMES[i]}"; done
  [ "$CAP_SUM" -lt "$BUDGET" ]; exit
fi

mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
ROWS=$OUT/rows.jsonl LOG=$OUT/device_check.log REPORT=$OUT/report.md INFO=$OUT/info.txt
FILES=(rows.jsonl device_check.log report.md info.txt kernels_check.txt pytest-cuda.xml profile.json attention.png)
for f in "${FILES[@]}"; do rm -f "${OUT:?}/$f"; done  # a rerun into the same folder starts clean
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vtp_fast_device_check.XXXXXX") || exit 1
trap 'rm -rf "$WORK"' EXIT

# Console (the device tool's output) on fd 3; everything else goes to the log.
exec 3>&1
exec >>"$LOG" 2>&1
say() { printf '%s\n' "$*"; printf '%s\n' "$*" >&3; }
T0=$SECONDS
STAGE_END=0
SUMMARY=()  # "| stage | status | seconds | rows |" lines

rows_now() { if [ -f "$ROWS" ]; then wc -l <"$ROWS"; else echo 0; fi; }

# run CMD...: run CMD until the current stage's deadline; its output goes to the log (and to the file $TO when
# set), its last $TAIL lines to the console.
run() {
  local left=$((STAGE_END - SECONDS)) from rc
  if [ "$left" -lt 3 ]; then say "  (no time left in this stage for: $*)"; return 124; fi
  from=$(stat -c %s "$LOG")
  echo "\$ $(tr '\n' ' ' <<<"$*")[at most ${left}s]"
  if [ -n "${TO:-}" ]; then
    timeout -k 5 "$left" "$@" 2>&1 | tee -a "$TO"
    rc=${PIPESTATUS[0]}
  else
    timeout -k 5 "$left" "$@"
    rc=$?
  fi
  tail -c +"$((from + 1))" "$LOG" | grep -v '^\$ ' | tail -n "${TAIL:-6}" | sed 's/^/  | /' >&3
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && say "  timed out after ${left}s: $*"
  return "$rc"
}

# stage NAME CAP FUNCTION [ARGS...]: run FUNCTION with at most CAP seconds and never past the budget.
stage() {
  local name=$1 cap=$2 t=$SECONDS rows=$(rows_now) left status rc
  shift 2
  left=$((BUDGET - RESERVE - (SECONDS - T0)))
  say ""
  say "=== [$((SECONDS - T0))s] $name (cap ${cap}s, ${left}s of the budget left)"
  if [ "$left" -lt 5 ]; then
    status="skipped: out of budget"
  else
    STAGE_END=$((SECONDS + (cap < left ? cap : left)))
    "$@"
    rc=$?
    case $rc in
      0) status=ok ;;
      124|137) status="timed out (cap ${cap}s)" ;;
      *) status="failed (exit $rc)" ;;
    esac
  fi
  SUMMARY+=("| $name | $status | $((SECONDS - t)) | $(($(rows_now) - rows)) |")
  say "--- $name: $status, $((SECONDS - t))s, $(($(rows_now) - rows)) rows"
  write_report
}

write_report() {
  {
    echo "# device check $([ "$DRY" = 1 ] && echo "(dry run on the CPU: code paths, not measurements)")"
    echo
    echo "$(date -u +%FT%TZ), $(rows_now) rows in rows.jsonl, $((SECONDS - T0))s of a ${BUDGET}s budget" \
         "(stage caps add up to ${CAP_SUM}s), build: ${BUILD_PATH:-not built yet}"
    echo
    echo "| stage | status | seconds | rows |"
    echo "|---|---|---|---|"
    printf '%s\n' "${SUMMARY[@]}"
  } >"$REPORT"
}

# ------------------------------------------------------------------------------------------------- stages
environment() {
  {
    echo "# $(date -u +%FT%TZ) $(uname -srm), $(nproc) CPU cores"
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
    else
      echo "nvidia-smi: not found (no NVIDIA driver here)"
    fi
    echo "python: $(command -v "$PY")"
  } | tee -a "$INFO"
  TO=$INFO TAIL=20 run "$PY" - <<'PYEOF'
import importlib, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), "sm_%d%d" % torch.cuda.get_device_capability(0))
for name in ("triton", "torchvision", "numpy", "PIL", "yaml", "tqdm", "safetensors", "matplotlib", "open_clip",
             "setuptools", "pybind11", "nvidia.dali", "torch_fidelity", "pytest"):
    try:
        m = importlib.import_module(name)
        print(f"  {name:14s} {getattr(m, '__version__', 'ok')}")
    except Exception as e:  # noqa: BLE001 - a report, not a check
        print(f"  {name:14s} missing ({type(e).__name__})")
PYEOF
  local rc=$? whl
  if compgen -G "wheelhouse/*.whl" >/dev/null; then  # into a folder on PYTHONPATH: this Python stays as it was
    say "  wheelhouse: $(ls wheelhouse/*.whl | wc -l) wheels"
    export PYTHONPATH="$WORK/wheels${PYTHONPATH:+:$PYTHONPATH}"
    if ! TAIL=2 run "$PY" -m pip install -q --no-index --no-deps --target "$WORK/wheels" wheelhouse/*.whl; then
      for whl in wheelhouse/*.whl; do  # one by one: a wheel for another Python must not stop the others
        TAIL=1 run "$PY" -m pip install -q --no-index --no-deps --target "$WORK/wheels" "$whl"
      done
    fi
  else
    say "  wheelhouse: absent (\`make wheelhouse\` here and carry it: open_clip, ftfy, torch-fidelity)"
  fi
  return "$rc"
}

# The package runs from the source tree: a folder on PYTHONPATH with vtp_fast/ made of links to the tree's
# files, and vtp_fast/kernels linked to kernels/ (what pyproject's package-dir does for an install).
stage_tree() {
  local e
  mkdir -p "$WORK/py/vtp_fast"
  for e in "$ROOT"/vtp_fast/*; do
    case ${e##*/} in
      __pycache__) ;;
      _C.*) [ "$1" = reuse ] && ln -s "$e" "$WORK/py/vtp_fast/" ;;  # else: the one built here goes there
      *) ln -s "$e" "$WORK/py/vtp_fast/" ;;
    esac
  done
  ln -s "$ROOT/kernels" "$WORK/py/vtp_fast/kernels"
  # The tree after it (for tests/ and bench/), and PYTHONSAFEPATH: `python3 -m ...` run from the tree must not put
  # the tree's own vtp_fast/ (which has no kernels/) first; nor must pytest (--import-mode=append).
  export PYTHONPATH="$WORK/py:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
  PYTEST_MODE=(--import-mode=append)
}

build_pip() {  # first without building (metadata only, a second): what fails fast leaves the stage to CMake
  TAIL=2 run "$PY" -m pip install --dry-run --no-index --no-build-isolation --no-deps -e . &&
    VTP_FAST_CUDA_ARCHS=${VTP_FAST_CUDA_ARCHS:-90a} TAIL=4 \
      run "$PY" -m pip install -q --no-index --no-build-isolation --no-deps -e . &&
    "$PY" -c "import vtp_fast.kernels"
}

cuda_home() {  # the toolkit of the nvcc on the PATH; a small nvcc is a wrapper script naming the real one
  local nvcc named
  nvcc=$(readlink -f "$(command -v nvcc)")
  if [ "$(stat -c %s "$nvcc")" -lt 4096 ]; then
    named=$(grep -oE '/[^[:space:]"]+/bin/nvcc' "$nvcc" | head -1)
    [ -n "$named" ] && nvcc=$(readlink -f "$named")
  fi
  dirname "$(dirname "$nvcc")"
}

build_cmake() {
  local cuda=OFF home args=() reuse=no
  if [ "$DRY" = 1 ] && compgen -G "$ROOT/vtp_fast/_C.*" >/dev/null; then reuse=yes; fi
  if [ "$DRY" = 0 ] && { [ -n "${CUDA_HOME:-}" ] || command -v nvcc >/dev/null; }; then
    home=${CUDA_HOME:-$(cuda_home)}
    if [ -f "$home/include/cuda_runtime.h" ]; then
      cuda=ON
      args+=("-DCMAKE_CUDA_COMPILER=$home/bin/nvcc" "-DCUDAToolkit_ROOT=$home"
             "-DVTP_FAST_CUDA_ARCHS=${VTP_FAST_CUDA_ARCHS:-90a}")
    else
      say "  no CUDA toolkit at $home: C++ ops only"
    fi
  fi
  command -v ninja >/dev/null && args+=(-G Ninja)
  stage_tree "$([ "$reuse" = yes ] && echo reuse || echo build)"
  TAIL=3 run cmake -S "$ROOT" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release \
    "-DPython_EXECUTABLE=$(command -v "$PY")" "-DCMAKE_LIBRARY_OUTPUT_DIRECTORY=$WORK/py/vtp_fast" \
    "-DVTP_FAST_WITH_CUDA=$cuda" "${args[@]}" || return
  if [ "$reuse" = yes ]; then
    BUILD_PATH="CMake + PYTHONPATH (dry run: configured only; the tree's built vtp_fast._C is reused)"
    return 0
  fi
  BUILD_PATH="CMake + PYTHONPATH (CUDA $cuda)"
  TAIL=3 run cmake --build "$WORK/build" --parallel "$(nproc)"
}

build() {
  local mode=${VTP_FAST_BUILD:-auto} st rc=0
  [ "$DRY" = 1 ] && mode=cmake  # never reinstall into the environment a dry run borrows
  if [ "$mode" = auto ]; then
    st=$("$PY" -c "import setuptools; print(setuptools.__version__)" 2>/dev/null || echo 0)
    # pyproject's `license = "MIT"` (PEP 639) needs setuptools >= 77
    if [ "${st%%.*}" -ge 77 ] 2>/dev/null; then mode=pip; else
      say "  setuptools ${st}: too old for pyproject's license = \"MIT\"; taking the CMake path"; mode=cmake; fi
  fi
  if [ "$mode" = pip ]; then
    if build_pip; then
      BUILD_PATH="pip install -e . (no build isolation)"
    else
      say "  pip install -e . failed: taking the CMake + PYTHONPATH path"
      mode=cmake
    fi
  fi
  if [ "$mode" = cmake ] && ! build_cmake; then
    rc=1
    BUILD_PATH="${BUILD_PATH:-CMake + PYTHONPATH} (build FAILED: the ops without vtp_fast._C)"
    [ -d "$WORK/py/vtp_fast" ] || stage_tree build
  fi
  say "  build path: $BUILD_PATH"
  { echo; echo "build path: $BUILD_PATH"; } >>"$INFO"
  TO=$INFO TAIL=30 run "$PY" -c "import sys, vtp_fast, vtp_fast.kernels, vtp_fast.cli as cli
print('vtp_fast from', vtp_fast.__path__[0], '| vtp_fast.kernels from', vtp_fast.kernels.__path__[0])
sys.exit(cli.main(['info', '--device', '$DEV']))" && return "$rc"
}

kernels_check() {
  # the hot kernels at their training shapes in bf16, compiled by the real driver (the full matrix, offline for
  # sm_90 and sm_80, is bench/results/static/kernels_check.md): the figures to hold the offline ones against
  local args=(--arch native --subset --dtypes bfloat16 --ops attention,clip_loss,prototype_ce)
  [ "$DRY" = 1 ] && args=(--arch 90 --subset --ops masked_gather --dtypes float32)  # one kernel, compiled for sm_90
  TO=$OUT/kernels_check.txt TAIL=25 run "$PY" -m vtp_fast.cli kernels check "${args[@]}"
}

pytest_cuda() {  # -v: each result is in the log as it comes, so a stage stopped at its cap keeps them
  TAIL=8 run "$PY" -m pytest -v -m cuda -p no:cacheprovider "${PYTEST_MODE[@]}" \
    --junitxml="$OUT/pytest-cuda.xml" tests
}

bench() {  # bench NAME: rows appended to rows.jsonl as each shape finishes
  TAIL=${TAIL:-4} run "$PY" -m vtp_fast.cli bench "$1" --device "$DEV" "${SIZE[@]}" --out "$ROWS"
}

bench_op() {  # the Triton backends run under the interpreter on the CPU
  if [ "$DRY" = 1 ]; then
    TRITON_INTERPRET=1 VTP_FAST_BENCH_INTERPRETED=1 bench "$1"
  else
    bench "$1"
  fi
}

profile() {
  local over
  if [ "$DRY" = 1 ]; then
    over=(run.device=cpu model.preset=vtp-nano data.image_size=32 batch.size=4 batch.ssl=2 batch.rec=2
          ssl.views.global_size=32 ssl.views.local_size=16 ssl.views.local_crops=2 ssl.prototypes=64 ssl.hidden=32
          ssl.bottleneck=16 objective.perceptual=0 data.synthetic=true)
  else
    over=(model.preset=vtp-b data.image_size=256 batch.size=256 batch.ssl=64 batch.rec=32 ssl.views.global_size=256
          ssl.views.local_size=96 ssl.views.local_crops=8 ssl.prototypes=65536 ssl.hidden=2048 ssl.bottleneck=256
          objective.perceptual=0 run.precision=bf16 data.synthetic=true)
  fi
  TAIL=16 run "$PY" -m vtp_fast.cli profile --steps "$((3 - 2 * DRY))" --warmup "$((2 - DRY))" --out "$WORK/profile" \
    "${over[@]}" || return
  cp "$WORK/profile/profile.json" "$OUT/profile.json"
}

# the rows as a markdown table, the performance model beside them (`vtp-fast bench --model`), attention TFLOP/s
# against sequence length (needs matplotlib)
report() {
  [ -s "$ROWS" ] || { say "  no rows"; return 1; }
  TAIL=3 run "$PY" - "$ROWS" "$WORK" "$OUT/attention.png" <<'PYEOF'
import contextlib, sys, traceback
from vtp_fast import cli
from vtp_fast.measure.rows import plot_scaling, read_rows

rows_path, work, plot_path = sys.argv[1:]
for name, argv in (("rows", ["bench", "--report", rows_path]), ("model", ["bench", "--model", "--report", rows_path])):
    with open(f"{work}/{name}.md", "w") as f, contextlib.redirect_stdout(f):
        try:
            cli.main(argv)
        except Exception:  # noqa: BLE001 - one table missing must not cost the others
            traceback.print_exc(file=sys.stderr)
rows, _ = read_rows([rows_path])  # a line cut short by a stage's time limit is skipped
picked = [r for r in rows if r.get("bench") == "attention" and r.get("case") == "rope" and r.get("pass") == "fwd+bwd"
          and r.get("tflop_per_s")]
if not picked:
    print(f"{len(rows)} rows in the report; no attention rows to plot")
    sys.exit(0)
plot_scaling(picked, "seq_len", "tflop_per_s", "backend", plot_path, title="attention with 2-D RoPE, fwd+bwd "
             f"({picked[0]['device_name']})", xlabel="tokens per sequence", ylabel="TFLOP/s")
print(f"{len(rows)} rows in the report; plotted {len(picked)} attention rows")
PYEOF
}

# ------------------------------------------------------------------------------------------------- the run
say "device check $([ "$DRY" = 1 ] && echo "DRY RUN (CPU)" || echo "(GPU)"): budget ${BUDGET}s," \
    "stage caps add up to ${CAP_SUM}s, output $OUT"
if [ "$CAP_SUM" -ge "$BUDGET" ]; then say "error: the stage caps (${CAP_SUM}s) must add up to less than BUDGET"; exit 2; fi
say "carry (git-ignored paths the run uses when present): ${CARRY[*]}"
export VTP_FAST_GIT_REV=${VTP_FAST_GIT_REV:-$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)}
BUILD_PATH="" PYTEST_MODE=()
last=$((${#NAMES[@]} - 1))
for i in "${!NAMES[@]}"; do
  [ "$i" = "$last" ] && RESERVE=0  # the report stage spends what was kept for it
  read -ra call <<<"${CALLS[i]}"
  stage "${NAMES[i]}" "${CAPS[i]}" "${call[@]}"
done

{
  [ -s "$WORK/model.md" ] && { echo; echo "## performance model (H200 bounds) beside these rows"; echo; cat "$WORK/model.md"; }
  [ -s "$WORK/rows.md" ] && { echo; echo "## rows"; echo; cat "$WORK/rows.md"; }
  [ -s "$WORK/profile/profile.md" ] && { echo; sed 's/^# /## /' "$WORK/profile/profile.md"; }
} >>"$REPORT"

# The contract with the device tool: at most 8 files, at most two folders below $OUT.
n_files=$(find "$OUT" -type f | wc -l)
too_deep=$(find "$OUT" -mindepth 4 | wc -l)
say ""
say "$(sed -n 3p "$REPORT")"
sed -n '/^| stage/,/^$/p' "$REPORT" >&3
say "files in $OUT ($n_files):"
say "$(cd "$OUT" && find . -type f -printf '  %P %s bytes\n' | sort)"
failed=$(printf '%s\n' "${SUMMARY[@]}" | grep -vc '| ok |')
if [ "$n_files" -gt 8 ] || [ "$too_deep" -gt 0 ]; then
  say "error: $n_files files (at most 8), $too_deep paths more than two folders down"; exit 3
fi
say "done in $((SECONDS - T0))s: $failed stage(s) not ok"
[ "$failed" = 0 ]
exit
}
