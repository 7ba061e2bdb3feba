// Autograd kernel of panther::favor_attention: a C++ autograd::Function whose forward calls the op
// below autograd and whose backward calls _favor_attention_backward through the dispatcher,
// which recomputes the features (nothing per token is stored). It keeps the inputs and, for CUDA
// bf16 calls the fused kernels take, what the forward's kernels leave for the backward
// (_favor_attention_forward's second output, linear in length: the stabilisers and the total
// state, or causal, the scan's state every 16 chunks), so that the backward does not compute
// them again. Gradients flow to query, key, value and, when it requires grad, projection.
// When the backward itself is recorded (create_graph=True: grad mode is on inside backward), the
// gradients come instead from autograd through a composite of the forward in ATen ops
// (favor_forward_differentiable, same math, linear in length), so second derivatives are exact;
// the first-order path is unchanged.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>

#include "attention/impl.h"
#include "common/autograd.h"

namespace panther::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Grads4 = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>,
                          std::optional<at::Tensor>, std::optional<at::Tensor>>;

const auto& bwd_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("panther::_favor_attention_backward", "")
                       .typed<Grads4(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&, c10::string_view, bool,
                                     const std::optional<at::Tensor>&, std::array<bool, 4>,
                                     const std::optional<at::Tensor>&)>();
  return op;
}

const auto& forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("panther::_favor_attention_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, c10::string_view, bool,
                           const std::optional<at::Tensor>&)>();
  return op;
}

// Whether the forward should keep its states for the backward: CUDA calls the fused kernels take
// on this device (sizes only; malformed inputs go to the plain op, whose checks name the
// problem). Elsewhere the saved tensor would be allocated and never read.
bool keep_states(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                 const at::Tensor& projection) {
  const auto fused = panther::detail::favor_fused_query();
  if (!fused || !query.is_cuda() || query.dim() != 4 || key.dim() != 4 || value.dim() != 4 ||
      projection.dim() != 2)
    return false;
  // (The fused kernels take either feature kernel; `causal` does not change what they take.)
  const auto dt = query.scalar_type();
  const c10::SymInt B = query.sym_size(0), H = query.sym_size(1), Lq = query.sym_size(2),
                    Lk = key.sym_size(2);
  if (B.is_heap_allocated() || H.is_heap_allocated() || Lq.is_heap_allocated() ||
      Lk.is_heap_allocated()) {
    // Symbolic batch, heads or lengths (tracing under dynamic shapes): the size conditions
    // become guards, and the rest depends only on head_dim, value_dim and features.
    if (!panther::detail::favor_fused_shapes(B * H, Lq, Lk, query.sym_size(3), value.sym_size(3),
                                             projection.sym_size(0), dt))
      return false;
    const panther::detail::FavorDims d1{1, 1, 1, 1, query.size(3), value.size(3),
                                        projection.size(0), panther::detail::FavorKernel::Softmax};
    return fused(d1, dt, query.get_device());
  }
  const panther::detail::FavorDims d{query.size(0), query.size(1), query.size(2), key.size(2),
                                     query.size(3), value.size(3), projection.size(0),
                                     panther::detail::FavorKernel::Softmax};
  return fused(d, dt, query.get_device());
}

// Chunk length of the composite forward's causal scan (one recorded step per chunk).
constexpr int64_t kDifferentiableChunk = 64;

class FavorAttentionFunction : public torch::autograd::Function<FavorAttentionFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, const at::Tensor& projection,
                            const std::string& kernel_fn, bool causal,
                            const std::optional<at::Tensor>& key_padding_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out, saved;
    if (keep_states(query, key, value, projection))
      std::tie(out, saved) =
          forward_op().call(query, key, value, projection, kernel_fn, causal, key_padding_mask);
    else
      out = panther::detail::favor_attention_op().call(query, key, value, projection, kernel_fn,
                                                        causal, key_padding_mask);
    const bool has_mask = key_padding_mask.has_value() && key_padding_mask->defined();
    ctx->save_for_backward({query, key, value, projection,
                            has_mask ? *key_padding_mask : at::Tensor(), saved});
    ctx->saved_data["kernel_fn"] = kernel_fn;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["has_mask"] = has_mask;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto s = ctx->get_saved_variables();
    const std::array<bool, 4> mask = grad_mask<4>(ctx);
    at::Tensor g = grad_outputs[0];
    variable_list result(7);
    if (!g.defined() || !any(mask)) return result;
    const std::string kernel_fn = ctx->saved_data["kernel_fn"].toStringRef();
    const bool causal = ctx->saved_data["causal"].toBool();
    std::optional<at::Tensor> kpm;
    if (ctx->saved_data["has_mask"].toBool()) kpm = s[4];
    std::optional<at::Tensor> saved;
    if (s[5].defined()) saved = s[5];
    if (at::GradMode::is_enabled()) {
      // create_graph=True: differentiable gradients of the composite forward on the saved inputs.
      const panther::detail::FavorDims d = panther::detail::check_favor_attention(
          "panther::favor_attention", s[0], s[1], s[2], s[3], kernel_fn, causal, kpm);
      const at::Tensor out = panther::detail::favor_forward_differentiable(
          d, s[0], s[1], s[2], s[3], causal, kpm, kDifferentiableChunk);
      if (!out.requires_grad()) return result;  // no key or empty output: every gradient is 0
      variable_list inputs;
      std::vector<size_t> which;
      for (size_t i = 0; i < 4; ++i) {
        if (mask[i]) {
          inputs.push_back(s[i]);
          which.push_back(i);
        }
      }
      auto grads = torch::autograd::grad({out}, inputs, {g}, /*retain_graph=*/true,
                                         /*create_graph=*/true, /*allow_unused=*/true);
      for (size_t j = 0; j < which.size(); ++j) result[which[j]] = grads[j];
      return result;
    }
    auto grads = bwd_op().call(g, s[0], s[1], s[2], s[3], kernel_fn, causal, kpm, mask, saved);
    result[0] = grad_or_undefined(std::get<0>(grads));
    result[1] = grad_or_undefined(std::get<1>(grads));
    result[2] = grad_or_undefined(std::get<2>(grads));
    result[3] = grad_or_undefined(std::get<3>(grads));
    return result;
  }
};

at::Tensor favor_attention_autograd(const at::Tensor& query, const at::Tensor& key,
                                    const at::Tensor& value, const at::Tensor& projection,
                                    c10::string_view kernel_fn, bool causal,
                                    const std::optional<at::Tensor>& key_padding_mask) {
  if (!records_grad(query, key, value, projection)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return panther::detail::favor_attention_op().call(query, key, value, projection, kernel_fn,
                                                      causal, key_padding_mask);
  }
  return FavorAttentionFunction::apply(query, key, value, projection,
                                       std::string(kernel_fn.data(), kernel_fn.size()), causal,
                                       key_padding_mask);
}

}  // namespace
}  // namespace panther::autograd

TORCH_LIBRARY_IMPL(panther, Autograd, m) {
  m.impl("favor_attention", &panther::autograd::favor_attention_autograd);
}
