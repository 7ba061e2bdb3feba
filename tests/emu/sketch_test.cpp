// Runs the direct few-token backward of sketched_linear (cpp/linear/sketch_small.cuh) on the CPU
// emulator and compares every gradient with the float64 formula on the same (rounded) inputs:
// dT = g B^T, dx = s dT A^T, dA = s x^T dT, dB = T^T g, dbias = sum_n g. fp32 and bf16, partial
// column tiles, several terms, gradients requested selectively. Built by scripts/emu_test.sh.
#include "cuda_emu.h"
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
  const size_t n = sizeof(cases) / sizeof(cases[0]);
  std::printf("%d of %zu cases failed\n", fails, n);
  return fails ? 1 : 0;
}
