// Autocast kernels of panther::favor_attention (CPU and CUDA): query, key and value are cast to
// the autocast dtype (fp16/bf16; float64 is left alone), like aten::matmul. The projection keeps
// its own dtype (a module keeps it fp32): the kernels compute features in at least fp32 anyway,
// so casting it would only add rounding.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "panther/ops.h"

namespace panther::autocast {
namespace {

template <c10::DeviceType device>
at::Tensor favor_attention_autocast(const at::Tensor& query, const at::Tensor& key,
                                    const at::Tensor& value, const at::Tensor& projection,
                                    c10::string_view kernel, bool causal,
                                    const std::optional<at::Tensor>& key_padding_mask) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto dt = at::autocast::get_autocast_dtype(device);
  auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dt, t, device); };
  return panther::favor_attention(cast(query), cast(key), cast(value), projection,
                                  std::string(kernel.data(), kernel.size()), causal, key_padding_mask);
}

}  // namespace
}  // namespace panther::autocast

TORCH_LIBRARY_IMPL(panther, AutocastCPU, m) {
  m.impl("favor_attention", &panther::autocast::favor_attention_autocast<c10::DeviceType::CPU>);
}
TORCH_LIBRARY_IMPL(panther, AutocastCUDA, m) {
  m.impl("favor_attention", &panther::autocast::favor_attention_autocast<c10::DeviceType::CUDA>);
}
