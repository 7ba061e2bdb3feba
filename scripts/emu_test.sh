#!/usr/bin/env bash
# Builds and runs the fused CUDA FAVOR+ kernels on the CPU emulator (tests/emu), comparing them
# with the ATen implementation. No GPU or CUDA toolkit needed. Usage: scripts/emu_test.sh [quick]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
T=$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))')
out=${EMU_BUILD_DIR:-build/emu}
mkdir -p "$out"
g++ -std=c++20 -O2 -pthread -DPANTHER_CUDA_EMU -D_GLIBCXX_USE_CXX11_ABI=1 -w \
  -Itests/emu -Icpp -I"$T/include" -I"$T/include/torch/csrc/api/include" \
  tests/emu/favor_fused_test.cpp cpp/kernels/favor_attention.cpp \
  -L"$T/lib" -ltorch -ltorch_cpu -lc10 -Wl,-rpath,"$T/lib" -o "$out/favor_fused_test"
"$out/favor_fused_test" "$@"
