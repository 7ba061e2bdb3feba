// Autocast kernels of panther::sketched_linear (CPU and CUDA): like aten::linear, the op runs in
// the autocast dtype (fp16/bf16); float64 inputs are left alone (common/autocast.h).
#include "common/autocast.h"
#include "panther/ops.h"

namespace panther::autocast {
namespace {

template <c10::DeviceType device>
at::Tensor sketched_linear_autocast(const at::Tensor& input, const at::Tensor& S1s,
                                    const at::Tensor& S2s, const at::Tensor& U1s,
                                    const at::Tensor& U2s, const std::optional<at::Tensor>& bias) {
  const ToAutocastDtype<device> cast;
  return panther::sketched_linear(cast(input), cast(S1s), cast(S2s), cast(U1s), cast(U2s), cast(bias));
}

}  // namespace
}  // namespace panther::autocast

PANTHER_AUTOCAST_IMPL("sketched_linear", panther::autocast::sketched_linear_autocast)
