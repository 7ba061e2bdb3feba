// CUDA kernels of panther::favor_attention, _favor_attention_forward and
// _favor_attention_backward. bf16 calls whose sizes fit (favor_launch.cuh: head_dim and features
// multiples of 16, value dim < 256) run the fused tensor-core kernels; everything else (fp16,
// fp32, fp64, other sizes) runs the shared ATen implementation (cuBLAS batched GEMMs,
// cpp/attention/impl.cpp) under a device guard, plus one custom kernel, the exclusive scan
// over per-chunk states (one launch instead of one ATen step per chunk). Set
// PANTHER_FAVOR_FUSED=0 to force the ATen path (for comparisons).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "attention/favor_launch.cuh"
#include "attention/impl.h"

#include <cstdlib>

namespace panther::cuda {
namespace {
using namespace panther::detail;

constexpr int64_t kCudaChunk = 128;

// One thread per (batch*head, state entry): walks the chunks in order (or in reverse), keeping
// the running state in a register. Reads and writes are coalesced along the state entries.
//   forward: out[c] = acc; acc = a[c] * acc + x[c]   (out[0] = 0)
//   reverse: the same walking c from n-1 down to 0.
template <typename T>
__global__ void chunk_scan_kernel(const T* __restrict__ x, const T* __restrict__ a,
                                  T* __restrict__ out, int64_t BH, int64_t n, int64_t E,
                                  bool reverse) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= BH * E) return;
  const int64_t bh = idx / E, e = idx - bh * E;
  const T* xb = x + bh * n * E + e;
  T* ob = out + bh * n * E + e;
  const T* ab = a + bh * n;
  T acc = T(0);
  for (int64_t step = 0; step < n; ++step) {
    const int64_t c = reverse ? n - 1 - step : step;
    ob[c * E] = acc;
    acc = ab[c] * acc + xb[c * E];
  }
}

at::Tensor chunk_scan_cuda(const at::Tensor& x_in, const at::Tensor& a_in, bool reverse) {
  TORCH_INTERNAL_ASSERT(x_in.dim() == 3 && a_in.dim() == 2);
  at::Tensor x = x_in.contiguous();
  at::Tensor a = a_in.to(x.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t BH = x.size(0), n = x.size(1), E = x.size(2);
  if (out.numel() == 0) return out;
  const int threads = 256;
  const int64_t blocks = (BH * E + threads - 1) / threads;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "panther_chunk_scan_cuda", [&] {
    chunk_scan_kernel<scalar_t><<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(
        x.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), BH, n, E,
        reverse);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Whether this call takes the fused kernels.
bool fused_takes(const FavorDims& d, at::ScalarType dtype, int device) {
  static const bool enabled = [] {
    const char* e = std::getenv("PANTHER_FAVOR_FUSED");
    return !(e && std::string(e) == "0");
  }();
  if (!enabled) return false;
  return fused::supported(d, dtype, fused::max_smem_optin(device));
}

bool use_fused(const FavorDims& d, const at::Tensor& query) {
  return fused_takes(d, query.scalar_type(), query.get_device());
}

// Tells the autograd kernel (no CUDA code) which calls the fused backward will take.
const bool kRegistered = [] {
  favor_fused_query() = &fused_takes;
  return true;
}();

// The forward of favor_attention (`op`) on CUDA; keep_saved: also the states and stabilisers
// that the fused backward reuses (_favor_attention_forward's second output).
std::tuple<at::Tensor, at::Tensor> forward_cuda(const char* op, const at::Tensor& query,
                                                const at::Tensor& key, const at::Tensor& value,
                                                const at::Tensor& projection,
                                                c10::string_view kernel_fn, bool causal,
                                                const std::optional<at::Tensor>& key_padding_mask,
                                                bool keep_saved) {
  const FavorDims d = check_favor_attention(op, query, key, value, projection, kernel_fn, causal,
                                            key_padding_mask);
  const c10::cuda::CUDAGuard guard(query.device());
  if (use_fused(d, query)) {
    at::Tensor saved;
    at::Tensor out = fused::forward<__nv_bfloat16>(d, query, key, value, projection, causal,
                                                   key_padding_mask,
                                                   keep_saved ? &saved : nullptr);
    return {out, saved};
  }
  at::Tensor out = favor_forward(d, query, key, value, projection, causal, key_padding_mask,
                                 kCudaChunk, &chunk_scan_cuda);
  // The backward on this device does not take the fused path either: it never reads this one.
  return {out, keep_saved ? favor_saved_empty(d, causal, query.options()) : at::Tensor()};
}

at::Tensor favor_attention_cuda(const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, const at::Tensor& projection,
                                c10::string_view kernel_fn, bool causal,
                                const std::optional<at::Tensor>& key_padding_mask) {
  return std::get<0>(forward_cuda("panther::favor_attention", query, key, value, projection,
                                  kernel_fn, causal, key_padding_mask, /*keep_saved=*/false));
}

// favor_attention plus, for the fused path, the states and stabilisers the backward reuses.
std::tuple<at::Tensor, at::Tensor> favor_attention_forward_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& projection, c10::string_view kernel_fn, bool causal,
    const std::optional<at::Tensor>& key_padding_mask) {
  return forward_cuda("panther::_favor_attention_forward", query, key, value, projection,
                      kernel_fn, causal, key_padding_mask, /*keep_saved=*/true);
}

FavorGrads favor_attention_backward_cuda(const at::Tensor& grad_output, const at::Tensor& query,
                                         const at::Tensor& key, const at::Tensor& value,
                                         const at::Tensor& projection, c10::string_view kernel_fn,
                                         bool causal,
                                         const std::optional<at::Tensor>& key_padding_mask,
                                         std::array<bool, 4> output_mask,
                                         const std::optional<at::Tensor>& saved) {
  const FavorDims d = check_favor_attention("panther::_favor_attention_backward", query, key,
                                            value, projection, kernel_fn, causal, key_padding_mask);
  check_favor_attention_grad("panther::_favor_attention_backward", grad_output, query, value);
  const c10::cuda::CUDAGuard guard(query.device());
  if (use_fused(d, query) && grad_output.scalar_type() == query.scalar_type()) {
    // The projection gradient is summed with float atomics across chunks: raise (or warn) like
    // PyTorch's own non-deterministic kernels when deterministic algorithms are requested.
    if (output_mask[3])
      at::globalContext().alertNotDeterministic(
          "panther::_favor_attention_backward (CUDA bf16, gradient of projection)");
    const bool reuse = saved.has_value() && saved->defined() && saved->is_cuda() &&
                       saved->scalar_type() == at::kByte && saved->is_contiguous() &&
                       saved->numel() == favor_saved_layout(d, causal, query.scalar_type()).total;
    return fused::backward<__nv_bfloat16>(d, grad_output, query, key, value, projection, causal,
                                          key_padding_mask, output_mask,
                                          reuse ? &*saved : nullptr);
  }
  return favor_backward(d, grad_output, query, key, value, projection, causal, key_padding_mask,
                        kCudaChunk, &chunk_scan_cuda, output_mask);
}

}  // namespace
}  // namespace panther::cuda

TORCH_LIBRARY_IMPL(panther, CUDA, m) {
  m.impl("favor_attention", &panther::cuda::favor_attention_cuda);
  m.impl("_favor_attention_forward", &panther::cuda::favor_attention_forward_cuda);
  m.impl("_favor_attention_backward", &panther::cuda::favor_attention_backward_cuda);
}
