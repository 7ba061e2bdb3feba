#!/usr/bin/env bash
# A very short pass of the C++ microbenchmarks (bench/cpp, panther_bench): configures and builds
# build/cpp when needed (serialised by flock), then runs the small CPU cases briefly.
# Skips with a message (exit 0) where Google Benchmark is not installed.
#   usage: scripts/bench_cpp_quick.sh [python]   (default .venv/bin/python)
#   env:   PANTHER_CPP_BUILD_DIR (default build/cpp), PANTHER_BENCH_FILTER, PANTHER_BENCH_ARGS
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
BUILD=${PANTHER_CPP_BUILD_DIR:-build/cpp}
FILTER=${PANTHER_BENCH_FILTER:-'/cpu/.*(N256_d1024|L1024_causal)'}
LOCK=/tmp/panther-build.lock
PYDIR=$(cd "$(dirname "$PY")" && pwd)
export PATH="$PYDIR:$PATH"   # ninja and cmake from the venv where present

if [ ! -f "$BUILD/build.ninja" ] && [ ! -f "$BUILD/Makefile" ]; then
  gen=()
  command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
  prefix=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
  flock "$LOCK" cmake -S . -B "$BUILD" "${gen[@]}" -DPANTHER_BUILD_PYTHON=OFF -DPANTHER_BUILD_BENCH=ON \
    -DCMAKE_PREFIX_PATH="$prefix" -DPython_EXECUTABLE="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" \
    ${PANTHER_BENCHMARK_ROOT:+-DPANTHER_BENCHMARK_ROOT="$PANTHER_BENCHMARK_ROOT"} >"$BUILD.configure.log" 2>&1 \
    || { echo "C++ benchmarks: configure failed (see $BUILD.configure.log)"; tail -20 "$BUILD.configure.log"; exit 1; }
fi
if ! grep -q panther_bench "$BUILD"/build.ninja "$BUILD"/Makefile 2>/dev/null \
   && ! [ -d "$BUILD/bench/cpp/CMakeFiles/panther_bench.dir" ]; then
  echo "C++ benchmarks: skipped, Google Benchmark not found (Debian: apt-get install libbenchmark-dev)"
  exit 0
fi
flock "$LOCK" cmake --build "$BUILD" --target panther_bench -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" >/dev/null
# Plain seconds: accepted by Google Benchmark 1.7 and (with a notice) by 1.8+.
"$BUILD/bench/cpp/panther_bench" --benchmark_min_time=0.01 --benchmark_filter="$FILTER" ${PANTHER_BENCH_ARGS:-}
