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

void check_sketched_linear_backward(const char* op, const at::Tensor& grad_output,
                                    const at::Tensor& saved, const at::Tensor& input,
                                    const SketchDims& d) {
  checks::defined(op, {{"grad_output", grad_output}, {"saved", saved}});
  // Symbolic sizes (the Meta kernel under dynamic shapes): the comparisons become guards.
  const int64_t nd = input.dim();
  bool same = grad_output.dim() == nd && grad_output.sym_size(-1) == d.d_out;
  c10::SymInt rows = 1;
  for (int64_t i = 0; i + 1 < nd; ++i) {
    rows *= input.sym_size(i);
    same = same && grad_output.sym_size(i) == input.sym_size(i);
  }
  std::vector<c10::SymInt> want_g(input.sym_sizes().begin(), input.sym_sizes().end());
  want_g.back() = d.d_out;
  PANTHER_CHECK_ARG(same, op, "grad_output", "have the output's shape ", shape_str(want_g),
                    ", got ", shape_str(grad_output.sym_sizes()));
  checks::same_dtype(op, "grad_output", grad_output, "input", input);
  checks::same_device(op, "grad_output", grad_output, "input", input);
  const std::vector<c10::SymInt> want_s{rows, c10::SymInt(saved_cols(d.L * d.k))};
  PANTHER_CHECK_ARG(saved.dim() == 2 && saved.sym_size(0) == want_s[0] &&
                        saved.sym_size(1) == want_s[1],
                    op, "saved", "have shape (tokens, 2Lk + 8) = ", shape_str(want_s), ", got ",
                    shape_str(saved.sym_sizes()));
  checks::same_dtype(op, "saved", saved, "input", input);
  checks::same_device(op, "saved", saved, "input", input);
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

at::Tensor forward_exact_into(const at::Tensor& x2, const at::Tensor& A, const at::Tensor& B,
                              const std::optional<at::Tensor>& bias, double scale,
                              const at::Tensor& saved) {
  // The 1/(2L) scale is folded into the small (N, 2Lk) intermediate (the GEMM's alpha, applied
  // before its one rounding), never into the output. beta = 0: the uninitialised buffer is not read.
  at::Tensor Ts = saved.narrow(1, 0, A.size(1));
  Ts.addmm_(x2, A, /*beta=*/0, /*alpha=*/scale);
  return (bias.has_value() && bias->defined()) ? at::addmm(*bias, Ts, B) : at::mm(Ts, B);
}

std::tuple<at::Tensor, at::Tensor> forward_exact(const at::Tensor& x2, const at::Tensor& A,
                                                 const at::Tensor& B,
                                                 const std::optional<at::Tensor>& bias,
                                                 double scale, bool want_saved) {
  const int64_t C = A.size(1);
  at::Tensor saved = at::empty({x2.size(0), C + kSavedPad}, x2.options().dtype(A.scalar_type()));
  at::Tensor y = forward_exact_into(x2, A, B, bias, scale, saved);
  if (want_saved) saved.narrow(1, C, kSavedPad).zero_().select(1, 0).fill_(1);  // [1, 0, ..]
  return {y, saved};
}

Grads6 backward_exact(const at::Tensor& G2, const at::Tensor& x2, const at::Tensor& saved,
                      const at::Tensor& A, const at::Tensor& B, double scale, const SketchDims& d,
                      at::IntArrayRef input_sizes, at::ScalarType dtype,
                      const std::array<bool, 6>& mask, const at::Tensor& gT_given,
                      const at::Tensor& dx_given) {
  // y = Ts B + b with Ts = s x A:  dB = Ts^T G,  db = 1^T G,  dTs = G B^T,  dA = s x^T dTs,
  // dx = s dTs A^T. Columns [0, Lk) of A and Ts belong to S1s, [Lk, 2Lk) to U2s; rows [0, Lk)
  // of B to U1s, [Lk, 2Lk) to S2s; column 2Lk of saved is the "1" column. A module's U1s and
  // U2s are fixed buffers, so usually only the S1s columns of dA and the S2s rows of dB (plus
  // the bias row, from the same GEMM) are formed.
  const int64_t Lk = d.L * d.k, C = 2 * Lk;
  Grads6 out;
  // Outputs must not share storage (the schema promises fresh tensors) and must look like the
  // Meta kernel's (contiguous, storage offset 0): the first such view of a GEMM result is kept
  // as is, other views are copied.
  auto own = [](at::Tensor t, bool& taken) {
    if (taken || t.storage_offset() != 0 || !t.is_contiguous()) {
      return t.clone(at::MemoryFormat::Contiguous);
    }
    taken = true;
    return t;
  };
  auto per_term_in = [&](const at::Tensor& cols, bool& taken) {  // (d_in, Lk) -> (L, d_in, k)
    at::Tensor t = cols.reshape({d.d_in, d.L, d.k}).permute({1, 0, 2});
    return t.scalar_type() != dtype ? t.to(dtype).contiguous() : own(t, taken);
  };
  auto per_term_out = [&](const at::Tensor& rows, bool& taken) {  // (Lk, d_out) -> (L, k, d_out)
    at::Tensor t = rows.reshape({d.L, d.k, d.d_out});
    return t.scalar_type() != dtype ? t.to(dtype) : own(t, taken);
  };
  if (mask[0] || mask[1] || mask[4]) {
    at::Tensor gT = gT_given;
    if (!gT.defined()) {
      gT = at::empty({G2.size(0), C}, G2.options());
      gT.addmm_(G2, B.t(), /*beta=*/0, /*alpha=*/scale);
    }
    if (mask[0]) {
      at::Tensor dx = dx_given.defined() ? dx_given : at::mm(gT, A.t());
      std::get<0>(out) = dx.to(dtype).reshape(input_sizes);
    }
    if (mask[1] || mask[4]) {
      const int64_t c0 = mask[1] ? 0 : Lk, c1 = mask[4] ? C : Lk;
      const at::Tensor gA = at::mm(x2.t(), gT.narrow(1, c0, c1 - c0));  // (d_in, c1 - c0)
      bool taken = false;
      if (mask[1]) std::get<1>(out) = per_term_in(gA.narrow(1, 0, Lk), taken);
      if (mask[4]) std::get<4>(out) = per_term_in(gA.narrow(1, c1 - c0 - Lk, Lk), taken);
    }
  }
  if (mask[2] || mask[3] || mask[5]) {
    const int64_t r0 = mask[3] ? 0 : mask[2] ? Lk : C;
    const int64_t r1 = mask[5] ? C + 1 : mask[2] ? C : Lk;
    const at::Tensor gB = at::mm(saved.narrow(1, r0, r1 - r0).t(), G2);  // rows [r0, r1) of dB, db
    bool taken = false;
    if (mask[2]) std::get<2>(out) = per_term_out(gB.narrow(0, Lk - r0, Lk), taken);
    if (mask[3]) std::get<3>(out) = per_term_out(gB.narrow(0, 0, Lk), taken);
    if (mask[5]) {
      at::Tensor gb = gB.select(0, C - r0);
      std::get<5>(out) = gb.scalar_type() != dtype ? gb.to(dtype) : own(gb, taken);
    }
  }
  return out;
}

}  // namespace panther::detail
