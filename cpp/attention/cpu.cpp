// CPU kernels of panther::favor_attention, _favor_attention_backward, _favor_decode_step_ and
// _favor_decode_layer_
// (the latter: the ATen math of impl.cpp). fp32/fp64 compute in
// their own precision; fp16/bf16 compute features, states and sums in fp32 and round once at the
// end. Causal mode runs in chunks of kCpuChunk positions (cpp/attention/impl.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "attention/impl.h"

namespace panther::cpu {
namespace {
using namespace panther::detail;

constexpr int64_t kCpuChunk = 64;

// The math runs per (batch, group of heads), each slice's temporaries (features, chunk states)
// sized to stay in cache: all heads at once made every call allocate ~100 MB blocks at 8k tokens,
// which the C allocator maps fresh (page faults) on every call, and which stream through DRAM.
// Slices run in parallel when there are enough of them for the threads (their ops then run
// single-threaded); otherwise in turn, each op using all threads.
constexpr int64_t kSliceBytes = int64_t{4} << 20;

struct Slices {
  int64_t heads, groups, count;
  bool parallel;
};

Slices slices_of(const FavorDims& d) {
  const int64_t nchunks = std::max(d.Lq, d.Lk) / kCpuChunk + 1;
  const int64_t per_head = (nchunks * (d.Dv + 1) + std::max(d.Lq, d.Lk)) * d.M * 4;
  const int64_t heads = std::clamp<int64_t>(kSliceBytes / std::max<int64_t>(per_head, 1), 1,
                                            std::max<int64_t>(d.H, 1));
  Slices s{heads, (d.H + heads - 1) / heads, 0, false};
  s.count = d.B * s.groups;
  s.parallel = s.count >= at::get_num_threads() && at::get_num_threads() > 1;
  return s;
}

// Calls fn(slice index, batch b, first head h0, heads hn) for every slice.
template <class F>
void for_each_slice(const Slices& s, const FavorDims& d, F&& fn) {
  auto run = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / s.groups, h0 = (t % s.groups) * s.heads;
      fn(t, b, h0, std::min(s.heads, d.H - h0));
    }
  };
  if (s.parallel) at::parallel_for(0, s.count, 1, run);
  else run(0, s.count);
}

at::Tensor slice(const at::Tensor& t, int64_t b, int64_t h0, int64_t hn) {
  return t.narrow(0, b, 1).narrow(1, h0, hn);
}

std::optional<at::Tensor> slice_mask(const std::optional<at::Tensor>& m, int64_t b) {
  if (!m.has_value() || !m->defined()) return std::nullopt;
  return m->narrow(0, b, 1);
}

at::Tensor favor_attention_cpu(const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const at::Tensor& projection,
                               c10::string_view kernel_fn, bool causal,
                               const std::optional<at::Tensor>& key_padding_mask) {
  const FavorDims d = check_favor_attention("panther::favor_attention", query, key, value,
                                            projection, kernel_fn, causal, key_padding_mask);
  const Slices s = slices_of(d);
  if (s.count <= 1)
    return favor_forward(d, query, key, value, projection, causal, key_padding_mask, kCpuChunk,
                         &chunk_scan_cpu);
  at::Tensor out = favor_output(d, query.options());
  for_each_slice(s, d, [&](int64_t, int64_t b, int64_t h0, int64_t hn) {
    FavorDims ds = d;
    ds.B = 1, ds.H = hn;
    slice(out, b, h0, hn).copy_(favor_forward(ds, slice(query, b, h0, hn), slice(key, b, h0, hn),
                                              slice(value, b, h0, hn), projection, causal,
                                              slice_mask(key_padding_mask, b), kCpuChunk,
                                              &chunk_scan_cpu));
  });
  return out;
}

FavorGrads favor_attention_backward_cpu(const at::Tensor& grad_output, const at::Tensor& query,
                                        const at::Tensor& key, const at::Tensor& value,
                                        const at::Tensor& projection, c10::string_view kernel_fn,
                                        bool causal,
                                        const std::optional<at::Tensor>& key_padding_mask,
                                        std::array<bool, 4> output_mask,
                                        const std::optional<at::Tensor>& /*saved: CUDA only*/) {
  const FavorDims d = check_favor_attention("panther::_favor_attention_backward", query, key,
                                            value, projection, kernel_fn, causal, key_padding_mask);
  check_favor_attention_grad("panther::_favor_attention_backward", grad_output, query, value);
  const Slices s = slices_of(d);
  if (s.count <= 1)
    return favor_backward(d, grad_output, query, key, value, projection, causal,
                          key_padding_mask, kCpuChunk, &chunk_scan_cpu, output_mask);
  FavorGrads out;
  auto like = [](const at::Tensor& t) { return at::empty_like(t, at::MemoryFormat::Contiguous); };
  if (output_mask[0]) std::get<0>(out) = like(query);
  if (output_mask[1]) std::get<1>(out) = like(key);
  if (output_mask[2]) std::get<2>(out) = like(value);
  std::vector<at::Tensor> dW(static_cast<size_t>(s.count));
  // A 16-bit projection enters as fp32 (as the computation uses it), so that the slices'
  // projection gradients are summed before the one rounding to its dtype.
  const bool lowp_w = at::isReducedFloatingType(projection.scalar_type());
  const at::Tensor W = lowp_w ? projection.to(at::kFloat) : projection;
  for_each_slice(s, d, [&](int64_t t, int64_t b, int64_t h0, int64_t hn) {
    FavorDims ds = d;
    ds.B = 1, ds.H = hn;
    FavorGrads g = favor_backward(ds, slice(grad_output, b, h0, hn), slice(query, b, h0, hn),
                                  slice(key, b, h0, hn), slice(value, b, h0, hn), W,
                                  causal, slice_mask(key_padding_mask, b), kCpuChunk,
                                  &chunk_scan_cpu, output_mask);
    if (output_mask[0]) slice(*std::get<0>(out), b, h0, hn).copy_(*std::get<0>(g));
    if (output_mask[1]) slice(*std::get<1>(out), b, h0, hn).copy_(*std::get<1>(g));
    if (output_mask[2]) slice(*std::get<2>(out), b, h0, hn).copy_(*std::get<2>(g));
    if (output_mask[3]) dW[static_cast<size_t>(t)] = *std::get<3>(g);
  });
  if (output_mask[3]) {
    // Summed in slice order whatever the thread count: the result does not depend on timing.
    at::Tensor sum = dW[0].clone();
    for (size_t i = 1; i < dW.size(); ++i) sum.add_(dW[i]);
    std::get<3>(out) = sum.to(projection.scalar_type());
  }
  return out;
}

at::Tensor favor_decode_step_cpu(const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& projection,
                                 c10::string_view kernel_fn, const at::Tensor& kv,
                                 const at::Tensor& v_sum, const at::Tensor& stabiliser,
                                 const std::optional<at::Tensor>& length) {
  const DecodeDims d = check_favor_decode_step("panther::_favor_decode_step_", query, key, value,
                                               projection, kernel_fn, kv, v_sum, stabiliser,
                                               length);
  return favor_decode_step_aten(d, query, key, value, projection, kv, v_sum, stabiliser, length);
}

at::Tensor favor_decode_layer_cpu(
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
  const auto [q, k, v] = favor_decode_layer_qkv(
      x, qkv, kv, projection,
      [](const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& b) {
        return at::linear(a, w, b);
      });
  const at::Tensor ctx =
      favor_decode_step_aten(d, q, k, v, projection, kv, v_sum, stabiliser, length);
  return at::linear(ctx.reshape({x.size(0), kv.size(1) * d.Dv}), w_out, b_out);
}

}  // namespace
}  // namespace panther::cpu

TORCH_LIBRARY_IMPL(panther, CPU, m) {
  m.impl("favor_attention", &panther::cpu::favor_attention_cpu);
  m.impl("_favor_attention_backward", &panther::cpu::favor_attention_backward_cpu);
  m.impl("_favor_decode_step_", &panther::cpu::favor_decode_step_cpu);
  m.impl("_favor_decode_layer_", &panther::cpu::favor_decode_layer_cpu);
}
