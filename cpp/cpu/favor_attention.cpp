// CPU kernels of panther::favor_attention and _favor_attention_backward. fp32/fp64 compute in
// their own precision; fp16/bf16 compute features, states and sums in fp32 and round once at the
// end. Causal mode runs in chunks of kCpuChunk positions (kernels/favor_attention.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels/favor_attention.h"

namespace panther::cpu {
namespace {
using namespace panther::detail;

constexpr int64_t kCpuChunk = 64;

at::Tensor favor_attention_cpu(const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const at::Tensor& projection,
                               c10::string_view kernel, bool causal,
                               const std::optional<at::Tensor>& key_padding_mask) {
  const FavorDims d = check_favor_attention("panther::favor_attention", query, key, value,
                                            projection, kernel, causal, key_padding_mask);
  return favor_forward(d, query, key, value, projection, causal, key_padding_mask, kCpuChunk,
                       &chunk_scan_cpu);
}

FavorGrads favor_attention_backward_cpu(const at::Tensor& grad_output, const at::Tensor& query,
                                        const at::Tensor& key, const at::Tensor& value,
                                        const at::Tensor& projection, c10::string_view kernel,
                                        bool causal,
                                        const std::optional<at::Tensor>& key_padding_mask,
                                        std::array<bool, 4> output_mask) {
  const FavorDims d = check_favor_attention("panther::_favor_attention_backward", query, key,
                                            value, projection, kernel, causal, key_padding_mask);
  return favor_backward(d, grad_output, query, key, value, projection, causal, key_padding_mask,
                        kCpuChunk, &chunk_scan_cpu, output_mask);
}

}  // namespace
}  // namespace panther::cpu

TORCH_LIBRARY_IMPL(panther, CPU, m) {
  m.impl("favor_attention", &panther::cpu::favor_attention_cpu);
  m.impl("_favor_attention_backward", &panther::cpu::favor_attention_backward_cpu);
}
