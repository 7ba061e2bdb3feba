// panther::_rand_mha_self_attention: RandMultiHeadAttention's whole forward for self-attention
// (query = key = value = x) in one call, for the module's eager inference path. Short sequences
// are bound by the host's submission of launches; from Python each of the ~12 tensor calls of
// the forward costs a dispatch plus interpreter time, from C++ only the dispatch.
//
// CompositeImplicitAutograd: it is the composition of at::linear and panther::favor_attention,
// so autograd, autocast, Meta and tracing all see those ops. When no gradient is recorded and
// Wq, Wk, Wv (and bq, bk, bv) lie back to back in memory (the module allocates them so), q, k and
// v come from one GEMM over a view of that memory; otherwise from three.
#include <ATen/ATen.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <torch/library.h>

#include <array>

#include "attention/impl.h"

namespace panther::kernels {
namespace {

// A tensor with real memory: not meta, not a Python subclass (FakeTensor), not functionalized.
bool has_real_memory(const at::Tensor& t) {
  return t.defined() && !t.is_meta() && !t.unsafeGetTensorImpl()->is_python_dispatch() &&
         !at::functionalization::impl::isFunctionalTensor(t) && t.has_storage();
}

// Real tensors of one dtype and shape, contiguous, back to back in memory.
bool adjacent(const std::array<const at::Tensor*, 3>& ts) {
  const at::Tensor& a = *ts[0];
  if (!has_real_memory(a) || !a.is_contiguous()) return false;
  const auto step = static_cast<intptr_t>(a.numel() * a.element_size());
  const auto base = reinterpret_cast<intptr_t>(a.data_ptr());
  for (size_t i = 1; i < ts.size(); ++i) {
    const at::Tensor& t = *ts[i];
    if (!has_real_memory(t) || t.scalar_type() != a.scalar_type() || t.device() != a.device() ||
        t.sizes() != a.sizes() || !t.is_contiguous() ||
        reinterpret_cast<intptr_t>(t.data_ptr()) != base + static_cast<intptr_t>(i) * step)
      return false;
  }
  return true;
}

at::Tensor rand_mha_self_attention(const at::Tensor& x, const at::Tensor& Wq, const at::Tensor& Wk,
                                   const at::Tensor& Wv, const std::optional<at::Tensor>& bq,
                                   const std::optional<at::Tensor>& bk,
                                   const std::optional<at::Tensor>& bv, const at::Tensor& W0,
                                   const std::optional<at::Tensor>& b0,
                                   const at::Tensor& projection, int64_t num_heads,
                                   c10::string_view kernel_fn, bool causal,
                                   const std::optional<at::Tensor>& key_padding_mask) {
  constexpr const char* op = "panther::_rand_mha_self_attention";
  TORCH_CHECK(x.dim() == 3, op, ": x must be (batch, seq, embed_dim), got ", x.dim(), " dims");
  const int64_t B = x.size(0), L = x.size(1), E = x.size(2);
  TORCH_CHECK(num_heads >= 1 && E % num_heads == 0, op, ": num_heads must divide embed_dim=", E,
              ", got ", num_heads);
  const int64_t H = num_heads, hd = E / H;
  const bool has_bias = bq.has_value() && bq->defined();
  TORCH_CHECK(has_bias == (bk.has_value() && bk->defined()) &&
                  has_bias == (bv.has_value() && bv->defined()),
              op, ": bq, bk and bv must all be given or all be None");
  at::Tensor q, k, v;
  const bool packed = !at::GradMode::is_enabled() && adjacent({&Wq, &Wk, &Wv}) &&
                      (!has_bias || adjacent({&*bq, &*bk, &*bv})) && Wq.size(0) == E &&
                      Wq.dim() == 2 && Wq.size(1) == E;
  if (packed) {
    const at::Tensor w = Wq.as_strided({3 * E, E}, {E, 1});
    std::optional<at::Tensor> b;
    if (has_bias) b = bq->as_strided({3 * E}, {1});
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
