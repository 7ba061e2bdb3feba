# Panther developer commands. On a fresh machine `make demo` and `make test` do all set-up:
# create .venv, install the pinned dev dependencies, build and install the package, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-stamp
BUILD_LOCK := /tmp/panther-build.lock
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: all setup build demo test test-py test-cpp bench docs wheel clean

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements-dev.txt | $(PY)
	$(PY) -m pip install --upgrade -q pip
	$(PY) -m pip install -q -r requirements-dev.txt
	@touch $@

setup: $(STAMP)
	@bash scripts/ensure_cpp_deps.sh

# Incremental: scikit-build-core keeps its CMake tree under build/. flock serialises builds.
# (A venv from before the distribution was renamed has a "panther" distribution owning the same
# files: remove it first, or uninstalling it later would delete torch-panther's files.)
build: setup
	@if $(PY) -m pip show -q panther >/dev/null 2>&1; then $(PY) -m pip uninstall -y -q panther; fi
	flock $(BUILD_LOCK) $(PY) -m pip install -q --no-build-isolation --no-deps .

demo: build
	$(PY) examples/demo.py

# Python tests, a very short pass of the C++ benchmarks, then the C++ tests (ctest), the last two
# in the CMake tree build/cpp-tests. ctest's summary is the last thing printed.
test: build
	$(PY) -m pytest -q -ra
	@PY=$(PY) bash scripts/emu_test.sh
	@PANTHER_CPP_BUILD_DIR=build/cpp-tests bash scripts/bench_cpp_quick.sh $(PY)
	@bash scripts/run_cpp_tests.sh $(PY)

test-py: build
	$(PY) -m pytest -q -ra

test-cpp: build
	@PY=$(PY) bash scripts/emu_test.sh
	@PANTHER_CPP_BUILD_DIR=build/cpp-tests bash scripts/bench_cpp_quick.sh $(PY)
	@bash scripts/run_cpp_tests.sh $(PY)

# The API reference (Sphinx, from the docstrings) in build/docs/html; every warning is an error.
docs: build
	$(PY) -m sphinx -b html -E -W --keep-going -q docs build/docs/html

# A wheel in dist/ for the installed torch: its version carries the torch minor it was built
# against (0.1.0+torch2.13) and it requires that minor (torch==2.13.*). CUDA builds compile for
# TORCH_CUDA_ARCH_LIST, by default 8.0;8.6;8.9+PTX;9.0a (see README, "Building with CUDA").
wheel: setup
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9+PTX;9.0a}" PANTHER_LOCAL_VERSION=1 \
	  flock $(BUILD_LOCK) $(PY) -m pip wheel -q --no-build-isolation --no-deps -w dist .
	@ls -1 dist/*.whl

bench: build
	$(PY) bench/python/bench_linear.py

clean:
	rm -rf build dist *.egg-info
