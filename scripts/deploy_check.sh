#!/usr/bin/env bash
# Deployment check on one device, no GoogleTest needed (for the GPU machine: run with `cuda`):
# builds the C++ examples (build/deploy-<device>), exports the example model with Python as
# TorchScript and as an AOTInductor package compiled for <device>, and runs both from C++
# (panther_run_torchscript, panther_run_aoti) plus the pure-C++ training example.
#   scripts/deploy_check.sh [python] [cpu|cuda] [out_dir]
# Exit status 0 only when every program printed its match.
set -euo pipefail
PY=${1:-.venv/bin/python}
DEVICE=${2:-cpu}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=$(command -v "$PY" || echo "$PY")
case "$PY" in /*) ;; *) PY="$ROOT/$PY" ;; esac
OUT=${3:-$ROOT/build/deploy-$DEVICE/artifacts}
BUILD=build/deploy-$DEVICE
JOBS=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}

TORCH_PREFIX=$("$PY" -c "import torch; print(torch.utils.cmake_prefix_path)")
GEN=()
if command -v ninja >/dev/null 2>&1; then
  GEN=(-G Ninja)
elif [ -x "$(dirname "$PY")/ninja" ]; then
  GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="$(dirname "$PY")/ninja")
fi
echo "deploy check ($DEVICE): building the C++ examples in $BUILD"
cmake -S . -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DPANTHER_BUILD_PYTHON=OFF \
  -DPANTHER_BUILD_TESTS=OFF -DPANTHER_BUILD_EXAMPLES=ON -DPython_EXECUTABLE="$PY" \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" >"$BUILD.configure.log" 2>&1 || { cat "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD" -j "$JOBS" --target panther_run_torchscript panther_run_aoti panther_train_cpp

status=0
"$PY" examples/export_torchscript.py "$OUT/ts"
"$BUILD/examples/cpp/panther_run_torchscript" "$OUT/ts" "$DEVICE" || status=1
"$PY" examples/export_aoti.py "$OUT/aoti-$DEVICE" --device "$DEVICE" || status=1
"$BUILD/examples/cpp/panther_run_aoti" "$OUT/aoti-$DEVICE" || status=1
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$BUILD/examples/cpp/panther_train_cpp" || status=1
if [ $status -eq 0 ]; then
  echo "deploy check ($DEVICE): all match"
else
  echo "deploy check ($DEVICE): FAILED"
fi
exit $status
