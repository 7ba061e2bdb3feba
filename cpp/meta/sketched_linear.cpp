// Meta (shape-only) kernels of the sketched linear ops, used by torch.compile, torch.export
// and FakeTensor tracing. They run the same argument checks as the real kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels/sketched_linear.h"

namespace panther::meta {
namespace {
using namespace panther::detail;

at::Tensor sketched_linear_meta(const at::Tensor& input, const at::Tensor& S1s,
                                const at::Tensor& S2s, const at::Tensor& U1s,
                                const at::Tensor& U2s, const std::optional<at::Tensor>& bias) {
  const SketchDims d = check_sketched_linear("panther::sketched_linear", input, S1s, S2s, U1s, U2s, bias);
  return at::empty(sketched_output_shape(input, d.d_out), input.options());
}

std::tuple<at::Tensor, at::Tensor> fwd_meta(const at::Tensor& input, const at::Tensor& S1s,
                                            const at::Tensor& S2s, const at::Tensor& U1s,
                                            const at::Tensor& U2s,
                                            const std::optional<at::Tensor>& bias) {
  const SketchDims d = check_sketched_linear("panther::sketched_linear", input, S1s, S2s, U1s, U2s, bias);
  const bool lowp = is_low_precision(input.scalar_type());
  at::Tensor y = at::empty(sketched_output_shape(input, d.d_out), input.options());
  at::Tensor saved = at::empty({d.N, (lowp ? 4 : 2) * d.L * d.k}, input.options());
  return {y, saved};
}

Grads6 backward_meta(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& saved,
                     const at::Tensor& S1s, const at::Tensor& S2s, const at::Tensor& U1s,
                     const at::Tensor& U2s, std::array<bool, 6> mask) {
  check_sketched_linear("panther::_sketched_linear_backward", input, S1s, S2s, U1s, U2s, std::nullopt);
  Grads6 out;
  if (mask[0]) std::get<0>(out) = at::empty_like(input, at::MemoryFormat::Contiguous);
  if (mask[1]) std::get<1>(out) = at::empty_like(S1s, at::MemoryFormat::Contiguous);
  if (mask[2]) std::get<2>(out) = at::empty_like(S2s, at::MemoryFormat::Contiguous);
  if (mask[3]) std::get<3>(out) = at::empty_like(U1s, at::MemoryFormat::Contiguous);
  if (mask[4]) std::get<4>(out) = at::empty_like(U2s, at::MemoryFormat::Contiguous);
  if (mask[5]) std::get<5>(out) = at::empty({S2s.size(2)}, input.options());
  return out;
}

}  // namespace
}  // namespace panther::meta

TORCH_LIBRARY_IMPL(panther, Meta, m) {
  m.impl("sketched_linear", &panther::meta::sketched_linear_meta);
  m.impl("_sketched_linear_fwd", &panther::meta::fwd_meta);
  m.impl("_sketched_linear_backward", &panther::meta::backward_meta);
}
