// CUDA kernel of panther::_favor_decode_step_ (RandMultiHeadAttention.step_'s decoding step):
// the fused kernel of decode_kernel.cuh, one launch per call on the current stream. Calls it does
// not take (value_dim > 256, shared memory beyond the device's) run the ATen math of impl.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "attention/decode_kernel.cuh"
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

}  // namespace
}  // namespace panther::cuda

TORCH_LIBRARY_IMPL(panther, CUDA, m) {
  m.impl("_favor_decode_step_", &panther::cuda::favor_decode_step_cuda);
}
