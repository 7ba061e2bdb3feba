// What every hand-written kernel header includes first: the CUDA device headers (bf16, fp16),
// or, with PANTHER_CUDA_EMU defined, the CPU emulator tests/emu/cuda_emu.h, which provides the
// same names for a host C++ build; and PANTHER_DYNAMIC_SMEM(name), which declares a kernel's
// dynamic shared memory (128-byte aligned; the emulator defines its own).
#pragma once

#ifdef PANTHER_CUDA_EMU
#include "cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifndef PANTHER_DYNAMIC_SMEM
#define PANTHER_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif
#endif
