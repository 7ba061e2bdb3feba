// GoogleTest tests of panther::sketched_linear called from C++ through the dispatcher: forward
// against a naive per-term ATen loop (fp64, fp32), backward (C++ autograd) against the naive
// formula's autograd, argument errors, empty inputs and CPU autocast.
// Narrow includes (not <torch/torch.h>): ATen + the autograd API keep the compile short.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/headeronly/version.h>

#include <string>

#include "panther/ops.h"

namespace {

struct Sketch {
  at::Tensor S1s, S2s, U1s, U2s, bias;
};

// Random operands with odd sizes: L terms, rank k, d_in -> d_out.
Sketch make_sketch(int64_t L, int64_t k, int64_t d_in, int64_t d_out, at::ScalarType dt) {
  auto o = at::TensorOptions().dtype(dt);
  const double s = 1.0 / std::sqrt(static_cast<double>(k));
  auto signs = [&](at::IntArrayRef shape) { return (at::randint(0, 2, shape, o) * 2 - 1) * s; };
  return {at::randn({L, d_in, k}, o) * 0.3, at::randn({L, k, d_out}, o) * 0.3, signs({L, k, d_out}),
          signs({L, d_in, k}), at::randn({d_out}, o)};
}

// The definition, one term at a time: y = 1/(2L) sum_i (x S1_i U1_i + x U2_i S2_i) + b.
at::Tensor naive(const at::Tensor& x, const Sketch& p, bool with_bias = true) {
  const int64_t L = p.S1s.size(0);
  at::Tensor y;
  for (int64_t i = 0; i < L; ++i) {
    at::Tensor t = at::matmul(at::matmul(x, p.S1s[i]), p.U1s[i]) +
                   at::matmul(at::matmul(x, p.U2s[i]), p.S2s[i]);
    y = y.defined() ? y + t : t;
  }
  y = y / (2.0 * static_cast<double>(L));
  return with_bias ? y + p.bias : y;
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// Expects fn() to throw c10::Error whose message contains every one of `words`.
template <class F>
void expect_error(F fn, std::initializer_list<std::string> words) {
  try {
    fn();
    ADD_FAILURE() << "expected a c10::Error";
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    for (const auto& w : words) EXPECT_NE(msg.find(w), std::string::npos) << "'" << w << "' not in: " << msg;
  }
}

TEST(SketchedLinear, ForwardMatchesNaiveFloat64) {
  at::manual_seed(0);
  Sketch p = make_sketch(3, 5, 7, 11, at::kDouble);
  at::Tensor x = at::randn({4, 3, 7}, at::kDouble);
  at::Tensor y = panther::sketched_linear(x, p.S1s, p.S2s, p.U1s, p.U2s, p.bias);
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{4, 3, 11}));
  EXPECT_EQ(y.scalar_type(), at::kDouble);
  EXPECT_LT(max_abs_diff(y, naive(x, p)), 1e-12);
  // Without bias.
  at::Tensor y0 = panther::sketched_linear(x, p.S1s, p.S2s, p.U1s, p.U2s);
  EXPECT_LT(max_abs_diff(y0, naive(x, p, false)), 1e-12);
  EXPECT_GT(max_abs_diff(y0, y), 1e-3);  // the bias really is added
}

TEST(SketchedLinear, ForwardMatchesNaiveFloat32) {
  at::manual_seed(1);
  Sketch p = make_sketch(2, 3, 33, 17, at::kFloat);
  at::Tensor x = at::randn({5, 33}, at::kFloat);
  at::Tensor y = panther::sketched_linear(x, p.S1s, p.S2s, p.U1s, p.U2s, p.bias);
  EXPECT_EQ(y.scalar_type(), at::kFloat);
  Sketch p64{p.S1s.to(at::kDouble), p.S2s.to(at::kDouble), p.U1s.to(at::kDouble),
             p.U2s.to(at::kDouble), p.bias.to(at::kDouble)};
  EXPECT_LT(max_abs_diff(y, naive(x.to(at::kDouble), p64)), 1e-4);
}

TEST(SketchedLinear, NonContiguousAndOneDimensionalInput) {
  at::manual_seed(2);
  Sketch p = make_sketch(2, 4, 6, 5, at::kDouble);
  at::Tensor x = at::randn({6, 8}, at::kDouble).t();  // (8, 6), non-contiguous
  ASSERT_FALSE(x.is_contiguous());
  EXPECT_LT(max_abs_diff(panther::sketched_linear(x, p.S1s, p.S2s, p.U1s, p.U2s, p.bias), naive(x, p)), 1e-12);
  at::Tensor v = at::randn({6}, at::kDouble);
  at::Tensor yv = panther::sketched_linear(v, p.S1s, p.S2s, p.U1s, p.U2s, p.bias);
  ASSERT_EQ(yv.sizes(), (std::vector<int64_t>{5}));
  EXPECT_LT(max_abs_diff(yv, naive(v, p)), 1e-12);
}

TEST(SketchedLinear, EmptyInput) {
  Sketch p = make_sketch(2, 4, 6, 5, at::kFloat);
  at::Tensor y = panther::sketched_linear(at::empty({0, 6}), p.S1s, p.S2s, p.U1s, p.U2s, p.bias);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{0, 5}));
}

TEST(SketchedLinear, BackwardMatchesNaiveAutograd) {
  at::manual_seed(3);
  Sketch p = make_sketch(3, 4, 9, 6, at::kDouble);
  at::Tensor x = at::randn({2, 5, 9}, at::kDouble);
  at::Tensor g = at::randn({2, 5, 6}, at::kDouble);
  auto leaves = [&]() {
    return std::vector<at::Tensor>{x.clone().requires_grad_(), p.S1s.clone().requires_grad_(),
                                   p.S2s.clone().requires_grad_(), p.U1s.clone().requires_grad_(),
                                   p.U2s.clone().requires_grad_(), p.bias.clone().requires_grad_()};
  };
  auto a = leaves();
  at::Tensor y = panther::sketched_linear(a[0], a[1], a[2], a[3], a[4], a[5]);
  ASSERT_TRUE(y.requires_grad());
  auto ga = torch::autograd::grad({y}, a, {g});

  auto b = leaves();
  at::Tensor yr = naive(b[0], Sketch{b[1], b[2], b[3], b[4], b[5]});
  auto gb = torch::autograd::grad({yr}, b, {g});
  const char* names[] = {"input", "S1s", "S2s", "U1s", "U2s", "bias"};
  for (size_t i = 0; i < 6; ++i) {
    ASSERT_TRUE(ga[i].defined()) << names[i];
    EXPECT_EQ(ga[i].sizes(), a[i].sizes()) << names[i];
    EXPECT_LT(max_abs_diff(ga[i], gb[i]), 1e-10) << names[i];
  }
}

TEST(SketchedLinear, BackwardMatchesFiniteDifferences) {
  // Central differences of sum(y * g) in a few random directions, for x, S1s, S2s and bias.
  at::manual_seed(4);
  Sketch p = make_sketch(2, 3, 5, 4, at::kDouble);
  at::Tensor x = at::randn({3, 5}, at::kDouble);
  at::Tensor g = at::randn({3, 4}, at::kDouble);
  std::vector<at::Tensor> args{x, p.S1s, p.S2s, p.bias};
  std::vector<at::Tensor> leaves;
  for (auto& t : args) leaves.push_back(t.clone().requires_grad_());
  at::Tensor y = panther::sketched_linear(leaves[0], leaves[1], leaves[2], p.U1s, p.U2s, leaves[3]);
  auto grads = torch::autograd::grad({(y * g).sum()}, leaves);
  auto f = [&](const std::vector<at::Tensor>& v) {
    return (panther::sketched_linear(v[0], v[1], v[2], p.U1s, p.U2s, v[3]) * g).sum().item<double>();
  };
  const double h = 1e-6;
  for (size_t i = 0; i < args.size(); ++i) {
    at::Tensor d = at::randn_like(args[i]);
    auto plus = args, minus = args;
    plus[i] = args[i] + h * d;
    minus[i] = args[i] - h * d;
    const double fd = (f(plus) - f(minus)) / (2 * h);
    const double an = (grads[i] * d).sum().item<double>();
    EXPECT_NEAR(fd, an, 1e-6 * (1 + std::abs(an))) << "argument " << i;
  }
}

TEST(SketchedLinear, BackwardOnlyWhereNeeded) {
  Sketch p = make_sketch(2, 3, 5, 4, at::kFloat);
  at::Tensor x = at::randn({3, 5}).requires_grad_();
  at::Tensor S1 = p.S1s.clone().requires_grad_();
  panther::sketched_linear(x, S1, p.S2s, p.U1s, p.U2s, p.bias).sum().backward();
  EXPECT_TRUE(x.grad().defined());
  EXPECT_TRUE(S1.grad().defined());
  EXPECT_FALSE(p.S2s.grad().defined());
  // No grad mode: the result is not part of a graph.
  at::NoGradGuard ng;
  EXPECT_FALSE(panther::sketched_linear(x, S1, p.S2s, p.U1s, p.U2s, p.bias).requires_grad());
}

TEST(SketchedLinear, ErrorsNameTheArgument) {
  Sketch p = make_sketch(2, 3, 5, 4, at::kFloat);
  at::Tensor x = at::randn({3, 5});
  expect_error([&] { panther::sketched_linear(at::randn({3, 6}), p.S1s, p.S2s, p.U1s, p.U2s, p.bias); },
               {"panther::sketched_linear", "input", "d_in=5", "got 6"});
  expect_error([&] { panther::sketched_linear(x, p.S1s, at::randn({2, 4, 4}), p.U1s, p.U2s, p.bias); },
               {"S2s", "(2, 3, 4)"});
  expect_error([&] { panther::sketched_linear(x, p.S1s, p.S2s, at::randn({2, 3, 5}), p.U2s, p.bias); },
               {"U1s"});
  expect_error([&] { panther::sketched_linear(x, p.S1s, p.S2s, p.U1s, at::randn({1, 5, 3}), p.bias); },
               {"U2s"});
  expect_error([&] { panther::sketched_linear(x, p.S1s, p.S2s, p.U1s, p.U2s, at::randn({5})); },
               {"bias"});
  expect_error([&] { panther::sketched_linear(x, p.S1s.to(at::kDouble), p.S2s, p.U1s, p.U2s, p.bias); },
               {"S1s", "dtype"});
  expect_error([&] { panther::sketched_linear(at::randn({}), p.S1s, p.S2s, p.U1s, p.U2s, p.bias); },
               {"input", "0-d"});
  expect_error([&] { panther::sketched_linear(x, at::randn({5, 3}), p.S2s, p.U1s, p.U2s, p.bias); },
               {"S1s", "3-d"});
}

// Restores the autocast state of the CPU whatever the test does.
struct CpuAutocast {
  explicit CpuAutocast(at::ScalarType dt) {
    prev_dtype = at::autocast::get_autocast_dtype(at::kCPU);
    at::autocast::set_autocast_dtype(at::kCPU, dt);
    at::autocast::set_autocast_enabled(at::kCPU, true);
  }
  ~CpuAutocast() {
    at::autocast::set_autocast_enabled(at::kCPU, false);
    at::autocast::set_autocast_dtype(at::kCPU, prev_dtype);
    at::autocast::clear_cache();
  }
  at::ScalarType prev_dtype;
};

TEST(SketchedLinear, AutocastCpuRunsInBFloat16) {
  at::manual_seed(5);
  Sketch p = make_sketch(2, 8, 32, 16, at::kFloat);
  at::Tensor x = at::randn({4, 32});
  at::Tensor ref = panther::sketched_linear(x, p.S1s, p.S2s, p.U1s, p.U2s, p.bias);
  at::Tensor y;
  {
    CpuAutocast ac(at::kBFloat16);
    y = panther::sketched_linear(x, p.S1s, p.S2s, p.U1s, p.U2s, p.bias);
    // float64 is left alone, as aten::linear does under autocast.
    at::Tensor y64 = panther::sketched_linear(x.to(at::kDouble), p.S1s.to(at::kDouble), p.S2s.to(at::kDouble),
                                              p.U1s.to(at::kDouble), p.U2s.to(at::kDouble),
                                              p.bias.to(at::kDouble));
    EXPECT_EQ(y64.scalar_type(), at::kDouble);
  }
  EXPECT_FALSE(at::autocast::is_autocast_enabled(at::kCPU));
  EXPECT_EQ(y.scalar_type(), at::kBFloat16);
  // bf16 rounding of the inputs: relative error of a few 2^-8.
  const double rel = max_abs_diff(y, ref) / ref.abs().max().item<double>();
  EXPECT_LT(rel, 5e-2);
  // And the bf16 autocast result has gradients in fp32 for fp32 leaves.
  at::Tensor S1 = p.S1s.clone().requires_grad_();
  {
    CpuAutocast ac(at::kBFloat16);
    panther::sketched_linear(x, S1, p.S2s, p.U1s, p.U2s, p.bias).to(at::kFloat).sum().backward();
  }
  ASSERT_TRUE(S1.grad().defined());
  EXPECT_EQ(S1.grad().scalar_type(), at::kFloat);
}

TEST(SketchedLinear, BuiltWithTorch) {
  // The library was built against the torch these headers belong to (same major.minor).
  const std::string want = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + ".";
  EXPECT_EQ(std::string(panther::built_with_torch()).rfind(want, 0), 0u) << panther::built_with_torch();
}

}  // namespace
