#!/usr/bin/env bash
# One-time setup on a fresh machine: a virtualenv in .venv with torch, the package (editable) and its native
# extension. Idempotent; `make` calls it when pyproject.toml, setup.py, CMakeLists.txt or csrc/ change.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first (the CUDA 13.0 build; these machines serve it from local disk), then the build tools, then the
# package without build isolation so the native extension compiles against this torch.
"$VENV/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/pip" install -q setuptools wheel "cmake>=3.18" ninja "pybind11>=2.12"
"$VENV/bin/pip" install -q --no-build-isolation -e ".[dev,data,eval]"
"$VENV/bin/vtp-fast" info | sed -n '1,3p'
