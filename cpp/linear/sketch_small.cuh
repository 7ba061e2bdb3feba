// Direct few-token kernels of panther::sketched_linear (N <= kSmallTokens rows of input).
//
// With a handful of tokens the GEMMs of the rank-2Lk factorisation are tiny and the cost is the
// host's: packing the operands, each cuBLAS call and the unpacking of the gradients each cost
// a launch and tens of microseconds of CPU. These kernels read the four
// sketch tensors in their own layouts, accumulate in fp32 and round each result once.
//
// Notation (cpp/linear/impl.h): C = 2Lk columns, s = 1 / (2L),
//   A (d_in, C)  = [S1_1 .. S1_L | U2_1 .. U2_L]   column c = l k + j (+ Lk): S1s/U2s[l, :, j]
//   B (C, d_out) = [U1_1; ..; U1_L; S2_1; ..; S2_L]    row c:    U1s/S2s[l, j, :]
//   forward:  T = s x A (N, C), y = T B + bias
//   backward: dT = g B^T, dx = s dT A^T, dA = s x^T dT, dB = T^T g, dbias = sum_n g
// T comes from the forward's saved intermediate [T | 1 0..] (in the input dtype), so its "1"
// column yields dbias as one more column of dB.
//
// Backward, two launches:
//   small_bwd1_kernel: split-K partials P[z] of g B^T (blocks [0, red_blocks)), and dB, dbias;
//   small_bwd2_kernel: dx and dA, each block summing the partials it needs.
//
// The file compiles as CUDA and, with PANTHER_CUDA_EMU defined, as host C++ against
// tests/emu/cuda_emu.h (tests/emu/sketch_small_test.cpp runs it on the CPU).
#pragma once
#include <cstdint>

#include "common/device.cuh"

namespace panther::sketch {

constexpr int64_t kSmallTokens = 128;  // tokens at or below which the direct kernels are used
constexpr int64_t kSmallMaxCols = 1024;  // largest C = 2Lk they take (shared-memory tiles)
constexpr int kThreads = 256;
constexpr int kRedRows = 2;     // tokens per split-K block
constexpr int kRedCols = 32;    // columns per split-K block
constexpr int kTileRows = 8;    // tokens per pass of the dx role
constexpr int kColTile = 32;    // columns per block of the outer-product roles (dA, dB)
// Dynamic shared memory of reduce_block: the column pointers and one partial per warp.
constexpr size_t kReduceSmem =
    kRedCols * sizeof(void*) + (kThreads / 32) * kRedRows * kRedCols * sizeof(float);

// Column c of [lo | hi] where each half holds L terms of k columns:
//   base(c) = (c < Lk ? lo : hi) + l * blk + j * jstride, element r at base(c)[r * estride].
// A: lo = S1s, hi = U2s, blk = d_in k, jstride = 1, estride = k.
// B (as columns of B^T): lo = U1s, hi = S2s, blk = k d_out, jstride = d_out, estride = 1.
// A null half (a gradient nobody asked for) gives null columns.
template <class P>
struct Cols {
  P* lo;
  P* hi;
  int64_t Lk, k, blk, jstride, estride;
  __host__ __device__ P* col(int64_t c) const {
    const bool second = c >= Lk;
    P* base = second ? hi : lo;
    if (base == nullptr) return nullptr;
    const int64_t t = second ? c - Lk : c, l = t / k, j = t - l * k;
    return base + l * blk + j * jstride;
  }
};

template <class T>
struct SmallBwd {
  const T* x;      // (N, d_in)
  const T* g;      // (N, d_out)
  const T* saved;  // (N, ld)
  Cols<const T> A, B;
  Cols<T> dA, dB;  // destinations of dS1/dU2 and dU1/dS2
  T* dbias;        // (d_out) or null
  T* dx;           // (N, d_in) or null
  float* P;        // (splits, N, C) partials of g B^T
  int64_t N, d_in, d_out, C, ld, splits, slice;
  int red_blocks, db_blocks, dx_blocks;
  float scale;
};

template <class T>
__device__ inline float to_f(T v) { return static_cast<float>(v); }

// P[z, n, c0 + c] = sum_{i in slice z} X[n, i] col(c0 + c)[i * estride] for rows n0, n0 + 1 and
// the block's kRedCols columns (split-K over K, so a few tokens still fill the GPU).
template <class T>
__device__ void reduce_block(const T* X, int64_t N, int64_t K, const Cols<const T>& cols,
                             int64_t C, float* P, int64_t n0, int64_t c0, int64_t z, int64_t slice,
                             unsigned char* smem) {
  const T** src = reinterpret_cast<const T**>(smem);
  float* part = reinterpret_cast<float*>(smem + kRedCols * sizeof(T*));  // [warps][rows*cols]
  const int64_t i0 = z * slice, i1 = i0 + slice < K ? i0 + slice : K;
  const int64_t cleft = C - c0;
  const int ncols = static_cast<int>(cleft < kRedCols ? cleft : kRedCols);
  if (threadIdx.x < kRedCols) {
    const int t = static_cast<int>(threadIdx.x), tc = t < ncols ? t : ncols - 1;
    src[threadIdx.x] = cols.col(c0 + tc);
  }
  __syncthreads();
  float acc[kRedRows][kRedCols];
#pragma unroll
  for (int r = 0; r < kRedRows; ++r)
#pragma unroll
    for (int c = 0; c < kRedCols; ++c) acc[r][c] = 0.f;
  const int64_t es = cols.estride;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += kThreads) {
    float xv[kRedRows];
#pragma unroll
    for (int r = 0; r < kRedRows; ++r) xv[r] = (n0 + r < N) ? to_f(X[(n0 + r) * K + i]) : 0.f;
#pragma unroll
    for (int c = 0; c < kRedCols; ++c) {
      const float a = c < ncols ? to_f(src[c][i * es]) : 0.f;
#pragma unroll
      for (int r = 0; r < kRedRows; ++r) acc[r][c] += xv[r] * a;
    }
  }
  // Block reduction: warp shuffles, then one partial per warp through shared memory.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < kRedRows; ++r)
#pragma unroll
    for (int c = 0; c < kRedCols; ++c) {
      float v = acc[r][c];
      for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
      if (lane == 0) part[warp * kRedRows * kRedCols + r * kRedCols + c] = v;
    }
  __syncthreads();
  for (int e = threadIdx.x; e < kRedRows * kRedCols; e += kThreads) {
    const int r = e / kRedCols, c = e - r * kRedCols;
    if (n0 + r >= N || c >= ncols) continue;
    float v = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) v += part[w * kRedRows * kRedCols + e];
    P[(z * N + n0 + r) * C + c0 + c] = v;
  }
}

// dst(c)[r * estride] = mul * sum_n X[n, r] Ts[n, c] for the block's rows r0 + threadIdx.x and
// columns c0 + [0, ncols); Ts (N x kColTile, shared) already holds the columns' values.
template <class T>
__device__ void outer_block(const T* X, int64_t N, int64_t R, const float* Ts, int64_t r0,
                            int64_t c0, int ncols, const Cols<T>& dst, T* extra,
                            int64_t extra_col) {
  const int64_t r = r0 + threadIdx.x;
  if (r >= R) return;
  float acc[kColTile];
#pragma unroll
  for (int c = 0; c < kColTile; ++c) acc[c] = 0.f;
#pragma unroll 4
  for (int64_t n = 0; n < N; ++n) {
    const float xv = to_f(X[n * R + r]);
#pragma unroll
    for (int c = 0; c < kColTile; ++c) acc[c] += xv * Ts[n * kColTile + c];
  }
#pragma unroll
  for (int c = 0; c < kColTile; ++c) {
    if (c >= ncols) break;
    const int64_t cc = c0 + c;
    T* d = cc == extra_col ? extra : dst.col(cc);
    if (d != nullptr) d[r * (cc == extra_col ? 1 : dst.estride)] = static_cast<T>(acc[c]);
  }
}

// Launch 1: blocks [0, red_blocks) form the partials of dT = g B^T; the next db_blocks blocks
// form dB = T^T g and dbias (columns c in [0, C]: column C is the saved "1" column).
template <class T>
__global__ void __launch_bounds__(kThreads) small_bwd1_kernel(SmallBwd<T> p) {
  PANTHER_DYNAMIC_SMEM(smem);
  const int64_t b = blockIdx.x;
  if (b < p.red_blocks) {
    const int64_t rows = (p.N + kRedRows - 1) / kRedRows, cblocks = (p.C + kRedCols - 1) / kRedCols;
    const int64_t z = b / (rows * cblocks), rem = b - z * rows * cblocks;
    const int64_t cb = rem / rows, nb = rem - cb * rows;
    reduce_block(p.g, p.N, p.d_out, p.B, p.C, p.P, nb * kRedRows, cb * kRedCols, z, p.slice, smem);
    return;
  }
  // dB role: tile (rows of d_out) x (kColTile columns of [0, C]).
  const int64_t rtiles = (p.d_out + kThreads - 1) / kThreads;
  const int64_t t = b - p.red_blocks, ct = t / rtiles, rt = t - ct * rtiles;
  const int64_t c0 = ct * kColTile, cleft = p.C + 1 - c0;
  const int ncols = static_cast<int>(cleft < kColTile ? cleft : kColTile);
  float* Ts = reinterpret_cast<float*>(smem);
  for (int64_t e = threadIdx.x; e < p.N * kColTile; e += kThreads) {
    const int64_t n = e / kColTile, c = e - n * kColTile, cc = c0 + c;
    const T* row = p.saved + n * p.ld;
    Ts[e] = c < ncols ? to_f(row[cc]) : 0.f;  // (cc == C: the "1" column)
  }
  __syncthreads();
  outer_block(p.g, p.N, p.d_out, Ts, rt * kThreads, c0, ncols, p.dB, p.dbias, p.C);
}

// Launch 2: blocks [0, dx_blocks) form dx = s dT A^T (a d_in tile x a token tile each); the
// rest form dA = s x^T dT. Each block sums the split-K partials of dT it needs.
template <class T>
__global__ void __launch_bounds__(kThreads) small_bwd2_kernel(SmallBwd<T> p) {
  PANTHER_DYNAMIC_SMEM(smem);
  const int64_t b = blockIdx.x, C = p.C, N = p.N;
  auto dT = [&](int64_t n, int64_t c) {
    float v = 0.f;
    for (int64_t z = 0; z < p.splits; ++z) v += p.P[(z * N + n) * C + c];
    return v * p.scale;
  };
  if (b < p.dx_blocks) {
    // One (d_in tile, token tile) per block: the latency-bound column loop runs once per block.
    const int64_t itiles = (p.d_in + kThreads - 1) / kThreads;
    const int64_t n0 = (b / itiles) * kTileRows;
    const T** acol = reinterpret_cast<const T**>(smem);                 // C column pointers
    float* tile = reinterpret_cast<float*>(smem + C * sizeof(T*));     // kTileRows x C
    for (int64_t c = threadIdx.x; c < C; c += kThreads) acol[c] = p.A.col(c);
    const int rows = static_cast<int>(N - n0 < kTileRows ? N - n0 : kTileRows);
    for (int64_t e = threadIdx.x; e < rows * C; e += kThreads) tile[e] = dT(n0 + e / C, e % C);
    __syncthreads();
    const int64_t i = (b % itiles) * kThreads + threadIdx.x;
    if (i >= p.d_in) return;
    const int64_t es = p.A.estride;
    float acc[kTileRows];
#pragma unroll
    for (int r = 0; r < kTileRows; ++r) acc[r] = 0.f;
#pragma unroll 8
    for (int64_t c = 0; c < C; ++c) {
      const float a = to_f(acol[c][i * es]);
#pragma unroll
      for (int r = 0; r < kTileRows; ++r) acc[r] += tile[r * C + c] * a;
    }
    for (int r = 0; r < rows; ++r) p.dx[(n0 + r) * p.d_in + i] = static_cast<T>(acc[r]);
    return;
  }
  // dA role: tile (rows of d_in) x (kColTile columns of C).
  const int64_t rtiles = (p.d_in + kThreads - 1) / kThreads;
  const int64_t t = b - p.dx_blocks, ct = t / rtiles, rt = t - ct * rtiles;
  const int64_t c0 = ct * kColTile, cleft = C - c0;
  const int ncols = static_cast<int>(cleft < kColTile ? cleft : kColTile);
  float* Ts = reinterpret_cast<float*>(smem);
  for (int64_t e = threadIdx.x; e < N * kColTile; e += kThreads) {
    const int64_t n = e / kColTile, c = e - n * kColTile;
    Ts[e] = c < ncols ? dT(n, c0 + c) : 0.f;
  }
  __syncthreads();
  outer_block(p.x, N, p.d_in, Ts, rt * kThreads, c0, ncols, p.dA, static_cast<T*>(nullptr), -1);
}

}  // namespace panther::sketch

// ---------------------------------------------------------------------------------------------
// Host side (ATen), shared by the CUDA build and the emulator test.
#include <ATen/ATen.h>
#include <algorithm>
#include <array>
#include <tuple>

#include "linear/impl.h"

#ifdef PANTHER_CUDA_EMU
#define PANTHER_SKETCH_LAUNCH(kernel, grid, smem, ...) \
  ::emu::launch(kernel, dim3(grid), dim3(::panther::sketch::kThreads), smem, __VA_ARGS__)
#define PANTHER_SKETCH_SMS() int64_t{132}
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#define PANTHER_SKETCH_LAUNCH(kernel, grid, smem, ...)                                     \
  do {                                                                                     \
    kernel<<<grid, ::panther::sketch::kThreads, smem, at::cuda::getCurrentCUDAStream()>>>( \
        __VA_ARGS__);                                                                      \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                        \
  } while (0)
#define PANTHER_SKETCH_SMS() \
  static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount)
#endif

namespace panther::sketch {

// Whether the direct backward takes this call (fp64 stays on cuBLAS).
inline bool small_backward_applies(const detail::SketchDims& d, at::ScalarType dt) {
  return d.N >= 1 && d.N <= kSmallTokens && d.d_in >= 1 && d.d_out >= 1 && dt != at::kDouble &&
         2 * d.L * d.k <= kSmallMaxCols;
}

// Gradients (x, S1s, S2s, U1s, U2s, bias) per mask, in the input dtype, from g (N, d_out),
// x (N, d_in) and the forward's saved intermediate.
template <class T>
detail::Grads6 small_backward(const at::Tensor& grad_out, const at::Tensor& input,
                              const at::Tensor& saved, const at::Tensor& S1s,
                              const at::Tensor& S2s, const at::Tensor& U1s, const at::Tensor& U2s,
                              const detail::SketchDims& d, std::array<bool, 6> mask) {
  const int64_t Lk = d.L * d.k, C = 2 * Lk;
  at::Tensor g = grad_out.reshape({d.N, d.d_out}).contiguous();
  at::Tensor x = input.reshape({d.N, d.d_in}).contiguous();
  at::Tensor sv = saved.contiguous();
  auto s1 = S1s.contiguous(), s2 = S2s.contiguous(), u1 = U1s.contiguous(), u2 = U2s.contiguous();
  const auto opts = input.options();
  auto alloc = [&](bool want, at::IntArrayRef shape) {
    return want ? at::empty(shape, opts) : at::Tensor();
  };
  auto ptr = [](const at::Tensor& t) {
    return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
  };
  auto cptr = [](const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); };
  at::Tensor dx = alloc(mask[0], {d.N, d.d_in});
  at::Tensor gS1 = alloc(mask[1], S1s.sizes()), gS2 = alloc(mask[2], S2s.sizes());
  at::Tensor gU1 = alloc(mask[3], U1s.sizes()), gU2 = alloc(mask[4], U2s.sizes());
  at::Tensor gb = alloc(mask[5], {d.d_out});

  SmallBwd<T> p{};
  p.x = cptr(x);
  p.g = cptr(g);
  p.saved = cptr(sv);
  p.A = Cols<const T>{cptr(s1), cptr(u2), Lk, d.k, d.d_in * d.k, 1, d.k};
  p.B = Cols<const T>{cptr(u1), cptr(s2), Lk, d.k, d.k * d.d_out, d.d_out, 1};
  p.dA = Cols<T>{ptr(gS1), ptr(gU2), Lk, d.k, d.d_in * d.k, 1, d.k};
  p.dB = Cols<T>{ptr(gU1), ptr(gS2), Lk, d.k, d.k * d.d_out, d.d_out, 1};
  p.dbias = ptr(gb);
  p.dx = ptr(dx);
  p.N = d.N, p.d_in = d.d_in, p.d_out = d.d_out, p.C = C, p.ld = sv.size(1);
  p.scale = static_cast<float>(1.0 / (2.0 * static_cast<double>(d.L)));

  const bool need_dT = mask[0] || mask[1] || mask[4];
  const bool need_dB = mask[2] || mask[3] || mask[5];
  at::Tensor P;
  if (need_dT) {
    // Split d_out into slices of at least 512 so that about 4 blocks per SM are busy.
    const int64_t row_blocks = (d.N + kRedRows - 1) / kRedRows;
    const int64_t col_blocks = (C + kRedCols - 1) / kRedCols;
    int64_t splits = std::max<int64_t>(
        1, std::min<int64_t>((d.d_out + 511) / 512,
                             (4 * PANTHER_SKETCH_SMS()) / (row_blocks * col_blocks)));
    p.slice = (d.d_out + splits - 1) / splits;
    p.splits = (d.d_out + p.slice - 1) / p.slice;
    p.red_blocks = static_cast<int>(row_blocks * col_blocks * p.splits);
    P = at::empty({p.splits, d.N, C}, opts.dtype(at::kFloat));
    p.P = P.data_ptr<float>();
  }
  if (need_dB)
    p.db_blocks = static_cast<int>(((d.d_out + kThreads - 1) / kThreads) *
                                   ((C + 1 + kColTile - 1) / kColTile));
  const size_t smem_outer = static_cast<size_t>(d.N) * kColTile * sizeof(float);
  if (p.red_blocks + p.db_blocks > 0)
    PANTHER_SKETCH_LAUNCH(small_bwd1_kernel<T>, static_cast<unsigned>(p.red_blocks + p.db_blocks),
                          std::max(kReduceSmem, smem_outer), p);
  const int64_t d_in_tiles = (d.d_in + kThreads - 1) / kThreads;
  p.dx_blocks = mask[0] ? static_cast<int>(d_in_tiles * ((d.N + kTileRows - 1) / kTileRows)) : 0;
  const int64_t da_blocks = (mask[1] || mask[4]) ? d_in_tiles * ((C + kColTile - 1) / kColTile) : 0;
  const size_t smem_dx = C * sizeof(T*) + kTileRows * C * sizeof(float);
  if (p.dx_blocks + da_blocks > 0)
    PANTHER_SKETCH_LAUNCH(small_bwd2_kernel<T>, static_cast<unsigned>(p.dx_blocks + da_blocks),
                          std::max(smem_dx, smem_outer), p);
  if (mask[0]) dx = dx.reshape(input.sizes());
  return detail::select_grads(mask, {dx, gS1, gS2, gU1, gU2, gb});
}

}  // namespace panther::sketch
