# Quick start: `make train` (the main job), `make test` (the test suite). Both set up .venv on first use.
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: setup train test lint study check-kernels wheelhouse clean

$(STAMP): pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
	VENV=$(VENV) scripts/setup.sh
	touch $@

setup: $(STAMP)

# --resume auto: a second `make train` continues an interrupted run, or re-renders a finished one's results
train: $(STAMP)
	$(VENV)/bin/vtp-fast pretrain --config configs/tokenizer/tiny.yaml --resume auto

test: $(STAMP)
	VENV=$(VENV) scripts/test.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check vtp_fast kernels bench tests

# the scaling study on the CPU (docs/study/study.md); resumable: a second `make study` continues where it stopped.
study: $(STAMP)
	$(VENV)/bin/vtp-fast study --out runs/study

# the ahead-of-time compile gate on the full matrix (every op, shape, dtype; sm_90 and sm_80; the CUDA sources):
# minutes on 2 cores; CI runs a subset (tests/measure/test_gate.py). The table is committed.
check-kernels: $(STAMP)
	$(VENV)/bin/vtp-fast kernels check --cuda --markdown bench/results/static/kernels_check.md \
	  --json bench/results/static/kernels_check.jsonl

# pure-Python (and cp312 manylinux) wheels the GPU machine lacks, carried there by the device tool (bench/device_check.sh)
wheelhouse: $(STAMP)
	$(VENV)/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
	  --platform any -d wheelhouse open_clip_torch ftfy wcwidth regex torch-fidelity

# bench/device_check.sh on this CPU: every stage of the GPU run at tiny shapes (what CI checks; a few minutes)
.PHONY: device-dry-run
device-dry-run: $(STAMP)
	PYTHON=$(VENV)/bin/python3 bash bench/device_check.sh --dry-run

clean:
	rm -rf build *.egg-info vtp_fast/_C*.so
