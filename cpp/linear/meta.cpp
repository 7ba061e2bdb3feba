// Meta (shape-only) kernels of the sketched linear ops, used by torch.compile, torch.export
// and FakeTensor tracing. They run the same argument checks as the real kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "linear/impl.h"

namespace panther::meta {
namespace {
using namespace panther::detail;

// Shapes in SymInts, so that dynamic leading dims (torch.export Dim, torch.compile(dynamic=True))
// stay symbolic instead of being specialised to the example's sizes.
std::vector<c10::SymInt> sym_output_shape(const at::Tensor& input, int64_t d_out) {
  auto s = input.sym_sizes().vec();
  s.back() = d_out;
  return s;
}

c10::SymInt sym_rows(const at::Tensor& input) {
  c10::SymInt rows = 1;
  for (int64_t i = 0; i + 1 < input.dim(); ++i) rows *= input.sym_size(i);
  return rows;
}

at::Tensor sketched_linear_meta(const at::Tensor& input, const at::Tensor& S1s,
                                const at::Tensor& S2s, const at::Tensor& U1s,
                                const at::Tensor& U2s, const std::optional<at::Tensor>& bias) {
  const SketchDims d = check_sketched_linear("panther::sketched_linear", input, S1s, S2s, U1s, U2s, bias);
  return at::empty_symint(sym_output_shape(input, d.d_out), input.options());
}

std::tuple<at::Tensor, at::Tensor> sketched_linear_forward_meta(
    const at::Tensor& input, const at::Tensor& S1s, const at::Tensor& S2s, const at::Tensor& U1s,
    const at::Tensor& U2s, const std::optional<at::Tensor>& bias) {
  const SketchDims d = check_sketched_linear("panther::sketched_linear", input, S1s, S2s, U1s, U2s, bias);
  at::Tensor y = at::empty_symint(sym_output_shape(input, d.d_out), input.options());
  const int64_t cols = saved_cols(d.L * d.k);
  at::Tensor saved = at::empty_symint({sym_rows(input), c10::SymInt(cols)}, input.options());
  return {y, saved};
}

Grads6 backward_meta(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& saved,
                     const at::Tensor& S1s, const at::Tensor& S2s, const at::Tensor& U1s,
                     const at::Tensor& U2s, std::array<bool, 6> mask) {
  const SketchDims d = check_sketched_linear("panther::_sketched_linear_backward", input, S1s, S2s,
                                             U1s, U2s, std::nullopt);
  check_sketched_linear_backward("panther::_sketched_linear_backward", grad_out, saved, input, d);
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
  m.impl("_sketched_linear_forward", &panther::meta::sketched_linear_forward_meta);
  m.impl("_sketched_linear_backward", &panther::meta::backward_meta);
}
