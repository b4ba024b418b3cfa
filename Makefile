# Quick start: `make train` (the main job), `make test` (the test suite). Both set up .venv on first use.
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: setup train test lint wheelhouse clean

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

# pure-Python (and cp312 manylinux) wheels the GPU machine lacks, carried there by the device tool (bench/device_check.sh)
wheelhouse: $(STAMP)
	$(VENV)/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
	  --platform any -d wheelhouse open_clip_torch ftfy wcwidth regex torch-fidelity

clean:
	rm -rf build *.egg-info vtp_fast/_C*.so
