// Panther's public C++ API: typed functions that call the operators through the PyTorch
// dispatcher, so C++ callers get autograd, autocast and every backend exactly as Python does.
// Link panther::panther_ops (find_package(panther)) and include <panther/ops.h>.
#pragma once
#include <ATen/Tensor.h>
#include <optional>
#include <string>

namespace panther {

/// Sketched (randomized low-rank) linear layer.
///   y = 1/(2L) * sum_i (x S1s[i] U1s[i] + x U2s[i] S2s[i]) + bias
/// input (..., d_in); S1s (L, d_in, k); S2s (L, k, d_out); U1s (L, k, d_out); U2s (L, d_in, k);
/// bias (d_out) or nullopt. Returns (..., d_out). All tensors share dtype and device.
at::Tensor sketched_linear(const at::Tensor& input, const at::Tensor& S1s, const at::Tensor& S2s,
                           const at::Tensor& U1s, const at::Tensor& U2s,
                           const std::optional<at::Tensor>& bias = std::nullopt);

/// FAVOR+ random-feature attention (Performer), linear in sequence length.
/// query (B, H, Lq, D); key (B, H, Lk, D); value (B, H, Lk, Dv); projection (M, D) shared by the
/// heads; kernel_fn "softmax" or "relu"; causal needs Lq == Lk; key_padding_mask (B, Lk) bool with
/// true = padded key (ignored). Returns (B, H, Lq, Dv) in the query's dtype.
at::Tensor favor_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                           const at::Tensor& projection, const std::string& kernel_fn = "softmax",
                           bool causal = false,
                           const std::optional<at::Tensor>& key_padding_mask = std::nullopt);

/// Version string of torch this library was compiled against.
const char* built_with_torch();

}  // namespace panther
