#!/usr/bin/env bash
# Builds and runs the C++ tests and examples with ctest, in their own CMake tree build/cpp-tests
# (op library without the Python module + tests/cpp + examples/cpp), against the torch of the
# given Python. Usage: scripts/run_cpp_tests.sh [python]   (make test passes .venv/bin/python)
# GoogleTest missing: the gtest targets are skipped with a message; the examples still build/run.
set -euo pipefail
PY=${1:-.venv/bin/python}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=$(command -v "$PY" || echo "$PY")
case "$PY" in /*) ;; *) PY="$ROOT/$PY" ;; esac
BUILD=${PANTHER_CPP_BUILD_DIR:-build/cpp-tests}
JOBS=${CMAKE_BUILD_PARALLEL_LEVEL:-2}

if [ ! -f tests/cpp/CMakeLists.txt ]; then
  echo "C++ tests: none yet"
  exit 0
fi
if [ ! -f /usr/include/gtest/gtest.h ] && [ ! -d /usr/src/googletest ]; then
  echo "C++ tests: GoogleTest not installed (Debian/Ubuntu: apt-get install libgtest-dev);" \
       "the gtest targets are skipped, the C++ examples still build and run"
fi

TORCH_PREFIX=$("$PY" -c "import torch; print(torch.utils.cmake_prefix_path)")
GEN=()
if command -v ninja >/dev/null 2>&1; then
  GEN=(-G Ninja)
elif [ -x "$(dirname "$PY")/ninja" ]; then
  GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="$(dirname "$PY")/ninja")
fi
# A tree configured with another generator cannot be reused.
if [ -f "$BUILD/CMakeCache.txt" ] && [ ${#GEN[@]} -gt 0 ] && ! grep -q "CMAKE_GENERATOR:INTERNAL=Ninja" "$BUILD/CMakeCache.txt"; then
  rm -rf "$BUILD"
fi

echo "C++ tests: configuring and building $BUILD (torch from $PY)"
start=$(date +%s)
# flock serialises this build with the pip build (both compile against the same headers/CPU).
flock /tmp/panther-build.lock bash -c '
  set -e
  cmake -S . -B "$1" "${@:5}" -DCMAKE_BUILD_TYPE=Release \
    -DPANTHER_BUILD_PYTHON=OFF -DPANTHER_BUILD_TESTS=ON -DPANTHER_BUILD_EXAMPLES=ON -DPANTHER_BUILD_BENCH=ON \
    -DPython_EXECUTABLE="$2" -DCMAKE_PREFIX_PATH="$3" >"$1.configure.log" 2>&1 \
    || { cat "$1.configure.log"; exit 1; }
  grep -E "^-- Panther|GoogleTest|skipped" "$1.configure.log" || true
  cmake --build "$1" -j "$4"
' _ "$BUILD" "$PY" "$TORCH_PREFIX" "$JOBS" "${GEN[@]}" || { echo "C++ tests: build failed"; exit 1; }
echo "C++ tests: built in $(( $(date +%s) - start )) s"

cd "$BUILD"
# One intra-op thread per test: ctest runs $JOBS tests at once, and OpenMP threads spinning against
# each other on a busy machine make small training loops many times slower.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ctest --output-on-failure -j "$JOBS"
