#!/usr/bin/env bash
# The one prepared GPU run (../shared/GPU.md): build for this machine, the CUDA tests, the op, tokenizer and
# whole-step benchmarks, a per-objective profile; JSONL rows, logs and a markdown report under $OUT.
# Budget: $BUDGET seconds (default 540) on one H200, stages in order of importance; each has its own timeout,
# capped by what is left, so one slow stage cannot eat the rest and the report is always written.
#   via the device tool:  bash bench/device_check.sh        (OUT is set by the tool)
#   by hand:              OUT=bench/results/h200/$(date +%F) bash bench/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/local}
BUDGET=${BUDGET:-540}  # seconds for the whole script: the device tool allows 600 per command
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device_check.log") 2>&1
PY=${PYTHON:-python}
T0=$SECONDS
stage() { echo; echo "=== [$((SECONDS - T0))s] $*"; }
# run_for S CMD...: run CMD for at most S seconds and never past the budget (20 s kept for the report)
run_for() {
  local left=$((BUDGET - 20 - (SECONDS - T0))) want=$1; shift
  if [ "$left" -lt 10 ]; then echo "(skipped: out of budget) $*"; return 0; fi
  timeout $((want < left ? want : left)) "$@"
}

stage "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
# pure-Python wheels that travel with the tree (make wheelhouse; carry it: open_clip, ftfy, torch-fidelity), when present
[ -d wheelhouse ] && $PY -m pip install -q --no-deps wheelhouse/*.whl 2>&1 | tail -1

stage "build the native extension for this GPU (sm_90a)"
VTP_FAST_CUDA_ARCHS=90a run_for 180 $PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
$PY -m vtp_fast.cli info | tee "$OUT/info.txt"

stage "CUDA tests"
run_for 90 $PY -m pytest -q -m cuda -p no:cacheprovider --junitxml="$OUT/pytest-cuda.xml" tests 2>&1 | tail -15

stage "parity (fp32 / bf16 against the reference outputs)"
run_for 30 $PY bench/bench_parity.py --device cuda --out "$OUT/parity.jsonl"

stage "op benchmarks"
for op in masked_gather attention clip_loss prototype_ce pixel_shuffle_l1; do
  run_for 40 $PY -m vtp_fast.cli bench "$op" --device cuda --out "$OUT/ops.jsonl" 2>&1 | tail -40
done

stage "whole step, eager vs compiled (VTP-B, 256 px, bf16)"
run_for 90 $PY -m vtp_fast.cli bench step --device cuda --out "$OUT/step.jsonl"

stage "tokenizer encode + decode (VTP-L, 256 px, bf16): SDPA vs math"
run_for 40 $PY -m vtp_fast.cli bench tokenizer --device cuda --out "$OUT/tokenizer.jsonl"

stage "DiT-XL/1 step (16x16x64 latents, bf16): eager vs compiled; data pipeline (nvJPEG)"
run_for 60 $PY -m vtp_fast.cli bench dit --device cuda --out "$OUT/dit.jsonl"
run_for 30 $PY -m vtp_fast.cli bench data --device cuda --out "$OUT/data.jsonl"

stage "per-objective profile (VTP-B, 256 px, bf16)"
run_for 60 $PY -m vtp_fast.cli profile --steps 5 --warmup 3 --out "$OUT/profile" model.preset=vtp-b \
  data.image_size=256 batch.size=256 batch.ssl=64 batch.rec=32 ssl.views.global_size=256 ssl.views.local_size=96 \
  ssl.views.local_crops=8 ssl.prototypes=65536 ssl.hidden=2048 ssl.bottleneck=256 objective.perceptual=0 \
  run.precision=bf16 data.synthetic=true 2>&1 | tail -25
run_for 30 $PY bench/bench_attention.py --device cuda --quick --plot "$OUT/attention_scaling.png" >/dev/null 2>&1 || true

stage "report"
$PY -m vtp_fast.cli bench --report "$OUT"/*.jsonl > "$OUT/report.md" 2>&1
echo "done in $((SECONDS - T0))s; rows and report in $OUT"
