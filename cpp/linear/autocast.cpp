// Autocast kernels of panther::sketched_linear (CPU and CUDA): like aten::linear, the op runs in
// the autocast dtype (fp16/bf16); float64 inputs are left alone.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "panther/ops.h"

namespace panther::autocast {
namespace {

template <c10::DeviceType device>
at::Tensor sketched_linear_autocast(const at::Tensor& input, const at::Tensor& S1s,
                                    const at::Tensor& S2s, const at::Tensor& U1s,
                                    const at::Tensor& U2s, const std::optional<at::Tensor>& bias) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto dt = at::autocast::get_autocast_dtype(device);
  auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dt, t, device); };
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = cast(*bias);
  return panther::sketched_linear(cast(input), cast(S1s), cast(S2s), cast(U1s), cast(U2s), b);
}

}  // namespace
}  // namespace panther::autocast

TORCH_LIBRARY_IMPL(panther, AutocastCPU, m) {
  m.impl("sketched_linear", &panther::autocast::sketched_linear_autocast<c10::DeviceType::CPU>);
}
TORCH_LIBRARY_IMPL(panther, AutocastCUDA, m) {
  m.impl("sketched_linear", &panther::autocast::sketched_linear_autocast<c10::DeviceType::CUDA>);
}
