// The autocast policy of Panther's ops, declared once: "run in the autocast dtype", as
// aten::linear and aten::matmul do. Floating inputs are cast to the device's autocast dtype
// (fp16/bf16) with at::autocast::cached_cast, which leaves float64 and non-floating tensors
// alone; the op then runs below the autocast dispatch keys. An op's autocast.cpp writes one
// kernel template over the device and registers it with PANTHER_AUTOCAST_IMPL.
#pragma once
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <optional>

namespace panther::autocast {

// Casts tensors to the autocast dtype of `device`; while it lives, autocast is off for the calls
// it makes (so the op's own kernels run in the cast dtype and are not re-entered).
template <c10::DeviceType device>
class ToAutocastDtype {
 public:
  ToAutocastDtype() : dtype_(at::autocast::get_autocast_dtype(device)) {}
  at::Tensor operator()(const at::Tensor& t) const {
    return at::autocast::cached_cast(dtype_, t, device);
  }
  std::optional<at::Tensor> operator()(const std::optional<at::Tensor>& t) const {
    if (!t.has_value() || !t->defined()) return std::nullopt;
    return (*this)(*t);
  }

 private:
  c10::impl::ExcludeDispatchKeyGuard no_autocast_{c10::autocast_dispatch_keyset};
  at::ScalarType dtype_;
};

}  // namespace panther::autocast

// Registers kernel<CPU> as OP's AutocastCPU kernel and kernel<CUDA> as its AutocastCUDA kernel.
#define PANTHER_AUTOCAST_IMPL(op, kernel)                                    \
  TORCH_LIBRARY_IMPL(panther, AutocastCPU, m) {                              \
    m.impl(op, &kernel<c10::DeviceType::CPU>);                               \
  }                                                                          \
  TORCH_LIBRARY_IMPL(panther, AutocastCUDA, m) {                             \
    m.impl(op, &kernel<c10::DeviceType::CUDA>);                              \
  }
