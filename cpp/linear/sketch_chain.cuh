// The rank-2Lk chain of panther::sketched_linear in one kernel, for fp16/bf16 at many tokens:
//
//   T   = round(s * in P)        (N, C)      phase 1, T kept in shared memory (and written out
//                                            when asked: the forward's saved intermediate, the
//                                            backward's gradient of T)
//   out = round(T Q + bias)      (N, n_out)  phase 2, from that shared copy of T
//
// with C = 2Lk and, reading the sketches in their own (L, ., .) layout (no packed copies):
//   forward:  in = x (N, d_in),  P = A = [S1 | U2] (d_in, C),  Q = B = [U1; S2] (C, d_out), s = 1/(2L)
//   backward: in = dy (N, d_out), P = B^T, Q = A^T,  out = dx, T = dT (the gradient of x A / (2L))
// Both GEMMs accumulate in fp32 (mma.sync m16n8k16) and T is rounded once to the input dtype
// before the second, exactly as the two-GEMM path does; one launch replaces the packing and two
// cuBLAS calls, and T never makes a round trip through global memory between them. The tiles
// (16 rows per warp, mma.sync) run at about a third of cuBLAS's rate on an H100, which costs
// more GPU time than the launches save host time: cuda.cu takes the backward form only with
// PANTHER_LINEAR_CHAIN=1 (see use_chain_backward), and the forward form, which shares every line
// but the operand loads, is checked on the emulator. Faster tiles (wgmma, larger warp tiles)
// would make it the default.
//
// Block: kRows = 128 rows of `in`, 8 row groups of 16 rows, WC = C / 128 warps per row group
// (one for C <= 128). Phase 1 streams `in` and P through NS shared-memory stages of kKc columns
// (cp.async); warp (wr, wc) owns rows 16 wr.. and T columns [wc CW, (wc + 1) CW), CW = C / WC.
// Phase 2 streams Q in tiles of kNo = 64 output columns (two stages) over the same shared
// memory; warp (wr, wc) owns rows 16 wr.. and 64 / WC columns of a tile, staged through a
// warp-private tile so that global stores are 16-byte row segments. gridDim.y column groups
// split the output's tiles between blocks of the same rows (each recomputes T; only group 0
// writes it out), so that few rows still fill the GPU.
//
// Requirements (chain_applies): C in {64, 128, 256}, k % 8 == 0, d_in % 8 == 0, d_out % 8 == 0,
// contiguous 16-byte aligned operands. Rows and columns past the ends are zero-filled on load
// and not stored.
//
// The file compiles as CUDA and, with PANTHER_CUDA_EMU defined, as host C++ against
// tests/emu/cuda_emu.h (tests/emu/sketch_test.cpp runs it on the CPU).
#pragma once
#include <algorithm>
#include <cstdint>

#include "common/device.cuh"
#include "common/mma.cuh"

#include <ATen/ATen.h>

#include "linear/impl.h"

#include "common/launch.cuh"

namespace panther::sketch_chain {

constexpr int kRows = 128;     // rows of `in` per block: 8 row groups of 16
constexpr int kKc = 64;        // columns of `in` (the K of phase 1) per stage
constexpr int kNo = 64;        // output columns per phase-2 stage
constexpr int kTile = 64;      // rows of A per P (forward) or Q (backward) tile: kKc == kNo
constexpr int kLd = kKc + 8;   // leading dimension of the 64-wide tiles (pad: conflict-free ldmatrix)
static_assert(kKc == kTile && kNo == kTile, "A tiles serve as P and as Q");

// Per C: warps per row group (WC), T columns per warp in phase 1 (CW), output columns per warp
// in phase 2 (OW), threads, phase-1 stages (NS).
template <int C>
struct Cfg {
  static constexpr int WC = C > 128 ? C / 128 : 1, CW = C / WC, OW = kNo / WC;
  static constexpr int warps = 8 * WC, threads = 32 * warps;
  static constexpr int NS = C > 128 ? 2 : 3;
};

// The sketches in their own layout, read as A = [S1 | U2] (d_in, C) and B = [U1; S2] (C, d_out):
// A(i, c) = S1s[l, i, j] for c = l k + j < Lk, U2s[l, i, j] for c - Lk = l k + j; B(c, o) =
// U1s (Lk, d_out) row c, or S2s row c - Lk.
template <class T>
struct Sketches {
  const T* S1;
  const T* U2;
  const T* U1;
  const T* S2;
  int d_in, d_out, k, Lk;
};

// Eight consecutive elements A(i, c..c+7) (c % 8 == 0, k % 8 == 0: never across two terms).
template <class T>
__device__ __forceinline__ const T* a_seg(const Sketches<T>& s, int i, int c) {
  const bool second = c >= s.Lk;
  const int cc = second ? c - s.Lk : c, l = cc / s.k, j = cc - l * s.k;
  return (second ? s.U2 : s.S1) + (static_cast<int64_t>(l) * s.d_in + i) * s.k + j;
}
// Eight consecutive elements B(c, o..o+7).
template <class T>
__device__ __forceinline__ const T* b_seg(const Sketches<T>& s, int c, int o) {
  return (c < s.Lk ? s.U1 + static_cast<int64_t>(c) * s.d_out
                   : s.S2 + static_cast<int64_t>(c - s.Lk) * s.d_out) + o;
}

template <class T>
struct Params {
  const T* in;        // (N, K) contiguous
  int64_t N;
  int K;
  Sketches<T> sk;
  T* t_out;           // (N, ld_t): T in columns [0, C), or nullptr
  int64_t ld_t;
  bool pad;           // also write [1, 0, .., 0] into columns [C, C + 8) of t_out
  T* out;             // (N, n_out) contiguous, or nullptr (phase 1 only)
  int n_out;
  const T* bias;      // (n_out) or nullptr
  float scale;
};

// Shared memory (elements of T) for C: NS stages, each the kRows x kKc tile of `in` and the P
// tile (forward: 64 rows of A, 64 x (C + 8); backward: 64 columns of B stored as rows of B,
// C x kLd), the first two reused by phase 2 for Q tiles (forward: C x kLd; backward: 64 rows of
// A); then T (kRows x (C + 8)) and the warps' output staging tiles (16 x (OW + 8) each).
template <int C>
struct Smem {
  using G = Cfg<C>;
  static constexpr int LT = C + 8, LS = G::OW + 8;
  static constexpr int ptile = (kTile * LT > C * kLd) ? kTile * LT : C * kLd;
  static constexpr int stage = kRows * kLd + ptile;
  static constexpr int t = G::NS * stage, s = t + kRows * LT, total_elems = s + G::warps * 16 * LS;
  template <class T>
  static constexpr size_t bytes() { return sizeof(T) * total_elems; }
};


// Two 8-column B fragments (k rows k0..k0+15, n columns n0..n0+15) from shared memory stored
// n-major (rows of n: ldmatrix) or k-major (rows of k: ldmatrix.trans), and the two mma.sync
// that use them with one A fragment.
template <bool kNMajor, class T>
__device__ __forceinline__ void load_b_pair(unsigned (&b)[4], const T* s, int ld, int k0, int n0,
                                            int lane) {
  if constexpr (kNMajor) {
    mma::ldmatrix_x4(b, s + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
  } else {
    mma::ldmatrix_x4_trans(b, s + (k0 + (lane & 15)) * ld + n0 + (lane >> 4) * 8);
  }
}
template <class T>
__device__ __forceinline__ void mma_pair(float (&c0)[4], float (&c1)[4], const unsigned (&a)[4],
                                         const unsigned (&b)[4]) {
  const unsigned b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
  mma::mma_16816<T>(c0, a, b0, c0);
  mma::mma_16816<T>(c1, a, b1, c1);
}

// A rows [r0, r0 + 64), all C columns -> dst (64 x (C + 8)); rows past d_in zero-filled.
template <class T, int C>
__device__ __forceinline__ void load_a_rows(T* dst, const Sketches<T>& s, int r0, int tid) {
  for (int u = tid; u < kTile * (C / 8); u += Cfg<C>::threads) {
    const int r = u / (C / 8), c = (u % (C / 8)) * 8;
    const bool v = r0 + r < s.d_in;
    mma::cp_async16(dst + r * (C + 8) + c, v ? a_seg(s, r0 + r, c) : s.S1, v);
  }
}
// B columns [o0, o0 + 64), all C rows -> dst (C x kLd); columns past d_out zero-filled.
template <class T, int C>
__device__ __forceinline__ void load_b_cols(T* dst, const Sketches<T>& s, int o0, int tid) {
  for (int u = tid; u < C * (kTile / 8); u += Cfg<C>::threads) {
    const int c = u / (kTile / 8), o = (u % (kTile / 8)) * 8;
    const bool v = o0 + o < s.d_out;
    mma::cp_async16(dst + c * kLd + o, v ? b_seg(s, c, o0 + o) : s.U1, v);
  }
}

// grid (row blocks, column groups), Cfg<C>::threads threads, Smem<C>::bytes<T>() shared memory.
// kBwd: P = B^T, Q = A^T (see the top comment).
template <class T, int C, bool kBwd>
__global__ void __launch_bounds__(Cfg<C>::threads) chain_kernel(Params<T> p) {
  using S = Smem<C>;
  using G = Cfg<C>;
  constexpr int LT = S::LT, NS = G::NS, NT1 = G::CW / 8, NT2 = G::OW / 8;
  static_assert(NT1 % 2 == 0 && NT2 % 2 == 0, "8-column tiles go in pairs");
  PANTHER_DYNAMIC_SMEM(smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);
  T* const sT = smem + S::t;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int wr = warp & 7, wc = warp >> 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRows;

  // ---- Phase 1: T = s in P, NS stages in flight ---------------------------------------------
  const int nk = (p.K + kKc - 1) / kKc;
  auto issue_stage = [&](int ks) {
    if (ks < nk) {
      const int k0 = ks * kKc;
      T* sin = smem + (ks % NS) * S::stage;
      for (int u = tid; u < kRows * (kKc / 8); u += G::threads) {
        const int r = u / (kKc / 8), c = (u % (kKc / 8)) * 8;
        const bool v = n0 + r < p.N && k0 + c < p.K;
        mma::cp_async16(sin + r * kLd + c, v ? p.in + (n0 + r) * p.K + k0 + c : p.in, v);
      }
      T* sp = sin + kRows * kLd;
      if constexpr (kBwd) {
        load_b_cols<T, C>(sp, p.sk, k0, tid);
      } else {
        load_a_rows<T, C>(sp, p.sk, k0, tid);
      }
    }
    mma::cp_async_commit();  // (an empty group past the end keeps the count uniform)
  };
  float acc[NT1][4];
#pragma unroll
  for (int j = 0; j < NT1; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
  for (int ks = 0; ks < NS - 1; ++ks) issue_stage(ks);
  for (int ks = 0; ks < nk; ++ks) {
    issue_stage(ks + NS - 1);  // into the buffer computed at ks - 1 (freed by its last barrier)
    mma::cp_async_wait<NS - 1>();
    __syncthreads();
    const T* sin = smem + (ks % NS) * S::stage;
    const T* sp = sin + kRows * kLd;
#pragma unroll
    for (int kk = 0; kk < kKc / 16; ++kk) {
      unsigned a[4];
      mma::ldmatrix_x4(a, sin + (16 * wr + (lane & 15)) * kLd + 16 * kk + (lane >> 4) * 8);
#pragma unroll
      for (int jp = 0; jp < NT1 / 2; ++jp) {  // two 8-column tiles of T
        unsigned b[4];  // P stored as B (c, o) rows (backward) or A (i, c) rows (forward)
        load_b_pair<kBwd>(b, sp, kBwd ? kLd : LT, 16 * kk, wc * G::CW + 16 * jp, lane);
        mma_pair<T>(acc[2 * jp], acc[2 * jp + 1], a, b);
      }
    }
    __syncthreads();  // the stage is free for the load issued next iteration
  }
  mma::cp_async_wait<0>();  // (only empty groups are left)
  // T rounded once, into shared memory.
#pragma unroll
  for (int j = 0; j < NT1; ++j) {
    const int c = wc * G::CW + 8 * j + 2 * t, r = 16 * wr + g;
    mma::store_pair(sT + r * LT + c, mma::pack2<T>(p.scale * acc[j][0], p.scale * acc[j][1]));
    mma::store_pair(sT + (r + 8) * LT + c, mma::pack2<T>(p.scale * acc[j][2], p.scale * acc[j][3]));
  }

  // ---- Phase 2: out = T Q + bias, Q in tiles of kNo columns ---------------------------------
  const int n_tiles = p.out != nullptr ? (p.n_out + kNo - 1) / kNo : 0;
  const int ny = static_cast<int>(gridDim.y);
  auto issue_q = [&](int st, int ot) {
    if (ot < n_tiles) {
      T* sq = smem + st * S::stage;
      if constexpr (kBwd) {
        load_a_rows<T, C>(sq, p.sk, ot * kNo, tid);
      } else {
        load_b_cols<T, C>(sq, p.sk, ot * kNo, tid);
      }
    }
    mma::cp_async_commit();
  };
  issue_q(0, static_cast<int>(blockIdx.y));
  __syncthreads();  // T complete
  if (p.t_out != nullptr && blockIdx.y == 0) {
    for (int u = tid; u < kRows * (C / 8); u += G::threads) {
      const int r = u / (C / 8), c = (u % (C / 8)) * 8;
      if (n0 + r < p.N) mma::move16(p.t_out + (n0 + r) * p.ld_t + c, sT + r * LT + c);
    }
    if (p.pad) {
      for (int r = tid; r < kRows; r += G::threads) {
        if (n0 + r >= p.N) break;
        T v[8];
        v[0] = static_cast<T>(1.f);
        for (int q = 1; q < 8; ++q) v[q] = static_cast<T>(0.f);
        mma::move16(p.t_out + (n0 + r) * p.ld_t + C, v);
      }
    }
  }
  T* const stage = smem + S::s + warp * 16 * S::LS;
  int it = 0;
  for (int ot = static_cast<int>(blockIdx.y); ot < n_tiles; ot += ny, ++it) {
    issue_q((it + 1) & 1, ot + ny);
    mma::cp_async_wait<1>();
    __syncthreads();
    const T* sq = smem + (it & 1) * S::stage;
    const int q0 = wc * G::OW;       // this warp's first column in the Q tile
    const int o0 = ot * kNo + q0;    // and in the output
    float acc2[NT2][4];
#pragma unroll
    for (int j = 0; j < NT2; ++j) {
      const int o = o0 + 8 * j + 2 * t;
      const float b0 = p.bias != nullptr && o < p.n_out ? static_cast<float>(p.bias[o]) : 0.f;
      const float b1 = p.bias != nullptr && o + 1 < p.n_out ? static_cast<float>(p.bias[o + 1]) : 0.f;
      acc2[j][0] = acc2[j][2] = b0, acc2[j][1] = acc2[j][3] = b1;
    }
#pragma unroll
    for (int kc = 0; kc < C / 16; ++kc) {
      unsigned a[4];
      mma::ldmatrix_x4(a, sT + (16 * wr + (lane & 15)) * LT + 16 * kc + (lane >> 4) * 8);
#pragma unroll
      for (int jp = 0; jp < NT2 / 2; ++jp) {
        unsigned b[4];  // Q stored as A (i, c) rows (backward) or B (c, o) rows (forward)
        load_b_pair<kBwd>(b, sq, kBwd ? LT : kLd, 16 * kc, q0 + 16 * jp, lane);
        mma_pair<T>(acc2[2 * jp], acc2[2 * jp + 1], a, b);
      }
    }
#pragma unroll
    for (int j = 0; j < NT2; ++j) {
      mma::store_pair(stage + g * S::LS + 8 * j + 2 * t, mma::pack2<T>(acc2[j][0], acc2[j][1]));
      mma::store_pair(stage + (g + 8) * S::LS + 8 * j + 2 * t, mma::pack2<T>(acc2[j][2], acc2[j][3]));
    }
    __syncwarp();
    constexpr int segs = G::OW / 8;  // 16-byte segments per staged row
#pragma unroll
    for (int e = lane; e < 16 * segs; e += 32) {
      const int r = e / segs, u = e % segs;
      const int64_t row = n0 + 16 * wr + r;
      const int col = o0 + 8 * u;
      if (row < p.N && col < p.n_out) mma::move16(p.out + row * p.n_out + col, stage + r * S::LS + 8 * u);
    }
    __syncwarp();
    __syncthreads();  // every warp is done with this Q buffer before it is refilled
  }
  mma::cp_async_wait<0>();
}

// Whether chain() takes a call: fp16/bf16 sketches of C = 2Lk in {64, 128, 256}, k, d_in, d_out
// multiples of 8, contiguous 16-byte aligned sketches (and bias, if any, of the same dtype).
inline bool chain_applies(const detail::SketchDims& d, const at::Tensor& S1s, const at::Tensor& S2s,
                          const at::Tensor& U1s, const at::Tensor& U2s) {
  const int64_t C = 2 * d.L * d.k;
  const auto dt = S1s.scalar_type();
  bool ok = detail::is_low_precision(dt) && (C == 64 || C == 128 || C == 256) && d.k % 8 == 0 &&
            d.d_in % 8 == 0 && d.d_out % 8 == 0 && d.d_in > 0 && d.d_out > 0 &&
            d.d_in < (int64_t{1} << 30) && d.d_out < (int64_t{1} << 30);
  for (const at::Tensor* q : {&S1s, &S2s, &U1s, &U2s}) {
    ok = ok && q->is_contiguous() && mma::aligned16(q->data_ptr());
  }
  return ok;
}

// One launch of chain_kernel (A: the ATen element type). in (N, K) contiguous; out (N, n_out)
// contiguous or undefined; t_out (N, >= C (+ 8 with pad)) with a row stride that is a multiple of
// 8 elements, or undefined; bias (n_out) or undefined. sms: the device's multiprocessor count.
template <class A>
void chain(const at::Tensor& in, const at::Tensor& S1s, const at::Tensor& S2s,
           const at::Tensor& U1s, const at::Tensor& U2s, const detail::SketchDims& d, bool bwd,
           double scale, const at::Tensor& out, const at::Tensor& t_out, bool pad,
           const at::Tensor& bias, int64_t sms) {
  using T = typename std::conditional<std::is_same<A, c10::Half>::value, __half, __nv_bfloat16>::type;
  const int64_t N = in.size(0), C = 2 * d.L * d.k;
  if (N == 0) return;
  Params<T> p{};
  p.in = reinterpret_cast<const T*>(in.data_ptr());
  p.N = N;
  p.K = static_cast<int>(in.size(1));
  p.sk = {reinterpret_cast<const T*>(S1s.data_ptr()), reinterpret_cast<const T*>(U2s.data_ptr()),
          reinterpret_cast<const T*>(U1s.data_ptr()), reinterpret_cast<const T*>(S2s.data_ptr()),
          static_cast<int>(d.d_in), static_cast<int>(d.d_out), static_cast<int>(d.k),
          static_cast<int>(d.L * d.k)};
  p.t_out = t_out.defined() ? reinterpret_cast<T*>(t_out.data_ptr()) : nullptr;
  p.ld_t = t_out.defined() ? t_out.stride(0) : 0;
  p.pad = pad;
  p.out = out.defined() ? reinterpret_cast<T*>(out.data_ptr()) : nullptr;
  p.n_out = out.defined() ? static_cast<int>(out.size(1)) : 0;
  p.bias = bias.defined() ? reinterpret_cast<const T*>(bias.data_ptr()) : nullptr;
  p.scale = static_cast<float>(scale);
  const int64_t row_blocks = (N + kRows - 1) / kRows;
  const int64_t n_tiles = (p.n_out + kNo - 1) / kNo;
  // Column groups where the rows alone leave SMs idle: each group recomputes T, so at most 4,
  // never more than the output's tiles, and fewer where phase 1 (K) outweighs phase 2 (n_out).
  const int64_t ny_max = std::min<int64_t>({4, n_tiles, std::max<int64_t>(1, 2 * p.n_out / p.K)});
  const int64_t ny = row_blocks * 2 > sms ? 1
                                          : std::clamp<int64_t>((sms + row_blocks - 1) / row_blocks,
                                                                1, std::max<int64_t>(1, ny_max));
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(ny));
  // One launch site per kernel instance (PANTHER_LAUNCH sets its shared-memory limit once).
#define PANTHER_CHAIN_CASE(CC)                                                                 \
  case CC:                                                                                     \
    if (bwd) {                                                                                 \
      auto* k = &chain_kernel<T, CC, true>;                                                    \
      PANTHER_LAUNCH(k, grid, dim3(Cfg<CC>::threads), Smem<CC>::template bytes<T>(), p);       \
    } else {                                                                                   \
      auto* k = &chain_kernel<T, CC, false>;                                                   \
      PANTHER_LAUNCH(k, grid, dim3(Cfg<CC>::threads), Smem<CC>::template bytes<T>(), p);       \
    }                                                                                          \
    break;
  switch (C) {
    PANTHER_CHAIN_CASE(64)
    PANTHER_CHAIN_CASE(128)
    PANTHER_CHAIN_CASE(256)
    default: TORCH_INTERNAL_ASSERT(false, "sketch_chain: C is not 64, 128 or 256");
  }
#undef PANTHER_CHAIN_CASE
}

}  // namespace panther::sketch_chain
