// CUDA kernels of panther::sketched_linear, _sketched_linear_forward and _sketched_linear_backward.
// fp32/fp64: the two cuBLAS GEMMs of the rank-2Lk factorisation (cpp/linear/impl.cpp).
// fp16/bf16: both GEMMs accumulate in fp32; the (N, 2Lk) intermediate T stays fp32 and enters
// the second GEMM as an exact split T = hi + lo ([hi | lo] against [B; B]), so the only rounding
// to low precision is that of the output, as in a dense fp16/bf16 nn.Linear. The split costs a
// K of 4Lk instead of 2Lk in a GEMM whose time is set by writing the (N, d_out) output.
// Up to kSmallTokens tokens, forward and backward use direct kernels instead of cuBLAS
// (sketch_small.cuh and small_tb_kernel below). Above that, with 2Lk <= 64 and d_out % 8 == 0,
// the forward's second GEMM is out_kernel (sketch_out.cuh), which splits T in registers.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "linear/sketch_out.cuh"
#include "linear/sketch_small.cuh"
#include "linear/impl.h"

namespace panther::cuda {
namespace {
using namespace panther::detail;

constexpr const char* kOp = "panther::sketched_linear";

// Packs the four sketch tensors into the GEMM operands in one launch:
//   A (d_in, repsA * 2Lk) = [S1_1 .. S1_L | U2_1 .. U2_L] repeated repsA times along columns,
//   B (repsB * 2Lk, d_out) = [U1_1; ..; U1_L; S2_1; ..; S2_L] repeated repsB times along rows.
// (Repetition builds the [B; B] / [A | A] operands that multiply a [hi | lo] split.)
template <typename T>
__global__ void pack_operands_kernel(const T* __restrict__ S1, const T* __restrict__ U2,
                                     const T* __restrict__ U1, const T* __restrict__ S2,
                                     T* __restrict__ A, T* __restrict__ B, int64_t L, int64_t d_in,
                                     int64_t k, int64_t d_out, int64_t repsA, int64_t repsB) {
  const int64_t Lk = L * k, colsA = repsA * 2 * Lk, nA = d_in * colsA;
  const int64_t per = Lk * d_out, nB = repsB * 2 * per;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nA + nB;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < nA) {
      const int64_t r = i / colsA, c = (i - r * colsA) % (2 * Lk);
      const bool second = c >= Lk;
      const int64_t cc = second ? c - Lk : c, l = cc / k, j = cc - l * k;
      A[i] = (second ? U2 : S1)[(l * d_in + r) * k + j];
    } else {
      const int64_t b = i - nA, blk = b / per;
      B[b] = ((blk & 1) ? S2 : U1)[b - blk * per];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> pack_operands(const at::Tensor& S1s, const at::Tensor& U2s,
                                                 const at::Tensor& U1s, const at::Tensor& S2s,
                                                 int64_t repsA, int64_t repsB) {
  const int64_t L = S1s.size(0), d_in = S1s.size(1), k = S1s.size(2), d_out = S2s.size(2);
  auto s1 = S1s.contiguous(), u2 = U2s.contiguous(), u1 = U1s.contiguous(), s2 = S2s.contiguous();
  at::Tensor A = at::empty({d_in, repsA * 2 * L * k}, S1s.options());
  at::Tensor B = at::empty({repsB * 2 * L * k, d_out}, S1s.options());
  const int64_t total = A.numel() + B.numel();
  if (total == 0) return {A, B};
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 4096);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, S1s.scalar_type(), "panther_pack", [&] {
    pack_operands_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        s1.data_ptr<scalar_t>(), u2.data_ptr<scalar_t>(), u1.data_ptr<scalar_t>(),
        s2.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(), L, d_in, k, d_out,
        repsA, repsB);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {A, B};
}

// One launch for the two small passes between the GEMMs of the low-precision forward:
//   split: row r of out (R, 2C + pad) = [hi | lo | 1 0 .. 0], hi = lowp(s t[r]),
//          lo = lowp(s t[r] - hi);
//   pack (optional, nB > 0): B2 = [U1; S2; U1; S2] (4Lk x d_out, the [B; B] operand of the
//          [hi | lo] split), as four copies of the two flat (Lk x d_out) arrays in 16-byte units
//          (nB of them; per = units per array).
// I is the index type: int32 when everything fits (a 64-bit division is a slow software routine
// on the GPU and dominated this latency-bound launch).
template <typename T, typename I>
__global__ void split_pack_kernel(const float* __restrict__ in, T* __restrict__ out, I rows,
                                  I cols, I pad, float scale, const uint4* __restrict__ U1,
                                  const uint4* __restrict__ S2, uint4* __restrict__ B2, I per,
                                  I nB) {
  const I w = cols + pad, ld = 2 * cols + pad, nS = rows * w;
  for (I i = blockIdx.x * static_cast<I>(blockDim.x) + threadIdx.x; i < nS + nB;
       i += static_cast<I>(gridDim.x) * blockDim.x) {
    if (i < nS) {
      const I r = i / w, c = i - r * w;
      if (c < cols) {
        const float v = in[r * cols + c] * scale;
        const T hi = static_cast<T>(v);
        out[r * ld + c] = hi;
        out[r * ld + cols + c] = static_cast<T>(v - static_cast<float>(hi));
      } else {
        out[r * ld + cols + c] = static_cast<T>(c == cols ? 1.0f : 0.0f);
      }
    } else {
      const I j = i - nS, blk = j / per;
      B2[j] = ((blk & 1) ? S2 : U1)[j - blk * per];
    }
  }
}

// (R, C) fp32 -> (R, 2C + pad) in dtype: [hi | lo | pad] of scale * t. With B2 (4Lk, d_out)
// given, also packs it from U1s and S2s (contiguous, d_out % 8 == 0, 16-byte aligned).
at::Tensor split_hi_lo(const at::Tensor& t32, at::ScalarType dtype, double scale, int64_t pad,
                       const at::Tensor& U1s = {}, const at::Tensor& S2s = {},
                       at::Tensor* B2 = nullptr) {
  TORCH_INTERNAL_ASSERT(t32.scalar_type() == at::kFloat && t32.dim() == 2);
  at::Tensor in = t32.contiguous();
  const int64_t R = in.size(0), C = in.size(1);
  at::Tensor out = at::empty({R, 2 * C + pad}, in.options().dtype(dtype));
  const int64_t per = B2 != nullptr ? U1s.numel() * 2 / 16 : 0, nB = 4 * per;
  const int64_t total = R * (C + pad) + nB;
  if (total == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto vec = [](const at::Tensor& t) {
    return t.defined() ? reinterpret_cast<const uint4*>(t.data_ptr()) : nullptr;
  };
  uint4* b2 = B2 != nullptr ? reinterpret_cast<uint4*>(B2->data_ptr()) : nullptr;
  const bool small = R * (2 * C + pad) + nB + blocks * threads < (int64_t{1} << 31);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "panther_split_hi_lo", [&] {
    if (small)
      split_pack_kernel<scalar_t, int32_t><<<blocks, threads, 0, stream>>>(
          in.data_ptr<float>(), out.data_ptr<scalar_t>(), static_cast<int32_t>(R),
          static_cast<int32_t>(C), static_cast<int32_t>(pad), static_cast<float>(scale),
          vec(U1s), vec(S2s), b2, static_cast<int32_t>(per), static_cast<int32_t>(nB));
    else
      split_pack_kernel<scalar_t, int64_t><<<blocks, threads, 0, stream>>>(
          in.data_ptr<float>(), out.data_ptr<scalar_t>(), R, C, pad, static_cast<float>(scale),
          vec(U1s), vec(S2s), b2, per, nB);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Low-precision backward epilogue in one launch: folds the [hi | lo] halves of the fp32 GEMM
// results and scatters them into the per-term layouts of the parameters, rounding once:
//   gA = rawA[:, :2Lk] + rawA[:, 2Lk:]            rawA (d_in, 4Lk)
//   gB = rawB[:2Lk] + rawB[2Lk:4Lk], gb = rawB[4Lk]  rawB (4Lk + pad, d_out)
// Null outputs are skipped (gradients nobody asked for).
template <typename T>
__global__ void unpack_grads_kernel(const float* __restrict__ rawA, const float* __restrict__ rawB,
                                    T* gS1, T* gU2, T* gU1, T* gS2, T* gb, int64_t L, int64_t d_in,
                                    int64_t k, int64_t d_out) {
  const int64_t Lk = L * k, nIn = L * d_in * k, nOut = L * k * d_out;
  const int64_t total = 2 * nIn + 2 * nOut + d_out;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < 2 * nIn) {
      const bool u2 = i >= nIn;
      T* dst = u2 ? gU2 : gS1;
      if (dst == nullptr) continue;
      const int64_t e = u2 ? i - nIn : i;               // index into (L, d_in, k)
      const int64_t l = e / (d_in * k), r = (e / k) % d_in, j = e % k;
      const int64_t c = (u2 ? Lk : 0) + l * k + j;
      dst[e] = static_cast<T>(rawA[r * 4 * Lk + c] + rawA[r * 4 * Lk + 2 * Lk + c]);
    } else if (i < 2 * nIn + 2 * nOut) {
      const int64_t e0 = i - 2 * nIn;
      const bool s2 = e0 >= nOut;
      T* dst = s2 ? gS2 : gU1;
      if (dst == nullptr) continue;
      const int64_t e = s2 ? e0 - nOut : e0;            // index into (L, k, d_out) = (Lk, d_out)
      const int64_t row = (s2 ? Lk : 0) + e / d_out, o = e % d_out;
      dst[e] = static_cast<T>(rawB[row * d_out + o] + rawB[(2 * Lk + row) * d_out + o]);
    } else if (gb != nullptr) {
      const int64_t o = i - 2 * nIn - 2 * nOut;
      gb[o] = static_cast<T>(rawB[4 * Lk * d_out + o]);
    }
  }
}

// ---- Few-token forward (decode-sized batches) ---------------------------------------------
// With a handful of tokens the GEMMs are tiny and the cost is the host's: packing, two cuBLAS
// calls and the split each cost a launch and tens of microseconds of CPU. Two direct kernels read
// the sketches in their own layout instead, accumulate in fp32 and round the output once: the
// split-K partials of x A (sketch::reduce_block, shared with the few-token backward in
// sketch_small.cuh) and small_tb_kernel.
using sketch::kSmallTokens;
constexpr int kTileRows = 8;             // tokens per pass in small_tb_kernel

// P[z, n, c] = sum_{i in slice z} x[n, i] A(i, c). grid (row blocks, column blocks, splits).
template <typename T>
__global__ void __launch_bounds__(sketch::kThreads) small_xa_kernel(
    const T* __restrict__ x, sketch::Cols<const T> A, float* __restrict__ P, int64_t N,
    int64_t d_in, int64_t C, int64_t slice) {
  PANTHER_DYNAMIC_SMEM(smem);
  sketch::reduce_block(x, N, d_in, A, C, P, blockIdx.x * sketch::kRedRows,
                       blockIdx.y * sketch::kRedCols, blockIdx.z, slice, smem);
}

// y[n, o] = sum_c T[n, c] B(c, o) + bias[o] with T = s * sum_z P[z] and B(c, o) = U1s row c
// (c < Lk) or S2s row c - Lk. grid (column blocks, token tiles of kTileRows): one tile per block,
// so the (latency-bound) column loop runs once per block. Blocks of column block 0 also write
// their tokens' saved intermediate in the big path's layout ([T | 1 0..] for fp32,
// [hi | lo | 1 0..] in the input dtype for fp16/bf16).
template <typename T>
__global__ void small_tb_kernel(const float* __restrict__ P, int64_t splits,
                                const T* __restrict__ U1, const T* __restrict__ S2,
                                const T* __restrict__ bias, T* __restrict__ y,
                                T* __restrict__ saved, int64_t N, int64_t d_out, int64_t Lk,
                                float scale, bool split) {
  extern __shared__ float tile[];  // kTileRows x 2Lk
  const int64_t C = 2 * Lk;
  const int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileRows;
  const int64_t left = N - n0;
  const int rows = static_cast<int>(left < kTileRows ? left : kTileRows);
  const bool write_saved = saved != nullptr && blockIdx.x == 0;
  const int64_t ld = (split ? 2 * C : C) + kSavedPad;
  for (int64_t e = threadIdx.x; e < rows * C; e += blockDim.x) {
    float v = 0.f;
    for (int64_t z = 0; z < splits; ++z) v += P[(z * N + n0) * C + e];
    v *= scale;
    tile[e] = v;
    if (write_saved) {
      const int64_t n = n0 + e / C, c = e % C;
      const T hi = static_cast<T>(v);
      saved[n * ld + c] = hi;
      if (split) saved[n * ld + C + c] = static_cast<T>(v - static_cast<float>(hi));
    }
  }
  if (write_saved) {  // the pad columns [1, 0, ..., 0]
    for (int64_t e = threadIdx.x; e < rows * kSavedPad; e += blockDim.x) {
      const int64_t n = n0 + e / kSavedPad, q = e % kSavedPad;
      saved[n * ld + (split ? 2 * C : C) + q] = static_cast<T>(q == 0 ? 1.f : 0.f);
    }
  }
  __syncthreads();
  if (o >= d_out) return;
  const float b = bias != nullptr ? static_cast<float>(bias[o]) : 0.f;
  float acc[kTileRows];
#pragma unroll
  for (int r = 0; r < kTileRows; ++r) acc[r] = b;
  // Unrolled so that several rows of B are loaded before their products are needed.
#pragma unroll 8
  for (int64_t c = 0; c < C; ++c) {
    const float bv = static_cast<float>(c < Lk ? U1[c * d_out + o] : S2[(c - Lk) * d_out + o]);
#pragma unroll
    for (int r = 0; r < kTileRows; ++r) acc[r] += tile[r * C + c] * bv;
  }
  for (int r = 0; r < rows; ++r) y[(n0 + r) * d_out + o] = static_cast<T>(acc[r]);
}

// The direct few-token forward; `want_saved` also builds the intermediate autograd keeps.
std::tuple<at::Tensor, at::Tensor> forward_small(const at::Tensor& x2, const at::Tensor& S1s,
                                                 const at::Tensor& S2s, const at::Tensor& U1s,
                                                 const at::Tensor& U2s,
                                                 const std::optional<at::Tensor>& bias,
                                                 const SketchDims& d, double scale,
                                                 bool want_saved) {
  const auto dt = x2.scalar_type();
  const bool lowp = is_low_precision(dt);
  const int64_t Lk = d.L * d.k, C = 2 * Lk;
  at::Tensor x = x2.contiguous();
  auto s1 = S1s.contiguous(), u2 = U2s.contiguous(), u1 = U1s.contiguous(), s2 = S2s.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor saved;
  if (want_saved) saved = at::empty({d.N, saved_core_cols(dt, Lk) + kSavedPad}, x.options());
  at::Tensor y = at::empty({d.N, d.d_out}, x.options());
  if (d.N == 0) return {y, saved};
  // Split d_in into slices of at least 512 so that about 4 blocks per SM are busy.
  const int64_t row_blocks = (d.N + sketch::kRedRows - 1) / sketch::kRedRows;
  const int64_t col_blocks = (C + sketch::kRedCols - 1) / sketch::kRedCols;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>((d.d_in + 511) / 512,
                                                          (4 * sms) / (row_blocks * col_blocks)));
  const int64_t slice = std::max<int64_t>(1, (d.d_in + splits - 1) / splits);
  splits = std::max<int64_t>(1, (d.d_in + slice - 1) / slice);
  at::Tensor P = at::empty({splits, d.N, C}, x.options().dtype(at::kFloat));
  if (d.d_in == 0) P.zero_();
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid1(static_cast<unsigned>(row_blocks), static_cast<unsigned>(col_blocks),
                   static_cast<unsigned>(splits));
  constexpr int kOutThreads = 128;
  const dim3 grid2(static_cast<unsigned>((d.d_out + kOutThreads - 1) / kOutThreads),
                   static_cast<unsigned>((d.N + kTileRows - 1) / kTileRows));
  const size_t smem2 = kTileRows * C * sizeof(float);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "panther_small_forward", [&] {
    if (d.d_in > 0) {
      const sketch::Cols<const scalar_t> A{s1.data_ptr<scalar_t>(), u2.data_ptr<scalar_t>(), Lk,
                                           d.k, d.d_in * d.k, 1, d.k};
      small_xa_kernel<scalar_t><<<grid1, sketch::kThreads, sketch::kReduceSmem, stream>>>(
          x.data_ptr<scalar_t>(), A, P.data_ptr<float>(), d.N, d.d_in, C, slice);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    small_tb_kernel<scalar_t><<<grid2, kOutThreads, smem2, stream>>>(
        P.data_ptr<float>(), splits, u1.data_ptr<scalar_t>(), s2.data_ptr<scalar_t>(),
        has_bias ? b.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
        want_saved ? saved.data_ptr<scalar_t>() : nullptr, d.N, d.d_out, Lk,
        static_cast<float>(scale), lowp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, saved};
}

struct Fwd {
  at::Tensor y, saved;
};

Fwd forward_cuda(const at::Tensor& input, const at::Tensor& S1s, const at::Tensor& S2s,
                 const at::Tensor& U1s, const at::Tensor& U2s,
                 const std::optional<at::Tensor>& bias, bool want_saved) {
  const SketchDims d = check_sketched_linear(kOp, input, S1s, S2s, U1s, U2s, bias);
  const c10::cuda::CUDAGuard guard(input.device());
  const double scale = 1.0 / (2.0 * static_cast<double>(d.L));
  const auto dt = input.scalar_type();
  const int64_t Lk = d.L * d.k;
  at::Tensor x2 = input.reshape({d.N, d.d_in});
  const bool lowp = is_low_precision(dt);
  // The direct path's tile of T (8 x 2Lk fp32) must fit in shared memory: 2Lk <= 1024.
  if (d.N <= kSmallTokens && d.d_out > 0 && dt != at::kDouble && 2 * Lk <= 1024) {
    auto [y, saved] = forward_small(x2, S1s, S2s, U1s, U2s, bias, d, scale, want_saved);
    return {y.reshape(sketched_output_shape(input, d.d_out)), saved};
  }
  const bool has_bias = bias.has_value() && bias->defined();
  if (lowp) {
    // A = [S1 | U2] as a concatenation (reshapes are views for L = 1).
    auto terms = [&](const at::Tensor& t) { return t.permute({1, 0, 2}).reshape({d.d_in, Lk}); };
    at::Tensor A = at::cat({terms(S1s), terms(U2s)}, 1);
    at::Tensor T32 = at::mm(x2, A, at::kFloat);  // (N, 2Lk) fp32
    at::Tensor u1 = U1s.contiguous(), s2 = S2s.contiguous(), B2, saved, y;
    if (sketch_out::out_applies(T32, u1, s2, bias, /*min_rows=*/kSmallTokens + 1)) {
      // The output GEMM from registers, splitting T itself (sketch_out.cuh); the [hi | lo] copy
      // is written only for autograd.
      if (want_saved) saved = split_hi_lo(T32, dt, scale, kSavedPad);  // (N, 4Lk + pad)
      AT_DISPATCH_REDUCED_FLOATING_TYPES(dt, "panther_out_gemm", [&] {
        y = sketch_out::out_gemm<scalar_t>(T32, u1, s2, has_bias ? bias : std::nullopt, scale);
      });
      return {y.reshape(sketched_output_shape(input, d.d_out)), saved};
    }
    // cuBLAS on [hi | lo] [B; B]; the split and [B; B] in one launch where [B; B] can be copied
    // in 16-byte units.
    if (d.d_out % 8 == 0 && sketch_out::aligned16(u1.data_ptr()) &&
        sketch_out::aligned16(s2.data_ptr())) {
      B2 = at::empty({4 * Lk, d.d_out}, u1.options());
      saved = split_hi_lo(T32, dt, scale, kSavedPad, u1, s2, &B2);  // (N, 4Lk + pad)
    } else {
      u1 = u1.view({Lk, d.d_out}), s2 = s2.view({Lk, d.d_out});
      B2 = at::cat({u1, s2, u1, s2}, 0);
      saved = split_hi_lo(T32, dt, scale, kSavedPad);
    }
    at::Tensor hilo = saved.narrow(1, 0, 4 * Lk);
    y = has_bias ? at::addmm(*bias, hilo, B2) : at::mm(hilo, B2);
    return {y.reshape(sketched_output_shape(input, d.d_out)), saved};
  }
  auto [A, B] = pack_operands(S1s, U2s, U1s, S2s, 1, 1);
  auto [y, saved] = forward_exact(x2, A, B, bias, scale);
  return {y.reshape(sketched_output_shape(input, d.d_out)), saved};
}

at::Tensor sketched_linear_cuda(const at::Tensor& input, const at::Tensor& S1s, const at::Tensor& S2s,
                                const at::Tensor& U1s, const at::Tensor& U2s,
                                const std::optional<at::Tensor>& bias) {
  return forward_cuda(input, S1s, S2s, U1s, U2s, bias, /*want_saved=*/false).y;
}

std::tuple<at::Tensor, at::Tensor> sketched_linear_forward_cuda(
    const at::Tensor& input, const at::Tensor& S1s, const at::Tensor& S2s, const at::Tensor& U1s,
    const at::Tensor& U2s, const std::optional<at::Tensor>& bias) {
  auto f = forward_cuda(input, S1s, S2s, U1s, U2s, bias, /*want_saved=*/true);
  return {f.y, f.saved};
}

Grads6 backward_cuda(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& saved,
                     const at::Tensor& S1s, const at::Tensor& S2s, const at::Tensor& U1s,
                     const at::Tensor& U2s, std::array<bool, 6> mask) {
  const SketchDims d = check_sketched_linear("panther::_sketched_linear_backward", input, S1s, S2s,
                                             U1s, U2s, std::nullopt);
  const c10::cuda::CUDAGuard guard(input.device());
  if (sketch::small_backward_applies(d, input.scalar_type())) {
    Grads6 out;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                    "panther_small_backward", [&] {
      out = sketch::small_backward<scalar_t>(grad_out, input, saved, S1s, S2s, U1s, U2s, d, mask);
    });
    return out;
  }
  const double scale = 1.0 / (2.0 * static_cast<double>(d.L));
  const auto dt = input.scalar_type();
  const int64_t Lk = d.L * d.k;
  at::Tensor G2 = grad_out.reshape({d.N, d.d_out});
  at::Tensor x2 = input.reshape({d.N, d.d_in});
  const bool lowp = is_low_precision(dt);
  auto [A, B] = pack_operands(S1s, U2s, U1s, S2s, lowp ? 2 : 1, 1);
  if (!lowp) {
    return unpack_grads(backward_exact(G2, x2, saved, A, B, scale, mask), d, input, dt, mask);
  }
  // Low precision: every GEMM accumulates in fp32; fp32 operands enter as [hi | lo] splits
  // (A here is [A | A], so [ghi | glo] [A | A]^T = (ghi + glo) A^T).
  const bool need_x = mask[0], need_A = mask[1] || mask[4], need_B = mask[2] || mask[3];
  at::Tensor gx, rawA, rawB;
  if (need_x || need_A) {
    at::Tensor gT = split_hi_lo(at::mm(G2, B.t(), at::kFloat), dt, scale, 0);  // (N, 4Lk)
    if (need_x) gx = at::mm(gT, A.t()).reshape(input.sizes());
    if (need_A) rawA = at::mm(x2.t(), gT, at::kFloat).contiguous();             // (d_in, 4Lk)
  }
  if (need_B || mask[5]) rawB = at::mm(saved.t(), G2, at::kFloat).contiguous();  // (4Lk+8, d_out)
  auto opts = input.options();
  auto alloc = [&](bool want, at::IntArrayRef shape) {
    return want ? at::empty(shape, opts) : at::Tensor();
  };
  at::Tensor gS1 = alloc(mask[1], S1s.sizes()), gU2 = alloc(mask[4], U2s.sizes());
  at::Tensor gU1 = alloc(mask[3], U1s.sizes()), gS2 = alloc(mask[2], S2s.sizes());
  at::Tensor gb = alloc(mask[5], {d.d_out});
  if (need_A || need_B || mask[5]) {
    const int64_t total = 2 * d.L * d.d_in * d.k + 2 * Lk * d.d_out + d.d_out;
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 4096);
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_REDUCED_FLOATING_TYPES(dt, "panther_unpack_grads", [&] {
      auto ptr = [](at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
      unpack_grads_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
          rawA.defined() ? rawA.data_ptr<float>() : nullptr,
          rawB.defined() ? rawB.data_ptr<float>() : nullptr, ptr(gS1), ptr(gU2), ptr(gU1), ptr(gS2),
          ptr(gb), d.L, d.d_in, d.k, d.d_out);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return select_grads(mask, {gx, gS1, gS2, gU1, gU2, gb});
}

}  // namespace
}  // namespace panther::cuda

TORCH_LIBRARY_IMPL(panther, CUDA, m) {
  m.impl("sketched_linear", &panther::cuda::sketched_linear_cuda);
  m.impl("_sketched_linear_forward", &panther::cuda::sketched_linear_forward_cuda);
  m.impl("_sketched_linear_backward", &panther::cuda::backward_cuda);
}
