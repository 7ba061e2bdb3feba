// Definitions of the public C++ API (cpp/include/panther/ops.h): each is a typed dispatcher call.
#include "panther/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include "attention/impl.h"

namespace panther {

at::Tensor sketched_linear(const at::Tensor& input, const at::Tensor& S1s, const at::Tensor& S2s,
                           const at::Tensor& U1s, const at::Tensor& U2s,
                           const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("panther::sketched_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&)>();
  return op.call(input, S1s, S2s, U1s, U2s, bias);
}

at::Tensor favor_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                           const at::Tensor& projection, const std::string& kernel_fn, bool causal,
                           const std::optional<at::Tensor>& key_padding_mask) {
  return detail::favor_attention_op().call(query, key, value, projection, kernel_fn, causal,
                                          key_padding_mask);
}

const char* built_with_torch() { return PANTHER_TORCH_VERSION; }

}  // namespace panther
