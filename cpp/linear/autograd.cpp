// Autograd kernel of panther::sketched_linear: a C++ autograd::Function whose forward calls
// _sketched_linear_forward below autograd (keeping the small (N, 2Lk) intermediate) and whose
// backward calls _sketched_linear_backward, computing gradients only for inputs that need them.
// When the backward itself is recorded (create_graph=True: grad mode is on inside backward), the
// gradients are computed instead with differentiable ATen GEMMs on the packed operands, so that a
// second derivative is exact; the first-order path is unchanged.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/autograd.h"
#include "linear/impl.h"

namespace panther::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Grads6 = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>,
                          std::optional<at::Tensor>, std::optional<at::Tensor>,
                          std::optional<at::Tensor>, std::optional<at::Tensor>>;

const auto& forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("panther::_sketched_linear_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  return op;
}

const auto& bwd_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("panther::_sketched_linear_backward", "")
                       .typed<Grads6(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, std::array<bool, 6>)>();
  return op;
}

const auto& plain_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("panther::sketched_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&)>();
  return op;
}

// The gradients of y = s x A B + bias (s = 1/(2L), A = [S1 | U2], B = [U1; S2]) written with
// differentiable ATen ops on the saved variables, for backward passes that are themselves
// differentiated (create_graph=True): dx = s G B^T A^T, dA = s x^T G B^T, dB = s (x A)^T G,
// dbias = 1^T G. The opaque backward op treats its saved intermediate as a constant, which makes
// second derivatives wrong, so it is not used here. fp16/bf16 are computed in fp32.
variable_list differentiable_grads(const at::Tensor& g, const at::Tensor& input,
                                   const at::Tensor& S1s, const at::Tensor& S2s,
                                   const at::Tensor& U1s, const at::Tensor& U2s,
                                   const std::array<bool, 6>& mask) {
  const int64_t L = S1s.size(0), d_in = S1s.size(1), k = S1s.size(2), d_out = S2s.size(2);
  const int64_t Lk = L * k;
  const auto dt = input.scalar_type();
  const auto cdt = panther::detail::is_low_precision(dt) ? at::kFloat : dt;
  const double scale = 1.0 / (2.0 * static_cast<double>(L));
  int64_t N = 1;
  for (int64_t i = 0; i + 1 < input.dim(); ++i) N *= input.size(i);
  const at::Tensor x2 = input.reshape({N, d_in}).to(cdt);
  const at::Tensor G2 = g.reshape({N, d_out}).to(cdt);
  const at::Tensor A = panther::detail::pack_A(S1s, U2s).to(cdt);
  const at::Tensor B = panther::detail::pack_B(U1s, S2s).to(cdt);
  auto per_term_in = [&](const at::Tensor& cols) {  // (d_in, Lk) -> (L, d_in, k)
    return cols.reshape({d_in, L, k}).permute({1, 0, 2}).to(dt);
  };
  auto per_term_out = [&](const at::Tensor& rows) {  // (Lk, d_out) -> (L, k, d_out)
    return rows.reshape({L, k, d_out}).to(dt);
  };
  variable_list out(6);
  if (mask[0] || mask[1] || mask[4]) {
    const at::Tensor gT = at::mm(G2, B.t()) * scale;  // (N, 2Lk)
    if (mask[0]) out[0] = at::mm(gT, A.t()).to(dt).reshape(input.sizes());
    if (mask[1] || mask[4]) {
      const at::Tensor gA = at::mm(x2.t(), gT);  // (d_in, 2Lk)
      if (mask[1]) out[1] = per_term_in(gA.narrow(1, 0, Lk));
      if (mask[4]) out[4] = per_term_in(gA.narrow(1, Lk, Lk));
    }
  }
  if (mask[2] || mask[3]) {
    const at::Tensor gB = at::mm((at::mm(x2, A) * scale).t(), G2);  // (2Lk, d_out)
    if (mask[3]) out[3] = per_term_out(gB.narrow(0, 0, Lk));
    if (mask[2]) out[2] = per_term_out(gB.narrow(0, Lk, Lk));
  }
  if (mask[5]) out[5] = G2.sum(0).to(dt);
  return out;
}

class SketchedLinearFunction : public torch::autograd::Function<SketchedLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& S1s,
                            const at::Tensor& S2s, const at::Tensor& U1s, const at::Tensor& U2s,
                            const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, saved] = forward_op().call(input, S1s, S2s, U1s, U2s, bias);
    ctx->save_for_backward({input, saved, S1s, S2s, U1s, U2s});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto s = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 6> mask = grad_mask<6>(ctx, has_bias ? 6 : 5);
    at::Tensor g = grad_outputs[0];
    if (!g.defined() || !any(mask)) return variable_list(6);
    // Grad mode is on inside backward only when the backward is recorded (create_graph=True).
    if (at::GradMode::is_enabled()) return differentiable_grads(g, s[0], s[2], s[3], s[4], s[5], mask);
    auto grads = bwd_op().call(g, s[0], s[1], s[2], s[3], s[4], s[5], mask);
    return {grad_or_undefined(std::get<0>(grads)), grad_or_undefined(std::get<1>(grads)),
            grad_or_undefined(std::get<2>(grads)), grad_or_undefined(std::get<3>(grads)),
            grad_or_undefined(std::get<4>(grads)), grad_or_undefined(std::get<5>(grads))};
  }
};

at::Tensor sketched_linear_autograd(const at::Tensor& input, const at::Tensor& S1s,
                                    const at::Tensor& S2s, const at::Tensor& U1s,
                                    const at::Tensor& U2s, const std::optional<at::Tensor>& bias) {
  if (!records_grad(input, S1s, S2s, U1s, U2s, bias)) {
    // Inference: no intermediate is kept.
    at::AutoDispatchBelowADInplaceOrView guard;
    return plain_op().call(input, S1s, S2s, U1s, U2s, bias);
  }
  return SketchedLinearFunction::apply(input, S1s, S2s, U1s, U2s, bias);
}

}  // namespace
}  // namespace panther::autograd

TORCH_LIBRARY_IMPL(panther, Autograd, m) {
  m.impl("sketched_linear", &panther::autograd::sketched_linear_autograd);
}
