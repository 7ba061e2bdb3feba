// Shared implementation of the sketched linear op: checks, operand packing and the exact
// (fp32/fp64) two-GEMM forward and backward. No registrations here.
#include "linear/impl.h"

#include <c10/util/Exception.h>

#include "common/checks.h"

namespace panther::detail {

namespace {
// The sketch tensors and the bias must match the input's dtype and device.
constexpr const char* kCastHint =
    " (cast the input or the layer, e.g. layer.to(dtype); under autocast this is automatic)";

void check_like_input(const char* op, const char* name, const at::Tensor& t,
                      const at::Tensor& input) {
  checks::same_dtype(op, name, t, "input", input, kCastHint);
  checks::same_device(op, name, t, "input", input);
}
}  // namespace

SketchDims check_sketched_linear(const char* op, const at::Tensor& input, const at::Tensor& S1s,
                                 const at::Tensor& S2s, const at::Tensor& U1s,
                                 const at::Tensor& U2s, const std::optional<at::Tensor>& bias) {
  checks::defined(op, {{"input", input}, {"S1s", S1s}, {"S2s", S2s}, {"U1s", U1s}, {"U2s", U2s}});
  checks::min_dim(op, "input", input, 1, "(..., d_in)");
  checks::floating(op, "input", input);
  checks::dim(op, "S1s", S1s, 3, "(num_terms, d_in, low_rank)");
  const int64_t L = S1s.size(0), d_in = S1s.size(1), k = S1s.size(2);
  checks::dim(op, "S2s", S2s, 3, "(num_terms, low_rank, d_out)");
  const int64_t d_out = S2s.size(2);
  PANTHER_CHECK_ARG(L >= 1 && k >= 1, op, "num_terms and low_rank", "be >= 1, got S1s of shape ",
                    shape_str(S1s.sizes()));
  checks::shape(op, "S2s", S2s, {L, k, d_out}, "(num_terms, low_rank, d_out)");
  checks::shape(op, "U1s", U1s, {L, k, d_out}, "(num_terms, low_rank, d_out)");
  checks::shape(op, "U2s", U2s, {L, d_in, k}, "(num_terms, d_in, low_rank)");
  // sym_size: under dynamic shapes (torch.export Dim, torch.compile(dynamic=True)) the Meta
  // kernels see symbolic sizes; only the last dim is checked, leading dims stay symbolic.
  PANTHER_CHECK_ARG(input.sym_size(-1) == d_in, op, "input last dim", "be d_in=", d_in,
                    " (from S1s), got ", input.size(-1), " (input shape ", shape_str(input.sizes()),
                    ")");
  check_like_input(op, "S1s", S1s, input);
  check_like_input(op, "S2s", S2s, input);
  check_like_input(op, "U1s", U1s, input);
  check_like_input(op, "U2s", U2s, input);
  if (bias.has_value() && bias->defined()) {
    checks::shape(op, "bias", *bias, {d_out}, "(d_out,)");
    check_like_input(op, "bias", *bias, input);
  }
  // N = product of the leading dims; -1 when they are symbolic (Meta kernels under dynamic
  // shapes compute their own symbolic row count; real kernels always see concrete sizes).
  c10::SymInt rows = 1;
  for (int64_t i = 0; i + 1 < input.dim(); ++i) rows *= input.sym_size(i);
  return {L, k, d_in, d_out, rows.maybe_as_int().value_or(-1)};
}

std::vector<int64_t> sketched_output_shape(const at::Tensor& input, int64_t d_out) {
  auto s = input.sizes().vec();
  s.back() = d_out;
  return s;
}

at::Tensor pack_A(const at::Tensor& S1s, const at::Tensor& U2s) {
  const int64_t L = S1s.size(0), d_in = S1s.size(1), k = S1s.size(2);
  // (L, d_in, k) -> (d_in, L*k): column block i holds term i.
  auto a = S1s.permute({1, 0, 2}).reshape({d_in, L * k});
  auto b = U2s.permute({1, 0, 2}).reshape({d_in, L * k});
  return at::cat({a, b}, 1);
}

at::Tensor pack_B(const at::Tensor& U1s, const at::Tensor& S2s) {
  const int64_t L = U1s.size(0), k = U1s.size(1), d_out = U1s.size(2);
  return at::cat({U1s.reshape({L * k, d_out}), S2s.reshape({L * k, d_out})}, 0);
}

std::tuple<at::Tensor, at::Tensor> forward_exact(const at::Tensor& x2, const at::Tensor& A,
                                                 const at::Tensor& B,
                                                 const std::optional<at::Tensor>& bias,
                                                 double scale) {
  // The 1/(2L) scale is folded into the small (N, 2Lk) intermediate (the GEMM's alpha, applied
  // before its one rounding), never into the output. beta = 0: the uninitialised buffer is not read.
  const int64_t C = A.size(1);
  at::Tensor saved = at::empty({x2.size(0), C + kSavedPad}, x2.options().dtype(A.scalar_type()));
  at::Tensor Ts = saved.narrow(1, 0, C);
  Ts.addmm_(x2, A, /*beta=*/0, /*alpha=*/scale);
  saved.narrow(1, C, kSavedPad).zero_().select(1, 0).fill_(1);
  at::Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, Ts, B) : at::mm(Ts, B);
  return {y, saved};
}

PackedGrads backward_exact(const at::Tensor& G2, const at::Tensor& x2, const at::Tensor& saved,
                           const at::Tensor& A, const at::Tensor& B, double scale,
                           const std::array<bool, 6>& mask, TransposedMm tn) {
  // y = Ts B + b with Ts = s x A:  dB = Ts^T G,  db = 1^T G,  dTs = G B^T,  dA = s x^T dTs,
  // dx = s dTs A^T. dB and db come from one GEMM against the padded saved intermediate.
  PackedGrads g;
  const int64_t C = A.size(1);
  const bool need_x = mask[0], need_A = mask[1] || mask[4], need_B = mask[2] || mask[3];
  if (need_x || need_A) {
    at::Tensor gT = at::empty({G2.size(0), C}, G2.options());
    gT.addmm_(G2, B.t(), /*beta=*/0, /*alpha=*/scale);
    if (need_x) g.gx = at::mm(gT, A.t());
    if (need_A) g.gA = tn(x2, gT);
  }
  if (need_B || mask[5]) {
    at::Tensor gBext = tn(saved, G2);  // (C + pad, d_out)
    if (need_B) g.gB = gBext.narrow(0, 0, C);
    if (mask[5]) g.gb = gBext.select(0, C);
  }
  return g;
}

Grads6 unpack_grads(const PackedGrads& g, const SketchDims& d, const at::Tensor& input,
                    at::ScalarType dtype, const std::array<bool, 6>& mask) {
  const int64_t Lk = d.L * d.k;
  auto per_term_in = [&](const at::Tensor& cols) {  // (d_in, Lk) -> (L, d_in, k)
    return cols.reshape({d.d_in, d.L, d.k}).permute({1, 0, 2}).to(dtype).contiguous();
  };
  auto per_term_out = [&](const at::Tensor& rows) {  // (Lk, d_out) -> (L, k, d_out)
    return rows.reshape({d.L, d.k, d.d_out}).to(dtype).contiguous();
  };
  // Every output must own its memory: the schema promises fresh tensors, and views of one packed
  // GEMM result (the S2s and U1s rows of gB, the S1s and U2s columns of gA when d_in == 1, a bias
  // row of gB) would alias each other. Copy where the dtype conversion did not already.
  auto own = [](at::Tensor t, const at::Tensor& packed) {
    return t.is_alias_of(packed) ? t.clone(at::MemoryFormat::Contiguous) : t;
  };
  Grads6 out;
  if (mask[0]) std::get<0>(out) = g.gx.to(dtype).reshape(input.sizes());
  if (mask[1]) std::get<1>(out) = own(per_term_in(g.gA.narrow(1, 0, Lk)), g.gA);
  if (mask[2]) std::get<2>(out) = own(per_term_out(g.gB.narrow(0, Lk, Lk)), g.gB);
  if (mask[3]) std::get<3>(out) = own(per_term_out(g.gB.narrow(0, 0, Lk)), g.gB);
  if (mask[4]) std::get<4>(out) = own(per_term_in(g.gA.narrow(1, Lk, Lk)), g.gA);
  if (mask[5]) std::get<5>(out) = own(g.gb.to(dtype), g.gb);
  return out;
}

}  // namespace panther::detail
