// Device-independent pieces of the FAVOR+ attention op (argument checks, feature maps, the
// non-causal and chunked-causal forward and the hand-derived backward, written with ATen GEMMs).
// No registrations here: cpu.cpp and cuda.cu call these with their own chunk-state scan.
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
#include <cstdlib>
#include <optional>
#include <c10/util/string_view.h>
#include <tuple>
#include <vector>

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

// The fused CUDA kernels (favor_kernels.cuh) work in chunks of this many positions, with the
// value dimension plus the denominator column padded to a multiple of 16 (e1p).
constexpr int64_t kFavorFusedChunk = 64;
// (Sizes here are templates on the integer type: int64_t for the kernels, c10::SymInt for the Meta
// kernels under dynamic shapes, so that both compute the same sizes from one formula.)
template <class I>
inline I favor_fused_e1p(const I& Dv) { return (Dv + 1 + 15) / 16 * 16; }

// Whether the fused CUDA kernels take these shapes and this dtype (bf16, head_dim and features
// multiples of 16, e1p <= 256); the device's shared memory is checked on top (fused::supported).
template <class I>
inline bool favor_fused_shapes(const I& BH, const I& Lq, const I& Lk, const I& D, const I& Dv,
                               const I& M, at::ScalarType dt) {
  if (dt != at::kBFloat16) return false;
  if (D % 16 != 0 || M % 16 != 0 || favor_fused_e1p(Dv) > 256) return false;
  if (BH > 65535 || BH * Dv == 0 || Lq < 1 || Lk < 1) return false;
  const int64_t c = kFavorFusedChunk;
  return (Lq + c - 1) / c <= (int64_t{1} << 30) && (Lk + c - 1) / c <= (int64_t{1} << 30);
}

// Causal calls keep the scan's running state (fp32) only every kFavorBoundaryChunks chunks; the
// backward recomputes the chunk states in between, one launch of whole groups at a time.
#if defined(PANTHER_CUDA_EMU)
constexpr int64_t kFavorBoundaryChunks = 2;  // (the emulator's sequences have a few chunks)
#else
constexpr int64_t kFavorBoundaryChunks = 16;
#endif
// The boundary states of nk chunks: the running state before chunks G, 2G, ... < nk.
template <class I>
inline I favor_boundary_states(const I& nk) {
  return (nk - 1) / kFavorBoundaryChunks;
}

// Whether causal calls keep every chunk's features, A', output and denominators for the backward
// (PANTHER_FAVOR_SAVE_FEATURES=1; read once per process) instead of recomputing them there. Off
// by default: they cost ~25 bytes per position and feature; recomputing costs backward time.
inline bool favor_saves_features() {
  static const bool on = [] {
    const char* e = std::getenv("PANTHER_FAVOR_SAVE_FEATURES");
    return e != nullptr && e[0] == '1';
  }();
  return on;
}

// What the fused forward keeps for the backward (_favor_attention_forward's second output, one
// byte tensor), as byte offsets:
//   non-causal: the total state hs (BH, 1, M e1p) bf16 and its extra row hx (BH, 1, e1p) fp32;
//   causal: the scan's fp32 running state bd (BH, nb, (M + 1) e1p) before chunks G, 2G, ... < nk
//     (G = kFavorBoundaryChunks, nb = (nk - 1) / G) and the key stabiliser r (BH, nk C) fp32;
//     with features (favor_saves_features()), every chunk's query features phi (BH, nk C, M) bf16
//     with their row sums ps (BH, nk C) fp32, key features khat (BH, nk C, M) bf16, the C x C
//     block A' sa (BH, nk, C C) bf16 and, when Dv <= 64, the output before rounding yo
//     (BH, nk C, Dv) fp32 and the denominators dn (BH, nk C) fp32;
//   both: the chunk scalars cs (BH, nk, 4) fp32 (nk chunks of C);
//   causal softmax: each chunk's key maximum mx (BH, nk) fp32 (the chunk states are relative to
//     it; relu features need no stabiliser and keep none).
// Back to back with no padding, so the kernels write every byte (all but the last are multiples
// of 64 bytes: each region stays aligned). total is 0 for shapes the fused kernels do not take.
// Shapes only: the Meta kernel returns the same size as the CUDA one.
constexpr int64_t kFavorSavedOutMaxDv = 64;  // (the backward stages C x Dv fp32 in 16 KB)
template <class I>
struct FavorSavedT {
  I hs = 0, bd = 0, ph = 0, kf = 0, sa = 0, yo = 0, r = 0, ps = 0, dn = 0, hx = 0, cs = 0,
    mx = 0, total = 0;
};
using FavorSaved = FavorSavedT<int64_t>;
// (features = false: the same without the per-chunk features, A', output and denominators;
// boundaries = false: without the boundary states; both for the fused kernels' own workspace.)
template <class I>
inline FavorSavedT<I> favor_saved_layout(const I& BH, const I& Lq, const I& Lk, const I& D,
                                         const I& Dv, const I& M, bool causal, FavorKernel kernel,
                                         at::ScalarType dt,
                                         bool features = favor_saves_features(),
                                         bool boundaries = true) {
  FavorSavedT<I> s;
  if (!favor_fused_shapes(BH, Lq, Lk, D, Dv, M, dt)) return s;
  const I nk = (Lk + kFavorFusedChunk - 1) / kFavorFusedChunk, nst = causal ? I(0) : I(1);
  const I nb = causal && boundaries ? favor_boundary_states(nk) : I(0);
  const I rows = causal ? BH * nk * kFavorFusedChunk : I(0);  // causal: Lq == Lk
  const I frows = features ? rows : I(0);
  const I yrows = Dv <= kFavorSavedOutMaxDv ? frows : I(0);
  const I e1p = favor_fused_e1p(Dv);
  s.hs = 0;
  s.bd = s.hs + BH * nst * M * e1p * 2;
  s.ph = s.bd + BH * nb * (M + 1) * e1p * 4;
  s.kf = s.ph + frows * M * 2;
  s.sa = s.kf + frows * M * 2;
  s.yo = s.sa + frows * kFavorFusedChunk * 2;
  s.r = s.yo + yrows * Dv * 4;
  s.ps = s.r + rows * 4;
  s.dn = s.ps + frows * 4;
  s.hx = s.dn + yrows * 4;
  s.cs = s.hx + BH * nst * e1p * 4;
  s.mx = s.cs + BH * nk * 4 * 4;
  s.total = s.mx + (causal && kernel == FavorKernel::Softmax ? BH * nk * 4 : I(0));
  return s;
}

// Whether the fused CUDA kernels would take a call of these dims and dtype on CUDA device
// `device` (shapes, the device's shared memory, PANTHER_FAVOR_FUSED). Set by the CUDA kernels'
// translation unit when the library is built with CUDA, else null. The autograd kernel asks it
// before keeping the forward's states, which only the fused backward reads.
using FavorFusedQuery = bool (*)(const FavorDims& d, at::ScalarType dtype, int device);
FavorFusedQuery& favor_fused_query();

// FavorDims in SymInts: the Meta kernels' view of a call under dynamic shapes (torch.compile's
// automatic dynamic shapes, torch.export Dims), where batch, heads and lengths stay symbolic.
struct FavorSymDims {
  c10::SymInt B, H, Lq, Lk, D, Dv, M;
  FavorKernel kernel;
};

// check_favor_attention on symbolic sizes: the same checks, no size specialised to a constant.
FavorSymDims check_favor_attention_sym(const char* op, const at::Tensor& query,
                                       const at::Tensor& key, const at::Tensor& value,
                                       const at::Tensor& projection, c10::string_view kernel_fn,
                                       bool causal,
                                       const std::optional<at::Tensor>& key_padding_mask);

// The backward's grad_output: (B, H, Lq, Dv) as the output, floating, on the query's device
// (sizes compared as SymInts, for the Meta kernel under dynamic shapes). Autograd always passes
// it right; a direct call of the private op with another shape gets an error, not a misread.
void check_favor_attention_grad(const char* op, const at::Tensor& grad_output,
                                const at::Tensor& query, const at::Tensor& value);

// _favor_decode_step_ (one decoding position of causal FAVOR+ against a running state, in place;
// see schema.cpp): rows R = the product of the leading dims, head_dim D, value_dim Dv, M features.
struct DecodeDims {
  int64_t R, D, Dv, M;
  FavorKernel kernel;
};

// The dtype of a decoding state for queries of dtype `query`: float64 for float64, else float32.
inline at::ScalarType decode_state_dtype(at::ScalarType query) {
  return query == at::kDouble ? at::kDouble : at::kFloat;
}

// Validates the decode step's arguments (shapes; dtypes: query, key and value alike, in any
// floating dtype, the state in decode_state_dtype, the projection in either; length, when given,
// a 0-d int64 tensor; devices, kernel_fn, and that no tensor requires grad under grad mode: the op
// is in place and has no autograd kernel). Returns the output's sizes (the query's leading dims,
// then Dv); symbolic for the Meta kernel.
std::vector<c10::SymInt> check_favor_decode_step_sym(
    const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& projection, c10::string_view kernel_fn, const at::Tensor& kv,
    const at::Tensor& v_sum, const at::Tensor& stabiliser,
    const std::optional<at::Tensor>& length);
DecodeDims check_favor_decode_step(const char* op, const at::Tensor& query, const at::Tensor& key,
                                   const at::Tensor& value, const at::Tensor& projection,
                                   c10::string_view kernel_fn, const at::Tensor& kv,
                                   const at::Tensor& v_sum, const at::Tensor& stabiliser,
                                   const std::optional<at::Tensor>& length);

// The decode step in ATen ops, any device (the CPU kernel, and CUDA calls the fused kernel does
// not take): the math of panther._favor_math.decode_step(..., inplace=True), in the state's dtype.
// Updates kv, v_sum and stabiliser in place (and adds one to length, when given); returns out
// (..., Dv) in the query's dtype.
at::Tensor favor_decode_step_aten(const DecodeDims& d, const at::Tensor& query,
                                  const at::Tensor& key, const at::Tensor& value,
                                  const at::Tensor& projection, const at::Tensor& kv,
                                  const at::Tensor& v_sum, const at::Tensor& stabiliser,
                                  const std::optional<at::Tensor>& length);

// The q, k and v projections of _favor_decode_layer_: weights (rows, E), biases (rows) or none.
struct QkvWeights {
  at::Tensor w_q, w_k, w_v;
  std::optional<at::Tensor> b_q, b_k, b_v;
};

// _favor_decode_layer_ (the decoding step of a self-attention layer: q/k/v projections of x, the
// step, the output projection; see schema.cpp). Validates x (B, E), w_q and w_k (H D, E), w_v
// (H Dv, E), w_out (E_out, H Dv) and the biases against x and the state (kv (B, H, M, Dv + 1)
// gives H and Dv, the projection (M, D) gives D), then the state as _favor_decode_step_ does;
// returns the output's sizes (B, E_out), symbolic for the Meta kernel.
std::vector<c10::SymInt> check_favor_decode_layer_sym(
    const char* op, const at::Tensor& x, const QkvWeights& qkv, const at::Tensor& projection,
    c10::string_view kernel_fn, const at::Tensor& w_out, const std::optional<at::Tensor>& b_out,
    const at::Tensor& kv, const at::Tensor& v_sum, const at::Tensor& stabiliser,
    const std::optional<at::Tensor>& length);

// check_favor_decode_layer_sym on concrete sizes; returns the step's dims (rows B H).
DecodeDims check_favor_decode_layer(
    const char* op, const at::Tensor& x, const QkvWeights& qkv, const at::Tensor& projection,
    c10::string_view kernel_fn, const at::Tensor& w_out, const std::optional<at::Tensor>& b_out,
    const at::Tensor& kv, const at::Tensor& v_sum, const at::Tensor& stabiliser,
    const std::optional<at::Tensor>& length);

// q (B, H, D), k (B, H, D), v (B, H, Dv): the layer's projections of x, `linear` (x, w, b) -> (B,
// rows) for each (at::linear, or a faster kernel on CUDA); arguments checked by
// check_favor_decode_layer_sym.
template <class Linear>
std::tuple<at::Tensor, at::Tensor, at::Tensor> favor_decode_layer_qkv(const at::Tensor& x,
                                                                      const QkvWeights& qkv,
                                                                      const at::Tensor& kv,
                                                                      const at::Tensor& projection,
                                                                      Linear&& linear) {
  const int64_t B = x.size(0), H = kv.size(1), D = projection.size(1), Dv = kv.size(3) - 1;
  return {linear(x, qkv.w_q, qkv.b_q).view({B, H, D}), linear(x, qkv.w_k, qkv.b_k).view({B, H, D}),
          linear(x, qkv.w_v, qkv.b_v).view({B, H, Dv})};
}

// Validates shapes, dtypes, devices, kernel_fn, the mask and causal's Lq == Lk.
FavorDims check_favor_attention(const char* op, const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, const at::Tensor& projection,
                                c10::string_view kernel_fn, bool causal,
                                const std::optional<at::Tensor>& key_padding_mask);

// Exclusive scan over chunk states: x (BH, n, E), a (BH, n), both contiguous, same dtype.
//   forward: out[0] = 0, out[c] = a[c-1] * out[c-1] + x[c-1]
//   reverse: out[n-1] = 0, out[c] = a[c+1] * out[c+1] + x[c+1]
using ChunkScanFn = at::Tensor (*)(const at::Tensor& x, const at::Tensor& a, bool reverse);
// Any device: one ATen step per chunk (never per token).
at::Tensor chunk_scan_generic(const at::Tensor& x, const at::Tensor& a, bool reverse);
// Any device, out-of-place steps that autograd can record (one per chunk).
at::Tensor chunk_scan_differentiable(const at::Tensor& x, const at::Tensor& a, bool reverse);
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

inline at::Tensor favor_output(const FavorSymDims& d, const at::TensorOptions& options) {
  return at::empty_symint({d.B, d.Lq, d.H, d.Dv}, options).transpose(1, 2);
}

// Output (B, H, Lq, Dv) in the query's dtype (fp16/bf16 computed in fp32), as favor_output.
at::Tensor favor_forward(const FavorDims& d, const at::Tensor& query, const at::Tensor& key,
                         const at::Tensor& value, const at::Tensor& projection, bool causal,
                         const std::optional<at::Tensor>& key_padding_mask, int64_t chunk,
                         ChunkScanFn scan);

// The same output as favor_forward (any layout), computed with out-of-place ATen ops only and
// stabilisers detached, so that autograd records it: its autograd gradient is the op's gradient,
// and differentiating that gradient again gives exact second derivatives (the autograd kernel
// uses it for backward passes run with create_graph=True). Linear in length, like the op.
at::Tensor favor_forward_differentiable(const FavorDims& d, const at::Tensor& query,
                                        const at::Tensor& key, const at::Tensor& value,
                                        const at::Tensor& projection, bool causal,
                                        const std::optional<at::Tensor>& key_padding_mask,
                                        int64_t chunk);

inline FavorSaved favor_saved_layout(const FavorDims& d, bool causal, at::ScalarType dt,
                                     bool features = favor_saves_features(),
                                     bool boundaries = true) {
  return favor_saved_layout(d.B * d.H, d.Lq, d.Lk, d.D, d.Dv, d.M, causal, d.kernel, dt,
                            features, boundaries);
}

// An (unfilled) saved tensor for a call: the Meta kernel's, and the CUDA one's where the fused
// kernels do not run (the size is fixed by the shapes and the dtype, whatever the device does).
inline at::Tensor favor_saved_empty(const FavorDims& d, bool causal,
                                    const at::TensorOptions& query_options) {
  const int64_t bytes =
      favor_saved_layout(d, causal, query_options.dtype().toScalarType()).total;
  return at::empty({bytes}, query_options.dtype(at::kByte));
}
inline at::Tensor favor_saved_empty(const FavorSymDims& d, bool causal,
                                    const at::TensorOptions& query_options) {
  const c10::SymInt bytes = favor_saved_layout(d.B * d.H, d.Lq, d.Lk, d.D, d.Dv, d.M, causal,
                                               d.kernel, query_options.dtype().toScalarType())
                                .total;
  return at::empty_symint({bytes}, query_options.dtype(at::kByte));
}

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
