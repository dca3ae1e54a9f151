# Quick start: `make test` and `make bench` work on a fresh clone with nothing installed:
# they create .venv from requirements.txt (bounded by constraints.txt), build the extension in
# place, then run. `make test-fast` skips the tests marked slow (builds, subprocesses, training).
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
EXT_STAMP := build/.ext-built
OPTIONS_STAMP := build/.build-options
PYTEST_ARGS ?=
BENCH_ARGS ?=
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

# The environment variables setup.py builds by (see its docstring), "NAME unset" or "NAME=value";
# with the torch version they make up $(OPTIONS_STAMP), so changing one of them rebuilds.
BUILD_OPTION_VARS := LIGHTNET_OPS_NO_EXTENSION LIGHTNET_OPS_CUDA TORCH_CUDA_ARCH_LIST DEBUG CUDA_HOME
build_option = $(if $(filter undefined,$(origin $(1))),$(1) unset,$(1)=$($(1)))
BUILD_OPTIONS = $(foreach v,$(BUILD_OPTION_VARS),$(call build_option,$(v)))

.PHONY: all venv build test test-fast bench gpu-check lint clean FORCE

all: test

$(DEPS_STAMP): requirements.txt constraints.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt -c constraints.txt
	touch $@

venv: $(DEPS_STAMP)

# Rewritten only when the options differ from the last build's, so only a change rebuilds.
$(OPTIONS_STAMP): FORCE | $(DEPS_STAMP)
	@mkdir -p build
	@new="$(BUILD_OPTIONS) torch=$$($(PYTHON) -c 'import importlib.metadata as m; print(m.version("torch"))')"; \
	if [ "$$(cat $@ 2>/dev/null)" != "$$new" ]; then echo "$$new" > $@; echo "build options: $$new"; fi

# Builds lightnet_ops/_C*.so in place (ninja, incremental under build/) against the torch in
# .venv, and writes lightnet_ops/_build_info.py and lightnet_ops.egg-info (whose entry point makes
# torch.compile(..., backend="lightnet_ops") work from the repository root). Tests and benchmarks
# run from the repository root. Users install with `pip install --no-build-isolation .` (README).
$(EXT_STAMP): $(DEPS_STAMP) $(SOURCES) $(OPTIONS_STAMP)
	$(PYTHON) setup.py egg_info build_ext --inplace
	touch $@

build: $(EXT_STAMP)

test: build
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-fast: build
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: build
	$(PYTHON) -m lightnet_ops.bench $(BENCH_ARGS)

# On a CUDA machine whose Python already has torch, triton and pytest:
#   make gpu-check OUT=/path/to/results
gpu-check:
	bash scripts/gpu_check.sh $(or $(OUT),gpu-check-results)

lint: $(DEPS_STAMP)
	$(PYTHON) -m pip install --quiet ruff && $(VENV)/bin/ruff check lightnet_ops triton_kernels tests benchmarks scripts examples setup.py

clean:
	rm -rf build lightnet_ops/_C*.so lightnet_ops/_build_info.py *.egg-info dist

FORCE:
