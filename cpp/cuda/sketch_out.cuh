// Many-token fp16/bf16 forward of panther::sketched_linear, second GEMM: y = H B2 + bias, with
// H = [hi | lo] (N, K) the saved split of T and B2 = [B; B] (K, d_out), K = 4Lk <= 128.
//
// The time of this GEMM is that of writing y (128 MB for 8192 x 8192 bf16): a fill of that size
// runs at 3.3 TB/s (40 us), cuBLAS's GEMM at ~2.5 TB/s (52 us), which stages its tiles through
// shared memory for a TMA store. out_kernel keeps the products in registers instead:
//   * block (c, r) owns 512 output columns and a group of rows; each of its 8 warps owns 64 of
//     the columns and holds their B fragments (K x 64) in registers for its whole life, loaded
//     once with ldmatrix.trans from a shared copy of the block's B2 slice;
//   * the rows stream through shared memory in 128-row tiles of H (cp.async, double-buffered);
//     per 16-row step a warp loads its A fragments with ldmatrix and runs 8 x K/16 mma.sync,
//     the accumulators starting at the bias (fp32, rounded once at the end as in nn.Linear);
//   * the 16 x 64 result is rounded and passed through a small warp-private shared buffer only
//     to turn the fragments' 4-byte pieces into 16-byte row segments, then stored.
// Requirements (out_applies): K % 16 == 0, K <= 128, d_out % 8 == 0, 16-byte aligned rows.
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
#define PANTHER_OUT_LAUNCH(kernel, grid, smem, ...) \
  ::emu::launch(kernel, grid, dim3(::panther::sketch_out::kThreads), smem, __VA_ARGS__)
#define PANTHER_OUT_SMS() int64_t{132}
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#define PANTHER_OUT_LAUNCH(kernel, grid, smem, ...)                                         \
  do {                                                                                      \
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, \
                                        static_cast<int>(smem)));                           \
    kernel<<<grid, ::panther::sketch_out::kThreads, smem,                                   \
             at::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);                              \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                         \
  } while (0)
#define PANTHER_OUT_SMS() \
  static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount)
#endif

namespace panther::sketch_out {

constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int kWarpCols = 64, kCols = kWarps * kWarpCols;  // output columns per warp / block
constexpr int kTileRows = 128;                                // rows of H per pipeline stage
constexpr int kMaxK = 128;

template <class T>
struct Args {
  const T* H;     // (N, K), row stride ldh
  const T* B2;    // (K, d_out)
  const T* bias;  // (d_out) or nullptr
  T* y;           // (N, d_out)
  int64_t N, ldh;
  int d_out, rows_per_block;  // rows_per_block: a multiple of kTileRows
};

// Shared memory (elements of T): B2 slice K x (kCols + 8), two H tiles kTileRows x (K + 8), and
// per warp a 16 x (kWarpCols + 8) staging tile. The pads make every ldmatrix row set and the
// staging stores conflict-free.
template <int K>
struct Smem {
  static constexpr int LB = kCols + 8, LH = K + 8, LS = kWarpCols + 8;
  static constexpr int b = 0, h = K * LB, s = h + 2 * kTileRows * LH;
  static constexpr int total = s + kWarps * 16 * LS;
};

// 4- and 16-byte moves at addresses the caller knows to be aligned (memcpy under the emulator,
// which builds with strict aliasing).
__device__ __forceinline__ void put4(void* dst, unsigned v) {
#if defined(PANTHER_CUDA_EMU)
  std::memcpy(dst, &v, 4);
#else
  *reinterpret_cast<unsigned*>(dst) = v;
#endif
}
__device__ __forceinline__ void move16(void* dst, const void* src) {
#if defined(PANTHER_CUDA_EMU)
  std::memcpy(dst, src, 16);
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

// grid (column blocks, row groups), kThreads threads. KT = K / 16.
template <class T, int KT>
__global__ void __launch_bounds__(kThreads, 1) out_kernel(Args<T> p) {
  constexpr int K = 16 * KT;
  using S = Smem<K>;
  PANTHER_DYNAMIC_SMEM(smem);
  T* const sb = reinterpret_cast<T*>(smem) + S::b;
  T* const sh = reinterpret_cast<T*>(smem) + S::h;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int col0 = static_cast<int>(blockIdx.x) * kCols;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * p.rows_per_block;
  const int64_t row_end = std::min<int64_t>(p.N, row0 + p.rows_per_block);
  const int tiles = static_cast<int>((row_end - row0 + kTileRows - 1) / kTileRows);

  // H tile `it` -> buffer it % 2 (rows past N zero-filled).
  auto issue_tile = [&](int it) {
    if (it < tiles) {
      T* dst = sh + (it & 1) * kTileRows * S::LH;
      const int64_t r0 = row0 + static_cast<int64_t>(it) * kTileRows;
      for (int u = tid; u < kTileRows * (K / 8); u += kThreads) {
        const int r = u / (K / 8), c = (u % (K / 8)) * 8;
        const bool v = r0 + r < row_end;
        mma::cp_async16(dst + r * S::LH + c, v ? p.H + (r0 + r) * p.ldh + c : p.H, v);
      }
    }
    mma::cp_async_commit();
  };
  // The block's B2 slice (columns past d_out zero-filled), with tile 0; then tile 1.
  for (int u = tid; u < K * (kCols / 8); u += kThreads) {
    const int k = u / (kCols / 8), c = (u % (kCols / 8)) * 8;
    const bool v = col0 + c < p.d_out;
    mma::cp_async16(sb + k * S::LB + c, v ? p.B2 + static_cast<int64_t>(k) * p.d_out + col0 + c : p.B2, v);
  }
  issue_tile(0);
  issue_tile(1);
  mma::cp_async_wait<1>();
  __syncthreads();

  // This warp's B fragments: b[ks][j] for k-step ks and n-tile j (8 columns each).
  const int wc = warp * kWarpCols;
  unsigned b[KT][8][2];
#pragma unroll
  for (int ks = 0; ks < KT; ++ks) {
#pragma unroll
    for (int jp = 0; jp < 4; ++jp) {
      unsigned r[4];
      mma::ldmatrix_x4_trans(r, sb + (16 * ks + (lane & 15)) * S::LB + wc + 16 * jp + (lane >> 4) * 8);
      b[ks][2 * jp][0] = r[0], b[ks][2 * jp][1] = r[1];
      b[ks][2 * jp + 1][0] = r[2], b[ks][2 * jp + 1][1] = r[3];
    }
  }
  // Bias of this lane's columns 8j + 2t, +1.
  float bias[8][2];
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int c = col0 + wc + 8 * j + 2 * t + e;
      bias[j][e] = p.bias != nullptr && c < p.d_out ? static_cast<float>(p.bias[c]) : 0.f;
    }

  T* const stage = reinterpret_cast<T*>(smem) + S::s + warp * 16 * S::LS;
  for (int it = 0; it < tiles; ++it) {
    if (it > 0) {
      mma::cp_async_wait<1>();
      __syncthreads();
    }
    const T* tile = sh + (it & 1) * kTileRows * S::LH;
    const int64_t tr0 = row0 + static_cast<int64_t>(it) * kTileRows;
    const int steps = static_cast<int>(std::min<int64_t>(kTileRows, row_end - tr0) + 15) / 16;
    for (int m = 0; m < steps; ++m) {
      float acc[8][4];
#pragma unroll
      for (int j = 0; j < 8; ++j)
        acc[j][0] = acc[j][2] = bias[j][0], acc[j][1] = acc[j][3] = bias[j][1];
#pragma unroll
      for (int ks = 0; ks < KT; ++ks) {
        unsigned a[4];
        mma::ldmatrix_x4(a, tile + (16 * m + (lane & 15)) * S::LH + 16 * ks + (lane >> 4) * 8);
#pragma unroll
        for (int j = 0; j < 8; ++j) mma::mma_16816<T>(acc[j], a, b[ks][j], acc[j]);
      }
      // Rows g and g + 8, columns 8j + 2t, +1 -> staging -> 16-byte row segments.
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const unsigned lo = mma::pack2<T>(acc[j][0], acc[j][1]);
        const unsigned hi = mma::pack2<T>(acc[j][2], acc[j][3]);
        put4(stage + g * S::LS + 8 * j + 2 * t, lo);
        put4(stage + (g + 8) * S::LS + 8 * j + 2 * t, hi);
      }
      __syncwarp();
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = (lane >> 3) + 4 * i, u = lane & 7;
        const int64_t row = tr0 + 16 * m + r;
        const int col = col0 + wc + 8 * u;
        if (row < row_end && col < p.d_out) move16(p.y + row * p.d_out + col, stage + r * S::LS + 8 * u);
      }
      __syncwarp();
    }
    __syncthreads();  // every warp is done with this buffer
    issue_tile(it + 2);
  }
}

inline bool aligned16(const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; }

// Whether out_gemm takes y = H B2 + bias: H (N, K) with unit column stride, B2 (K, d_out)
// contiguous, fp16/bf16, K % 16 == 0 and K <= kMaxK, d_out % 8 == 0, 16-byte aligned rows.
inline bool out_applies(const at::Tensor& H, const at::Tensor& B2,
                        const std::optional<at::Tensor>& bias, int64_t min_rows) {
  const int64_t K = H.size(1), d_out = B2.size(1);
  const bool bias_ok = !bias.has_value() || !bias->defined() ||
                       (bias->is_contiguous() && bias->scalar_type() == H.scalar_type());
  return detail::is_low_precision(H.scalar_type()) && H.size(0) >= min_rows && K % 16 == 0 &&
         K >= 16 && K <= kMaxK && d_out % 8 == 0 && d_out > 0 && H.stride(1) == 1 &&
         H.stride(0) % 8 == 0 && B2.is_contiguous() && aligned16(H.data_ptr()) &&
         aligned16(B2.data_ptr()) && bias_ok;
}

// y (N, d_out) = H B2 + bias, in H's dtype (A is the ATen element type).
template <class A>
at::Tensor out_gemm(const at::Tensor& H, const at::Tensor& B2, const std::optional<at::Tensor>& bias) {
  using T = typename std::conditional<std::is_same<A, c10::Half>::value, __half, __nv_bfloat16>::type;
  const int64_t N = H.size(0), K = H.size(1), d_out = B2.size(1);
  at::Tensor y = at::empty({N, d_out}, H.options());
  if (N == 0) return y;
  const int64_t col_blocks = (d_out + kCols - 1) / kCols;
  // One block per SM: as many row groups as SMs left per column block.
  const int64_t groups_max = std::max<int64_t>(1, PANTHER_OUT_SMS() / col_blocks);
  const int64_t tiles = (N + kTileRows - 1) / kTileRows;
  const int64_t tiles_per_block = (tiles + groups_max - 1) / groups_max;
  const int64_t groups = (tiles + tiles_per_block - 1) / tiles_per_block;
  Args<T> p{};
  p.H = reinterpret_cast<const T*>(H.data_ptr());
  p.B2 = reinterpret_cast<const T*>(B2.data_ptr());
  p.bias = bias.has_value() && bias->defined() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
  p.y = reinterpret_cast<T*>(y.data_ptr());
  p.N = N, p.ldh = H.stride(0), p.d_out = static_cast<int>(d_out);
  p.rows_per_block = static_cast<int>(tiles_per_block * kTileRows);
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(groups));
  auto launch = [&](auto kernel, int k) {
    const size_t smem = static_cast<size_t>(
        (k * (kCols + 8) + 2 * kTileRows * (k + 8) + kWarps * 16 * (kWarpCols + 8)) * sizeof(T));
    PANTHER_OUT_LAUNCH(kernel, grid, smem, p);
  };
  switch (K / 16) {
    case 1: launch(out_kernel<T, 1>, 16); break;
    case 2: launch(out_kernel<T, 2>, 32); break;
    case 3: launch(out_kernel<T, 3>, 48); break;
    case 4: launch(out_kernel<T, 4>, 64); break;
    case 5: launch(out_kernel<T, 5>, 80); break;
    case 6: launch(out_kernel<T, 6>, 96); break;
    case 7: launch(out_kernel<T, 7>, 112); break;
    case 8: launch(out_kernel<T, 8>, 128); break;
    default: TORCH_INTERNAL_ASSERT(false, "out_gemm: K = ", K);
  }
  return y;
}

}  // namespace panther::sketch_out
