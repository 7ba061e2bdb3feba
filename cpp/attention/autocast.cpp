// Autocast kernels of panther::favor_attention (CPU and CUDA): query, key and value are cast to
// the autocast dtype (fp16/bf16; float64 is left alone), like aten::matmul (common/autocast.h).
// The projection keeps its own dtype (a module keeps it fp32): the kernels compute features in
// at least fp32 anyway, so casting it would only add rounding.
#include "common/autocast.h"
#include "panther/ops.h"

namespace panther::autocast {
namespace {

template <c10::DeviceType device>
at::Tensor favor_attention_autocast(const at::Tensor& query, const at::Tensor& key,
                                    const at::Tensor& value, const at::Tensor& projection,
                                    c10::string_view kernel_fn, bool causal,
                                    const std::optional<at::Tensor>& key_padding_mask) {
  const ToAutocastDtype<device> cast;
  return panther::favor_attention(cast(query), cast(key), cast(value), projection,
                                  std::string(kernel_fn.data(), kernel_fn.size()), causal,
                                  key_padding_mask);
}

}  // namespace
}  // namespace panther::autocast

PANTHER_AUTOCAST_IMPL("favor_attention", panther::autocast::favor_attention_autocast)
