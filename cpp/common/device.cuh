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

namespace panther {

// Programmatic dependent launch (sm_90; no-ops below it and in the emulator, whose launches run
// in order). A kernel launched with PANTHER_LAUNCH_DEPENDENT may start while the kernel before
// it on the stream still runs: it must call grid_dependency_wait() before it reads anything that
// kernel writes (or writes anything that kernel reads); the wait returns once that kernel has
// finished and its writes are visible. Work before the wait (loads of weights, say) overlaps
// the previous kernel's tail. A kernel calls launch_dependents() to let the next one start
// early; without it, the next one starts when this one ends, as usual.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace panther
