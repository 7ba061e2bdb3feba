// panther::_rand_mha_self_attention: RandMultiHeadAttention's whole forward for self-attention
// (query = key = value = x) in one call, for the module's eager inference path. Short sequences
// are bound by the host's submission of launches; from Python each of the ~12 tensor calls of
// the forward costs a dispatch plus interpreter time, from C++ only the dispatch.
//
// CompositeImplicitAutograd: it is the composition of at::linear and panther::favor_attention,
// so autograd, autocast, Meta and tracing all see those ops. When no gradient is recorded, q, k
// and v come from one GEMM over the concatenation of Wq, Wk, Wv (and bq, bk, bv), formed per call
// (a copy of 3 E^2 numbers, cheap next to the GEMM); otherwise from three GEMMs. The parameters
// are separate tensors: nothing here assumes where they live in memory.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "attention/impl.h"
#include "common/checks.h"

namespace panther::kernels {
namespace {

at::Tensor rand_mha_self_attention(const at::Tensor& x, const at::Tensor& Wq, const at::Tensor& Wk,
                                   const at::Tensor& Wv, const std::optional<at::Tensor>& bq,
                                   const std::optional<at::Tensor>& bk,
                                   const std::optional<at::Tensor>& bv, const at::Tensor& W0,
                                   const std::optional<at::Tensor>& b0,
                                   const at::Tensor& projection, int64_t num_heads,
                                   c10::string_view kernel_fn, bool causal,
                                   const std::optional<at::Tensor>& key_padding_mask) {
  constexpr const char* op = "panther::_rand_mha_self_attention";
  checks::defined(op, {{"x", x}, {"Wq", Wq}, {"Wk", Wk}, {"Wv", Wv}, {"W0", W0},
                       {"projection", projection}});
  checks::dim(op, "x", x, 3, "(batch, seq, embed_dim)");
  const int64_t B = x.size(0), L = x.size(1), E = x.size(2);
  PANTHER_CHECK_ARG(num_heads >= 1 && E % num_heads == 0, op, "num_heads", "divide embed_dim=", E,
                    ", got ", num_heads);
  const int64_t H = num_heads, hd = E / H;
  const bool has_bias = bq.has_value() && bq->defined();
  PANTHER_CHECK_ARG(has_bias == (bk.has_value() && bk->defined()) &&
                        has_bias == (bv.has_value() && bv->defined()),
                    op, "bq, bk and bv", "all be given or all be None");
  at::Tensor q, k, v;
  auto is_ee = [&](const at::Tensor& W) {
    return W.dim() == 2 && W.size(0) == E && W.size(1) == E && W.scalar_type() == Wq.scalar_type() &&
           W.device() == Wq.device();
  };
  const bool fused = !at::GradMode::is_enabled() && is_ee(Wq) && is_ee(Wk) && is_ee(Wv);
  if (fused) {
    const at::Tensor w = at::cat({Wq, Wk, Wv}, 0);  // (3E, E), a new tensor
    std::optional<at::Tensor> b;
    if (has_bias) b = at::cat({*bq, *bk, *bv}, 0);
    const at::Tensor qkv = at::linear(x, w, b).contiguous();  // (B, L, 3E)
    auto heads = [&](int64_t j) {
      return qkv.as_strided({B, H, L, hd}, {L * 3 * E, hd, 3 * E, 1},
                            qkv.storage_offset() + j * E);
    };
    q = heads(0), k = heads(1), v = heads(2);
  } else {
    auto proj = [&](const at::Tensor& W, const std::optional<at::Tensor>& b) {
      return at::linear(x, W, b).view({B, L, H, hd}).transpose(1, 2);
    };
    q = proj(Wq, bq), k = proj(Wk, bk), v = proj(Wv, bv);
  }
  // favor_attention lays its output out as (B, L, H, hd): merging the heads is a view.
  const at::Tensor ctx = detail::favor_attention_op().call(q, k, v, projection, kernel_fn, causal,
                                                          key_padding_mask);
  return at::linear(ctx.transpose(1, 2).reshape({B, L, E}), W0, b0);
}

}  // namespace
}  // namespace panther::kernels

TORCH_LIBRARY_IMPL(panther, CompositeImplicitAutograd, m) {
  m.impl("_rand_mha_self_attention", &panther::kernels::rand_mha_self_attention);
}
