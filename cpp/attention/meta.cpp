// Meta (shape-only) kernels of panther::favor_attention, _favor_attention_forward,
// _favor_attention_backward, _favor_decode_step_ and _favor_decode_layer_ (their outputs only:
// the state they update in
// place keeps its shape), used by torch.compile, torch.export and FakeTensor tracing. They run
// the same checks as the real kernels, on symbolic sizes (sym_size, empty_symint): under dynamic
// shapes (torch.compile's automatic dynamic shapes, torch.export Dims) batch, heads and lengths
// stay symbols instead of being specialised to the example's sizes.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "attention/impl.h"

namespace panther::meta {
namespace {
using namespace panther::detail;

at::Tensor favor_attention_meta(const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, const at::Tensor& projection,
                                c10::string_view kernel_fn, bool causal,
                                const std::optional<at::Tensor>& key_padding_mask) {
  const FavorSymDims d = check_favor_attention_sym("panther::favor_attention", query, key,
                                                   value, projection, kernel_fn, causal,
                                                   key_padding_mask);
  return favor_output(d, query.options());
}

std::tuple<at::Tensor, at::Tensor> favor_attention_forward_meta(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& projection, c10::string_view kernel_fn, bool causal,
    const std::optional<at::Tensor>& key_padding_mask) {
  const FavorSymDims d = check_favor_attention_sym("panther::_favor_attention_forward", query,
                                                   key, value, projection, kernel_fn, causal,
                                                   key_padding_mask);
  return {favor_output(d, query.options()), favor_saved_empty(d, causal, query.options())};
}

FavorGrads favor_attention_backward_meta(const at::Tensor& grad_output, const at::Tensor& query,
                                         const at::Tensor& key, const at::Tensor& value,
                                         const at::Tensor& projection, c10::string_view kernel_fn,
                                         bool causal,
                                         const std::optional<at::Tensor>& key_padding_mask,
                                         std::array<bool, 4> output_mask,
                                         const std::optional<at::Tensor>& /*saved*/) {
  check_favor_attention_sym("panther::_favor_attention_backward", query, key, value, projection,
                            kernel_fn, causal, key_padding_mask);
  check_favor_attention_grad("panther::_favor_attention_backward", grad_output, query, value);
  FavorGrads out;
  if (output_mask[0]) std::get<0>(out) = at::empty_like(query, at::MemoryFormat::Contiguous);
  if (output_mask[1]) std::get<1>(out) = at::empty_like(key, at::MemoryFormat::Contiguous);
  if (output_mask[2]) std::get<2>(out) = at::empty_like(value, at::MemoryFormat::Contiguous);
  if (output_mask[3]) std::get<3>(out) = at::empty_like(projection, at::MemoryFormat::Contiguous);
  return out;
}

at::Tensor favor_decode_step_meta(const at::Tensor& query, const at::Tensor& key,
                                  const at::Tensor& value, const at::Tensor& projection,
                                  c10::string_view kernel_fn, const at::Tensor& kv,
                                  const at::Tensor& v_sum, const at::Tensor& stabiliser,
                                  const std::optional<at::Tensor>& length) {
  const std::vector<c10::SymInt> out = check_favor_decode_step_sym(
      "panther::_favor_decode_step_", query, key, value, projection, kernel_fn, kv, v_sum,
      stabiliser, length);
  return at::empty_symint(out, query.options());
}

at::Tensor favor_decode_layer_meta(
    const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k, const at::Tensor& w_v,
    const std::optional<at::Tensor>& b_q, const std::optional<at::Tensor>& b_k,
    const std::optional<at::Tensor>& b_v, const at::Tensor& projection,
    c10::string_view kernel_fn, const at::Tensor& w_out, const std::optional<at::Tensor>& b_out,
    const at::Tensor& kv, const at::Tensor& v_sum, const at::Tensor& stabiliser,
    const std::optional<at::Tensor>& length) {
  const std::vector<c10::SymInt> out = check_favor_decode_layer_sym(
      "panther::_favor_decode_layer_", x, QkvWeights{w_q, w_k, w_v, b_q, b_k, b_v}, projection,
      kernel_fn, w_out, b_out, kv, v_sum, stabiliser, length);
  return at::empty_symint(out, x.options());
}

}  // namespace
}  // namespace panther::meta

TORCH_LIBRARY_IMPL(panther, Meta, m) {
  m.impl("favor_attention", &panther::meta::favor_attention_meta);
  m.impl("_favor_attention_forward", &panther::meta::favor_attention_forward_meta);
  m.impl("_favor_attention_backward", &panther::meta::favor_attention_backward_meta);
  m.impl("_favor_decode_step_", &panther::meta::favor_decode_step_meta);
  m.impl("_favor_decode_layer_", &panther::meta::favor_decode_layer_meta);
}
