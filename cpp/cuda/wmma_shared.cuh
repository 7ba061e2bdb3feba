// Helpers for hand-written tensor-core kernels (bf16 and fp16, m16n16k16 WMMA): 16-bit <-> float
// conversions and operand loads from shared memory. The CUDA build issues PTX; with
// PANTHER_CUDA_EMU defined the same calls run on the CPU emulator (tests/emu/cuda_emu.h).
#pragma once
#include <cstdint>
#include <type_traits>

#ifdef PANTHER_CUDA_EMU
#include "cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

namespace panther::wmma_util {
namespace wmma = nvcuda::wmma;

// float <-> 16-bit conversions through the intrinsics (torch's CUDA flags disable the implicit
// ones): Cvt<T>::f(x) to float, Cvt<T>::t(x) from float (round to nearest even).
template <class T>
struct Cvt;
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 t(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float f(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half t(float x) { return __float2half_rn(x); }
};

// Operand loads from shared memory. NVVM does not infer the shared state space for the 16-bit
// WMMA load intrinsics (every load came out generic, ~10x slower per MMA step on an H100), so the
// CUDA build issues wmma.load ... .shared itself; the emulator uses the WMMA API.
// bf16 a/b fragments are 4 registers per thread, fp16 ones 8 (PTX ISA, wmma.load).
#ifndef PANTHER_CUDA_EMU
#define PANTHER_WMMA_LOAD4(op)                                                      \
  asm volatile(op " {%0,%1,%2,%3}, [%4], %5;"                                       \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                     \
               : "r"(a), "r"(ld))
#define PANTHER_WMMA_LOAD8(op)                                                      \
  asm volatile(op " {%0,%1,%2,%3,%4,%5,%6,%7}, [%8], %9;"                           \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]), "=r"(r[4]),        \
                 "=r"(r[5]), "=r"(r[6]), "=r"(r[7])                                 \
               : "r"(a), "r"(ld))
#endif

template <class Use, class T, class L>
__device__ __forceinline__ void load_shared(wmma::fragment<Use, 16, 16, 16, T, L>& f, const T* p,
                                            int ld) {
#if defined(PANTHER_CUDA_EMU)
  wmma::load_matrix_sync(f, p, ld);
#else
  constexpr bool bf = std::is_same<T, __nv_bfloat16>::value;
  static_assert(bf || std::is_same<T, __half>::value, "shared WMMA loads: bf16 or fp16");
  static_assert(sizeof(f.x) == (bf ? 16 : 32), "m16n16k16 a/b fragment: bf16 4, fp16 8 registers");
  unsigned* r = reinterpret_cast<unsigned*>(&f.x[0]);
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  constexpr bool is_a = std::is_same<Use, wmma::matrix_a>::value;
  constexpr bool row = std::is_same<L, wmma::row_major>::value;
  if constexpr (bf) {
    if (is_a && row) PANTHER_WMMA_LOAD4("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16");
    else if (is_a) PANTHER_WMMA_LOAD4("wmma.load.a.sync.aligned.col.m16n16k16.shared.bf16");
    else if (row) PANTHER_WMMA_LOAD4("wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16");
    else PANTHER_WMMA_LOAD4("wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16");
  } else {
    if (is_a && row) PANTHER_WMMA_LOAD8("wmma.load.a.sync.aligned.row.m16n16k16.shared.f16");
    else if (is_a) PANTHER_WMMA_LOAD8("wmma.load.a.sync.aligned.col.m16n16k16.shared.f16");
    else if (row) PANTHER_WMMA_LOAD8("wmma.load.b.sync.aligned.row.m16n16k16.shared.f16");
    else PANTHER_WMMA_LOAD8("wmma.load.b.sync.aligned.col.m16n16k16.shared.f16");
  }
#endif
}

}  // namespace panther::wmma_util
