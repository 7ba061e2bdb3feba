// Many-token fp16/bf16 forward of panther::sketched_linear: the first GEMM, T = x A, as one
// stream over the input.
//
// With few sketch columns (C = 2Lk <= 64) the first GEMM is a pure stream: x (N, d_in) is read
// once (128 MB for 8192 x 8192 bf16) and T (N, C) is tiny. cuBLAS ran it at about 2.2 TB/s, and
// a shared-memory-pipelined WMMA kernel (cp.async stages of x and A, block barriers) at only
// 1.7-1.8 TB/s, whatever its tile shape. xa_kernel instead streams x straight into registers:
//   * the depth d_in is cut into S slices of Ds; block (b, s) keeps A's slice s (Ds x C, read in
//     place from S1s / U2s) in shared memory for its whole life and streams the rows of its
//     16-row tiles of x over that slice;
//   * each warp owns its tiles and needs no barrier: per 32-deep chunk a lane loads 16 bytes of
//     row g and of row g + 8 (g = lane / 4) with one 128-bit load each, several chunks ahead,
//     and feeds them to mma.sync m16n8k16 as A fragments as they are. That works because the
//     sum over depth does not care about the order of its terms: lane t's eight depths
//     8t .. 8t + 7 play the fragment's k = 2t, 2t+1, 2t+8, 2t+9 of two k-steps. A's rows are
//     stored in shared memory in the same permuted order (within each 32-row chunk, depth
//     8t + 4s + 2m + h sits at row 16s + 8m + 2t + h), so one ldmatrix.x4.trans with lane l
//     pointing at row l yields the B fragments of both k-steps;
//   * the S partial sums are written side by side; the hi/lo split that follows adds them.
// Requirements (xa_applies): C % 16 == 0 and C <= 64 (k % 8 == 0), d_in % 8 == 0, and 16-byte
// aligned contiguous x, S1s and U2s.
//
// The file compiles as CUDA and, with PANTHER_CUDA_EMU defined, as host C++ against
// tests/emu/cuda_emu.h (tests/emu/sketch_test.cpp runs it on the CPU).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cuda/mma.cuh"

#ifndef PANTHER_CUDA_EMU
#ifndef PANTHER_DYNAMIC_SMEM
#define PANTHER_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif
#endif

#include <ATen/ATen.h>

#include "kernels/sketched_linear.h"

#ifdef PANTHER_CUDA_EMU
#define PANTHER_STREAM_LAUNCH(kernel, grid, smem, ...) \
  ::emu::launch(kernel, grid, dim3(::panther::stream::kThreads), smem, __VA_ARGS__)
#define PANTHER_STREAM_SMS() int64_t{132}
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#define PANTHER_STREAM_LAUNCH(kernel, grid, smem, ...)                                      \
  do {                                                                                      \
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, \
                                        static_cast<int>(smem)));                           \
    kernel<<<grid, ::panther::stream::kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(  \
        __VA_ARGS__);                                                                       \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                         \
  } while (0)
#define PANTHER_STREAM_SMS() \
  static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount)
#endif

namespace panther::stream {

constexpr int kWarps = 16, kThreads = 32 * kWarps;  // one block per SM
constexpr int kAhead = 4;           // 32-deep chunks loaded ahead per lane (2 x 16 bytes each)
constexpr int kMaxCols = 64;
constexpr int64_t kMaxSmem = 200 * 1024;  // A slice budget per block

template <class T>
struct Args {
  const T* x;   // (N, d_in)
  const T* S1;  // (L, d_in, k)
  const T* U2;  // (L, d_in, k)
  float* t;     // (S, N, C) fp32: slice s's partial sums in t[s]
  int64_t N;
  int d_in, k, Lk;
  int Ds;             // depth per slice (multiple of 32); slice s = blockIdx.y
  int tiles_per_block;  // 16-row tiles of block blockIdx.x: [b * tpb, (b + 1) * tpb)
};

// Row of A's shared-memory slice that holds depth i (see the top comment).
__device__ __forceinline__ int slice_row(int i) {
  const int d = i & 31;  // d = 8t + 4s + 2m + h
  return (i & ~31) | ((d >> 2) & 1) << 4 | ((d >> 1) & 1) << 3 | (d >> 3) << 1 | (d & 1);
}

// 16 bytes of a row of x (streamed: read once).
__device__ __forceinline__ uint4 load_x16(const void* p) {
#if defined(PANTHER_CUDA_EMU)
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
#else
  return __ldcs(reinterpret_cast<const uint4*>(p));
#endif
}

// grid (row blocks, S slices), kThreads threads. NC = C / 16.
template <class T, int NC>
__global__ void __launch_bounds__(kThreads, 1) xa_kernel(Args<T> p) {
  PANTHER_DYNAMIC_SMEM(smem);
  constexpr int C = 16 * NC, NT = C / 8, LA = C + 8;  // LA: padded row (conflict-free ldmatrix)
  T* As = reinterpret_cast<T*>(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int s0 = static_cast<int>(blockIdx.y) * p.Ds;
  const int depth = std::min(p.Ds, p.d_in - s0);  // of this slice, > 0, a multiple of 8

  // A's slice, permuted rows, 16-byte units; rows past d_in are zero.
  for (int u = tid; u < p.Ds * (C / 8); u += kThreads) {
    const int i = u / (C / 8), c = (u % (C / 8)) * 8;
    const bool second = c >= p.Lk;
    const int cc = second ? c - p.Lk : c, l = cc / p.k, j = cc - l * p.k;
    const bool v = i < depth;
    const T* src = (second ? p.U2 : p.S1) + (static_cast<int64_t>(l) * p.d_in + s0 + i) * p.k + j;
    mma::cp_async16(As + slice_row(i) * LA + c, v ? src : p.S1, v);
  }
  mma::cp_async_commit();

  const int64_t tiles = (p.N + 15) / 16;
  const int64_t tile_end = std::min<int64_t>(tiles, (blockIdx.x + int64_t{1}) * p.tiles_per_block);
  const int chunks = (depth + 31) / 32, groups = (chunks + kAhead - 1) / kAhead;

  // Loads chunks [q * kAhead, (q + 1) * kAhead) of rows g and g + 8 of a tile.
  auto load = [&](uint4 (&v)[kAhead][2], const T* ra, const T* rb, int q) {
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int d = (q * kAhead + u) * 32 + 8 * t;
      const bool ok = d < depth;
      v[u][0] = ok && ra != nullptr ? load_x16(ra + d) : uint4{0, 0, 0, 0};
      v[u][1] = ok && rb != nullptr ? load_x16(rb + d) : uint4{0, 0, 0, 0};
    }
  };
  auto rows = [&](int64_t tile, const T*& ra, const T*& rb) {
    const int64_t r = tile * 16 + g;
    ra = r < p.N ? p.x + r * p.d_in + s0 : nullptr;
    rb = r + 8 < p.N ? p.x + (r + 8) * p.d_in + s0 : nullptr;
  };

  int64_t tile = blockIdx.x * static_cast<int64_t>(p.tiles_per_block) + warp;
  const T *ra = nullptr, *rb = nullptr;
  uint4 cur[kAhead][2];
  if (tile < tile_end) {  // the first loads fly while A's slice lands
    rows(tile, ra, rb);
    load(cur, ra, rb, 0);
  }
  mma::cp_async_wait<0>();
  __syncthreads();

  for (; tile < tile_end; tile += kWarps) {
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    for (int q = 0; q < groups; ++q) {
      uint4 nxt[kAhead][2];
      const bool more = q + 1 < groups;
      if (more) load(nxt, ra, rb, q + 1);
#pragma unroll
      for (int u = 0; u < kAhead; ++u) {
        const int chunk = q * kAhead + u;
        if (chunk >= chunks) break;  // warp-uniform
        const T* arow = As + (chunk * 32 + lane) * LA;
        const unsigned a0[4] = {cur[u][0].x, cur[u][1].x, cur[u][0].y, cur[u][1].y};
        const unsigned a1[4] = {cur[u][0].z, cur[u][1].z, cur[u][0].w, cur[u][1].w};
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          unsigned b[4];
          mma::ldmatrix_x4_trans(b, arow + 8 * j);
          const unsigned b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
          mma::mma_16816<T>(acc[j], a0, b0, acc[j]);
          mma::mma_16816<T>(acc[j], a1, b1, acc[j]);
        }
      }
      if (more) {
#pragma unroll
        for (int u = 0; u < kAhead; ++u) cur[u][0] = nxt[u][0], cur[u][1] = nxt[u][1];
      }
    }
    // acc[j]: (row g, cols 8j + 2t, +1) and (row g + 8, same cols).
    const int64_t r = tile * 16 + g;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t row = r + (e >> 1) * 8;
        if (row >= p.N) continue;
        p.t[(blockIdx.y * p.N + row) * C + 8 * j + 2 * t + (e & 1)] = acc[j][e];
      }
    }
    if (tile + kWarps < tile_end) {
      rows(tile + kWarps, ra, rb);
      load(cur, ra, rb, 0);
    }
  }
}

// The kernel's element type for an ATen one (the same types under the emulator).
template <class T>
struct Native {
  using type = T;
};
#if !defined(PANTHER_CUDA_EMU)
template <>
struct Native<c10::Half> {
  using type = __half;
};
template <>
struct Native<c10::BFloat16> {
  using type = __nv_bfloat16;
};
#endif

inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Whether xa_t32 takes this forward: x2 (N, d_in) fp16/bf16 with at least min_rows rows, few
// sketch columns, and operands it can load in 16-byte units.
inline bool xa_applies(const at::Tensor& x2, const at::Tensor& S1s, const at::Tensor& U2s,
                       const detail::SketchDims& d, int64_t min_rows) {
  const int64_t C = 2 * d.L * d.k;
  return detail::is_low_precision(x2.scalar_type()) && d.N >= min_rows && C <= kMaxCols &&
         d.k % 8 == 0 && d.d_in % 8 == 0 && d.d_in >= 8 && d.d_in < (int64_t{1} << 30) &&
         x2.is_contiguous() && S1s.is_contiguous() && U2s.is_contiguous() && aligned16(x2) &&
         aligned16(S1s) && aligned16(U2s);
}

// Slices and row blocks: every block is resident at once (S * row blocks <= SMs), each A slice
// fits kMaxSmem, and the slowest warp's work (its tiles x Ds) is smallest; ties go to fewer
// slices (fewer atomics).
struct Plan {
  int64_t S, Ds, row_blocks, tiles_per_block;
};
inline Plan xa_plan(int64_t N, int64_t d_in, int64_t C, int64_t sms, int64_t force_slices = 0) {
  const int64_t tiles = (N + 15) / 16, warp_rows = (tiles + kWarps - 1) / kWarps;
  const int64_t max_ds = std::max<int64_t>(32, kMaxSmem / ((C + 8) * 2) / 32 * 32);
  auto ds_for = [&](int64_t S) { return ((d_in + S - 1) / S + 31) / 32 * 32; };
  const int64_t s_min = (d_in + max_ds - 1) / max_ds;
  Plan best{0, 0, 0, 0};
  int64_t best_cost = -1;
  const int64_t s_lo = force_slices > 0 ? force_slices : s_min;
  const int64_t s_hi = force_slices > 0 ? force_slices : std::max(s_min, std::min<int64_t>(s_min + 32, (d_in + 31) / 32));
  for (int64_t S = s_lo; S <= s_hi; ++S) {
    const int64_t Ds = ds_for(S);
    if ((S - 1) * Ds >= d_in) continue;  // an empty slice
    const int64_t rb = std::max<int64_t>(1, std::min(sms / S, warp_rows));
    const int64_t tpb = (tiles + rb - 1) / rb;
    const int64_t cost = (tpb + kWarps - 1) / kWarps * Ds;
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best = {S, Ds, (tiles + tpb - 1) / tpb, tpb};
    }
  }
  TORCH_INTERNAL_ASSERT(best_cost >= 0 && best.Ds <= max_ds);
  return best;
}

// T (N, C) fp32 = x2 [S1 | U2] (unscaled) as S partial sums over slices of d_in: (S, N, C).
// force_slices > 0 fixes S (tests).
template <class A>
at::Tensor xa_t32(const at::Tensor& x2, const at::Tensor& S1s, const at::Tensor& U2s,
                  const detail::SketchDims& d, int64_t force_slices = 0) {
  using T = typename Native<A>::type;
  const int64_t C = 2 * d.L * d.k;
  const Plan pl = xa_plan(d.N, d.d_in, C, PANTHER_STREAM_SMS(), force_slices);
  const auto opts = x2.options().dtype(at::kFloat);
  at::Tensor t = at::empty({pl.S, d.N, C}, opts);
  if (d.N == 0) return t;
  Args<T> p{};
  p.x = reinterpret_cast<const T*>(x2.data_ptr());
  p.S1 = reinterpret_cast<const T*>(S1s.data_ptr());
  p.U2 = reinterpret_cast<const T*>(U2s.data_ptr());
  p.t = t.data_ptr<float>();
  p.N = d.N, p.d_in = static_cast<int>(d.d_in), p.k = static_cast<int>(d.k);
  p.Lk = static_cast<int>(d.L * d.k);
  p.Ds = static_cast<int>(pl.Ds), p.tiles_per_block = static_cast<int>(pl.tiles_per_block);
  const dim3 grid(static_cast<unsigned>(pl.row_blocks), static_cast<unsigned>(pl.S));
  const size_t smem = static_cast<size_t>(pl.Ds) * (C + 8) * sizeof(T);
  auto launch = [&](auto kernel) { PANTHER_STREAM_LAUNCH(kernel, grid, smem, p); };
  switch (C / 16) {
    case 1: launch(xa_kernel<T, 1>); break;
    case 2: launch(xa_kernel<T, 2>); break;
    case 3: launch(xa_kernel<T, 3>); break;
    case 4: launch(xa_kernel<T, 4>); break;
    default: TORCH_INTERNAL_ASSERT(false, "xa_t32: C = ", C);
  }
  return t;
}

}  // namespace panther::stream
