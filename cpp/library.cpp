// Declares the panther operator namespace: TORCH_LIBRARY(panther, m), exactly once in the library
// (a second TORCH_LIBRARY(panther, ...) anywhere fails at load time). Each op family registers its
// schemas in its own <family>/schema.cpp with TORCH_LIBRARY_FRAGMENT(panther, m), and its kernels
// in <family>/cpu.cpp, cuda.cu, meta.cpp, autograd.cpp and autocast.cpp (see cpp/README.md).
#include <torch/library.h>

TORCH_LIBRARY(panther, m) {}
