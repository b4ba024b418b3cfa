# Quick start: `make train` (the main job), `make test` (the test suite). Both set up .venv on first use.
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: setup train test lint clean

$(STAMP): pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
	VENV=$(VENV) scripts/setup.sh
	touch $@

setup: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/vtp-fast pretrain --config configs/tokenizer/tiny.yaml

test: $(STAMP)
	VENV=$(VENV) scripts/test.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check vtp_fast kernels bench tests

clean:
	rm -rf build *.egg-info vtp_fast/_C*.so
