// CUDA kernels of panther::sketched_linear, _sketched_linear_fwd and _sketched_linear_backward.
// fp32/fp64: the two cuBLAS GEMMs of the rank-2Lk factorisation (kernels/sketched_linear.cpp).
// fp16/bf16: both GEMMs accumulate in fp32; the (N, 2Lk) intermediate T stays fp32 and enters
// the second GEMM as an exact split T = hi + lo ([hi | lo] against [B; B]), so the only rounding
// to low precision is that of the output, as in a dense fp16/bf16 nn.Linear. The split costs a
// K of 4Lk instead of 2Lk in a GEMM whose time is set by writing the (N, d_out) output.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernels/sketched_linear.h"

namespace panther::cuda {
namespace {
using namespace panther::detail;

constexpr const char* kOp = "panther::sketched_linear";

// out[r, c] = lowp(s * in[r, c]); out[r, C + c] = lowp(s * in[r, c] - out[r, c]).
template <typename T>
__global__ void split_hi_lo_kernel(const float* __restrict__ in, T* __restrict__ out, int64_t rows,
                                   int64_t cols, float scale) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    const float v = in[i] * scale;
    const T hi = static_cast<T>(v);
    const T lo = static_cast<T>(v - static_cast<float>(hi));
    out[r * 2 * cols + c] = hi;
    out[r * 2 * cols + cols + c] = lo;
  }
}

// (R, C) fp32 contiguous -> (R, 2C) in dtype: [hi | lo] of scale * t.
at::Tensor split_hi_lo(const at::Tensor& t32, at::ScalarType dtype, double scale) {
  TORCH_INTERNAL_ASSERT(t32.scalar_type() == at::kFloat && t32.dim() == 2);
  at::Tensor in = t32.contiguous();
  const int64_t R = in.size(0), C = in.size(1);
  at::Tensor out = at::empty({R, 2 * C}, in.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((R * C + threads - 1) / threads, 65535);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "panther_split_hi_lo", [&] {
    split_hi_lo_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        in.data_ptr<float>(), out.data_ptr<scalar_t>(), R, C, static_cast<float>(scale));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Sum of the two K-halves of a product against [hi | lo]: (R, 2C) -> (R, C) or rows likewise.
at::Tensor fold_cols(const at::Tensor& t) {
  const int64_t C = t.size(1) / 2;
  return t.narrow(1, 0, C) + t.narrow(1, C, C);
}
at::Tensor fold_rows(const at::Tensor& t) {
  const int64_t R = t.size(0) / 2;
  return t.narrow(0, 0, R) + t.narrow(0, R, R);
}

struct Fwd {
  at::Tensor y, saved;
};

Fwd forward_cuda(const at::Tensor& input, const at::Tensor& S1s, const at::Tensor& S2s,
                 const at::Tensor& U1s, const at::Tensor& U2s,
                 const std::optional<at::Tensor>& bias) {
  const SketchDims d = check_sketched_linear(kOp, input, S1s, S2s, U1s, U2s, bias);
  const c10::cuda::CUDAGuard guard(input.device());
  const double scale = 1.0 / (2.0 * static_cast<double>(d.L));
  const auto dt = input.scalar_type();
  at::Tensor x2 = input.reshape({d.N, d.d_in});
  at::Tensor A = pack_A(S1s, U2s);
  const bool has_bias = bias.has_value() && bias->defined();
  if (!is_low_precision(dt)) {
    auto [y, Ts] = forward_exact(x2, A, pack_B(U1s, S2s), bias, scale);
    return {y.reshape(sketched_output_shape(input, d.d_out)), Ts};
  }
  const int64_t Lk = d.L * d.k;
  at::Tensor T32 = at::mm(x2, A, at::kFloat);            // (N, 2Lk), fp32 accumulate and store
  at::Tensor hilo = split_hi_lo(T32, dt, scale);         // (N, 4Lk)
  at::Tensor BB = at::cat({U1s.reshape({Lk, d.d_out}), S2s.reshape({Lk, d.d_out}),
                           U1s.reshape({Lk, d.d_out}), S2s.reshape({Lk, d.d_out})}, 0);
  at::Tensor y = has_bias ? at::addmm(*bias, hilo, BB) : at::mm(hilo, BB);
  return {y.reshape(sketched_output_shape(input, d.d_out)), hilo};
}

at::Tensor sketched_linear_cuda(const at::Tensor& input, const at::Tensor& S1s, const at::Tensor& S2s,
                                const at::Tensor& U1s, const at::Tensor& U2s,
                                const std::optional<at::Tensor>& bias) {
  return forward_cuda(input, S1s, S2s, U1s, U2s, bias).y;
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& input, const at::Tensor& S1s,
                                            const at::Tensor& S2s, const at::Tensor& U1s,
                                            const at::Tensor& U2s,
                                            const std::optional<at::Tensor>& bias) {
  auto f = forward_cuda(input, S1s, S2s, U1s, U2s, bias);
  return {f.y, f.saved};
}

Grads6 backward_cuda(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& saved,
                     const at::Tensor& S1s, const at::Tensor& S2s, const at::Tensor& U1s,
                     const at::Tensor& U2s, std::array<bool, 6> mask) {
  const SketchDims d = check_sketched_linear("panther::_sketched_linear_backward", input, S1s, S2s,
                                             U1s, U2s, std::nullopt);
  const c10::cuda::CUDAGuard guard(input.device());
  const double scale = 1.0 / (2.0 * static_cast<double>(d.L));
  const auto dt = input.scalar_type();
  at::Tensor G2 = grad_out.reshape({d.N, d.d_out});
  at::Tensor x2 = input.reshape({d.N, d.d_in});
  at::Tensor A = pack_A(S1s, U2s), B = pack_B(U1s, S2s);
  if (!is_low_precision(dt)) {
    return unpack_grads(backward_exact(G2, x2, saved, A, B, scale, mask), d, input, dt, mask);
  }
  // Low precision: every GEMM accumulates in fp32; fp32 operands enter as [hi | lo] splits.
  PackedGrads g;
  const bool need_x = mask[0], need_A = mask[1] || mask[4], need_B = mask[2] || mask[3];
  if (need_x || need_A) {
    at::Tensor gT = split_hi_lo(at::mm(G2, B.t(), at::kFloat), dt, scale);  // (N, 4Lk)
    if (need_x) {
      at::Tensor AtAt = at::cat({A.t(), A.t()}, 0);                         // (4Lk, d_in)
      g.gx = at::mm(gT, AtAt);
    }
    if (need_A) g.gA = fold_cols(at::mm(x2.t(), gT, at::kFloat));            // (d_in, 2Lk)
  }
  if (need_B) g.gB = fold_rows(at::mm(saved.t(), G2, at::kFloat));           // (2Lk, d_out)
  if (mask[5]) g.gb = G2.sum(0, /*keepdim=*/false, at::kFloat);
  return unpack_grads(g, d, input, dt, mask);
}

}  // namespace
}  // namespace panther::cuda

TORCH_LIBRARY_IMPL(panther, CUDA, m) {
  m.impl("sketched_linear", &panther::cuda::sketched_linear_cuda);
  m.impl("_sketched_linear_fwd", &panther::cuda::fwd_cuda);
  m.impl("_sketched_linear_backward", &panther::cuda::backward_cuda);
}
