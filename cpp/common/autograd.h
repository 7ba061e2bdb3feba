// Shared pieces of the ops' autograd kernels (<family>/autograd.cpp): which inputs need a
// gradient, whether a call must be recorded at all, and a backward op's optional gradients as
// autograd's outputs.
#pragma once
#include <torch/autograd.h>

#include <array>
#include <cstddef>
#include <optional>

namespace panther::autograd {

// The output_mask of an op's backward: whether each of the first `present` inputs (default: all
// N) needs a gradient; the rest are false. Inputs that are None (an absent optional tensor at the
// end) must not be asked about: autograd does not track them, so pass `present` without them.
template <std::size_t N>
std::array<bool, N> grad_mask(torch::autograd::AutogradContext* ctx, std::size_t present = N) {
  std::array<bool, N> mask{};
  for (std::size_t i = 0; i < present && i < N; ++i) mask[i] = ctx->needs_input_grad(i);
  return mask;
}

template <std::size_t N>
bool any(const std::array<bool, N>& mask) {
  for (bool b : mask)
    if (b) return true;
  return false;
}

inline bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad(const std::optional<at::Tensor>& t) {
  return t.has_value() && requires_grad(*t);
}

// Whether autograd must record a call on these tensors: grad mode is on and one of them
// requires grad. When not, the op runs below autograd and keeps nothing for a backward.
template <class... Ts>
bool records_grad(const Ts&... ts) {
  return at::GradMode::is_enabled() && (requires_grad(ts) || ...);
}

// A backward op's optional gradient as an autograd output (undefined: no gradient).
inline at::Tensor grad_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

}  // namespace panther::autograd
