// Panther's C++ modules (torch::nn::Module style), twins of the Python layers with the same
// parameter/buffer names, shapes and initialisation: panther::nn::SKLinear (pr.nn.SKLinear, calls
// panther::sketched_linear) and panther::nn::RandMultiHeadAttention (pr.nn.RandMultiHeadAttention,
// calls panther::favor_attention). Forward goes through the dispatcher, so C++ training gets
// autograd and autocast exactly like Python. Link panther::panther_ops and include <panther/nn.h>.
#pragma once
#include <ATen/Tensor.h>
#include <c10/core/TensorOptions.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

#include <optional>
#include <ostream>
#include <string>

namespace panther::nn {

/// Options of SKLinear (builder style, like torch::nn::LinearOptions):
///   SKLinearOptions(512, 256, /*num_terms=*/2, /*low_rank=*/32).bias(false)
struct SKLinearOptions {
  SKLinearOptions(int64_t in_features, int64_t out_features, int64_t num_terms, int64_t low_rank)
      : in_features_(in_features),
        out_features_(out_features),
        num_terms_(num_terms),
        low_rank_(low_rank) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  /// Number of sketch terms L (>= 1).
  TORCH_ARG(int64_t, num_terms);
  /// Sketch size k (>= 1, any value).
  TORCH_ARG(int64_t, low_rank);
  /// Learn an additive bias (initialised like torch::nn::Linear's).
  TORCH_ARG(bool, bias) = true;
  /// dtype/device of parameters and buffers (default: float32 on CPU).
  TORCH_ARG(c10::TensorOptions, tensor_options) = c10::TensorOptions();
};

/// Sketched linear layer, the C++ twin of pr.nn.SKLinear:
///   y = 1/(2L) * sum_i (x S1s[i] U1s[i] + x U2s[i] S2s[i]) + bias
/// Parameters: S1s (L, in, k), S2s (L, k, out), bias (out) [if options.bias()].
/// Buffers:    U1s (L, k, out), U2s (L, in, k), entries +-1/sqrt(k) drawn from the global
///             generator (torch::manual_seed reproduces a layer; constructing never reseeds).
/// Initialisation: from W (out x in; W_init, or torch::nn::Linear's default init shrunk by
/// (1 + (in + out - 2) / (4 L k))^-1/2 so the effective weight keeps nn.Linear's variance),
/// S1_i = W^T U1_i^T and S2_i = U2_i^T W^T, so each term is an unbiased estimate of W^T.
/// Same draws as pr.nn.SKLinear: after the same torch::manual_seed, identical numbers.
/// Shape: forward(input (..., in)) -> (..., out). Errors name "SKLinear", the argument and sizes.
class SKLinearImpl : public torch::nn::Cloneable<SKLinearImpl> {
 public:
  /// SKLinear(in_features, out_features, num_terms, low_rank[, bias]).
  SKLinearImpl(int64_t in_features, int64_t out_features, int64_t num_terms, int64_t low_rank,
               bool bias = true)
      : SKLinearImpl(SKLinearOptions(in_features, out_features, num_terms, low_rank).bias(bias)) {}
  /// From options; W_init (out_features, in_features), when given, is sketched instead of a
  /// random dense init (e.g. a trained torch::nn::Linear's weight).
  explicit SKLinearImpl(const SKLinearOptions& options,
                        const std::optional<at::Tensor>& W_init = std::nullopt);

  /// Draws new sign buffers and sketches from the global generator (from W_init if given).
  /// Called by the constructor and by clone(); keeps parameter/buffer names stable.
  void reset() override;

  /// input (..., in_features) -> (..., out_features), via panther::sketched_linear.
  at::Tensor forward(const at::Tensor& input);

  /// The equivalent dense weight (out_features, in_features), for inspection and tests.
  at::Tensor dense_weight() const;

  /// Prints "panther::nn::SKLinear(in_features=.., out_features=.., num_terms=.., low_rank=.., bias=..)".
  void pretty_print(std::ostream& stream) const override;

  SKLinearOptions options;
  std::optional<at::Tensor> W_init;
  at::Tensor S1s, S2s, U1s, U2s, bias;
};
TORCH_MODULE(SKLinear);

/// Options of RandMultiHeadAttention: RandMultiHeadAttentionOptions(512, 8, 256).kernel_fn("relu")
struct RandMultiHeadAttentionOptions {
  RandMultiHeadAttentionOptions(int64_t embed_dim, int64_t num_heads, int64_t num_random_features)
      : embed_dim_(embed_dim), num_heads_(num_heads), num_random_features_(num_random_features) {}
  /// Model width E (divisible by num_heads; head_dim = E / num_heads).
  TORCH_ARG(int64_t, embed_dim);
  TORCH_ARG(int64_t, num_heads);
  /// M, random features per head (shared by the heads).
  TORCH_ARG(int64_t, num_random_features);
  /// Dropout on the per-head attention output (before W0), in training mode only.
  TORCH_ARG(double, dropout) = 0.0;
  /// Learn projection biases bq, bk, bv, b0 (initialised to zero).
  TORCH_ARG(bool, bias) = true;
  /// "softmax" (positive random features) or "relu".
  TORCH_ARG(std::string, kernel_fn) = "softmax";
  /// Position i attends to positions <= i only (needs equal query/key lengths). Panther's
  /// spelling, as the Python constructor's; forward's argument and the op say `causal`.
  TORCH_ARG(bool, iscausal) = false;
  /// dtype/device of parameters and buffers (default: float32 on CPU).
  TORCH_ARG(c10::TensorOptions, tensor_options) = c10::TensorOptions();
};

/// FAVOR+ random-feature multi-head attention (Performer), the C++ twin of
/// pr.nn.RandMultiHeadAttention: linear in sequence length.
/// Parameters: Wq, Wk, Wv, W0 (E, E) (nn.Linear layout, q = x Wq^T + bq), xavier-uniform init;
///             bq, bk, bv, b0 (E) [if options.bias()], zero init.
/// Buffer:     projection_matrix (M, head_dim): orthogonal Gaussian blocks with chi-distributed
///             row norms, drawn from the global generator.
/// Needs the op panther::favor_attention (this build's library must have it; forward throws a
/// c10::Error naming the op otherwise).
class RandMultiHeadAttentionImpl : public torch::nn::Cloneable<RandMultiHeadAttentionImpl> {
 public:
  RandMultiHeadAttentionImpl(int64_t embed_dim, int64_t num_heads, int64_t num_random_features)
      : RandMultiHeadAttentionImpl(
            RandMultiHeadAttentionOptions(embed_dim, num_heads, num_random_features)) {}
  explicit RandMultiHeadAttentionImpl(const RandMultiHeadAttentionOptions& options);

  /// Draws new weights and random features from the global generator.
  void reset() override;

  /// query (B, Lq, E), key and value (B, Lk, E) -> (B, Lq, E).
  /// key_padding_mask: (B, Lk) bool, true = ignore that key. causal: as options.iscausal().
  at::Tensor forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const std::optional<at::Tensor>& key_padding_mask = std::nullopt,
                     bool causal = false);

  /// Draws new random features in place (same shape, dtype, device).
  void redraw_projection();

  void pretty_print(std::ostream& stream) const override;

  RandMultiHeadAttentionOptions options;
  at::Tensor Wq, Wk, Wv, W0, bq, bk, bv, b0, projection_matrix;
};
TORCH_MODULE(RandMultiHeadAttention);

/// Orthogonal Gaussian random features (M, dim), as pr.nn.attention.orthogonal_gaussian_projection:
/// blocks of dim rows are Q^T of the QR of a Gaussian (dim, dim) matrix (float64), rows scaled by
/// chi(dim) norms of Gaussian vectors. Drawn from the global generator; returned in `options`.
at::Tensor orthogonal_gaussian_projection(int64_t num_features, int64_t dim,
                                          const c10::TensorOptions& options = {});

}  // namespace panther::nn
