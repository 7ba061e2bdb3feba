// Many-token fp16/bf16 forward of panther::sketched_linear, second GEMM: y = s T B + bias, with
// T = x A (N, C) in fp32, C = 2Lk <= 64, and B = [U1; S2] (C, d_out).
//
// The time of this GEMM is that of writing y (128 MB for 8192 x 8192 bf16): a fill of that size
// runs at 3.3 TB/s (40 us), cuBLAS's GEMM of the [hi | lo] [B; B] form at ~2.5 TB/s (52 us),
// staging its tiles through shared memory for a TMA store. out_kernel keeps the products in
// registers instead:
//   * block (c, r) owns 512 output columns and a group of rows; each of its 8 warps owns 64 of
//     the columns and holds their B fragments (C x 64) in registers for its whole life, loaded
//     once with ldmatrix.trans from a shared copy of the block's slice of U1s / S2s;
//   * the rows of T stream through shared memory in 128-row fp32 tiles (cp.async, two buffers);
//     per 16-row step a warp reads its rows of T, splits s T = hi + lo in registers exactly as
//     split_hi_lo does (hi = lowp(s T), lo = lowp(s T - hi)) and runs two mma.sync per
//     fragment (hi B and lo B), the accumulators starting at the bias: fp32 throughout, one
//     rounding at the end, as in nn.Linear;
//   * the 16 x 64 result is rounded and passed through a small warp-private shared buffer only
//     to turn the fragments' 4-byte pieces into 16-byte row segments, then stored.
// So the forward needs no [hi | lo] copy of T and no [B; B], and its output is as accurate as
// nn.Linear's (autograd's saved intermediate, T rounded once, is written separately when a
// backward needs it).
// Requirements (out_applies): C % 16 == 0, C <= 64, d_out % 8 == 0, contiguous 16-byte aligned
// operands.
//
// The file compiles as CUDA and, with PANTHER_CUDA_EMU defined, as host C++ against
// tests/emu/cuda_emu.h (tests/emu/sketch_test.cpp runs it on the CPU).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/device.cuh"
#include "common/mma.cuh"

#include <ATen/ATen.h>

#include "linear/impl.h"

#include "common/launch.cuh"
#ifdef PANTHER_CUDA_EMU
#define PANTHER_OUT_SMS() int64_t{132}
#else
#define PANTHER_OUT_SMS() \
  static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount)
#endif

namespace panther::sketch_out {

constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int kWarpCols = 64, kCols = kWarps * kWarpCols;  // output columns per warp / block
constexpr int kTileRows = 128;                                // rows of T per pipeline stage
constexpr int kMaxCols = 64;  // largest C

template <class T>
struct Args {
  const float* Tm;  // (N, C) fp32, contiguous
  const T* U1;      // (Lk, d_out)
  const T* S2;      // (Lk, d_out)
  const T* bias;    // (d_out) or nullptr
  T* y;             // (N, d_out)
  int64_t N;
  int Lk, d_out, rows_per_block;  // rows_per_block: a multiple of kTileRows
  float scale;
};

// Shared memory in bytes: the B slice, C x (kCols + 8) elements, two fp32 tiles of T,
// kTileRows x (C + 8), and per warp a 16 x (kWarpCols + 8) staging tile. The pads make the
// ldmatrix row sets, the fragment reads of T and the staging stores conflict-free.
template <class T, int C>
struct Smem {
  static constexpr int LB = kCols + 8, LT = C + 8, LS = kWarpCols + 8;
  static constexpr size_t b = 0, t = b + sizeof(T) * C * LB,
                          s = t + sizeof(float) * 2 * kTileRows * LT,
                          total = s + sizeof(T) * kWarps * 16 * LS;
};

__device__ __forceinline__ float2 get8(const float* p) {
#if defined(PANTHER_CUDA_EMU)
  float2 v;
  std::memcpy(&v, p, 8);
  return v;
#else
  return *reinterpret_cast<const float2*>(p);
#endif
}

// The two values packed by mma::pack2<T>, back in fp32 (exact).
template <class T>
__device__ __forceinline__ float2 unpack2(unsigned u) {
#if defined(PANTHER_CUDA_EMU)
  T v[2];
  std::memcpy(v, &u, 4);
  return make_float2(static_cast<float>(v[0]), static_cast<float>(v[1]));
#else
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
  } else {
    __half2 h;
    std::memcpy(&h, &u, 4);
    return __half22float2(h);
  }
#endif
}

// s (a, b) = hi + lo, each packed as two T (hi: the rounding; lo: the rounding of the rest).
template <class T>
__device__ __forceinline__ void split2(float2 v, float s, unsigned& hi, unsigned& lo) {
  v.x *= s, v.y *= s;
  hi = mma::pack2<T>(v.x, v.y);
  const float2 h = unpack2<T>(hi);
  lo = mma::pack2<T>(v.x - h.x, v.y - h.y);
}

// grid (column blocks, row groups), kThreads threads. CT = C / 16.
template <class T, int CT>
__global__ void __launch_bounds__(kThreads, 1) out_kernel(Args<T> p) {
  constexpr int C = 16 * CT;
  using S = Smem<T, C>;
  PANTHER_DYNAMIC_SMEM(smem);
  T* const sb = reinterpret_cast<T*>(smem + S::b);
  float* const st = reinterpret_cast<float*>(smem + S::t);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int col0 = static_cast<int>(blockIdx.x) * kCols;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * p.rows_per_block;
  const int64_t row_end = std::min<int64_t>(p.N, row0 + p.rows_per_block);
  const int tiles = static_cast<int>((row_end - row0 + kTileRows - 1) / kTileRows);

  // Tile `it` of T -> buffer it % 2 (rows past N zero-filled).
  auto issue_tile = [&](int it) {
    if (it < tiles) {
      float* dst = st + (it & 1) * kTileRows * S::LT;
      const int64_t r0 = row0 + static_cast<int64_t>(it) * kTileRows;
      for (int u = tid; u < kTileRows * (C / 4); u += kThreads) {
        const int r = u / (C / 4), c = (u % (C / 4)) * 4;
        const bool v = r0 + r < row_end;
        mma::cp_async16(dst + r * S::LT + c, v ? p.Tm + (r0 + r) * C + c : p.Tm, v);
      }
    }
    mma::cp_async_commit();
  };
  // The block's slice of B = [U1; S2] (columns past d_out zero-filled), with tile 0; then tile 1.
  for (int u = tid; u < C * (kCols / 8); u += kThreads) {
    const int k = u / (kCols / 8), c = (u % (kCols / 8)) * 8;
    const bool v = col0 + c < p.d_out;
    const T* src = (k < p.Lk ? p.U1 + static_cast<int64_t>(k) * p.d_out
                             : p.S2 + static_cast<int64_t>(k - p.Lk) * p.d_out) + col0 + c;
    mma::cp_async16(sb + k * S::LB + c, v ? src : p.U1, v);
  }
  issue_tile(0);
  issue_tile(1);
  mma::cp_async_wait<1>();
  __syncthreads();

  // This warp's B fragments: b[cb][j] for the 16 rows of B from 16 cb and n-tile j (8 columns).
  const int wc = warp * kWarpCols;
  unsigned b[CT][8][2];
#pragma unroll
  for (int cb = 0; cb < CT; ++cb) {
#pragma unroll
    for (int jp = 0; jp < 4; ++jp) {
      unsigned r[4];
      mma::ldmatrix_x4_trans(r, sb + (16 * cb + (lane & 15)) * S::LB + wc + 16 * jp + (lane >> 4) * 8);
      b[cb][2 * jp][0] = r[0], b[cb][2 * jp][1] = r[1];
      b[cb][2 * jp + 1][0] = r[2], b[cb][2 * jp + 1][1] = r[3];
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

  T* const stage = reinterpret_cast<T*>(smem + S::s) + warp * 16 * S::LS;
  for (int it = 0; it < tiles; ++it) {
    if (it > 0) {
      mma::cp_async_wait<1>();
      __syncthreads();
    }
    const float* tile = st + (it & 1) * kTileRows * S::LT;
    const int64_t tr0 = row0 + static_cast<int64_t>(it) * kTileRows;
    const int steps = static_cast<int>(std::min<int64_t>(kTileRows, row_end - tr0) + 15) / 16;
    for (int m = 0; m < steps; ++m) {
      float acc[8][4];
#pragma unroll
      for (int j = 0; j < 8; ++j)
        acc[j][0] = acc[j][2] = bias[j][0], acc[j][1] = acc[j][3] = bias[j][1];
      const float* r0 = tile + (16 * m + g) * S::LT + 2 * t;
#pragma unroll
      for (int cb = 0; cb < CT; ++cb) {
        // A fragments of rows g, g + 8 and columns 16 cb + (2t, 2t+1, 2t+8, 2t+9), split.
        unsigned hi[4], lo[4];
        split2<T>(get8(r0 + 16 * cb), p.scale, hi[0], lo[0]);
        split2<T>(get8(r0 + 8 * S::LT + 16 * cb), p.scale, hi[1], lo[1]);
        split2<T>(get8(r0 + 16 * cb + 8), p.scale, hi[2], lo[2]);
        split2<T>(get8(r0 + 8 * S::LT + 16 * cb + 8), p.scale, hi[3], lo[3]);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          mma::mma_16816<T>(acc[j], hi, b[cb][j], acc[j]);
          mma::mma_16816<T>(acc[j], lo, b[cb][j], acc[j]);
        }
      }
      // Rows g and g + 8, columns 8j + 2t, +1 -> staging -> 16-byte row segments.
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        mma::store_pair(stage + g * S::LS + 8 * j + 2 * t, mma::pack2<T>(acc[j][0], acc[j][1]));
        mma::store_pair(stage + (g + 8) * S::LS + 8 * j + 2 * t, mma::pack2<T>(acc[j][2], acc[j][3]));
      }
      __syncwarp();
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = (lane >> 3) + 4 * i, u = lane & 7;
        const int64_t row = tr0 + 16 * m + r;
        const int col = col0 + wc + 8 * u;
        if (row < row_end && col < p.d_out) mma::move16(p.y + row * p.d_out + col, stage + r * S::LS + 8 * u);
      }
      __syncwarp();
    }
    __syncthreads();  // every warp is done with this buffer
    issue_tile(it + 2);
  }
}

// Whether out_gemm takes y = s T B + bias: T (N, C) fp32, U1 / S2 (Lk, d_out) as (L, k, d_out)
// sketches, fp16/bf16, C = 2Lk a multiple of 16 up to kMaxCols, d_out % 8 == 0, contiguous
// 16-byte aligned operands, at least min_rows rows.
inline bool out_applies(const at::Tensor& T32, const at::Tensor& U1s, const at::Tensor& S2s,
                        const std::optional<at::Tensor>& bias, int64_t min_rows) {
  const auto dt = U1s.scalar_type();
  const int64_t C = T32.size(1), d_out = S2s.size(-1);
  const bool bias_ok = !bias.has_value() || !bias->defined() ||
                       (bias->is_contiguous() && bias->scalar_type() == dt);
  return detail::is_low_precision(dt) && T32.scalar_type() == at::kFloat && T32.dim() == 2 &&
         T32.size(0) >= min_rows && C % 16 == 0 && C >= 16 && C <= kMaxCols &&
         C == 2 * U1s.numel() / std::max<int64_t>(d_out, 1) && d_out % 8 == 0 && d_out > 0 &&
         T32.is_contiguous() && U1s.is_contiguous() && S2s.is_contiguous() &&
         S2s.scalar_type() == dt && mma::aligned16(T32.data_ptr()) &&
         mma::aligned16(U1s.data_ptr()) && mma::aligned16(S2s.data_ptr()) && bias_ok;
}

// y (N, d_out) = scale T [U1; S2] + bias, in the sketches' dtype (A: its ATen element type).
template <class A>
at::Tensor out_gemm(const at::Tensor& T32, const at::Tensor& U1s, const at::Tensor& S2s,
                    const std::optional<at::Tensor>& bias, double scale) {
  using T = typename std::conditional<std::is_same<A, c10::Half>::value, __half, __nv_bfloat16>::type;
  const int64_t N = T32.size(0), C = T32.size(1), d_out = S2s.size(-1);
  at::Tensor y = at::empty({N, d_out}, U1s.options());
  if (N == 0) return y;
  const int64_t col_blocks = (d_out + kCols - 1) / kCols;
  // One block per SM: as many row groups as SMs left per column block.
  const int64_t groups_max = std::max<int64_t>(1, PANTHER_OUT_SMS() / col_blocks);
  const int64_t tiles = (N + kTileRows - 1) / kTileRows;
  const int64_t tiles_per_block = (tiles + groups_max - 1) / groups_max;
  const int64_t groups = (tiles + tiles_per_block - 1) / tiles_per_block;
  Args<T> p{};
  p.Tm = T32.data_ptr<float>();
  p.U1 = reinterpret_cast<const T*>(U1s.data_ptr());
  p.S2 = reinterpret_cast<const T*>(S2s.data_ptr());
  p.bias = bias.has_value() && bias->defined() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
  p.y = reinterpret_cast<T*>(y.data_ptr());
  p.N = N, p.Lk = static_cast<int>(C / 2), p.d_out = static_cast<int>(d_out);
  p.rows_per_block = static_cast<int>(tiles_per_block * kTileRows);
  p.scale = static_cast<float>(scale);
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(groups));
  const dim3 block(kThreads);
  // One launch site per kernel (PANTHER_LAUNCH sets its shared-memory limit once per device).
  switch (C / 16) {
    case 1: { auto* k = &out_kernel<T, 1>; PANTHER_LAUNCH(k, grid, block, (Smem<T, 16>::total), p); break; }
    case 2: { auto* k = &out_kernel<T, 2>; PANTHER_LAUNCH(k, grid, block, (Smem<T, 32>::total), p); break; }
    case 3: { auto* k = &out_kernel<T, 3>; PANTHER_LAUNCH(k, grid, block, (Smem<T, 48>::total), p); break; }
    case 4: { auto* k = &out_kernel<T, 4>; PANTHER_LAUNCH(k, grid, block, (Smem<T, 64>::total), p); break; }
    default: TORCH_INTERNAL_ASSERT(false, "out_gemm: C is not 16, 32, 48 or 64");
  }
  return y;
}

}  // namespace panther::sketch_out
