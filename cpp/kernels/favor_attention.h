// Device-independent pieces of the FAVOR+ attention op (argument checks, feature maps, the
// non-causal and chunked-causal forward and the hand-derived backward, written with ATen GEMMs).
// No registrations here: cpu/ and cuda/ call these with their own chunk-state scan.
//
// Math (per batch*head; x' = x D^-1/4; W = projection (M, D); C = chunk size):
//   softmax: phi(q_i)  = M^-1/2 (exp(x'_i W^T - |x'_i|^2/2 - c_i) + eps),  c_i = max_m(...) per row
//            psi_i(k_j) = M^-1/2 (exp(x'_j W^T - |x'_j|^2/2 - r_i) + eps)
//            r_i = max over valid keys j' <= i of max_m(x'_j' W^T - |x'_j'|^2/2)   (causal: a running
//            max, so no position depends on a later one; non-causal: the max over all valid keys)
//   relu:    phi(x) = M^-1/2 relu(x W^T) + eps (queries and keys alike; no stabiliser)
//   out_i = sum_{j valid (, j <= i)} (phi(q_i).psi_i(k_j)) v_j / sum_{...} phi(q_i).psi_i(k_j)
// Every stabiliser is a constant (stop-gradient): the ratio does not depend on it except through
// eps, so treating it as a constant is exact up to O(eps).
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <array>
#include <optional>
#include <c10/util/string_view.h>
#include <tuple>

namespace panther::detail {

enum class FavorKernel { Softmax, Relu };

// eps of the feature maps: relative to the largest (stabilised, = 1) softmax feature; absolute
// for relu features (the Performer defaults).
constexpr double kFavorSoftmaxEps = 1e-6;
constexpr double kFavorReluEps = 1e-3;

struct FavorDims {
  int64_t B, H, Lq, Lk, D, Dv, M;
  FavorKernel kernel;
};

// Validates shapes, dtypes, devices, the kernel string, the mask and causal's Lq == Lk.
FavorDims check_favor_attention(const char* op, const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, const at::Tensor& projection,
                                c10::string_view kernel, bool causal,
                                const std::optional<at::Tensor>& key_padding_mask);

// Exclusive scan over chunk states: x (BH, n, E), a (BH, n), both contiguous, same dtype.
//   forward: out[0] = 0, out[c] = a[c-1] * out[c-1] + x[c-1]
//   reverse: out[n-1] = 0, out[c] = a[c+1] * out[c+1] + x[c+1]
using ChunkScanFn = at::Tensor (*)(const at::Tensor& x, const at::Tensor& a, bool reverse);
// Any device: one ATen step per chunk (never per token).
at::Tensor chunk_scan_generic(const at::Tensor& x, const at::Tensor& a, bool reverse);
// CPU: one pass of plain loops, parallel over (batch*head, state entries).
at::Tensor chunk_scan_cpu(const at::Tensor& x, const at::Tensor& a, bool reverse);

// The dispatcher handle of panther::favor_attention, for C++ code that calls the op through the
// dispatcher (its autograd kernel, the C++ API, composite ops).
using FavorAttentionSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, c10::string_view, bool,
                                     const std::optional<at::Tensor>&);
const c10::TypedOperatorHandle<FavorAttentionSig>& favor_attention_op();

// The op's output: shape (B, H, Lq, Dv) laid out as (B, Lq, H, Dv) in memory, so that
// out.transpose(1, 2).reshape(B, Lq, H * Dv) (merging the heads) is a view, as with
// scaled_dot_product_attention's fused kernels. Every backend, Meta included, returns this layout.
inline at::Tensor favor_output(const FavorDims& d, const at::TensorOptions& options) {
  return at::empty({d.B, d.Lq, d.H, d.Dv}, options).transpose(1, 2);
}

// Output (B, H, Lq, Dv) in the query's dtype (fp16/bf16 computed in fp32), as favor_output.
at::Tensor favor_forward(const FavorDims& d, const at::Tensor& query, const at::Tensor& key,
                         const at::Tensor& value, const at::Tensor& projection, bool causal,
                         const std::optional<at::Tensor>& key_padding_mask, int64_t chunk,
                         ChunkScanFn scan);

using FavorGrads = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>,
                              std::optional<at::Tensor>, std::optional<at::Tensor>>;

// Gradients for (query, key, value, projection); std::nullopt where output_mask is false.
// Recomputes the features and the per-chunk states (nothing per token is kept from forward).
FavorGrads favor_backward(const FavorDims& d, const at::Tensor& grad_output,
                          const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          const at::Tensor& projection, bool causal,
                          const std::optional<at::Tensor>& key_padding_mask, int64_t chunk,
                          ChunkScanFn scan, std::array<bool, 4> output_mask);

}  // namespace panther::detail
