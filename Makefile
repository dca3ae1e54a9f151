# Quick start: `make test` and `make bench` work on a fresh clone with nothing installed:
# they create .venv from requirements.txt, build the extension in place, then run.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
EXT_STAMP := build/.ext-built
PYTEST_ARGS ?=
BENCH_ARGS ?=
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: all venv build test bench gpu-check lint clean

all: test

$(DEPS_STAMP): requirements.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(DEPS_STAMP)

# Builds lightnet_ops/_C*.so in place (ninja, incremental under build/) against the torch in
# .venv; tests and benchmarks run from the repository root. Users install with
# `pip install --no-build-isolation -e .` instead (see README).
$(EXT_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PYTHON) setup.py build_ext --inplace
	mkdir -p build && touch $@

build: $(EXT_STAMP)

test: build
	$(PYTHON) -m pytest $(PYTEST_ARGS)

bench: build
	$(PYTHON) -m lightnet_ops.bench $(BENCH_ARGS)

# On a CUDA machine whose Python already has torch, triton and pytest:
#   make gpu-check OUT=/path/to/results
gpu-check:
	bash scripts/gpu_check.sh $(or $(OUT),gpu-check-results)

lint: $(DEPS_STAMP)
	$(PYTHON) -m pip install --quiet ruff && $(VENV)/bin/ruff check lightnet_ops triton_kernels tests benchmarks scripts examples

clean:
	rm -rf build lightnet_ops/_C*.so *.egg-info
