#!/usr/bin/env bash
# Compiles every CUDA source against the CPU torch's headers with nvcc (no CUDA libraries needed:
# cuBLAS/cuSPARSE/cuSOLVER headers are stubbed), to catch C++/CUDA errors on a machine without
# a GPU or a CUDA build of torch. Object files are thrown away; this is a syntax/type check only.
# Environment: CUDA_FILES (default cpp/*/*.cu), NVCC_ARCH (default sm_90; e.g. NVCC_ARCH=sm_80
# checks the portable device code that non-Hopper GPUs run), NVCC_EXTRA (more nvcc flags).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
T=$($PY -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "include"))')
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
echo '#pragma once' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
printf '#pragma once\n#include <cuda_runtime.h>\ntypedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\ntypedef int cublasOperation_t;\n' > "$stub/cublas_v2.h"
printf '#pragma once\n#include "cublas_v2.h"\ntypedef struct cublasLtContext* cublasLtHandle_t;\n' > "$stub/cublasLt.h"
printf '#pragma once\ntypedef struct cusparseContext* cusparseHandle_t;\ntypedef int cusparseStatus_t;\n' > "$stub/cusparse.h"
printf '#pragma once\ntypedef struct cusolverDnContext* cusolverDnHandle_t;\ntypedef int cusolverStatus_t;\n' > "$stub/cusolverDn.h"
cp "$stub/cusolverDn.h" "$stub/cusolver_common.h"
rc=0
for f in ${CUDA_FILES:-cpp/*/*.cu}; do
  echo "nvcc syntax check: $f"
  if ! nvcc -std=c++17 -arch=${NVCC_ARCH:-sm_90} -I"$stub" -I"$T" -I"$T/torch/csrc/api/include" -Icpp -Icpp/include \
      --expt-relaxed-constexpr -D_GLIBCXX_USE_CXX11_ABI=1 -DPANTHER_WITH_CUDA=1 -w \
      ${NVCC_EXTRA:-} -c "$f" -o /dev/null; then
    rc=1
  fi
done
exit $rc
