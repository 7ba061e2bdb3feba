// Shared implementation of the FAVOR+ attention op: checks, feature maps, non-causal and
// chunked-causal forward, and the hand-derived backward (all ATen GEMMs, any device). The only
// device-specific piece, the exclusive scan over per-chunk states, is passed in. No registrations.
//
// Causal algorithm (per batch*head, chunks of C positions, states of size M x (Dv+1)):
//   khat_j = M^-1/2 exp(b_j - r_j) with b_j = x'_j W^T - |x'_j|^2/2 and r_j the running max of
//   max_m b_j'm over valid keys j' <= j. For query i (with r_i >= r_j for j <= i):
//     psi_i(k_j) = exp(r_j - r_i) khat_j + e_k           (e_k = M^-1/2 eps; relu: r = 0, e_k = eps)
//   y_i = [num_i, den_i] = sum_{j<=i} (phi_i . psi_i(k_j)) [v_j, 1]
//       = s_i phi_i H_c                      (earlier chunks; s_i = exp(P_c - r_i) <= 1)
//       + sum_{j in chunk, j<=i} exp(r_j - r_i) (phi_i . khat_j) [v_j, 1]  (masked C x C block)
//       + e_k (sum_m phi_im) sum_{j<=i} [v_j, 1]                           (eps part, a cumsum)
//   H_c = sum_{j < start of c} exp(r_j - P_c) khat_j [v_j, 1]^T, P_c = r at the end of chunk c-1,
//   built by the scan H_{c+1} = exp(P_c - R_c) H_c + T_c (R_c = r at the end of chunk c,
//   T_c = sum_{j in c} exp(r_j - R_c) khat_j [v_j, 1]^T). Every exponent above is <= 0, so
//   nothing overflows, and no quantity at position i involves a key after i.
#include "attention/impl.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "common/checks.h"
#include <cmath>
#include <limits>

namespace panther::detail {
namespace {

at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// Everything the forward and backward share: inputs in the compute dtype and the features.
struct Prepared {
  int64_t BH = 0, E1 = 0;
  at::Tensor xq, xk;       // (BH, Lq, D), (BH, Lk, D): what multiplies W (softmax: x D^-1/4)
  at::Tensor W;            // (M, D)
  at::Tensor V;            // (BH, Lk, Dv+1): [v, 1], zero rows at padded keys
  at::Tensor valid;        // (BH, Lk) 0/1
  at::Tensor phi;          // (BH, Lq, M) query features (eps included)
  at::Tensor dphi_dpre;    // relu: (BH, Lq, M) d phi / d (pre-activation); softmax: undefined
  double phi_offset = 0;   // softmax: d phi / d (pre-activation) = phi - phi_offset
  at::Tensor khat;         // (BH, Lk, M) key features without eps, zero at padded keys
  at::Tensor dkhat_dpre;   // (BH, Lk, M) d khat / d (pre-activation)
  at::Tensor r;            // (BH, Lk) key stabiliser (zero for relu)
  double ek = 0.0;         // eps of key features
  double xscale = 1.0;     // x' = xscale * x
};

// differentiable: out-of-place ops only and stabilisers detached, so that autograd can record the
// features (the composite forward of favor_forward_differentiable); otherwise in-place
// temporaries.
Prepared prepare(const FavorDims& d, const at::Tensor& query, const at::Tensor& key,
                 const at::Tensor& value, const at::Tensor& projection, bool causal,
                 const std::optional<at::Tensor>& mask, bool differentiable = false) {
  Prepared p;
  const auto cdt = compute_dtype(query.scalar_type());
  p.BH = d.B * d.H;
  p.E1 = d.Dv + 1;
  const int64_t BH = p.BH;
  at::Tensor Q = query.to(cdt).reshape({BH, d.Lq, d.D});
  at::Tensor K = key.to(cdt).reshape({BH, d.Lk, d.D});
  at::Tensor Vr = value.to(cdt).reshape({BH, d.Lk, d.Dv});
  p.W = projection.to(cdt).contiguous();
  const auto opts = Q.options();
  at::Tensor valid_b;  // (BH, Lk) bool, or undefined when nothing is padded
  if (mask.has_value() && mask->defined()) {
    valid_b = mask->logical_not().unsqueeze(1).expand({d.B, d.H, d.Lk}).reshape({BH, d.Lk});
    p.valid = valid_b.to(cdt);
  } else {
    p.valid = at::ones({BH, d.Lk}, opts);
  }
  p.V = at::cat({Vr, at::ones({BH, d.Lk, 1}, opts)}, -1) * p.valid.unsqueeze(-1);
  const double sM = 1.0 / std::sqrt(static_cast<double>(d.M));
  const at::Tensor Wt = p.W.t();
  if (d.kernel == FavorKernel::Softmax) {
    p.xscale = std::pow(static_cast<double>(d.D), -0.25);
    p.xq = Q * p.xscale;
    p.xk = K * p.xscale;
    // Queries: per-row stabiliser c_i = max_m pre_im, so the largest feature is M^-1/2 (1 + eps).
    // (in place on fresh temporaries: one buffer of (BH, Lq, M) instead of five)
    at::Tensor prek;
    if (!differentiable) {
      at::Tensor u = at::matmul(p.xq, Wt);
      u.sub_(p.xq.square().sum(-1, /*keepdim=*/true).mul_(0.5));
      u.sub_(std::get<0>(u.max(-1, /*keepdim=*/true)));
      p.phi = u.exp_().mul_(sM).add_(kFavorSoftmaxEps * sM);
      // Keys: padded keys get pre = -inf (feature exactly 0, never part of a max).
      prek = at::matmul(p.xk, Wt);
      prek.sub_(p.xk.square().sum(-1, /*keepdim=*/true).mul_(0.5));
      if (valid_b.defined()) {
        prek.masked_fill_(valid_b.logical_not().unsqueeze(-1),
                          -std::numeric_limits<double>::infinity());
      }
    } else {
      at::Tensor u = at::matmul(p.xq, Wt) - p.xq.square().sum(-1, /*keepdim=*/true) * 0.5;
      p.phi = (u - std::get<0>(u.detach().max(-1, /*keepdim=*/true))).exp() * sM +
              kFavorSoftmaxEps * sM;
      prek = at::matmul(p.xk, Wt) - p.xk.square().sum(-1, /*keepdim=*/true) * 0.5;
      if (valid_b.defined()) {
        prek = prek.masked_fill(valid_b.logical_not().unsqueeze(-1),
                                -std::numeric_limits<double>::infinity());
      }
    }
    // d phi / d pre = M^-1/2 exp(...) = phi - M^-1/2 eps (formed by the backward when needed).
    p.phi_offset = kFavorSoftmaxEps * sM;
    at::Tensor a = std::get<0>((differentiable ? prek.detach() : prek).max(-1));  // (BH, Lk)
    at::Tensor r = causal ? std::get<0>(at::cummax(a, 1))
                          : std::get<0>(a.max(1, /*keepdim=*/true)).expand({BH, d.Lk});
    // r = -inf where no valid key has been seen yet: those positions have only zero features;
    // give them the first finite r (0 if none) so every exponent stays finite and <= 0.
    at::Tensor neg = at::isneginf(r);
    at::Tensor first = at::where(neg, std::numeric_limits<double>::infinity(), r)
                           .amin(1, /*keepdim=*/true);
    first = at::where(at::isinf(first), 0.0, first);
    p.r = at::where(neg, first, r).contiguous();
    p.khat = differentiable ? (prek - p.r.unsqueeze(-1)).exp() * sM
                            : prek.sub_(p.r.unsqueeze(-1)).exp_().mul_(sM);
    p.dkhat_dpre = p.khat;
    p.ek = kFavorSoftmaxEps * sM;
  } else {
    p.xq = Q;
    p.xk = K;
    at::Tensor uq = at::matmul(Q, Wt);
    p.phi = at::relu(uq) * sM + kFavorReluEps;
    p.dphi_dpre = (uq > 0).to(cdt) * sM;
    at::Tensor uk = at::matmul(K, Wt);
    at::Tensor vm = p.valid.unsqueeze(-1);
    p.khat = at::relu(uk) * sM * vm;
    p.dkhat_dpre = (uk > 0).to(cdt) * sM * vm;
    p.r = at::zeros({BH, d.Lk}, opts);
    p.ek = kFavorReluEps;
  }
  return p;
}

// Everything the causal backward reuses from the causal forward (all O(L) in size).
struct CausalState {
  int64_t L = 0, C = 0, n = 0, Lp = 0;
  at::Tensor phic, khc, Vc;  // (BH, n, C, M|M|E1)
  at::Tensor rc;             // (BH, n, C)
  at::Tensor alpha;          // (BH, n): exp(P_c - R_c)
  at::Tensor kfac;           // (BH, n, C): exp(r_j - R_c)
  at::Tensor Hs;             // (BH, n, M, E1): exclusive prefix states
  at::Tensor s;              // (BH, n, C): exp(P_c - r_i)
  at::Tensor E;              // (BH, n, C, C): exp(r_j - r_i) for j <= i, else 0
  at::Tensor A;              // (BH, n, C, C): (phi_i . khat_j) E_ij
  at::Tensor Cum;            // (BH, Lp, E1): inclusive cumsum of [v, 1] over valid keys
  at::Tensor phisum;         // (BH, Lp, 1)
};

// Inclusive cumsum of (BH, L, E) along positions (dim 1), optionally from the end. Scanning a
// non-innermost dimension with a short inner size is very slow on CUDA (ATen's outer-dim scan
// took 6 ms at L = 16k, E = 65); scanning the innermost dimension of the transposed tensor costs
// two copies and a fast scan.
at::Tensor cumsum_positions(const at::Tensor& t, bool reverse) {
  at::Tensor tt = t.transpose(1, 2);
  if (reverse) tt = tt.flip({2});
  at::Tensor c = at::cumsum(tt.contiguous(), 2);
  if (reverse) c = c.flip({2});
  return c.transpose(1, 2);
}

at::Tensor pad_len(const at::Tensor& t, int64_t pad) {
  return pad ? at::constant_pad_nd(t, {0, 0, 0, pad}) : t;
}

// Y (BH, L, E1) of the causal mode; fills st for the backward.
at::Tensor causal_forward(const FavorDims& d, const Prepared& p, int64_t chunk, ChunkScanFn scan,
                          CausalState& st) {
  const int64_t BH = p.BH, M = d.M, E1 = p.E1, L = d.Lk;
  const int64_t C = std::min<int64_t>(chunk, L), n = (L + C - 1) / C, Lp = n * C, pad = Lp - L;
  st.L = L;
  st.C = C;
  st.n = n;
  st.Lp = Lp;
  st.phic = pad_len(p.phi, pad).view({BH, n, C, M});
  st.khc = pad_len(p.khat, pad).view({BH, n, C, M});
  at::Tensor Vp = pad_len(p.V, pad);
  st.Vc = Vp.view({BH, n, C, E1});
  at::Tensor rp = pad ? at::cat({p.r, p.r.narrow(1, L - 1, 1).expand({BH, pad})}, 1) : p.r;
  st.rc = rp.reshape({BH, n, C});
  at::Tensor R = st.rc.select(2, C - 1);                                       // (BH, n)
  at::Tensor P = at::cat({st.rc.select(2, 0).narrow(1, 0, 1), R.narrow(1, 0, n - 1)}, 1);
  st.alpha = at::exp(P - R).contiguous();
  st.kfac = at::exp(st.rc - R.unsqueeze(-1));
  at::Tensor Ktil = st.khc * st.kfac.unsqueeze(-1);
  at::Tensor T = at::matmul(Ktil.transpose(-1, -2), st.Vc);                  // (BH, n, M, E1)
  st.Hs = scan(T.reshape({BH, n, M * E1}).contiguous(), st.alpha, /*reverse=*/false)
              .view({BH, n, M, E1});
  st.s = at::exp(P.unsqueeze(-1) - st.rc);
  at::Tensor tril = at::ones({C, C}, st.rc.options().dtype(at::kBool)).tril();
  at::Tensor diff = st.rc.unsqueeze(-2) - st.rc.unsqueeze(-1);               // [i, j] = r_j - r_i
  st.E = at::exp(diff.clamp_max(0)).masked_fill(tril.logical_not(), 0);
  st.A = at::matmul(st.phic, st.khc.transpose(-1, -2)) * st.E;
  at::Tensor Y = at::matmul(st.phic, st.Hs) * st.s.unsqueeze(-1) + at::matmul(st.A, st.Vc);
  st.Cum = cumsum_positions(Vp, /*reverse=*/false);
  st.phisum = pad_len(p.phi, pad).sum(-1, /*keepdim=*/true);
  at::Tensor Yf = Y.view({BH, Lp, E1}) + p.ek * st.phisum * st.Cum;
  return Yf.narrow(1, 0, L);
}

// Y (BH, Lq, E1) of the non-causal mode; returns KV and Kf for the backward.
at::Tensor noncausal_forward(const Prepared& p, at::Tensor& Kf, at::Tensor& KV) {
  Kf = p.khat + p.ek * p.valid.unsqueeze(-1);
  KV = at::matmul(Kf.transpose(1, 2), p.V);  // (BH, M, E1)
  return at::matmul(p.phi, KV);
}

}  // namespace

FavorFusedQuery& favor_fused_query() {
  static FavorFusedQuery query = nullptr;
  return query;
}

const c10::TypedOperatorHandle<FavorAttentionSig>& favor_attention_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("panther::favor_attention", "")
                             .typed<FavorAttentionSig>();
  return op;
}

FavorSymDims check_favor_attention_sym(const char* op, const at::Tensor& query,
                                       const at::Tensor& key, const at::Tensor& value,
                                       const at::Tensor& projection, c10::string_view kernel_fn,
                                       bool causal,
                                       const std::optional<at::Tensor>& key_padding_mask) {
  // Sizes are read with sym_size and compared as SymInts: under dynamic shapes the comparisons
  // become guards relating the symbols (key batch == query batch), never a constant.
  checks::defined(op,
                  {{"query", query}, {"key", key}, {"value", value}, {"projection", projection}});
  FavorSymDims d{};
  // (The message names the Python wrapper's keyword, `kernel`: docs/compatibility.md.)
  d.kernel = checks::one_of(op, "kernel", kernel_fn, {"softmax", "relu"}) == 0
                 ? FavorKernel::Softmax
                 : FavorKernel::Relu;
  checks::dim(op, "query", query, 4, "(batch, heads, Lq, head_dim)");
  checks::dim(op, "key", key, 4, "(batch, heads, Lk, head_dim)");
  checks::dim(op, "value", value, 4, "(batch, heads, Lk, value_dim)");
  checks::dim(op, "projection", projection, 2, "(num_random_features, head_dim)");
  checks::floating(op, "query", query);
  checks::same_dtype(op, "key", key, "query", query);
  checks::same_dtype(op, "value", value, "query", query);
  checks::floating(op, "projection", projection, "a floating-point tensor");
  checks::same_device(op, "key", key, "query", query);
  checks::same_device(op, "value", value, "query", query);
  checks::same_device(op, "projection", projection, "query", query);
  d.B = query.sym_size(0);
  d.H = query.sym_size(1);
  d.Lq = query.sym_size(2);
  d.D = query.sym_size(3);
  d.Lk = key.sym_size(2);
  d.Dv = value.sym_size(3);
  d.M = projection.sym_size(0);
  PANTHER_CHECK_ARG(key.sym_size(0) == d.B && key.sym_size(1) == d.H && key.sym_size(3) == d.D,
                    op, "key", "have shape (batch=", d.B, ", heads=", d.H, ", Lk, head_dim=", d.D,
                    ") to match query ", shape_str(query.sym_sizes()), ", got ",
                    shape_str(key.sym_sizes()));
  PANTHER_CHECK_ARG(
      value.sym_size(0) == d.B && value.sym_size(1) == d.H && value.sym_size(2) == d.Lk, op,
      "value", "have shape (batch=", d.B, ", heads=", d.H, ", Lk=", d.Lk,
      ", value_dim) to match key ", shape_str(key.sym_sizes()), ", got ",
      shape_str(value.sym_sizes()));
  PANTHER_CHECK_ARG(d.D >= 1, op, "head_dim", "be >= 1, got query shape ",
                    shape_str(query.sym_sizes()));
  PANTHER_CHECK_ARG(d.M >= 1 && projection.sym_size(1) == d.D, op, "projection",
                    "have shape (num_random_features >= 1, head_dim=", d.D, "), got ",
                    shape_str(projection.sym_sizes()));
  TORCH_CHECK(!causal || d.Lq == d.Lk,
              detail::message(op, ": causal=True needs equal query and key lengths, got Lq=", d.Lq,
                              " and Lk=", d.Lk));
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    const at::Tensor& m = *key_padding_mask;
    checks::dtype(op, "key_padding_mask", m, at::kBool, "bool (True = padded key, ignored)");
    PANTHER_CHECK_ARG(m.dim() == 2 && m.sym_size(0) == d.B && m.sym_size(1) == d.Lk, op,
                      "key_padding_mask", "have shape (batch=", d.B, ", Lk=", d.Lk, "), got ",
                      shape_str(m.sym_sizes()));
    checks::same_device(op, "key_padding_mask", m, "query", query);
  }
  return d;
}

void check_favor_attention_grad(const char* op, const at::Tensor& grad_output,
                                const at::Tensor& query, const at::Tensor& value) {
  checks::defined(op, {{"grad_output", grad_output}});
  const std::vector<c10::SymInt> want{query.sym_size(0), query.sym_size(1), query.sym_size(2),
                                      value.sym_size(3)};
  bool same = grad_output.dim() == 4;
  for (int64_t i = 0; same && i < 4; ++i) same = grad_output.sym_size(i) == want[i];
  PANTHER_CHECK_ARG(same, op, "grad_output", "have the output's shape (batch, heads, Lq, value_dim) = ",
                    shape_str(want), ", got ", shape_str(grad_output.sym_sizes()));
  checks::floating(op, "grad_output", grad_output);
  checks::same_device(op, "grad_output", grad_output, "query", query);
}

FavorDims check_favor_attention(const char* op, const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, const at::Tensor& projection,
                                c10::string_view kernel_fn, bool causal,
                                const std::optional<at::Tensor>& key_padding_mask) {
  // (Real kernels see concrete sizes.)
  const FavorSymDims s = check_favor_attention_sym(op, query, key, value, projection, kernel_fn,
                                                   causal, key_padding_mask);
  return {s.B.expect_int(), s.H.expect_int(),  s.Lq.expect_int(), s.Lk.expect_int(),
          s.D.expect_int(), s.Dv.expect_int(), s.M.expect_int(),  s.kernel};
}

std::vector<c10::SymInt> check_favor_decode_step_sym(
    const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& projection, c10::string_view kernel_fn, const at::Tensor& kv,
    const at::Tensor& v_sum, const at::Tensor& stabiliser,
    const std::optional<at::Tensor>& length) {
  checks::defined(op, {{"query", query}, {"key", key}, {"value", value}, {"projection", projection},
                       {"kv", kv}, {"v_sum", v_sum}, {"stabiliser", stabiliser}});
  if (length.has_value() && length->defined()) {
    PANTHER_CHECK_ARG(length->scalar_type() == at::kLong, op, "length",
                      "be int64 (the positions the state holds), got ", length->scalar_type());
    PANTHER_CHECK_ARG(length->dim() == 0, op, "length", "be a 0-d tensor, got shape ",
                      shape_str(length->sym_sizes()));
    checks::same_device(op, "length", *length, "query", query);
  }
  // (The message names favor_attention's keyword, `kernel`, as that op's does.)
  checks::one_of(op, "kernel", kernel_fn, {"softmax", "relu"});
  checks::min_dim(op, "query", query, 1, "(..., head_dim)");
  // The new position (query, key, value) comes in the layer's dtype; the decode state is kept in
  // float32 for float32/float16/bfloat16 layers, float64 for float64 ones, and the projection is
  // in either of the two. The output is in the query's dtype.
  const at::ScalarType qt = query.scalar_type();
  PANTHER_CHECK_ARG(qt == at::kFloat || qt == at::kDouble || qt == at::kHalf || qt == at::kBFloat16,
                    op, "query", "be float16, bfloat16, float32 or float64, got ", qt);
  checks::same_dtype(op, "key", key, "query", query);
  checks::same_dtype(op, "value", value, "query", query);
  const at::ScalarType st = decode_state_dtype(qt);
  PANTHER_CHECK_ARG(kv.scalar_type() == st, op, "kv", "have dtype ", st,
                    " (the decode state's for ", qt, " queries), got ", kv.scalar_type());
  checks::same_dtype(op, "v_sum", v_sum, "kv", kv);
  checks::same_dtype(op, "stabiliser", stabiliser, "kv", kv);
  PANTHER_CHECK_ARG(projection.scalar_type() == qt || projection.scalar_type() == st, op,
                    "projection", "have the query's dtype ", qt, " or the state's ", st, ", got ",
                    projection.scalar_type());
  const std::initializer_list<checks::Arg> rest = {{"key", key},   {"value", value},
                                                   {"projection", projection}, {"kv", kv},
                                                   {"v_sum", v_sum}, {"stabiliser", stabiliser}};
  for (const checks::Arg& a : rest) checks::same_device(op, a.name, a.tensor, "query", query);
  // In place and without an autograd kernel: a call that autograd would have to record is an
  // error rather than a silently wrong gradient.
  const bool grad = at::GradMode::is_enabled();
  for (const checks::Arg& a : {checks::Arg{"query", query}, checks::Arg{"key", key},
                               checks::Arg{"value", value}, checks::Arg{"projection", projection},
                               checks::Arg{"kv", kv}, checks::Arg{"v_sum", v_sum},
                               checks::Arg{"stabiliser", stabiliser}})
    PANTHER_CHECK_ARG(!(grad && a.tensor.requires_grad()), op, a.name,
                      "not require grad (an in-place inference op: call it under torch.no_grad()), "
                      "got a tensor that requires grad");
  const auto qs = query.sym_sizes();
  const std::vector<c10::SymInt> lead(qs.begin(), qs.end() - 1);
  const c10::SymInt D = qs.back();
  auto with = [&](std::initializer_list<c10::SymInt> tail) {
    std::vector<c10::SymInt> w = lead;
    w.insert(w.end(), tail.begin(), tail.end());
    return w;
  };
  auto has_shape = [](const at::Tensor& t, const std::vector<c10::SymInt>& want) {
    if (t.dim() != static_cast<int64_t>(want.size())) return false;
    for (size_t i = 0; i < want.size(); ++i)
      if (t.sym_size(static_cast<int64_t>(i)) != want[i]) return false;
    return true;
  };
  PANTHER_CHECK_ARG(D >= 1, op, "query", "have head_dim >= 1, got shape ", shape_str(qs));
  const auto wk = with({D});
  PANTHER_CHECK_ARG(has_shape(key, wk), op, "key", "have the query's shape (..., head_dim) = ",
                    shape_str(wk), ", got ", shape_str(key.sym_sizes()));
  bool vok = value.dim() == query.dim();
  for (int64_t i = 0; vok && i + 1 < value.dim(); ++i) vok = value.sym_size(i) == lead[i];
  PANTHER_CHECK_ARG(vok, op, "value", "have the query's leading dims (..., value_dim) = ",
                    shape_str(with({})), " + (value_dim,), got ", shape_str(value.sym_sizes()));
  const c10::SymInt Dv = value.sym_size(-1);
  checks::dim(op, "projection", projection, 2, "(num_random_features, head_dim)");
  const c10::SymInt M = projection.sym_size(0);
  PANTHER_CHECK_ARG(M >= 1 && projection.sym_size(1) == D, op, "projection",
                    "have shape (num_random_features >= 1, head_dim=", D, "), got ",
                    shape_str(projection.sym_sizes()));
  const auto wkv = with({M, Dv + 1}), wvs = with({Dv + 1});
  PANTHER_CHECK_ARG(has_shape(kv, wkv), op, "kv",
                    "have shape (..., num_random_features, value_dim + 1) = ", shape_str(wkv),
                    ", got ", shape_str(kv.sym_sizes()));
  PANTHER_CHECK_ARG(has_shape(v_sum, wvs), op, "v_sum", "have shape (..., value_dim + 1) = ",
                    shape_str(wvs), ", got ", shape_str(v_sum.sym_sizes()));
  PANTHER_CHECK_ARG(has_shape(stabiliser, lead), op, "stabiliser",
                    "have the query's leading shape (...) = ", shape_str(lead), ", got ",
                    shape_str(stabiliser.sym_sizes()));
  return with({Dv});
}

DecodeDims check_favor_decode_step(const char* op, const at::Tensor& query, const at::Tensor& key,
                                   const at::Tensor& value, const at::Tensor& projection,
                                   c10::string_view kernel_fn, const at::Tensor& kv,
                                   const at::Tensor& v_sum, const at::Tensor& stabiliser,
                                   const std::optional<at::Tensor>& length) {
  check_favor_decode_step_sym(op, query, key, value, projection, kernel_fn, kv, v_sum, stabiliser,
                              length);
  const FavorKernel kernel =
      kernel_fn == c10::string_view("softmax") ? FavorKernel::Softmax : FavorKernel::Relu;
  return {query.numel() / query.size(-1), query.size(-1), value.size(-1), projection.size(0),
          kernel};
}

std::vector<c10::SymInt> check_favor_decode_layer_sym(
    const char* op, const at::Tensor& x, const QkvWeights& qkv, const at::Tensor& projection,
    c10::string_view kernel_fn, const at::Tensor& w_out, const std::optional<at::Tensor>& b_out,
    const at::Tensor& kv, const at::Tensor& v_sum, const at::Tensor& stabiliser,
    const std::optional<at::Tensor>& length) {
  checks::defined(op, {{"x", x}, {"w_q", qkv.w_q}, {"w_k", qkv.w_k}, {"w_v", qkv.w_v},
                       {"projection", projection}, {"w_out", w_out}, {"kv", kv}, {"v_sum", v_sum},
                       {"stabiliser", stabiliser}});
  checks::dim(op, "x", x, 2, "(batch, embed_dim)");
  checks::dim(op, "kv", kv, 4, "(batch, num_heads, num_random_features, value_dim + 1)");
  checks::dim(op, "projection", projection, 2, "(num_random_features, head_dim)");
  checks::dim(op, "w_q", qkv.w_q, 2, "(num_heads * head_dim, embed_dim)");
  checks::dim(op, "w_k", qkv.w_k, 2, "(num_heads * head_dim, embed_dim)");
  checks::dim(op, "w_v", qkv.w_v, 2, "(num_heads * value_dim, embed_dim)");
  checks::dim(op, "w_out", w_out, 2, "(out_features, num_heads * value_dim)");
  const c10::SymInt B = x.sym_size(0), E = x.sym_size(1), H = kv.sym_size(1),
                    Dv = kv.sym_size(3) - 1, D = projection.sym_size(1);
  PANTHER_CHECK_ARG(E >= 1, op, "x", "have embed_dim >= 1, got shape ", shape_str(x.sym_sizes()));
  const c10::SymInt E_out = w_out.sym_size(0);
  // The weights and biases: the layer's dtype (x's), x's device, the shapes the state implies.
  std::vector<checks::Arg> params = {{"x", x}};
  auto weight = [&](const char* name, const at::Tensor& w, const c10::SymInt& rows,
                    const char* rows_text) {
    checks::same_dtype(op, name, w, "x", x);
    checks::same_device(op, name, w, "x", x);
    PANTHER_CHECK_ARG(w.sym_size(0) == rows && w.sym_size(1) == E, op, name, "have shape (",
                      rows_text, ", embed_dim) = (", rows, ", ", E, "), got ",
                      shape_str(w.sym_sizes()));
    params.push_back({name, w});
  };
  weight("w_q", qkv.w_q, H * D, "num_heads * head_dim");
  weight("w_k", qkv.w_k, H * D, "num_heads * head_dim");
  weight("w_v", qkv.w_v, H * Dv, "num_heads * value_dim");
  checks::same_dtype(op, "w_out", w_out, "x", x);
  checks::same_device(op, "w_out", w_out, "x", x);
  PANTHER_CHECK_ARG(w_out.sym_size(1) == H * Dv, op, "w_out", "have num_heads * value_dim = ",
                    H * Dv, " columns, got shape ", shape_str(w_out.sym_sizes()));
  params.push_back({"w_out", w_out});
  auto bias = [&](const char* name, const std::optional<at::Tensor>& b, const c10::SymInt& n) {
    if (!b.has_value() || !b->defined()) return;
    checks::same_dtype(op, name, *b, "x", x);
    checks::same_device(op, name, *b, "x", x);
    PANTHER_CHECK_ARG(b->dim() == 1 && b->sym_size(0) == n, op, name, "have shape [", n,
                      "], got ", shape_str(b->sym_sizes()));
    params.push_back({name, *b});
  };
  bias("b_q", qkv.b_q, H * D);
  bias("b_k", qkv.b_k, H * D);
  bias("b_v", qkv.b_v, H * Dv);
  bias("b_out", b_out, E_out);
  const bool grad = at::GradMode::is_enabled();
  for (const checks::Arg& a : params)
    PANTHER_CHECK_ARG(!(grad && a.tensor.requires_grad()), op, a.name,
                      "not require grad (an in-place inference op: call it under torch.no_grad()), "
                      "got a tensor that requires grad");
  // The step's checks (state, projection, kernel_fn, length) on q, k and v as the projection
  // would give them (views of x's first element: no allocation).
  const at::Tensor q = x.as_strided_symint({B, H, D}, {0, 0, 0}),
                   v = x.as_strided_symint({B, H, Dv}, {0, 0, 0});
  check_favor_decode_step_sym(op, q, q, v, projection, kernel_fn, kv, v_sum, stabiliser, length);
  return {B, E_out};
}

DecodeDims check_favor_decode_layer(
    const char* op, const at::Tensor& x, const QkvWeights& qkv, const at::Tensor& projection,
    c10::string_view kernel_fn, const at::Tensor& w_out, const std::optional<at::Tensor>& b_out,
    const at::Tensor& kv, const at::Tensor& v_sum, const at::Tensor& stabiliser,
    const std::optional<at::Tensor>& length) {
  check_favor_decode_layer_sym(op, x, qkv, projection, kernel_fn, w_out, b_out, kv, v_sum,
                               stabiliser, length);
  const FavorKernel kernel =
      kernel_fn == c10::string_view("softmax") ? FavorKernel::Softmax : FavorKernel::Relu;
  return {kv.size(0) * kv.size(1), projection.size(1), kv.size(3) - 1, kv.size(2), kernel};
}

at::Tensor favor_decode_step_aten(const DecodeDims& d, const at::Tensor& query_in,
                                  const at::Tensor& key_in, const at::Tensor& value_in,
                                  const at::Tensor& projection, const at::Tensor& kv,
                                  const at::Tensor& v_sum, const at::Tensor& stabiliser,
                                  const std::optional<at::Tensor>& length) {
  if (length.has_value() && length->defined()) length->add_(1);
  // Computed in the state's dtype; the output comes back in the query's.
  const at::ScalarType st = kv.scalar_type();
  const at::Tensor query = query_in.to(st), key = key_in.to(st), value = value_in.to(st);
  const double sM = 1.0 / std::sqrt(static_cast<double>(d.M));
  const at::Tensor Wt = projection.to(st).t();
  const at::Tensor V1 = at::constant_pad_nd(value, {0, 1}, 1.0);  // [v, 1]
  at::Tensor phi, kf;
  double ek;
  if (d.kernel == FavorKernel::Softmax) {
    const double xscale = std::pow(static_cast<double>(d.D), -0.25);
    auto pre = [&](const at::Tensor& x) {
      const at::Tensor xs = x * xscale;
      return at::matmul(xs, Wt) - 0.5 * (xs * xs).sum(-1, /*keepdim=*/true);
    };
    const at::Tensor pq = pre(query), pk = pre(key);
    const at::Tensor r_new = at::maximum(stabiliser, pk.amax(-1));
    phi = sM * ((pq - pq.amax(-1, /*keepdim=*/true)).exp() + kFavorSoftmaxEps);
    kf = sM * (pk - r_new.unsqueeze(-1)).exp();
    // alpha = exp(r - r_new) <= 1; 0 while the state is empty (r = -inf).
    kv.mul_((stabiliser - r_new).exp().unsqueeze(-1).unsqueeze(-1));
    stabiliser.copy_(r_new);
    ek = kFavorSoftmaxEps * sM;
  } else {
    phi = sM * at::relu(at::matmul(query, Wt)) + kFavorReluEps;
    kf = sM * at::relu(at::matmul(key, Wt));
    ek = kFavorReluEps;
  }
  kv.addcmul_(kf.unsqueeze(-1), V1.unsqueeze(-2));
  v_sum.add_(V1);
  const at::Tensor y =
      at::matmul(phi.unsqueeze(-2), kv + ek * v_sum.unsqueeze(-2)).squeeze(-2);  // (..., Dv+1)
  return (y.narrow(-1, 0, d.Dv) / y.narrow(-1, d.Dv, 1)).to(query_in.scalar_type()).contiguous();
}

at::Tensor chunk_scan_generic(const at::Tensor& x, const at::Tensor& a, bool reverse) {
  const int64_t n = x.size(1);
  at::Tensor out = at::zeros_like(x);
  if (n <= 1 || x.numel() == 0) return out;
  if (!reverse) {
    for (int64_t c = 1; c < n; ++c) {
      out.select(1, c).copy_(out.select(1, c - 1) * a.select(1, c - 1).unsqueeze(-1) +
                             x.select(1, c - 1));
    }
  } else {
    for (int64_t c = n - 2; c >= 0; --c) {
      out.select(1, c).copy_(out.select(1, c + 1) * a.select(1, c + 1).unsqueeze(-1) +
                             x.select(1, c + 1));
    }
  }
  return out;
}

at::Tensor chunk_scan_differentiable(const at::Tensor& x, const at::Tensor& a, bool reverse) {
  const int64_t n = x.size(1);
  std::vector<at::Tensor> out(static_cast<size_t>(n));
  at::Tensor acc = at::zeros_like(x.select(1, 0));
  for (int64_t step = 0; step < n; ++step) {
    const int64_t c = reverse ? n - 1 - step : step;
    out[static_cast<size_t>(c)] = acc;
    acc = acc * a.select(1, c).unsqueeze(-1) + x.select(1, c);
  }
  return at::stack(out, 1);
}

at::Tensor chunk_scan_cpu(const at::Tensor& x_in, const at::Tensor& a_in, bool reverse) {
  TORCH_INTERNAL_ASSERT(x_in.dim() == 3 && a_in.dim() == 2);
  at::Tensor x = x_in.contiguous(), a = a_in.contiguous().to(x.scalar_type());
  at::Tensor out = at::empty_like(x);
  const int64_t BH = x.size(0), n = x.size(1), E = x.size(2);
  if (out.numel() == 0) return out;
  constexpr int64_t kBlock = 512;  // state entries per task: a contiguous run of each chunk row
  const int64_t nblk = (E + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "panther_chunk_scan_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, BH * nblk, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> acc(kBlock);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / nblk, e0 = (t % nblk) * kBlock, len = std::min(kBlock, E - e0);
        std::fill(acc.begin(), acc.begin() + len, scalar_t(0));
        for (int64_t step = 0; step < n; ++step) {
          const int64_t c = reverse ? n - 1 - step : step;
          const scalar_t* xr = xp + (bh * n + c) * E + e0;
          scalar_t* orow = op + (bh * n + c) * E + e0;
          const scalar_t ac = ap[bh * n + c];
          for (int64_t e = 0; e < len; ++e) {
            orow[e] = acc[e];
            acc[e] = ac * acc[e] + xr[e];
          }
        }
      }
    });
  });
  return out;
}

at::Tensor favor_forward(const FavorDims& d, const at::Tensor& query, const at::Tensor& key,
                         const at::Tensor& value, const at::Tensor& projection, bool causal,
                         const std::optional<at::Tensor>& key_padding_mask, int64_t chunk,
                         ChunkScanFn scan) {
  const auto dt = query.scalar_type();
  if (d.B * d.H * d.Lq * d.Dv == 0 || d.Lk == 0) {
    // No output, or no key at all: every query sees nothing and its output is 0.
    return favor_output(d, query.options()).zero_();
  }
  Prepared p = prepare(d, query, key, value, projection, causal, key_padding_mask);
  at::Tensor Y;
  if (causal) {
    CausalState st;
    Y = causal_forward(d, p, chunk, scan, st);
  } else {
    at::Tensor Kf, KV;
    Y = noncausal_forward(p, Kf, KV);
  }
  at::Tensor num = Y.narrow(-1, 0, d.Dv), den = Y.narrow(-1, d.Dv, 1);
  // den > 0 whenever a query sees a valid key (every feature is >= eps > 0); a query that sees
  // none (all keys padded) outputs 0.
  at::Tensor res = favor_output(d, query.options());
  res.copy_((num / at::where(den == 0, 1.0, den)).reshape({d.B, d.H, d.Lq, d.Dv}));
  return res;
}

at::Tensor favor_forward_differentiable(const FavorDims& d, const at::Tensor& query,
                                        const at::Tensor& key, const at::Tensor& value,
                                        const at::Tensor& projection, bool causal,
                                        const std::optional<at::Tensor>& key_padding_mask,
                                        int64_t chunk) {
  if (d.B * d.H * d.Lq * d.Dv == 0 || d.Lk == 0) {
    return at::zeros({d.B, d.H, d.Lq, d.Dv}, query.options());
  }
  Prepared p = prepare(d, query, key, value, projection, causal, key_padding_mask,
                       /*differentiable=*/true);
  at::Tensor Y;
  if (causal) {
    CausalState st;
    Y = causal_forward(d, p, chunk, &chunk_scan_differentiable, st);
  } else {
    at::Tensor Kf, KV;
    Y = noncausal_forward(p, Kf, KV);
  }
  at::Tensor num = Y.narrow(-1, 0, d.Dv), den = Y.narrow(-1, d.Dv, 1);
  at::Tensor none = den == 0;
  at::Tensor res = (num / at::where(none, 1.0, den)).masked_fill(none, 0);
  return res.reshape({d.B, d.H, d.Lq, d.Dv}).to(query.scalar_type());
}

FavorGrads favor_backward(const FavorDims& d, const at::Tensor& grad_output,
                          const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          const at::Tensor& projection, bool causal,
                          const std::optional<at::Tensor>& key_padding_mask, int64_t chunk,
                          ChunkScanFn scan, std::array<bool, 4> mask) {
  FavorGrads out;
  if (d.B * d.H * d.Lq * d.Dv == 0 || d.Lk == 0) {
    if (mask[0]) std::get<0>(out) = at::zeros_like(query, at::MemoryFormat::Contiguous);
    if (mask[1]) std::get<1>(out) = at::zeros_like(key, at::MemoryFormat::Contiguous);
    if (mask[2]) std::get<2>(out) = at::zeros_like(value, at::MemoryFormat::Contiguous);
    if (mask[3]) std::get<3>(out) = at::zeros_like(projection, at::MemoryFormat::Contiguous);
    return out;
  }
  Prepared p = prepare(d, query, key, value, projection, causal, key_padding_mask);
  const int64_t BH = p.BH, M = d.M, E1 = p.E1;
  const auto cdt = p.phi.scalar_type();

  // Forward again (features and per-chunk states only), then the gradient of y = [num, den]:
  // out = num / den  =>  dnum = g / den, dden = -(g . out) / den.
  CausalState st;
  at::Tensor Kf, KV, Y;
  Y = causal ? causal_forward(d, p, chunk, scan, st) : noncausal_forward(p, Kf, KV);
  at::Tensor num = Y.narrow(-1, 0, d.Dv), den = Y.narrow(-1, d.Dv, 1);
  at::Tensor none = den == 0;
  at::Tensor dsafe = at::where(none, 1.0, den);
  at::Tensor o = num / dsafe;
  at::Tensor g = grad_output.to(cdt).reshape({BH, d.Lq, d.Dv});
  at::Tensor Yb = at::cat({g / dsafe, -(g * o).sum(-1, /*keepdim=*/true) / dsafe}, -1)
                      .masked_fill(none, 0);  // (BH, Lq, E1)

  at::Tensor dphi, dkhat, dV;  // (BH, Lq, M), (BH, Lk, M), (BH, Lk, E1)
  if (!causal) {
    dphi = at::matmul(Yb, KV.transpose(1, 2));
    at::Tensor dKV = at::matmul(p.phi.transpose(1, 2), Yb);  // (BH, M, E1)
    dkhat = at::matmul(p.V, dKV.transpose(1, 2));
    if (mask[2]) dV = at::matmul(Kf, dKV);
  } else {
    const int64_t L = st.L, C = st.C, n = st.n, Lp = st.Lp, pad = Lp - L;
    at::Tensor Ybp = pad_len(Yb, pad);
    at::Tensor Ybc = Ybp.view({BH, n, C, E1});
    // Across chunks: y_i += s_i phi_i H_c, H by the forward scan => states' gradient by the
    // reverse scan (a suffix sum of per-chunk gradient states).
    at::Tensor s4 = st.s.unsqueeze(-1);
    at::Tensor dphic = at::matmul(Ybc, st.Hs.transpose(-1, -2)) * s4;            // (BH,n,C,M)
    at::Tensor dH = at::matmul((st.phic * s4).transpose(-1, -2), Ybc);            // (BH,n,M,E1)
    at::Tensor dT = scan(dH.reshape({BH, n, M * E1}).contiguous(), st.alpha, /*reverse=*/true)
                        .view({BH, n, M, E1});
    at::Tensor kf4 = st.kfac.unsqueeze(-1);
    at::Tensor dkc = at::matmul(st.Vc, dT.transpose(-1, -2)) * kf4;               // (BH,n,C,M)
    at::Tensor dVc;
    if (mask[2]) dVc = at::matmul(st.khc * kf4, dT);
    // Inside a chunk: y_i += sum_j A_ij [v_j, 1], A = (phi khat^T) o E.
    at::Tensor Wm = at::matmul(Ybc, st.Vc.transpose(-1, -2)) * st.E;             // (BH,n,C,C)
    dphic = dphic + at::matmul(Wm, st.khc);
    dkc = dkc + at::matmul(Wm.transpose(-1, -2), st.phic);
    if (mask[2]) dVc = dVc + at::matmul(st.A.transpose(-1, -2), Ybc);
    // eps part: y_i += e_k (sum_m phi_im) Cum_i.
    at::Tensor dphi_p = dphic.view({BH, Lp, M}) +
                        p.ek * (Ybp * st.Cum).sum(-1, /*keepdim=*/true);
    dphi = dphi_p.narrow(1, 0, L);
    dkhat = dkc.view({BH, Lp, M}).narrow(1, 0, L);
    if (mask[2]) {
      at::Tensor dCum = p.ek * st.phisum * Ybp;
      at::Tensor dVp = dVc.view({BH, Lp, E1}) + cumsum_positions(dCum, /*reverse=*/true);
      dV = dVp.narrow(1, 0, L);
    }
  }

  // Through the feature maps (stabilisers are constants).
  at::Tensor dpre_q = p.dphi_dpre.defined() ? dphi * p.dphi_dpre
                                            : dphi * (p.phi - p.phi_offset);  // (BH, Lq, M)
  at::Tensor dpre_k = dkhat * p.dkhat_dpre;  // (BH, Lk, M)
  const bool softmax = d.kernel == FavorKernel::Softmax;
  if (mask[0]) {
    at::Tensor dx = at::matmul(dpre_q, p.W);
    if (softmax) dx = (dx - dpre_q.sum(-1, /*keepdim=*/true) * p.xq) * p.xscale;
    std::get<0>(out) = dx.reshape({d.B, d.H, d.Lq, d.D}).to(query.scalar_type());
  }
  if (mask[1]) {
    at::Tensor dx = at::matmul(dpre_k, p.W);
    if (softmax) dx = (dx - dpre_k.sum(-1, /*keepdim=*/true) * p.xk) * p.xscale;
    std::get<1>(out) = dx.reshape({d.B, d.H, d.Lk, d.D}).to(key.scalar_type());
  }
  if (mask[2]) {
    at::Tensor dv = dV.narrow(-1, 0, d.Dv) * p.valid.unsqueeze(-1);
    std::get<2>(out) = dv.reshape({d.B, d.H, d.Lk, d.Dv}).to(value.scalar_type());
  }
  if (mask[3]) {
    // pre = x' W^T (+ terms without W)  =>  dW = sum over rows of dpre^T x'.
    at::Tensor dW = at::matmul(dpre_q.reshape({-1, M}).t(), p.xq.reshape({-1, d.D})) +
                    at::matmul(dpre_k.reshape({-1, M}).t(), p.xk.reshape({-1, d.D}));
    std::get<3>(out) = dW.to(projection.scalar_type());
  }
  return out;
}

}  // namespace panther::detail
