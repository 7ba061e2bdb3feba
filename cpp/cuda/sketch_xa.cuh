// First GEMM of the fp16/bf16 sketched_linear forward for many tokens, with its epilogue fused:
//   saved[n] = [hi | lo | 1 0 .. 0],  hi + lo = s x[n] A  (fp32, split exactly into two halves)
// where A (d_in, C = 2Lk) = [S1_1 .. S1_L | U2_1 .. U2_L] is read from S1s/U2s in their own layout
// (no packing) and s = 1 / (2L). The second GEMM (cuBLAS) then multiplies [hi | lo] by [B; B].
//
// The GEMM is (N x d_in) x (d_in x C) with C <= 128: it streams x once from HBM and its time is
// x's bytes over the bandwidth. cuBLAS's skinny kernel reached ~2.3 TB/s on an H100 here; this
// one keeps kStages tiles of x in flight per block with cp.async and multiplies them on the
// tensor cores (WMMA, fp32 accumulation).
//
// Block: kRows rows of x, all of d_in in tiles of kK; 8 warps. The (kRows x CP) output (C padded
// to a power of two CP >= 16) is 4 x CP/16 WMMA tiles: with 8 tiles or fewer, 8 / tiles warps
// share each tile and split its k-steps; with more, each warp keeps tiles / 8 of them.
//
// The file compiles as CUDA and, with PANTHER_CUDA_EMU defined, as host C++ against
// tests/emu/cuda_emu.h (tests/emu/sketch_small_test.cpp runs it on the CPU).
#pragma once
#include <cstdint>

#include "cuda/wmma_shared.cuh"
#ifndef PANTHER_CUDA_EMU
#ifndef PANTHER_DYNAMIC_SMEM
#define PANTHER_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif
#endif

namespace panther::sketch {
namespace xa {
namespace wmma = nvcuda::wmma;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kPad = 8;       // shared leading dimensions + kPad elements (bank spread)
constexpr int kMaxCols = 128;

__host__ __device__ constexpr int align128(int x) { return (x + 127) & ~127; }

// Tiling: kRows rows of x per block, d_in in tiles of kK, kStages tiles in flight; CP = C padded.
template <int CP_, int Rows, int K, int Stages>
struct Cfg {
  static constexpr int CP = CP_, kRows = Rows, kK = K, kStages = Stages;
  static constexpr int x_bytes = align128(kRows * (kK + kPad) * 2);
  static constexpr int a_bytes = align128(kK * (CP + kPad) * 2);
  static constexpr int stage_bytes = x_bytes + a_bytes;
  // The epilogue's fp32 partials (kGroups x kRows x (CP + 4)) reuse the pipeline's buffers.
  static constexpr int smem_bytes = stage_bytes * kStages;
  static constexpr int kTiles = (kRows / 16) * (CP / 16);
  static constexpr int kGroups = kTiles >= kWarps ? 1 : kWarps / kTiles;   // warps per tile
  static constexpr int kPerWarp = kTiles >= kWarps ? kTiles / kWarps : 1;  // tiles per warp
  static constexpr int kSteps = kK / 16;
  static_assert(kSteps % kGroups == 0, "k-steps split evenly over a tile's warps");
  static_assert(kGroups * kRows * (CP + 4) * 4 <= smem_bytes, "epilogue fits the pipeline");
};

template <class T>
struct Params {
  const T* x;       // (N, d_in), rows 16-byte aligned (d_in % 8 == 0)
  const T* S1;      // (L, d_in, k)
  const T* U2;      // (L, d_in, k)
  T* saved;         // (N, ld)
  int64_t N, d_in, k, Lk, ld;
  int C;            // 2Lk, a multiple of 8
  float scale;
  int dbg;          // DEV EXPERIMENT: 1 = no MMA, 2 = A loaded in the first stages only
};

using wmma_util::Cvt;

// Copies k-tile kt of x and A into one pipeline slot (zeros outside the matrices).
template <class G, class T>
__device__ __forceinline__ void load_stage(const Params<T>& p, unsigned char* slot, int64_t row0,
                                           int64_t kt) {
  constexpr int kRows = G::kRows, kK = G::kK, CP = G::CP;
  T* xs = reinterpret_cast<T*>(slot);
  T* as = reinterpret_cast<T*>(slot + G::x_bytes);
  constexpr int xc = kK / 8;  // 16-byte chunks per row of the x tile
  const int64_t i0 = kt * kK;
  for (int q = threadIdx.x; q < kRows * xc; q += kThreads) {
    const int r = q / xc, ch = q - r * xc;
    const int64_t n = row0 + r, i = i0 + ch * 8;
    T* dst = xs + r * (kK + kPad) + ch * 8;
    if (n < p.N && i < p.d_in) wmma_util::cp_async16(dst, p.x + n * p.d_in + i);
    else wmma_util::zero16(dst);
  }
  constexpr int ac = CP / 8;  // chunks per row of the A tile: 8 columns of one term each
  if (p.dbg == 2 && kt >= G::kStages) return;
  for (int q = threadIdx.x; q < kK * ac; q += kThreads) {
    const int ii = q / ac, c = (q - ii * ac) * 8;
    const int64_t i = i0 + ii;
    T* dst = as + ii * (CP + kPad) + c;
    if (i < p.d_in && c < p.C) {
      const bool second = c >= p.Lk;
      const int64_t t = second ? c - p.Lk : c, l = t / p.k, j = t - l * p.k;
      wmma_util::cp_async16(dst, (second ? p.U2 : p.S1) + (l * p.d_in + i) * p.k + j);
    } else {
      wmma_util::zero16(dst);
    }
  }
}

template <class G, class T>
__global__ void __launch_bounds__(kThreads) xa_saved_kernel(Params<T> p) {
  PANTHER_DYNAMIC_SMEM(smem);
  constexpr int CP = G::CP, kRows = G::kRows, kK = G::kK, kStages = G::kStages;
  constexpr int kTiles = G::kTiles, kGroups = G::kGroups, kPerWarp = G::kPerWarp;
  constexpr int kSteps = G::kSteps, stage_bytes = G::stage_bytes;
  const int warp = threadIdx.x >> 5;
  const int group = warp / (kWarps / kGroups);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t nk = (p.d_in + kK - 1) / kK;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kPerWarp];
#pragma unroll
  for (int t = 0; t < kPerWarp; ++t) wmma::fill_fragment(acc[t], 0.f);

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nk) load_stage<G>(p, smem + s * stage_bytes, row0, s);
    wmma_util::cp_async_commit();
  }
  for (int64_t kt = 0; kt < nk; ++kt) {
    wmma_util::cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt is in; every warp is done with the slot refilled below
    const int64_t next = kt + kStages - 1;
    if (next < nk) load_stage<G>(p, smem + (next % kStages) * stage_bytes, row0, next);
    wmma_util::cp_async_commit();
    const unsigned char* slot = smem + (kt % kStages) * stage_bytes;
    const T* xs = reinterpret_cast<const T*>(slot);
    const T* as = reinterpret_cast<const T*>(slot + G::x_bytes);
    if (p.dbg == 1) continue;
#pragma unroll
    for (int t = 0; t < kPerWarp; ++t) {
      const int tile = kGroups > 1 ? warp % kTiles : warp + t * kWarps;
      const int rt = tile % (kRows / 16), ct = tile / (kRows / 16);
#pragma unroll
      for (int ks = group; ks < kSteps; ks += kGroups) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma_util::load_shared(fa, xs + rt * 16 * (kK + kPad) + ks * 16, kK + kPad);
        wmma_util::load_shared(fb, as + ks * 16 * (CP + kPad) + ct * 16, CP + kPad);
        wmma::mma_sync(acc[t], fa, fb, acc[t]);
      }
    }
  }
  wmma_util::cp_async_wait<0>();
  __syncthreads();  // the pipeline's buffers become the fp32 partials
  constexpr int ldr = CP + 4;
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int t = 0; t < kPerWarp; ++t) {
    const int tile = kGroups > 1 ? warp % kTiles : warp + t * kWarps;
    const int rt = tile % (kRows / 16), ct = tile / (kRows / 16);
    wmma::store_matrix_sync(red + (group * kRows + rt * 16) * ldr + ct * 16, acc[t], ldr,
                            wmma::mem_row_major);
  }
  __syncthreads();
  // saved row = [hi | lo | 1 0 .. 0]
  const int C = p.C, width = 2 * C + 8;
  for (int e = threadIdx.x; e < kRows * width; e += kThreads) {
    const int r = e / width, c = e - r * width;
    const int64_t n = row0 + r;
    if (n >= p.N) break;
    T out;
    if (c < 2 * C) {
      const int cc = c < C ? c : c - C;
      float v = 0.f;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) v += red[(g * kRows + r) * ldr + cc];
      v *= p.scale;
      const T hi = Cvt<T>::t(v);
      out = c < C ? hi : Cvt<T>::t(v - Cvt<T>::f(hi));
    } else {
      out = Cvt<T>::t(c == 2 * C ? 1.f : 0.f);
    }
    p.saved[n * p.ld + c] = out;
  }
}

}  // namespace xa
}  // namespace panther::sketch

// ---------------------------------------------------------------------------------------------
// Host side (ATen), shared by the CUDA build and the emulator test.
#include <ATen/ATen.h>
#include <cstdlib>

#include "kernels/sketched_linear.h"

#ifdef PANTHER_CUDA_EMU
#define PANTHER_XA_LAUNCH(kernel, grid, smem, ...) \
  ::emu::launch(kernel, dim3(grid), dim3(::panther::sketch::xa::kThreads), smem, __VA_ARGS__)
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <atomic>
// Opts the kernel into more than 48 KiB of dynamic shared memory once per (kernel, device).
#define PANTHER_XA_LAUNCH(kernel, grid, smem, ...)                                          \
  do {                                                                                      \
    static std::atomic<uint64_t> panther_set{0};                                            \
    const int panther_dev = at::cuda::current_device();                                     \
    const uint64_t panther_bit = uint64_t{1} << (panther_dev & 63);                         \
    if (!(panther_set.load(std::memory_order_acquire) & panther_bit)) {                     \
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, \
                                          static_cast<int>(smem)));                         \
      panther_set.fetch_or(panther_bit, std::memory_order_acq_rel);                         \
    }                                                                                       \
    kernel<<<grid, ::panther::sketch::xa::kThreads, smem, at::cuda::getCurrentCUDAStream()>>>( \
        __VA_ARGS__);                                                                       \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                         \
  } while (0)
#endif

namespace panther::sketch::xa {

inline int padded_cols(int64_t C) {
  int cp = 16;
  while (cp < C) cp *= 2;
  return cp;
}

inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Whether the fused first GEMM takes this call: fp16/bf16, C = 2Lk <= 128, 16-byte rows of x
// and of every term's columns (d_in and k multiples of 8), contiguous aligned operands.
inline bool applies(const detail::SketchDims& d, const at::Tensor& x2, const at::Tensor& S1s,
                    const at::Tensor& U2s) {
  const int64_t C = 2 * d.L * d.k;
  return detail::is_low_precision(x2.scalar_type()) && d.N >= 1 && C <= kMaxCols &&
         d.d_in % 8 == 0 && d.k % 8 == 0 && x2.is_contiguous() && S1s.is_contiguous() &&
         U2s.is_contiguous() && aligned16(x2) && aligned16(S1s) && aligned16(U2s);
}

template <class G, class T>
void launch(const Params<T>& p) {
  const unsigned grid = static_cast<unsigned>((p.N + G::kRows - 1) / G::kRows);
  auto* kernel = &xa_saved_kernel<G, T>;
  PANTHER_XA_LAUNCH(kernel, grid, G::smem_bytes, p);
}

// saved (N, 2C + kSavedPad) = [hi | lo | 1 0..] of scale * x A. T: the device element type
// (__nv_bfloat16 / __half; the c10 types under the emulator).
template <class T>
at::Tensor saved_intermediate(const at::Tensor& x2, const at::Tensor& S1s, const at::Tensor& U2s,
                              const detail::SketchDims& d, double scale) {
  const int64_t C = 2 * d.L * d.k;
  at::Tensor saved = at::empty({d.N, 2 * C + detail::kSavedPad}, x2.options());
  Params<T> p{};
  p.x = reinterpret_cast<const T*>(x2.data_ptr());
  p.S1 = reinterpret_cast<const T*>(S1s.data_ptr());
  p.U2 = reinterpret_cast<const T*>(U2s.data_ptr());
  p.saved = reinterpret_cast<T*>(saved.data_ptr());
  p.N = d.N, p.d_in = d.d_in, p.k = d.k, p.Lk = d.L * d.k, p.ld = saved.size(1);
  p.C = static_cast<int>(C);
  p.scale = static_cast<float>(scale);
  switch (padded_cols(C)) {
    case 16: launch<Cfg<16, 64, 128, 6>>(p); break;
    case 32: {
      // DEV EXPERIMENT (removed after measuring): PANTHER_XA_CFG picks a tiling.
      const char* e = std::getenv("PANTHER_XA_CFG");
      const int v = e ? std::atoi(e) : 1;
      p.dbg = v >= 6 ? v - 5 : 0;
      if (v == 0) launch<Cfg<32, 64, 128, 4>>(p);
      else if (v == 2) launch<Cfg<32, 32, 128, 5>>(p);
      else if (v == 3) launch<Cfg<32, 64, 64, 8>>(p);
      else if (v == 4) launch<Cfg<32, 128, 64, 6>>(p);
      else if (v == 5) launch<Cfg<32, 32, 64, 8>>(p);
      else if (v >= 6) launch<Cfg<32, 64, 128, 4>>(p);
      else launch<Cfg<32, 64, 128, 6>>(p);
      break;
    }
    case 64: launch<Cfg<64, 64, 128, 5>>(p); break;
    default: launch<Cfg<128, 64, 128, 4>>(p); break;
  }
  return saved;
}

}  // namespace panther::sketch::xa
