// Output kernel of the many-token fp16/bf16 forward of panther::sketched_linear.
//
// With d_out in the thousands and C = 2Lk at most 64, the second GEMM y = T B + bias is a pure
// write of the (N, d_out) output: its FLOPs are tiny and its time is set by HBM write bandwidth.
// cuBLAS needs T as an explicit [hi | lo] split in the input dtype and B as a packed [B; B]
// operand (two extra launches and passes); this kernel reads the fp32 T and the two sketch
// tensors directly, splits T = hi + lo in shared memory (so T enters exactly, as in the cuBLAS
// path), multiplies on the tensor cores with fp32 accumulation, adds the bias in fp32 and rounds
// each output once.
//
// Notation (sketch_small.cuh): B (C, d_out) = [U1_1; ..; U1_L; S2_1; ..; S2_L], row c of B is
// U1s row c (c < Lk) or S2s row c - Lk, both viewed as (Lk, d_out).
//   y[n, o] = sum_c (hi[n, c] + lo[n, c]) B(c, o) + bias[o],  hi = lowp(s T), lo = lowp(s T - hi)
//
// Layout: a block owns kWideCols = 256 output columns and walks row tiles of kWideRows = 32
// rows; the grid is one wave of blocks. Its 8 warps are 2 row halves x 4 column quarters: each
// computes 16 rows x 64 columns of a tile. B's tile is read once per block into shared memory and
// from there into each warp's registers (its 64 columns, all of K; the space is then reused). Per
// row tile: T's rows (fetched through a block-wide cp.async ring kWideStages - 1 tiles ahead, so
// their latency overlaps the stores) are split once into a shared [hi | lo] tile that all four
// column quarters read; each warp multiplies, stages its accumulators in its own shared area and
// writes whole 128-byte row segments with 16-byte stores. T is read d_out / 256 times from L2.
//
// The file compiles as CUDA and, with PANTHER_CUDA_EMU defined, as host C++ against
// tests/emu/cuda_emu.h (tests/emu/sketch_test.cpp runs it on the CPU).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef PANTHER_CUDA_EMU
#include "cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#ifndef PANTHER_DYNAMIC_SMEM
#define PANTHER_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif
#endif

namespace panther::sketch {
namespace wmma = nvcuda::wmma;

constexpr int kWideCols = 256;       // output columns per block
constexpr int kWideRows = 32;        // rows per step of a block
constexpr int kWideThreads = 256;    // 8 warps: 2 row halves x 4 column quarters
constexpr int64_t kWideMaxC = 64;    // largest C = 2Lk (beyond, cuBLAS is faster)
constexpr int kWideLdB = kWideCols + 8;  // +8: conflict-free WMMA loads, rows 32-byte aligned
constexpr int kWideLdS = 64 + 8;         // per-warp fp32 staging (16 x 64); 8 mod 32 words:
                                         // conflict-free accumulator stores
constexpr int kWideStages = 4;           // T tiles in flight per block (cp.async ring)

// Shared memory for KS steps of 16 along K (KP = 16 KS): the cp.async ring of fp32 T tiles
// (kWideStages x kWideRows x KP), the [hi | lo] tile (2 x kWideRows x (KP + 8) elements) and the
// warps' fp32 staging (8 x 16 x kWideLdS). B's tile (KP x kWideLdB), read once, aliases them.
constexpr size_t wide_ring_bytes(int ks) { return size_t{kWideStages} * kWideRows * 16 * ks * 4; }
constexpr size_t wide_split_bytes(int ks) { return size_t{2} * kWideRows * (16 * ks + 8) * 2; }
constexpr size_t wide_stage_bytes() { return size_t{kWideThreads / 32} * 16 * kWideLdS * 4; }
constexpr size_t wide_smem(int ks) {
  return wide_ring_bytes(ks) + wide_split_bytes(ks) + wide_stage_bytes() >
                 size_t{16} * ks * kWideLdB * 2
             ? wide_ring_bytes(ks) + wide_split_bytes(ks) + wide_stage_bytes()
             : size_t{16} * ks * kWideLdB * 2;
}

// The bytes of a small local array as one vector register (memcpy: no aliasing assumptions).
template <class V, class T, int K>
__device__ __forceinline__ V wide_bits(const T (&v)[K]) {
  static_assert(sizeof(V) == sizeof(v), "vector and array sizes differ");
  V out;
  memcpy(&out, v, sizeof(V));
  return out;
}

// Asynchronous copies global -> shared of 4 or 16 bytes; zero-fill when !valid (src not read).
__device__ __forceinline__ void wide_cp4(float* dst, const float* src, bool valid) {
#if defined(PANTHER_CUDA_EMU)
  *dst = valid ? *src : 0.f;
#else
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(d), "l"(src),
               "r"(valid ? 4 : 0));
#endif
}
__device__ __forceinline__ void wide_cp16(float* dst, const float* src) {
#if defined(PANTHER_CUDA_EMU)
  for (int i = 0; i < 4; ++i) dst[i] = src[i];
#else
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src));
#endif
}
__device__ __forceinline__ void wide_cp_commit() {
#if !defined(PANTHER_CUDA_EMU)
  asm volatile("cp.async.commit_group;");
#endif
}
template <int Pending>
__device__ __forceinline__ void wide_cp_wait() {
#if !defined(PANTHER_CUDA_EMU)
  asm volatile("cp.async.wait_group %0;" ::"n"(Pending));
#endif
}

template <class T>
__device__ __forceinline__ float wide_f(T v) {
  if constexpr (std::is_same<T, __half>::value) return __half2float(v);
  else return __bfloat162float(v);
}
template <class T>
__device__ __forceinline__ T wide_t(float v) {
  if constexpr (std::is_same<T, __half>::value) return __float2half_rn(v);
  else return __float2bfloat16_rn(v);
}

// Row-major WMMA operand load from shared memory. For bf16 the CUDA build issues
// wmma.load ... .shared itself (NVVM leaves these loads generic; see favor_fused.cuh).
template <class Use, class T>
__device__ __forceinline__ void wide_load(wmma::fragment<Use, 16, 16, 16, T, wmma::row_major>& f,
                                          const T* p, int ld) {
#if !defined(PANTHER_CUDA_EMU)
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    static_assert(sizeof(f.x) == 16, "a bf16 m16n16k16 a/b fragment is 4 registers");
    unsigned* r = reinterpret_cast<unsigned*>(&f.x[0]);
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    if constexpr (std::is_same<Use, wmma::matrix_a>::value)
      asm volatile("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16 {%0,%1,%2,%3}, [%4], %5;"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a), "r"(ld));
    else
      asm volatile("wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16 {%0,%1,%2,%3}, [%4], %5;"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a), "r"(ld));
    return;
  }
#endif
  wmma::load_matrix_sync(f, p, ld);
}

// T: __half or __nv_bfloat16; KS = ceil(C / 16) <= kWideMaxC / 16. t32 (N, C) fp32 row-major
// (C = 2 Lk); U1, S2 (Lk, d_out); bias (d_out) or null; y (N, d_out). vec: d_out % 8 == 0 and
// U1, S2, y 16-byte aligned. grid (column tiles, row groups): row group g takes the row tiles
// g, g + gridDim.y, ...
template <class T, int KS>
__global__ void __launch_bounds__(kWideThreads, KS <= 2 ? 2 : 1) wide_tb_kernel(
    const float* __restrict__ t32, const T* __restrict__ U1, const T* __restrict__ S2,
    const T* __restrict__ bias, T* __restrict__ y, int64_t N, int64_t d_out, int64_t Lk,
    float scale, bool vec) {
  static_assert(KS >= 1 && KS * 16 <= kWideMaxC, "K steps of 16 up to kWideMaxC");
  constexpr int KP = KS * 16;                // C padded to the MMA's K
  constexpr int LdA = KP + 8;                // hi / lo tiles (elements)
  constexpr int kGroups = kWideRows * KP / 4;  // groups of 4 T values in a row tile
  PANTHER_DYNAMIC_SMEM(smem);
  T* sB = reinterpret_cast<T*>(smem);  // aliased by everything below once read
  float* ring = reinterpret_cast<float*>(smem);
  T* sH = reinterpret_cast<T*>(smem + wide_ring_bytes(KS));
  T* sL = sH + kWideRows * LdA;
  const int64_t C = 2 * Lk;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int wr = warp >> 2, wq = warp & 3;  // the warp's row half and column quarter
  float* stage = reinterpret_cast<float*>(smem + wide_ring_bytes(KS) + wide_split_bytes(KS)) +
                 warp * 16 * kWideLdS;
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kWideCols;
  const bool full_cols = vec && o0 + kWideCols <= d_out;

  // B's tile (rows [0, KP) of B, zero past C or d_out) -> shared -> this warp's fragments.
  if (full_cols) {
    for (int e = tid; e < KP * (kWideCols / 8); e += kWideThreads) {
      const int r = e / (kWideCols / 8), c = (e - r * (kWideCols / 8)) * 8;
      uint4 v{0u, 0u, 0u, 0u};
      if (r < C)
        v = *reinterpret_cast<const uint4*>((r < Lk ? U1 + r * d_out : S2 + (r - Lk) * d_out) +
                                            o0 + c);
      *reinterpret_cast<uint4*>(sB + r * kWideLdB + c) = v;
    }
  } else {
    for (int e = tid; e < KP * kWideCols; e += kWideThreads) {
      const int r = e / kWideCols, c = e - r * kWideCols;
      const int64_t o = o0 + c;
      T v = wide_t<T>(0.f);
      if (r < C && o < d_out) v = r < Lk ? U1[r * d_out + o] : S2[(r - Lk) * d_out + o];
      sB[r * kWideLdB + c] = v;
    }
  }
  __syncthreads();
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks)
#pragma unroll
    for (int j = 0; j < 4; ++j)
      wide_load(bf[ks][j], sB + ks * 16 * kWideLdB + wq * 64 + j * 16, kWideLdB);
  __syncthreads();  // sB is dead from here on

  // This lane's 8 output columns in the epilogue and their bias.
  const int64_t oc = o0 + wq * 64 + (lane & 7) * 8;
  float bv[8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
    bv[i] = (bias != nullptr && oc + i < d_out) ? wide_f(bias[oc + i]) : 0.f;

  const int64_t tiles = (N + kWideRows - 1) / kWideRows, step = gridDim.y;
  // Row tile i of this block lands in ring stage i % kWideStages as a row-major kWideRows x KP
  // block (zero past N or C, or past the last tile). Work comes in groups of 4 values: group
  // q = tid + kWideThreads j starts at element 4q (row 4q / KP, column 4q % KP); the thread that
  // copies a group also splits it, so the ring needs no barrier of its own.
  // vecT (C % 4 == 0, t32 16-byte aligned): a whole group is one 16-byte copy.
  const bool vecT = C % 4 == 0 && reinterpret_cast<uintptr_t>(t32) % 16 == 0;
  auto fetch = [&](int64_t tile, int stage_no) {
    float* dst = ring + stage_no * kWideRows * KP;
    for (int q = tid; q < kGroups; q += kWideThreads) {
      const int e = 4 * q, r = e / KP, c = e - r * KP;
      const int64_t n = tile * kWideRows + r;
      const bool row_ok = tile < tiles && n < N;
      if (vecT && row_ok && c < C) {
        wide_cp16(dst + e, t32 + n * C + c);
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const bool valid = row_ok && c + i < C;
          wide_cp4(dst + e + i, valid ? t32 + n * C + c + i : t32, valid);
        }
      }
    }
    wide_cp_commit();
  };
  int64_t bt = blockIdx.y;
#pragma unroll
  for (int i = 0; i < kWideStages - 1; ++i) fetch(bt + i * step, i);
  for (int i = 0; bt < tiles; bt += step, ++i) {
    fetch(bt + (kWideStages - 1) * step, (i + kWideStages - 1) % kWideStages);
    wide_cp_wait<kWideStages - 1>();  // tile i has landed (this thread's copies)
    __syncthreads();  // every warp is done with the previous [hi | lo] tile
    const float* cur = ring + (i % kWideStages) * kWideRows * KP;
    for (int q = tid; q < kGroups; q += kWideThreads) {
      const int e = 4 * q, r = e / KP, c = e - r * KP;
      const float4 v4 = *reinterpret_cast<const float4*>(cur + e);
      const float v[4] = {scale * v4.x, scale * v4.y, scale * v4.z, scale * v4.w};
      T hi[4], lo[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        hi[k] = wide_t<T>(v[k]);
        lo[k] = wide_t<T>(v[k] - wide_f(hi[k]));
      }
      *reinterpret_cast<uint2*>(sH + r * LdA + c) = wide_bits<uint2>(hi);
      *reinterpret_cast<uint2*>(sL + r * LdA + c) = wide_bits<uint2>(lo);
    }
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[j], 0.f);
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> ah, al;
      wide_load(ah, sH + wr * 16 * LdA + ks * 16, LdA);
      wide_load(al, sL + wr * 16 * LdA + ks * 16, LdA);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wmma::mma_sync(acc[j], ah, bf[ks][j], acc[j]);
        wmma::mma_sync(acc[j], al, bf[ks][j], acc[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j)
      wmma::store_matrix_sync(stage + j * 16, acc[j], kWideLdS, wmma::mem_row_major);
    __syncwarp();
    // 16 rows x 64 columns: 8 lanes cover a row's 128 bytes, 4 rows per pass.
#pragma unroll
    for (int it = 0; it < 4; ++it) {
      const int r = it * 4 + (lane >> 3);
      const int64_t n = bt * kWideRows + wr * 16 + r;
      if (n >= N) continue;
      const float* sv = stage + r * kWideLdS + (lane & 7) * 8;
      T* dst = y + n * d_out + oc;
      if (full_cols) {
        T out[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) out[k] = wide_t<T>(sv[k] + bv[k]);
        *reinterpret_cast<uint4*>(dst) = wide_bits<uint4>(out);
      } else {
        for (int k = 0; k < 8 && oc + k < d_out; ++k) dst[k] = wide_t<T>(sv[k] + bv[k]);
      }
    }
    __syncwarp();  // the staging is read before the next tile's accumulators overwrite it
  }
  wide_cp_wait<0>();  // no copy may still target shared memory when the block exits
}

}  // namespace panther::sketch

// ---- Host side ---------------------------------------------------------------------------------
#include "cuda/sketch_small.cuh"  // PANTHER_SKETCH_LAUNCH

namespace panther::sketch {
static_assert(kWideThreads == kThreads, "PANTHER_SKETCH_LAUNCH launches kThreads per block");

// y (N, d_out) in T = T32 B + bias as described at the top. T32: (N, 2Lk) fp32 (x A, unscaled);
// T: __half or __nv_bfloat16 (the CUDA types of the input dtype).
template <class T>
at::Tensor wide_output(const at::Tensor& T32, const at::Tensor& U1s, const at::Tensor& S2s,
                       const std::optional<at::Tensor>& bias, const detail::SketchDims& d,
                       double scale) {
  const int64_t Lk = d.L * d.k;
  at::Tensor t = T32.contiguous();
  at::Tensor u1 = U1s.contiguous(), s2 = S2s.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({d.N, d.d_out}, U1s.options());
  if (y.numel() == 0) return y;
  auto aligned = [](const at::Tensor& x) { return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0; };
  const bool vec = d.d_out % 8 == 0 && aligned(u1) && aligned(s2) && aligned(y);
  TORCH_INTERNAL_ASSERT(2 * Lk >= 1 && 2 * Lk <= kWideMaxC);
  // One wave of blocks (two per SM; one for KS > 2, whose B fragments take more registers),
  // each walking its share of the row tiles. Rounded down: a second, partial wave would double
  // the time of the whole call.
  const int ks = static_cast<int>((2 * Lk + 15) / 16);
  const int64_t col_tiles = (d.d_out + kWideCols - 1) / kWideCols;
  const int64_t row_tiles = (d.N + kWideRows - 1) / kWideRows;
  const int64_t wave = (ks <= 2 ? 2 : 1) * PANTHER_SKETCH_SMS();
  const int64_t groups =
      std::max<int64_t>(1, std::min<int64_t>({row_tiles, wave / col_tiles, 65535}));
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(groups));
  const size_t smem = wide_smem(ks);
  auto cp = [](const at::Tensor& x) { return reinterpret_cast<const T*>(x.data_ptr()); };
  auto launch = [&](auto kernel) {
#if !defined(PANTHER_CUDA_EMU)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
#endif
    PANTHER_SKETCH_LAUNCH(kernel, grid, smem, t.data_ptr<float>(), cp(u1), cp(s2),
                          has_bias ? cp(b) : nullptr, reinterpret_cast<T*>(y.data_ptr()), d.N,
                          d.d_out, Lk, static_cast<float>(scale), vec);
  };
  switch (ks) {
    case 1: launch(wide_tb_kernel<T, 1>); break;
    case 2: launch(wide_tb_kernel<T, 2>); break;
    case 3: launch(wide_tb_kernel<T, 3>); break;
    default: launch(wide_tb_kernel<T, 4>); break;
  }
  return y;
}

}  // namespace panther::sketch
