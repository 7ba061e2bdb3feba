#!/usr/bin/env bash
# Builds and runs hand-written CUDA kernels on the CPU emulator (tests/emu), comparing them with
# the ATen implementations: the fused FAVOR+ kernels (favor_fused_test), the fused decoding step
# (decode_test) and sketched_linear's few-token backward (sketch_test); selftest checks the
# emulator itself and the emulated PTX primitives of cpp/common/mma.cuh (mma.sync/ldmatrix lane
# mapping). No GPU or CUDA toolkit needed.
# Usage: scripts/emu_test.sh [quick]   (quick: one FAVOR+ case)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
T=$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))')
out=${EMU_BUILD_DIR:-build/emu}
mkdir -p "$out"
build() {  # name, sources...
  local name=$1
  shift
  g++ -std=c++20 -O2 -pthread -DPANTHER_CUDA_EMU -D_GLIBCXX_USE_CXX11_ABI=1 -w \
    -Itests/emu -Icpp -I"$T/include" -I"$T/include/torch/csrc/api/include" \
    "$@" -L"$T/lib" -ltorch -ltorch_cpu -lc10 -Wl,-rpath,"$T/lib" -o "$out/$name"
}
build favor_fused_test tests/emu/favor_fused_test.cpp cpp/attention/impl.cpp &
build sketch_test tests/emu/sketch_test.cpp &
build selftest tests/emu/selftest.cpp &
build decode_test tests/emu/decode_test.cpp cpp/attention/impl.cpp &
wait %1 && wait %2 && wait %3 && wait %4
"$out/selftest"
"$out/sketch_test"
"$out/decode_test"
"$out/favor_fused_test" "$@"
