// CUDA kernels of panther::sketched_linear, _sketched_linear_forward and _sketched_linear_backward.
// Every dtype runs the two GEMMs of the rank-2Lk factorisation on cuBLAS (cpp/linear/impl.cpp),
// accumulating in fp32; fp16/bf16 round the (N, 2Lk) intermediate T once to the input dtype (the
// error this adds is of the size of the output's own rounding: the layer's error stays within
// 2x of a dense fp16/bf16 nn.Linear's, as the model-shape benchmark measures). Exceptions:
// up to kSmallTokens tokens, forward and backward use direct kernels (sketch_small.cuh and
// small_tb_kernel below); with 2Lk <= 64 the fp16/bf16 forward's second GEMM is out_kernel
// (sketch_out.cuh). Both keep T in fp32 for the output. With PANTHER_LINEAR_CHAIN=1 the fp16/bf16
// backward of layers up to 3072 wide forms dT and dx in one launch of the fused chain kernel
// (sketch_chain.cuh) instead of packing and two cuBLAS GEMMs (see use_chain_backward).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "linear/sketch_chain.cuh"
#include "linear/sketch_out.cuh"
#include "linear/sketch_small.cuh"
#include "linear/impl.h"

namespace panther::cuda {
namespace {
using namespace panther::detail;

constexpr const char* kOp = "panther::sketched_linear";

// Packs the four sketch tensors into the GEMM operands in one launch:
//   A (d_in, 2Lk) = [S1_1 .. S1_L | U2_1 .. U2_L],  B (2Lk, d_out) = [U1_1; ..; U1_L; S2_1; ..; S2_L],
// and, when `pad` is given, writes the pad columns [1, 0, ..., 0] of the saved intermediate
// (rows of pad_ld elements; the pad starts at column 2Lk) in the same launch.
template <typename T>
__global__ void pack_operands_kernel(const T* __restrict__ S1, const T* __restrict__ U2,
                                     const T* __restrict__ U1, const T* __restrict__ S2,
                                     T* __restrict__ A, T* __restrict__ B, int64_t L, int64_t d_in,
                                     int64_t k, int64_t d_out, T* __restrict__ pad, int64_t pad_rows,
                                     int64_t pad_ld) {
  const int64_t Lk = L * k, colsA = 2 * Lk, nA = d_in * colsA;
  const int64_t per = Lk * d_out, nB = 2 * per, nP = pad != nullptr ? pad_rows * kSavedPad : 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nA + nB + nP;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < nA) {
      const int64_t r = i / colsA, c = i - r * colsA;
      const bool second = c >= Lk;
      const int64_t cc = second ? c - Lk : c, l = cc / k, j = cc - l * k;
      A[i] = (second ? U2 : S1)[(l * d_in + r) * k + j];
    } else if (i < nA + nB) {
      const int64_t b = i - nA;
      B[b] = (b >= per ? S2 : U1)[b >= per ? b - per : b];
    } else {
      const int64_t e = i - nA - nB, n = e / kSavedPad, q = e - n * kSavedPad;
      pad[n * pad_ld + colsA + q] = static_cast<T>(q == 0 ? 1.f : 0.f);
    }
  }
}

// A and B as above; with `saved` (N, 2Lk + kSavedPad) also its pad columns.
std::tuple<at::Tensor, at::Tensor> pack_operands(const at::Tensor& S1s, const at::Tensor& U2s,
                                                 const at::Tensor& U1s, const at::Tensor& S2s,
                                                 at::Tensor* saved = nullptr) {
  const int64_t L = S1s.size(0), d_in = S1s.size(1), k = S1s.size(2), d_out = S2s.size(2);
  auto s1 = S1s.contiguous(), u2 = U2s.contiguous(), u1 = U1s.contiguous(), s2 = S2s.contiguous();
  at::Tensor A = at::empty({d_in, 2 * L * k}, S1s.options());
  at::Tensor B = at::empty({2 * L * k, d_out}, S1s.options());
  const int64_t pad_rows = saved != nullptr ? saved->size(0) : 0;
  const int64_t total = A.numel() + B.numel() + pad_rows * kSavedPad;
  if (total == 0) return {A, B};
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 4096);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, S1s.scalar_type(), "panther_pack", [&] {
    pack_operands_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        s1.data_ptr<scalar_t>(), u2.data_ptr<scalar_t>(), u1.data_ptr<scalar_t>(),
        s2.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(), L, d_in, k, d_out,
        pad_rows > 0 ? saved->data_ptr<scalar_t>() : nullptr, pad_rows,
        pad_rows > 0 ? saved->stride(0) : 0);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {A, B};
}

// saved (N, C + kSavedPad) = [s T32 | 1 0 .. 0], rounded once to the saved dtype, in one launch.
template <typename T>
__global__ void write_saved_kernel(const float* __restrict__ T32, T* __restrict__ saved, int64_t N,
                                   int64_t C, float scale) {
  const int64_t ld = C + kSavedPad, total = N * ld;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / ld, c = i - n * ld;
    saved[i] = static_cast<T>(c < C ? scale * T32[n * C + c] : (c == C ? 1.f : 0.f));
  }
}

// ---- Few-token forward (decode-sized batches) ---------------------------------------------
// With a handful of tokens the GEMMs are tiny and the cost is the host's: packing, two cuBLAS
// calls and the pack kernel each cost a launch and tens of microseconds of CPU. Two direct kernels read
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
// their tokens' saved intermediate in the big path's layout ([T | 1 0..] in the input dtype).
template <typename T>
__global__ void small_tb_kernel(const float* __restrict__ P, int64_t splits,
                                const T* __restrict__ U1, const T* __restrict__ S2,
                                const T* __restrict__ bias, T* __restrict__ y,
                                T* __restrict__ saved, int64_t N, int64_t d_out, int64_t Lk,
                                float scale) {
  extern __shared__ float tile[];  // kTileRows x 2Lk
  const int64_t C = 2 * Lk;
  const int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileRows;
  const int64_t left = N - n0;
  const int rows = static_cast<int>(left < kTileRows ? left : kTileRows);
  const bool write_saved = saved != nullptr && blockIdx.x == 0;
  const int64_t ld = C + kSavedPad;
  for (int64_t e = threadIdx.x; e < rows * C; e += blockDim.x) {
    float v = 0.f;
    for (int64_t z = 0; z < splits; ++z) v += P[(z * N + n0) * C + e];
    v *= scale;
    tile[e] = v;
    if (write_saved) saved[(n0 + e / C) * ld + e % C] = static_cast<T>(v);
  }
  if (write_saved) {  // the pad columns [1, 0, ..., 0]
    for (int64_t e = threadIdx.x; e < rows * kSavedPad; e += blockDim.x) {
      const int64_t n = n0 + e / kSavedPad, q = e % kSavedPad;
      saved[n * ld + C + q] = static_cast<T>(q == 0 ? 1.f : 0.f);
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
  const int64_t Lk = d.L * d.k, C = 2 * Lk;
  at::Tensor x = x2.contiguous();
  auto s1 = S1s.contiguous(), u2 = U2s.contiguous(), u1 = U1s.contiguous(), s2 = S2s.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor saved;
  if (want_saved) saved = at::empty({d.N, saved_cols(Lk)}, x.options());
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
        static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, saved};
}

// Whether the backward's dT and dx go through the fused chain kernel (fp16/bf16, 2Lk of 64, 128
// or 256, see sketch_chain::chain_applies): only with PANTHER_LINEAR_CHAIN=1 (read at every
// call), and then for layers up to 3072 wide and 1e10 multiply-adds per chain. It saves the
// packing and two cuBLAS calls of host time, but its mma.sync tiles reach about a third of
// cuBLAS's rate: on an H100 (bf16, L=1 k=64) a BERT-base-shaped encoder's training step took
// 24.4 ms with it against 22.3 ms without (dense: 29.3 ms), and its forward form was slower
// than cuBLAS at every shape of the model-shape grid
// (bench/results/h100-chain-backward-and-causal-forward-2026-12-07.md). Off until its tiles are
// faster.
bool use_chain_backward(const SketchDims& d, const at::Tensor& S1s, const at::Tensor& S2s,
                        const at::Tensor& U1s, const at::Tensor& U2s) {
  const char* e = std::getenv("PANTHER_LINEAR_CHAIN");
  if (e == nullptr || e[0] != '1' || e[1] != '\0') return false;
  const int64_t C = 2 * d.L * d.k;
  const double macs = static_cast<double>(d.N) * static_cast<double>(C) *
                      static_cast<double>(d.d_in + d.d_out);
  if (std::max(d.d_in, d.d_out) > 3072 || macs > 1e10) return false;
  return sketch_chain::chain_applies(d, S1s, S2s, U1s, U2s);
}

int64_t device_sms(const at::Tensor& t) { return sm_count(t.get_device()); }

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
  // The direct path's tile of T (8 x 2Lk fp32) must fit in shared memory: 2Lk <= 1024.
  if (d.N <= kSmallTokens && d.d_out > 0 && dt != at::kDouble && 2 * Lk <= 1024) {
    auto [y, saved] = forward_small(x2, S1s, S2s, U1s, U2s, bias, d, scale, want_saved);
    return {y.reshape(sketched_output_shape(input, d.d_out)), saved};
  }
  const int64_t C = 2 * Lk;
  if (is_low_precision(dt) && C % 16 == 0 && C <= sketch_out::kMaxCols && d.d_out % 8 == 0) {
    // Narrow sketches (2Lk <= 64): T in fp32 and the output GEMM from registers (sketch_out.cuh),
    // which splits s T exactly and writes y at close to the bandwidth of the write. Autograd's
    // copy of T (rounded once to the input dtype) is written only when a backward needs it.
    const at::Tensor T32 = at::mm(x2, pack_A(S1s, U2s), at::kFloat);
    const at::Tensor u1 = U1s.contiguous(), s2 = S2s.contiguous();
    if (sketch_out::out_applies(T32, u1, s2, bias, /*min_rows=*/kSmallTokens + 1)) {
      at::Tensor y, saved;
      AT_DISPATCH_REDUCED_FLOATING_TYPES(dt, "panther_out_gemm", [&] {
        y = sketch_out::out_gemm<scalar_t>(T32, u1, s2, bias, scale);
      });
      if (want_saved) {
        saved = at::empty({d.N, saved_cols(Lk)}, x2.options());
        const int64_t total = saved.numel(), threads = 256;
        const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 4096);
        AT_DISPATCH_REDUCED_FLOATING_TYPES(dt, "panther_write_saved", [&] {
          write_saved_kernel<scalar_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
              T32.data_ptr<float>(), saved.data_ptr<scalar_t>(), d.N, C, static_cast<float>(scale));
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      return {y.reshape(sketched_output_shape(input, d.d_out)), saved};
    }
  }
  // T is written into the saved buffer (its pad columns by the packing launch) even when no
  // backward needs it: the buffer is then only the GEMMs' intermediate.
  at::Tensor saved = at::empty({d.N, saved_cols(Lk)}, x2.options());
  auto [A, B] = pack_operands(S1s, U2s, U1s, S2s, want_saved ? &saved : nullptr);
  at::Tensor y = forward_exact_into(x2, A, B, bias, scale, saved);
  if (!want_saved) saved = at::Tensor();
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
  check_sketched_linear_backward("panther::_sketched_linear_backward", grad_out, saved, input, d);
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
  at::Tensor G2 = grad_out.reshape({d.N, d.d_out});
  at::Tensor x2 = input.reshape({d.N, d.d_in});
  if (use_chain_backward(d, S1s, S2s, U1s, U2s)) {
    // dT = s G B^T (needed by dx and dA) and dx = dT A^T in one launch; dA, dB and the bias
    // gradient from cuBLAS as below, without packing A or B.
    const at::Tensor G = G2.contiguous();
    if (mma::aligned16(G.data_ptr())) {
      at::Tensor gT, dx;
      if (mask[0] || mask[1] || mask[4]) {
        gT = at::empty({d.N, 2 * d.L * d.k}, G.options());
        if (mask[0]) dx = at::empty({d.N, d.d_in}, G.options());
        AT_DISPATCH_REDUCED_FLOATING_TYPES(G.scalar_type(), "panther_chain_backward", [&] {
          sketch_chain::chain<scalar_t>(G, S1s, S2s, U1s, U2s, d, /*bwd=*/true, scale, dx, gT,
                                        /*pad=*/false, at::Tensor(), device_sms(G));
        });
      }
      return backward_exact(G, x2, saved, at::Tensor(), at::Tensor(), scale, d, input.sizes(),
                            input.scalar_type(), mask, gT, dx);
    }
  }
  auto [A, B] = pack_operands(S1s, U2s, U1s, S2s);
  return backward_exact(G2, x2, saved, A, B, scale, d, input.sizes(), input.scalar_type(), mask);
}

}  // namespace
}  // namespace panther::cuda

TORCH_LIBRARY_IMPL(panther, CUDA, m) {
  m.impl("sketched_linear", &panther::cuda::sketched_linear_cuda);
  m.impl("_sketched_linear_forward", &panther::cuda::sketched_linear_forward_cuda);
  m.impl("_sketched_linear_backward", &panther::cuda::backward_cuda);
}
