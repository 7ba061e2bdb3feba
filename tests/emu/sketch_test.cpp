// Runs sketched_linear's hand-written CUDA kernels on the CPU emulator against the float64 formula
// on the same (rounded) inputs:
//  * the direct few-token backward (cpp/cuda/sketch_small.cuh): every gradient, dT = g B^T,
//    dx = s dT A^T, dA = s x^T dT, dB = T^T g, dbias = sum_n g; fp32 and bf16, partial column
//    tiles, several terms, gradients requested selectively;
//  * the many-token first GEMM with its [hi | lo | 1 0..] epilogue (cpp/cuda/sketch_xa.cuh):
//    bf16 and fp16, ragged rows and d_in, every padded column count.
// Built by scripts/emu_test.sh.
#include "cuda_emu.h"
#include "cuda/sketch_small.cuh"
#include "cuda/sketch_xa.cuh"

#include <ATen/ATen.h>
#include <cstdio>

#include "kernels/sketched_linear.h"

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
  // The forward's saved intermediate: [T | 1 0..] (fp32) or [hi | lo | 1 0..] (bf16).
  const bool lowp = panther::detail::is_low_precision(dt);
  at::Tensor Tf = T.to(at::kFloat);
  at::Tensor core = Tf;
  if (lowp) {
    at::Tensor hi = Tf.to(dt);
    core = at::cat({hi, (Tf - hi.to(at::kFloat)).to(dt)}, 1);
  }
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
// saved = [hi | lo | 1 0..] with hi + lo = s x A in fp32 (checked against float64).
bool run_xa(int64_t N, int64_t d_in, int64_t L, int64_t k, at::ScalarType dt) {
  const int64_t Lk = L * k, C = 2 * Lk;
  auto r = [&](at::IntArrayRef s) { return at::randn(s).to(dt); };
  at::Tensor x = r({N, d_in}), S1 = r({L, d_in, k}), U2 = r({L, d_in, k});
  const double s = 1.0 / (2.0 * L);
  auto D = [](const at::Tensor& t) { return t.to(at::kDouble); };
  at::Tensor A = at::cat({D(S1).permute({1, 0, 2}).reshape({d_in, Lk}),
                          D(U2).permute({1, 0, 2}).reshape({d_in, Lk})}, 1);
  at::Tensor T = at::mm(D(x), A) * s;
  SketchDims d{L, k, d_in, 1, N};
  const bool ok_applies = panther::sketch::xa::applies(d, x, S1, U2);
  at::Tensor saved = dt == at::kBFloat16
      ? panther::sketch::xa::saved_intermediate<__nv_bfloat16>(x, S1, U2, d, s)
      : panther::sketch::xa::saved_intermediate<__half>(x, S1, U2, d, s);
  at::Tensor hi = saved.narrow(1, 0, C).to(at::kDouble), lo = saved.narrow(1, C, C).to(at::kDouble);
  const double e = rel_err(hi + lo, T);
  // hi is T rounded once to the dtype; lo is what that rounding dropped.
  const double e_hi = rel_err(saved.narrow(1, 0, C), T);
  at::Tensor pad = saved.narrow(1, 2 * C, panther::detail::kSavedPad).to(at::kFloat);
  at::Tensor want = at::zeros_like(pad);
  want.select(1, 0).fill_(1.0);
  const bool ok = ok_applies && e < 2e-5 && e_hi < 1e-2 && at::equal(pad, want);
  std::printf("xa N=%lld d_in=%lld L=%lld k=%lld %s: hi+lo %.1e, hi %.1e, pad %s -> %s\n",
              (long long)N, (long long)d_in, (long long)L, (long long)k,
              dt == at::kBFloat16 ? "bf16" : "fp16", e, e_hi, at::equal(pad, want) ? "ok" : "WRONG",
              ok ? "PASS" : "FAIL");
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
  fails += !run_xa(70, 264, 1, 16, at::kBFloat16);   // ragged rows and d_in, C = 32
  fails += !run_xa(64, 128, 2, 8, at::kHalf);        // C = 32 from two terms
  fails += !run_xa(5, 40, 1, 8, at::kBFloat16);      // C = 16: warps split the k-steps
  fails += !run_xa(33, 200, 3, 8, at::kHalf);        // C = 48, padded to 64
  fails += !run_xa(130, 256, 1, 64, at::kBFloat16);  // C = 128
  std::printf("%d of %zu cases failed\n", fails, sizeof(cases) / sizeof(cases[0]) + 5);
  return fails ? 1 : 0;
}
