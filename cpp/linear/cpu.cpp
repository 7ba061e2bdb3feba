// CPU kernels of panther::sketched_linear, _sketched_linear_forward and _sketched_linear_backward.
// fp32/fp64 run the two-GEMM path in their own precision; fp16/bf16 are computed in fp32 and
// the output is rounded once (fp32 accumulation, no intermediate rounding). The intermediate
// kept for the backward is stored in the input dtype, as on every device (impl.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "linear/impl.h"

namespace panther::cpu {
namespace {
using namespace panther::detail;

constexpr const char* kOp = "panther::sketched_linear";

at::ScalarType compute_dtype(at::ScalarType t) {
  return is_low_precision(t) ? at::kFloat : t;
}

std::optional<at::Tensor> cast_opt(const std::optional<at::Tensor>& t, at::ScalarType dt) {
  if (t.has_value() && t->defined()) return t->to(dt);
  return std::nullopt;
}

std::tuple<at::Tensor, at::Tensor> sketched_linear_forward_cpu(
    const at::Tensor& input, const at::Tensor& S1s, const at::Tensor& S2s, const at::Tensor& U1s,
    const at::Tensor& U2s, const std::optional<at::Tensor>& bias) {
  const SketchDims d = check_sketched_linear(kOp, input, S1s, S2s, U1s, U2s, bias);
  const auto dt = input.scalar_type(), cdt = compute_dtype(dt);
  const double scale = 1.0 / (2.0 * static_cast<double>(d.L));
  at::Tensor x2 = input.reshape({d.N, d.d_in}).to(cdt);
  at::Tensor A = pack_A(S1s, U2s).to(cdt), B = pack_B(U1s, S2s).to(cdt);
  auto [y, Ts] = forward_exact(x2, A, B, cast_opt(bias, cdt), scale);
  y = y.to(dt).reshape(sketched_output_shape(input, d.d_out));
  return {y, Ts.to(dt)};
}

at::Tensor sketched_linear_cpu(const at::Tensor& input, const at::Tensor& S1s, const at::Tensor& S2s,
                               const at::Tensor& U1s, const at::Tensor& U2s,
                               const std::optional<at::Tensor>& bias) {
  const SketchDims d = check_sketched_linear(kOp, input, S1s, S2s, U1s, U2s, bias);
  const auto dt = input.scalar_type(), cdt = compute_dtype(dt);
  const double scale = 1.0 / (2.0 * static_cast<double>(d.L));
  at::Tensor x2 = input.reshape({d.N, d.d_in}).to(cdt);
  auto [y, Ts] = forward_exact(x2, pack_A(S1s, U2s).to(cdt), pack_B(U1s, S2s).to(cdt),
                               cast_opt(bias, cdt), scale, /*want_saved=*/false);
  return y.to(dt).reshape(sketched_output_shape(input, d.d_out));
}

Grads6 backward_cpu(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& saved,
                    const at::Tensor& S1s, const at::Tensor& S2s, const at::Tensor& U1s,
                    const at::Tensor& U2s, std::array<bool, 6> mask) {
  const SketchDims d = check_sketched_linear("panther::_sketched_linear_backward", input, S1s, S2s,
                                             U1s, U2s, std::nullopt);
  check_sketched_linear_backward("panther::_sketched_linear_backward", grad_out, saved, input, d);
  const auto dt = input.scalar_type(), cdt = compute_dtype(dt);
  const double scale = 1.0 / (2.0 * static_cast<double>(d.L));
  at::Tensor Ts = saved.to(cdt);
  at::Tensor G2 = grad_out.reshape({d.N, d.d_out}).to(cdt);
  at::Tensor x2 = input.reshape({d.N, d.d_in}).to(cdt);
  return backward_exact(G2, x2, Ts, pack_A(S1s, U2s).to(cdt), pack_B(U1s, S2s).to(cdt), scale, d,
                        input.sizes(), dt, mask);
}

}  // namespace
}  // namespace panther::cpu

TORCH_LIBRARY_IMPL(panther, CPU, m) {
  m.impl("sketched_linear", &panther::cpu::sketched_linear_cpu);
  m.impl("_sketched_linear_forward", &panther::cpu::sketched_linear_forward_cpu);
  m.impl("_sketched_linear_backward", &panther::cpu::backward_cpu);
}
