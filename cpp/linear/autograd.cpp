// Autograd kernel of panther::sketched_linear: a C++ autograd::Function whose forward calls
// _sketched_linear_fwd below autograd (keeping the small (N, 2Lk) intermediate) and whose
// backward calls _sketched_linear_backward, computing gradients only for inputs that need them.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace panther::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Grads6 = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>,
                          std::optional<at::Tensor>, std::optional<at::Tensor>,
                          std::optional<at::Tensor>, std::optional<at::Tensor>>;

const auto& fwd_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("panther::_sketched_linear_fwd", "")
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

class SketchedLinearFunction : public torch::autograd::Function<SketchedLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& S1s,
                            const at::Tensor& S2s, const at::Tensor& U1s, const at::Tensor& U2s,
                            const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, saved] = fwd_op().call(input, S1s, S2s, U1s, U2s, bias);
    ctx->save_for_backward({input, saved, S1s, S2s, U1s, U2s});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto s = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    std::array<bool, 6> mask;
    for (size_t i = 0; i < 5; ++i) mask[i] = ctx->needs_input_grad(i);
    mask[5] = has_bias && ctx->needs_input_grad(5);
    at::Tensor g = grad_outputs[0];
    if (!g.defined() || !(mask[0] || mask[1] || mask[2] || mask[3] || mask[4] || mask[5])) {
      return variable_list(6);
    }
    auto grads = bwd_op().call(g, s[0], s[1], s[2], s[3], s[4], s[5], mask);
    auto get = [](const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); };
    return {get(std::get<0>(grads)), get(std::get<1>(grads)), get(std::get<2>(grads)),
            get(std::get<3>(grads)), get(std::get<4>(grads)), get(std::get<5>(grads))};
  }
};

at::Tensor sketched_linear_autograd(const at::Tensor& input, const at::Tensor& S1s,
                                    const at::Tensor& S2s, const at::Tensor& U1s,
                                    const at::Tensor& U2s, const std::optional<at::Tensor>& bias) {
  const bool any_grad = at::GradMode::is_enabled() &&
                        (input.requires_grad() || S1s.requires_grad() || S2s.requires_grad() ||
                         U1s.requires_grad() || U2s.requires_grad() ||
                         (bias.has_value() && bias->defined() && bias->requires_grad()));
  if (!any_grad) {
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
