// Definitions of the C++ modules (cpp/include/panther/nn.h): panther::nn::SKLinear and
// panther::nn::RandMultiHeadAttention. Registers no operator; forward goes through the dispatcher
// (panther::sketched_linear, panther::favor_attention).
#include "panther/nn.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DefaultDtype.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "common/checks.h"
#include "panther/ops.h"

namespace panther::nn {
namespace {

// panther::favor_attention through the dispatcher, looked up on first use (so this file does not
// depend on the op being in the same build: the module's forward throws a c10::Error without it).
at::Tensor call_favor_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& projection, const std::string& kernel_fn,
                                bool causal, const std::optional<at::Tensor>& key_padding_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("panther::favor_attention", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, c10::string_view, bool,
                                         const std::optional<at::Tensor>&)>();
  return op.call(q, k, v, projection, kernel_fn, causal, key_padding_mask);
}

at::ScalarType dtype_of(const c10::TensorOptions& o) {
  return o.has_dtype() ? c10::typeMetaToScalarType(o.dtype()) : c10::get_default_dtype_as_scalartype();
}

}  // namespace

SKLinearImpl::SKLinearImpl(const SKLinearOptions& options_, const std::optional<at::Tensor>& W)
    : options(options_), W_init(W) {
  reset();
}

void SKLinearImpl::reset() {
  const auto& o = options;
  const char* name = "SKLinear";
  checks::positive(name, "in_features", o.in_features());
  checks::positive(name, "out_features", o.out_features());
  checks::positive(name, "num_terms", o.num_terms());
  checks::positive(name, "low_rank", o.low_rank());
  if (W_init.has_value() && W_init->defined()) {
    PANTHER_CHECK_ARG(W_init->dim() == 2 && W_init->size(0) == o.out_features() &&
                          W_init->size(1) == o.in_features(),
                      name, "W_init", "have shape (out_features=", o.out_features(),
                      ", in_features=", o.in_features(), ") (nn.Linear layout), got ",
                      detail::shape_str(W_init->sizes()));
  }
  const int64_t L = o.num_terms(), k = o.low_rank(), in = o.in_features(), out = o.out_features();
  const auto topt = o.tensor_options();
  const auto dtype = dtype_of(topt);
  const auto dev = topt.device();
  const auto opts = at::TensorOptions().dtype(dtype).device(dev);
  const double scale = 1.0 / std::sqrt(static_cast<double>(k));

  at::NoGradGuard no_grad;
  // Rademacher signs +-1/sqrt(k), in the same draw order as Python (U1s, then U2s).
  auto signs = [&](at::IntArrayRef shape) {
    return (at::randint(0, 2, shape, opts.dtype(at::kChar)).to(dtype) * 2 - 1) * scale;
  };
  at::Tensor U1 = signs({L, k, out});
  at::Tensor U2 = signs({L, in, k});

  // Sketches are formed in at least fp32 and rounded once to the layer's dtype.
  const auto work = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor Wt;
  if (W_init.has_value() && W_init->defined()) {
    Wt = W_init->detach().to(dev, work);
  } else {
    // kaiming_uniform_(a=sqrt(5)) on (out, in), as torch::nn::Linear: U(-1/sqrt(in), 1/sqrt(in)),
    // with the bound computed exactly as torch.nn.init does (same draws as the Python layer).
    const double a = std::sqrt(5.0);
    const double gain = std::sqrt(2.0 / (1.0 + a * a));
    const double bound = std::sqrt(3.0) * (gain / std::sqrt(static_cast<double>(in)));
    Wt = at::empty({out, in}, opts.dtype(work)).uniform_(-bound, bound);
    // As the Python layer: the effective weight (dense_weight()) is W plus sketch noise of
    // variance var(W) (in + out - 2) / (4 L k) per entry; shrink W so the effective weight has
    // nn.Linear's variance (activations keep nn.Linear's scale).
    Wt.mul_(std::pow(1.0 + static_cast<double>(in + out - 2) / (4.0 * static_cast<double>(L * k)), -0.5));
  }
  at::Tensor U1w = U1.to(work), U2w = U2.to(work);
  at::Tensor S1 = at::einsum("oi,lko->lik", {Wt, U1w});  // W^T U1_i^T: (L, in, k)
  at::Tensor S2 = at::einsum("lik,oi->lko", {U2w, Wt});  // U2_i^T W^T: (L, k, out)

  U1s = register_buffer("U1s", U1);
  U2s = register_buffer("U2s", U2);
  S1s = register_parameter("S1s", S1.to(dtype).contiguous());
  S2s = register_parameter("S2s", S2.to(dtype).contiguous());
  if (o.bias()) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    bias = register_parameter("bias", at::empty({out}, opts).uniform_(-bound, bound));
  } else {
    bias = register_parameter("bias", at::Tensor(), /*requires_grad=*/false);
  }
}

at::Tensor SKLinearImpl::forward(const at::Tensor& input) {
  checks::min_dim("SKLinear", "input", input, 1, "(..., in_features)");
  PANTHER_CHECK_ARG(input.size(-1) == options.in_features(), "SKLinear", "input last dim",
                    "be in_features=", options.in_features(), ", got ", input.size(-1));
  std::optional<at::Tensor> b;
  if (bias.defined()) b = bias;
  return panther::sketched_linear(input, S1s, S2s, U1s, U2s, b);
}

at::Tensor SKLinearImpl::dense_weight() const {
  const auto L = static_cast<double>(options.num_terms());
  at::Tensor Wt = at::einsum("lik,lko->io", {S1s, U1s}) + at::einsum("lik,lko->io", {U2s, S2s});
  return (Wt / (2.0 * L)).t();
}

void SKLinearImpl::pretty_print(std::ostream& stream) const {
  // Built as a string (format.h: numbers never go through an iostream of this library).
  stream << detail::message("panther::nn::SKLinear(in_features=", options.in_features(),
                            ", out_features=", options.out_features(),
                            ", num_terms=", options.num_terms(), ", low_rank=", options.low_rank(),
                            ", bias=", options.bias(), ")");
}

// ---------------------------------------------------------------- RandMultiHeadAttention

at::Tensor orthogonal_gaussian_projection(int64_t num_features, int64_t dim,
                                          const c10::TensorOptions& options) {
  TORCH_CHECK(num_features > 0 && dim > 0,
              detail::message("orthogonal_gaussian_projection: num_features and dim must be "
                              "positive, got ", num_features, " and ", dim));
  at::NoGradGuard no_grad;
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t nblocks = (num_features + dim - 1) / dim;
  // One Gaussian (dim, dim) block per `dim` rows, drawn at once (the same draws as Python's
  // panther.nn.attention.orthogonal_gaussian_projection on the CPU). Each column j of Q is
  // multiplied by sign(R_jj), which makes Q Haar-distributed, so every row is marginally N(0, I).
  at::Tensor g = at::randn({nblocks, dim, dim}, f64);
  auto [qmat, rmat] = at::linalg_qr(g);
  at::Tensor signs = at::diagonal(rmat, 0, -2, -1).sign();
  signs = at::where(signs == 0, at::ones_like(signs), signs);
  qmat = qmat * signs.unsqueeze(-2);
  at::Tensor rows = qmat.transpose(-1, -2).reshape({nblocks * dim, dim}).narrow(0, 0, num_features);
  at::Tensor norms = at::randn({num_features, dim}, f64).norm(2, {1}, /*keepdim=*/true);
  return (rows * norms).to(options.device(), dtype_of(options)).contiguous();
}

RandMultiHeadAttentionImpl::RandMultiHeadAttentionImpl(const RandMultiHeadAttentionOptions& options_)
    : options(options_) {
  reset();
}

void RandMultiHeadAttentionImpl::reset() {
  const auto& o = options;
  const char* name = "RandMultiHeadAttention";
  checks::positive(name, "embed_dim", o.embed_dim());
  checks::positive(name, "num_heads", o.num_heads());
  checks::positive(name, "num_random_features", o.num_random_features());
  PANTHER_CHECK_ARG(o.embed_dim() % o.num_heads() == 0, name, "embed_dim",
                    "be divisible by num_heads, got embed_dim=", o.embed_dim(),
                    ", num_heads=", o.num_heads());
  PANTHER_CHECK_ARG(o.dropout() >= 0.0 && o.dropout() < 1.0, name, "dropout",
                    "be in [0, 1), got ", o.dropout());
  checks::one_of(name, "kernel_fn", o.kernel_fn(), {"softmax", "relu"}, '\'');
  const int64_t E = o.embed_dim(), hd = E / o.num_heads();
  const auto opts = at::TensorOptions().dtype(dtype_of(o.tensor_options())).device(o.tensor_options().device());

  at::NoGradGuard no_grad;
  // xavier_uniform_ as torch.nn.init does it (same draws, same order as the Python layer).
  const double a = std::sqrt(3.0) * 1.0 * std::sqrt(2.0 / static_cast<double>(E + E));
  auto xavier = [&] { return at::empty({E, E}, opts).uniform_(-a, a); };
  Wq = register_parameter("Wq", xavier());
  Wk = register_parameter("Wk", xavier());
  Wv = register_parameter("Wv", xavier());
  W0 = register_parameter("W0", xavier());
  if (o.bias()) {
    bq = register_parameter("bq", at::zeros({E}, opts));
    bk = register_parameter("bk", at::zeros({E}, opts));
    bv = register_parameter("bv", at::zeros({E}, opts));
    b0 = register_parameter("b0", at::zeros({E}, opts));
  } else {
    bq = register_parameter("bq", at::Tensor(), false);
    bk = register_parameter("bk", at::Tensor(), false);
    bv = register_parameter("bv", at::Tensor(), false);
    b0 = register_parameter("b0", at::Tensor(), false);
  }
  projection_matrix = register_buffer(
      "projection_matrix", orthogonal_gaussian_projection(o.num_random_features(), hd, opts));
}

void RandMultiHeadAttentionImpl::redraw_projection() {
  at::NoGradGuard no_grad;
  projection_matrix.copy_(orthogonal_gaussian_projection(
      options.num_random_features(), projection_matrix.size(1), projection_matrix.options()));
}

at::Tensor RandMultiHeadAttentionImpl::forward(const at::Tensor& query, const at::Tensor& key,
                                               const at::Tensor& value,
                                               const std::optional<at::Tensor>& key_padding_mask,
                                               bool causal) {
  const char* name = "RandMultiHeadAttention";
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3,
              detail::message(name, ": query, key and value must be 3-d (batch, seq, embed_dim), got ",
                              detail::shape_str(query.sizes()), ", ", detail::shape_str(key.sizes()), ", ",
                              detail::shape_str(value.sizes())));
  const int64_t E = options.embed_dim(), H = options.num_heads(), hd = E / H;
  TORCH_CHECK(query.size(2) == E && key.size(2) == E && value.size(2) == E,
              detail::message(name, ": last dim of query, key and value must be embed_dim=", E,
                              ", got ", query.size(2), ", ", key.size(2), ", ", value.size(2)));
  const int64_t B = query.size(0), Lq = query.size(1), Lk = key.size(1);
  TORCH_CHECK(key.size(0) == B && value.size(0) == B && value.size(1) == Lk,
              detail::message(name, ": key and value must have shape (batch=", B, ", key_len, ", E,
                              ") with the same key_len, got ", detail::shape_str(key.sizes()), " and ",
                              detail::shape_str(value.sizes())));
  causal = causal || options.iscausal();
  TORCH_CHECK(!causal || Lq == Lk,
              detail::message(name, ": causal attention needs equal query and key lengths, got ",
                              Lq, " and ", Lk));
  auto opt = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
  at::Tensor q = at::linear(query, Wq, opt(bq)).view({B, Lq, H, hd}).transpose(1, 2);
  at::Tensor k = at::linear(key, Wk, opt(bk)).view({B, Lk, H, hd}).transpose(1, 2);
  at::Tensor v = at::linear(value, Wv, opt(bv)).view({B, Lk, H, hd}).transpose(1, 2);
  at::Tensor ctx = call_favor_attention(q, k, v, projection_matrix, options.kernel_fn(), causal,
                                        key_padding_mask);
  ctx = ctx.transpose(1, 2).reshape({B, Lq, E});
  if (options.dropout() > 0.0 && is_training()) ctx = at::dropout(ctx, options.dropout(), true);
  return at::linear(ctx, W0, opt(b0));
}

void RandMultiHeadAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << detail::message("panther::nn::RandMultiHeadAttention(embed_dim=", options.embed_dim(),
                            ", num_heads=", options.num_heads(),
                            ", num_random_features=", options.num_random_features(),
                            ", dropout=", options.dropout(), ", bias=", options.bias(),
                            ", kernel_fn='", options.kernel_fn(), "', iscausal=", options.iscausal(),
                            ")");
}

}  // namespace panther::nn
