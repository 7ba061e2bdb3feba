// CUDA kernels of panther::_favor_decode_step_ and _favor_decode_layer_ (RandMultiHeadAttention.
// step_'s decoding step). The step: the fused kernel of decode_kernel.cuh, one launch per call on
// the current stream; calls it does not take (value_dim > 256, shared memory beyond the device's)
// run the ATen math of impl.cpp. The layer: the cluster kernel of decode_layer.cuh (q/k/v
// projections and the step) where it takes the call, else the q, k and v projections and the
// step; the projections (linear_rows_kernel for a few rows, else a GEMM).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "attention/decode_kernel.cuh"
#include "attention/decode_layer.cuh"
#include "attention/impl.h"

namespace panther::cuda {
namespace {
using namespace panther::detail;

at::Tensor favor_decode_step_cuda(const at::Tensor& query, const at::Tensor& key,
                                  const at::Tensor& value, const at::Tensor& projection,
                                  c10::string_view kernel_fn, const at::Tensor& kv,
                                  const at::Tensor& v_sum, const at::Tensor& stabiliser,
                                  const std::optional<at::Tensor>& length) {
  const DecodeDims d = check_favor_decode_step("panther::_favor_decode_step_", query, key, value,
                                               projection, kernel_fn, kv, v_sum, stabiliser,
                                               length);
  const c10::cuda::CUDAGuard guard(query.device());
  if (!decode::takes(d, kv.scalar_type(), ::panther::max_smem_optin(query.get_device())))
    return favor_decode_step_aten(d, query, key, value, projection, kv, v_sum, stabiliser,
                                  length);
  return decode::run_step(d, query, key, value, projection, kv, v_sum, stabiliser, length);
}

// Whether the device launches thread block clusters (compute capability 9.0 or newer).
bool has_clusters(int device) {
  return at::cuda::getDeviceProperties(device)->major >= 9;
}

at::Tensor favor_decode_layer_cuda(
    const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k, const at::Tensor& w_v,
    const std::optional<at::Tensor>& b_q, const std::optional<at::Tensor>& b_k,
    const std::optional<at::Tensor>& b_v, const at::Tensor& projection,
    c10::string_view kernel_fn, const at::Tensor& w_out, const std::optional<at::Tensor>& b_out,
    const at::Tensor& kv, const at::Tensor& v_sum, const at::Tensor& stabiliser,
    const std::optional<at::Tensor>& length) {
  const char* op = "panther::_favor_decode_layer_";
  const QkvWeights qkv{w_q, w_k, w_v, b_q, b_k, b_v};
  const DecodeDims d = check_favor_decode_layer(op, x, qkv, projection, kernel_fn, w_out, b_out,
                                                kv, v_sum, stabiliser, length);
  const c10::cuda::CUDAGuard guard(x.device());
  const int dev = x.get_device();
  const int64_t max_smem = ::panther::max_smem_optin(dev);
  at::Tensor ctx;
  if (decode::layer_takes(x.size(1), d.D, d.Dv, d.M, kv.scalar_type(), max_smem,
                          has_clusters(dev))) {
    ctx = decode::run_layer_step(x, qkv, projection, d.kernel == FavorKernel::Softmax, kv, v_sum,
                                 stabiliser, length);
  } else {  // the q, k and v projections, then the one-block step kernel (or its ATen math)
    const auto [q, k, v] = favor_decode_layer_qkv(
        x, qkv, kv, projection,
        [&](const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& b) {
          return decode::linear_rows(a, w, b, max_smem);
        });
    ctx = favor_decode_step_cuda(q, k, v, projection, kernel_fn, kv, v_sum, stabiliser, length)
              .reshape({x.size(0), kv.size(1) * d.Dv});
  }
  return decode::linear_rows(ctx, w_out, b_out, max_smem);
}

}  // namespace
}  // namespace panther::cuda

TORCH_LIBRARY_IMPL(panther, CUDA, m) {
  m.impl("_favor_decode_step_", &panther::cuda::favor_decode_step_cuda);
  m.impl("_favor_decode_layer_", &panther::cuda::favor_decode_layer_cuda);
}
