// A C++ program using an installed Panther (find_package(panther)): calls panther::sketched_linear
// and checks it against the dense form of the same sketch. Prints "consumer ok" on success.
// Per-op ATen headers (not <ATen/ATen.h>) keep this test's compile short.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/sum.h>

#include <cstdio>

#include "panther/ops.h"

int main() {
  const int64_t L = 2, k = 3, d_in = 8, d_out = 5;
  auto o = at::TensorOptions().dtype(at::kDouble);
  at::Tensor x = at::randn({4, d_in}, o);
  at::Tensor S1 = at::randn({L, d_in, k}, o), S2 = at::randn({L, k, d_out}, o);
  at::Tensor U1 = at::randn({L, k, d_out}, o), U2 = at::randn({L, d_in, k}, o);
  at::Tensor b = at::randn({d_out}, o);
  at::Tensor y = panther::sketched_linear(x, S1, S2, U1, U2, b);
  // Dense weight (d_in, d_out) = 1/(2L) sum_i (S1_i U1_i + U2_i S2_i).
  at::Tensor W = (at::bmm(S1, U1) + at::bmm(U2, S2)).sum(0) / (2.0 * L);
  const double diff = (y - (at::matmul(x, W) + b)).abs().max().item<double>();
  std::printf("panther built with torch %s; max abs diff %.3g\n", panther::built_with_torch(), diff);
  if (!(diff < 1e-10)) return 1;
  std::printf("consumer ok\n");
  return 0;
}
