// Runs the direct few-token backward of sketched_linear (cpp/linear/sketch_small.cuh) on the CPU
// emulator and compares every gradient with the float64 formula on the same (rounded) inputs:
// dT = g B^T, dx = s dT A^T, dA = s x^T dT, dB = T^T g, dbias = sum_n g. fp32 and bf16, partial
// column tiles, several terms, gradients requested selectively. Built by scripts/emu_test.sh.
#include "cuda_emu.h"
#include "linear/sketch_chain.cuh"
#include "linear/sketch_out.cuh"
#include "linear/sketch_small.cuh"

#include <ATen/ATen.h>
#include <cstdio>

#include "linear/impl.h"

namespace {
using panther::detail::SketchDims;

double rel_err(const at::Tensor& got, const at::Tensor& ref) {
  const double scale = ref.abs().max().item<double>() + 1e-12;
  return (got.to(at::kDouble) - ref).abs().max().item<double>() / scale;
}

struct Case {
  int64_t N, d_in, d_out, L, k;
  at::ScalarType dt;
  std::array<bool, 6> mask;
};

bool run(const Case& c) {
  const auto dt = c.dt;
  const int64_t Lk = c.L * c.k, C = 2 * Lk;
  auto r = [&](at::IntArrayRef s) { return at::randn(s).to(dt); };
  at::Tensor x = r({c.N, c.d_in}), g = r({c.N, c.d_out});
  at::Tensor S1 = r({c.L, c.d_in, c.k}), U2 = r({c.L, c.d_in, c.k});
  at::Tensor U1 = r({c.L, c.k, c.d_out}), S2 = r({c.L, c.k, c.d_out});
  const double s = 1.0 / (2.0 * c.L);
  // float64 reference on the rounded inputs.
  auto D = [](const at::Tensor& t) { return t.to(at::kDouble); };
  at::Tensor A = at::cat({D(S1).permute({1, 0, 2}).reshape({c.d_in, Lk}),
                          D(U2).permute({1, 0, 2}).reshape({c.d_in, Lk})}, 1);
  at::Tensor B = at::cat({D(U1).reshape({Lk, c.d_out}), D(S2).reshape({Lk, c.d_out})}, 0);
  at::Tensor T = at::mm(D(x), A) * s;
  at::Tensor dT = at::mm(D(g), B.t());
  at::Tensor dx = at::mm(dT, A.t()) * s, dA = at::mm(D(x).t(), dT) * s, dB = at::mm(T.t(), D(g));
  auto term_cols = [&](const at::Tensor& m, int64_t from) {  // (d_in, C) columns -> (L, d_in, k)
    return m.narrow(1, from, Lk).reshape({c.d_in, c.L, c.k}).permute({1, 0, 2});
  };
  const at::Tensor ref[6] = {dx, term_cols(dA, 0), dB.narrow(0, Lk, Lk).reshape({c.L, c.k, c.d_out}),
                             dB.narrow(0, 0, Lk).reshape({c.L, c.k, c.d_out}), term_cols(dA, Lk),
                             D(g).sum(0)};
  // The forward's saved intermediate: [T | 1 0..] in the input dtype.
  const bool lowp = panther::detail::is_low_precision(dt);
  at::Tensor core = T.to(dt);
  at::Tensor pad = at::zeros({c.N, panther::detail::kSavedPad}, at::kFloat);
  pad.select(1, 0).fill_(1.0);
  at::Tensor saved = at::cat({core.to(dt), pad.to(dt)}, 1);

  SketchDims d{c.L, c.k, c.d_in, c.d_out, c.N};
  panther::detail::Grads6 got =
      dt == at::kFloat
          ? panther::sketch::small_backward<float>(g, x, saved, S1, S2, U1, U2, d, c.mask)
          : panther::sketch::small_backward<c10::BFloat16>(g, x, saved, S1, S2, U1, U2, d, c.mask);
  const std::optional<at::Tensor> outs[6] = {std::get<0>(got), std::get<1>(got), std::get<2>(got),
                                             std::get<3>(got), std::get<4>(got), std::get<5>(got)};
  const char* names[6] = {"dx", "dS1", "dS2", "dU1", "dU2", "dbias"};
  const double tol = lowp ? 1e-2 : 2e-5;
  bool ok = true;
  std::printf("N=%lld d_in=%lld d_out=%lld L=%lld k=%lld %s:", (long long)c.N, (long long)c.d_in,
              (long long)c.d_out, (long long)c.L, (long long)c.k, lowp ? "bf16" : "fp32");
  for (int i = 0; i < 6; ++i) {
    if (!c.mask[i]) {
      ok = ok && !outs[i].has_value();
      continue;
    }
    if (!outs[i].has_value() || outs[i]->sizes() != ref[i].sizes()) {
      std::printf(" %s missing or misshapen", names[i]);
      ok = false;
      continue;
    }
    const double e = rel_err(*outs[i], ref[i]);
    ok = ok && e < tol;
    std::printf(" %s %.1e", names[i], e);
  }
  std::printf(" -> %s\n", ok ? "PASS" : "FAIL");
  return ok;
}
// The many-token output GEMM (cpp/linear/sketch_out.cuh): y = s T [U1; S2] + bias from the fp32 T,
// split in the kernel. Reference: the same split done here (hi = lowp(s T), lo = lowp(s T - hi))
// and (hi + lo) B + bias in float64: every output within half an ulp of the dtype plus fp32
// accumulation, nearly all exactly the rounded float64 value. Row tails inside a tile, several
// row groups, partial column blocks, C = 16..64.
struct OutCase {
  int64_t N, L, k, d_out;
  bool bias;
  at::ScalarType dt;
};

bool run_out(const OutCase& c) {
  const int64_t Lk = c.L * c.k;
  auto r = [&](at::IntArrayRef s) { return at::randn(s).to(c.dt); };
  at::Tensor T32 = at::randn({c.N, 2 * Lk}) * 7;
  at::Tensor U1 = r({c.L, c.k, c.d_out}), S2 = r({c.L, c.k, c.d_out});
  std::optional<at::Tensor> bias;
  if (c.bias) bias = r({c.d_out});
  const double s = 1.0 / (2.0 * c.L);
  at::Tensor v = T32 * static_cast<float>(s);  // fp32, as the kernel scales
  at::Tensor hi = v.to(c.dt), lo = (v - hi.to(at::kFloat)).to(c.dt);
  auto D = [](const at::Tensor& t) { return t.to(at::kDouble); };
  at::Tensor B = at::cat({D(U1).reshape({Lk, c.d_out}), D(S2).reshape({Lk, c.d_out})}, 0);
  at::Tensor ref = (D(hi) + D(lo)).mm(B);
  if (c.bias) ref = ref + D(*bias);
  const bool applies = panther::sketch_out::out_applies(T32, U1, S2, bias, 1);
  at::Tensor y = c.dt == at::kHalf ? panther::sketch_out::out_gemm<c10::Half>(T32, U1, S2, bias, s)
                                   : panther::sketch_out::out_gemm<c10::BFloat16>(T32, U1, S2, bias, s);
  const double ulp = c.dt == at::kHalf ? 1.0 / 1024 : 1.0 / 128;  // relative spacing, upper bound
  const double mag = (D(v).abs().mm(B.abs())).max().item<double>();
  at::Tensor err = (D(y) - ref).abs();
  const bool within = (err <= ref.abs() * ulp * 0.5 + mag * 1e-6).all().item<bool>();
  const double exact = at::eq(y, ref.to(c.dt)).to(at::kDouble).mean().item<double>();
  const bool ok = applies && within && exact > 0.99;
  std::printf("out N=%lld C=%lld d_out=%lld bias=%d %s: exact %.4f within %d -> %s\n",
              (long long)c.N, (long long)(2 * Lk), (long long)c.d_out, c.bias,
              c.dt == at::kHalf ? "fp16" : "bf16", exact, within, ok ? "PASS" : "FAIL");
  return ok;
}
// The fused chain (cpp/linear/sketch_chain.cuh). Forward: T = lowp(s x A), y = T B + bias;
// backward: dT = lowp(s g B^T), dx = dT A^T. Reference: the same two steps in float64 on the
// rounded inputs, T rounded to the dtype as the kernel does. T (the saved intermediate with its
// pad columns [1, 0..], or the backward's dT) must equal the reference's rounding nearly
// everywhere (the fp32 accumulation may round the other way at a tie) and the output within
// one rounding of the dtype. Row tails, K and output columns that are not multiples of 64,
// several terms, column groups (sms), phase 1 alone (no output).
struct ChainCase {
  int64_t N, d_in, d_out, L, k;
  bool bwd, bias, want_t, want_out;
  int64_t sms;
  at::ScalarType dt;
};

bool run_chain(const ChainCase& c) {
  using panther::detail::SketchDims;
  const int64_t Lk = c.L * c.k, C = 2 * Lk;
  auto r = [&](at::IntArrayRef s) { return at::randn(s).to(c.dt); };
  at::Tensor S1 = r({c.L, c.d_in, c.k}), U2 = r({c.L, c.d_in, c.k});
  at::Tensor U1 = r({c.L, c.k, c.d_out}), S2 = r({c.L, c.k, c.d_out});
  const int64_t K = c.bwd ? c.d_out : c.d_in, n_out = c.bwd ? c.d_in : c.d_out;
  at::Tensor in = r({c.N, K});
  at::Tensor bias = c.bias ? r({n_out}) : at::Tensor();
  const double s = 1.0 / (2.0 * c.L);
  auto D = [](const at::Tensor& t) { return t.to(at::kDouble); };
  at::Tensor A = at::cat({D(S1).permute({1, 0, 2}).reshape({c.d_in, Lk}),
                          D(U2).permute({1, 0, 2}).reshape({c.d_in, Lk})}, 1);
  at::Tensor B = at::cat({D(U1).reshape({Lk, c.d_out}), D(S2).reshape({Lk, c.d_out})}, 0);
  at::Tensor P = c.bwd ? B.t() : A, Q = c.bwd ? A.t() : B;
  at::Tensor Tq = (D(in).mm(P) * s).to(c.dt);
  at::Tensor ref = D(Tq).mm(Q);
  if (c.bias) ref = ref + D(bias);
  const int64_t ld = c.bwd ? C : C + panther::detail::kSavedPad;
  at::Tensor t_out = c.want_t ? at::full({c.N, ld}, 99.0, at::kFloat).to(c.dt) : at::Tensor();
  at::Tensor out = c.want_out ? at::full({c.N, n_out}, 99.0, at::kFloat).to(c.dt) : at::Tensor();
  SketchDims d{c.L, c.k, c.d_in, c.d_out, c.N};
  const bool applies = panther::sketch_chain::chain_applies(d, S1, S2, U1, U2);
  if (c.dt == at::kHalf) {
    panther::sketch_chain::chain<c10::Half>(in, S1, S2, U1, U2, d, c.bwd, s, out, t_out, !c.bwd,
                                            bias, c.sms);
  } else {
    panther::sketch_chain::chain<c10::BFloat16>(in, S1, S2, U1, U2, d, c.bwd, s, out, t_out,
                                                !c.bwd, bias, c.sms);
  }
  bool ok = applies;
  double t_exact = 1.0, t_err = 0.0, y_err = 0.0;
  if (c.want_t) {
    at::Tensor got = t_out.narrow(1, 0, C);
    t_exact = at::eq(got, Tq).to(at::kDouble).mean().item<double>();
    t_err = rel_err(got, D(Tq));
    ok = ok && t_exact > 0.99 && t_err < 1e-2;
    if (!c.bwd) {  // pad columns [1, 0, .., 0]
      at::Tensor pad = t_out.narrow(1, C, panther::detail::kSavedPad).to(at::kFloat);
      at::Tensor want = at::zeros_like(pad);
      want.select(1, 0).fill_(1.0);
      ok = ok && at::equal(pad, want);
    }
  }
  if (c.want_out) {
    y_err = rel_err(out, ref);
    ok = ok && y_err < (c.dt == at::kHalf ? 2e-3 : 1e-2);
  }
  std::printf("chain %s N=%lld d_in=%lld d_out=%lld L=%lld k=%lld (C=%lld) %s bias=%d sms=%lld: "
              "T exact %.4f err %.1e, out err %.1e -> %s\n",
              c.bwd ? "bwd" : "fwd", (long long)c.N, (long long)c.d_in, (long long)c.d_out,
              (long long)c.L, (long long)c.k, (long long)C, c.dt == at::kHalf ? "fp16" : "bf16",
              c.bias, (long long)c.sms, t_exact, t_err, y_err, ok ? "PASS" : "FAIL");
  return ok;
}
}  // namespace

int main() {
  at::manual_seed(0);
  const std::array<bool, 6> all{true, true, true, true, true, true};
  const Case cases[] = {
      {5, 300, 200, 2, 3, at::kBFloat16, all},
      {1, 70, 33, 1, 16, at::kFloat, all},
      {17, 40, 530, 1, 40, at::kFloat, {false, true, true, true, true, true}},  // 3 column tiles
      {128, 520, 260, 3, 8, at::kBFloat16, {true, false, false, false, false, true}},
      {9, 260, 90, 2, 5, at::kBFloat16, {false, false, true, false, true, false}},
  };
  int fails = 0;
  for (const Case& c : cases) fails += !run(c);
  const OutCase out_cases[] = {
      {150, 1, 16, 520, true, at::kBFloat16},  // C = 32, row tail, two row groups, 8-column block
      {300, 1, 8, 64, false, at::kHalf},       // C = 16, three tiles in one group, narrow output
      {40, 2, 16, 1032, true, at::kHalf},      // C = 64, two terms, three column blocks
      {20, 3, 8, 24, false, at::kBFloat16},    // C = 48, three terms
  };
  for (const OutCase& c : out_cases) fails += !run_out(c);
  const ChainCase chain_cases[] = {
      // N, d_in, d_out, L, k, bwd, bias, want_t, want_out, sms, dtype
      {200, 136, 200, 1, 64, false, true, true, true, 1, at::kBFloat16},  // C = 128, two row blocks, tail
      {200, 136, 200, 1, 64, true, false, true, true, 1, at::kBFloat16},  // its backward
      {40, 72, 136, 2, 16, false, false, false, true, 8, at::kHalf},      // C = 64, column groups
      {40, 72, 136, 2, 16, true, false, true, true, 8, at::kHalf},
      {30, 64, 96, 2, 64, false, true, true, true, 4, at::kBFloat16},     // C = 256, two terms
      {30, 64, 96, 2, 64, true, false, true, false, 4, at::kBFloat16},    // phase 1 alone
  };
  for (const ChainCase& c : chain_cases) fails += !run_chain(c);
  const size_t n = sizeof(cases) / sizeof(cases[0]) + sizeof(out_cases) / sizeof(out_cases[0]) +
                   sizeof(chain_cases) / sizeof(chain_cases[0]);
  std::printf("%d of %zu cases failed\n", fails, n);
  return fails ? 1 : 0;
}
