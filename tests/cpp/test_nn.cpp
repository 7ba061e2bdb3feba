// GoogleTest tests of the C++ module panther::nn::SKLinear: names/shapes of parameters and
// buffers, initialisation, forward vs the dense-weight form, errors, seeding, clone, save/load
// and a few training steps with torch::optim::Adam (backward in C++).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/optim/adam.h>
#include <torch/serialize.h>

#include <cstdio>
#include <set>
#include <sstream>
#include <string>

#include "panther/nn.h"

namespace {

std::set<std::string> keys(const torch::OrderedDict<std::string, at::Tensor>& d) {
  std::set<std::string> out;
  for (const auto& kv : d) out.insert(kv.key());
  return out;
}

TEST(SKLinearModule, ParametersBuffersAndShapes) {
  panther::nn::SKLinear layer(10, 6, /*num_terms=*/3, /*low_rank=*/4);
  EXPECT_EQ(keys(layer->named_parameters()), (std::set<std::string>{"S1s", "S2s", "bias"}));
  EXPECT_EQ(keys(layer->named_buffers()), (std::set<std::string>{"U1s", "U2s"}));
  EXPECT_EQ(layer->S1s.sizes(), (std::vector<int64_t>{3, 10, 4}));
  EXPECT_EQ(layer->S2s.sizes(), (std::vector<int64_t>{3, 4, 6}));
  EXPECT_EQ(layer->U1s.sizes(), (std::vector<int64_t>{3, 4, 6}));
  EXPECT_EQ(layer->U2s.sizes(), (std::vector<int64_t>{3, 10, 4}));
  EXPECT_EQ(layer->bias.sizes(), (std::vector<int64_t>{6}));
  EXPECT_TRUE(layer->S1s.requires_grad());
  EXPECT_FALSE(layer->U1s.requires_grad());
  EXPECT_EQ(layer->S1s.scalar_type(), at::kFloat);
  // Sign buffers: entries exactly +-1/sqrt(k), both signs present.
  EXPECT_TRUE(at::allclose(layer->U1s.abs(), at::full_like(layer->U1s, 0.5)));
  EXPECT_TRUE(at::allclose(layer->U2s.abs(), at::full_like(layer->U2s, 0.5)));
  EXPECT_GT(layer->U2s.gt(0).sum().item<int64_t>(), 0);
  EXPECT_GT(layer->U2s.lt(0).sum().item<int64_t>(), 0);
  std::ostringstream os;
  os << *layer;
  EXPECT_NE(os.str().find("num_terms=3"), std::string::npos) << os.str();

  panther::nn::SKLinear nobias(panther::nn::SKLinearOptions(10, 6, 1, 2).bias(false));
  EXPECT_EQ(keys(nobias->named_parameters()), (std::set<std::string>{"S1s", "S2s"}));
  EXPECT_EQ(nobias->forward(at::randn({2, 10})).sizes(), (std::vector<int64_t>{2, 6}));
}

TEST(SKLinearModule, ForwardEqualsDenseWeightForm) {
  at::manual_seed(0);
  panther::nn::SKLinear layer(panther::nn::SKLinearOptions(12, 7, 2, 3).tensor_options(at::kDouble));
  EXPECT_EQ(layer->S1s.scalar_type(), at::kDouble);
  at::Tensor x = at::randn({2, 4, 12}, at::kDouble);
  at::Tensor y = layer(x);
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{2, 4, 7}));
  at::Tensor ref = at::linear(x, layer->dense_weight(), layer->bias);
  EXPECT_LT((y - ref).abs().max().item<double>(), 1e-12);
}

TEST(SKLinearModule, WInitSketchesTheGivenWeight) {
  // Each term is an unbiased estimate of W^T: averaging many terms approaches W.
  at::manual_seed(1);
  at::Tensor W = at::randn({5, 8}, at::kDouble);
  panther::nn::SKLinear layer(panther::nn::SKLinearOptions(8, 5, 400, 4).tensor_options(at::kDouble), W);
  const double err = (layer->dense_weight() - W).norm().item<double>() / W.norm().item<double>();
  EXPECT_LT(err, 0.25);
  panther::nn::SKLinear one(panther::nn::SKLinearOptions(8, 5, 1, 4).tensor_options(at::kDouble), W);
  const double err1 = (one->dense_weight() - W).norm().item<double>() / W.norm().item<double>();
  EXPECT_LT(err, err1);  // more terms, better estimate
}

TEST(SKLinearModule, Errors) {
  panther::nn::SKLinear layer(10, 6, 2, 3);
  try {
    layer(at::randn({3, 9}));
    ADD_FAILURE() << "expected c10::Error";
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_NE(msg.find("SKLinear"), std::string::npos) << msg;
    EXPECT_NE(msg.find("in_features=10"), std::string::npos) << msg;
    EXPECT_NE(msg.find("got 9"), std::string::npos) << msg;
  }
  EXPECT_THROW(panther::nn::SKLinear(10, 6, 0, 3), c10::Error);
  EXPECT_THROW(panther::nn::SKLinear(10, 6, 2, -1), c10::Error);
  EXPECT_THROW(panther::nn::SKLinear(panther::nn::SKLinearOptions(10, 6, 2, 3), at::randn({10, 6})),
               c10::Error);
}

TEST(SKLinearModule, SeedReproducesAndCloneIsIndependent) {
  at::manual_seed(7);
  panther::nn::SKLinear a(9, 4, 2, 3);
  at::manual_seed(7);
  panther::nn::SKLinear b(9, 4, 2, 3);
  panther::nn::SKLinear c(9, 4, 2, 3);  // next draws: different
  EXPECT_TRUE(at::equal(a->S1s, b->S1s));
  EXPECT_TRUE(at::equal(a->U2s, b->U2s));
  EXPECT_TRUE(at::equal(a->bias, b->bias));
  EXPECT_FALSE(at::equal(a->S1s, c->S1s));

  auto copy = std::dynamic_pointer_cast<panther::nn::SKLinearImpl>(a->clone());
  ASSERT_TRUE(copy);
  EXPECT_TRUE(at::equal(copy->S1s, a->S1s));
  EXPECT_TRUE(at::equal(copy->U1s, a->U1s));
  {
    at::NoGradGuard ng;
    copy->S1s.add_(1.0);
  }
  EXPECT_FALSE(at::equal(copy->S1s, a->S1s));
  at::Tensor x = at::randn({3, 9});
  EXPECT_FALSE(at::allclose(copy->forward(x), a->forward(x)));
}

TEST(SKLinearModule, SaveLoadRoundTrip) {
  at::manual_seed(3);
  panther::nn::SKLinear a(9, 4, 2, 3);
  panther::nn::SKLinear b(9, 4, 2, 3);
  const std::string path = ::testing::TempDir() + "panther_sklinear_module.pt";
  torch::save(a, path);
  torch::load(b, path);
  std::remove(path.c_str());
  at::Tensor x = at::randn({5, 9});
  EXPECT_TRUE(at::equal(a(x), b(x)));
}

TEST(SKLinearModule, AdamStepsReduceLoss) {
  at::manual_seed(11);
  panther::nn::SKLinear layer(16, 8, 2, 4);
  at::Tensor x = at::randn({64, 16});
  at::Tensor target = at::randn({64, 8});
  torch::optim::Adam opt(layer->parameters(), torch::optim::AdamOptions(1e-2));
  auto loss_now = [&] { return at::mse_loss(layer(x), target); };
  const double first = loss_now().item<double>();
  for (int step = 0; step < 30; ++step) {
    opt.zero_grad();
    at::Tensor loss = loss_now();
    loss.backward();
    ASSERT_TRUE(layer->S2s.grad().defined());
    ASSERT_FALSE(layer->U1s.grad().defined());  // buffers are not trained
    opt.step();
  }
  EXPECT_LT(loss_now().item<double>(), first);
}

// ---------------------------------------------------------------- RandMultiHeadAttention

bool has_favor_attention() {
  return c10::Dispatcher::singleton().findSchema({"panther::favor_attention", ""}).has_value();
}

TEST(RandMultiHeadAttentionModule, ProjectionIsOrthogonalGaussianBlocks) {
  at::manual_seed(0);
  at::Tensor P = panther::nn::orthogonal_gaussian_projection(20, 8, at::kDouble);
  ASSERT_EQ(P.sizes(), (std::vector<int64_t>{20, 8}));
  // Rows within a block of 8 are orthogonal.
  at::Tensor blk = P.narrow(0, 0, 8);
  at::Tensor G = at::matmul(blk, blk.t());
  EXPECT_LT((G - at::diag(at::diag(G))).abs().max().item<double>(), 1e-10);
}

TEST(RandMultiHeadAttentionModule, ParametersAndShapes) {
  at::manual_seed(0);
  panther::nn::RandMultiHeadAttention attn(16, 4, 12);
  EXPECT_EQ(keys(attn->named_parameters()),
            (std::set<std::string>{"Wq", "Wk", "Wv", "W0", "bq", "bk", "bv", "b0"}));
  EXPECT_EQ(keys(attn->named_buffers()), (std::set<std::string>{"projection_matrix"}));
  EXPECT_EQ(attn->projection_matrix.sizes(), (std::vector<int64_t>{12, 4}));
  EXPECT_EQ(attn->Wq.sizes(), (std::vector<int64_t>{16, 16}));
  EXPECT_THROW(panther::nn::RandMultiHeadAttention(15, 4, 12), c10::Error);
  EXPECT_THROW(panther::nn::RandMultiHeadAttention(
                   panther::nn::RandMultiHeadAttentionOptions(16, 4, 12).kernel_fn("cosine")),
               c10::Error);
}

TEST(RandMultiHeadAttentionModule, ForwardBackwardThroughTheOp) {
  if (!has_favor_attention()) GTEST_SKIP() << "panther::favor_attention is not in this build";
  at::manual_seed(1);
  const int64_t B = 2, L = 7, E = 16, H = 2, M = 4096;
  panther::nn::RandMultiHeadAttention attn(
      panther::nn::RandMultiHeadAttentionOptions(E, H, M).tensor_options(at::kDouble));
  at::Tensor x = 0.3 * at::randn({B, L, E}, at::kDouble);
  at::Tensor y = attn(x, x, x);
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{B, L, E}));
  // Many random features: close to exact softmax attention with the same projections.
  auto heads = [&](const at::Tensor& W, const at::Tensor& b) {
    return at::linear(x, W, b).view({B, L, H, E / H}).transpose(1, 2);
  };
  at::Tensor q = heads(attn->Wq, attn->bq), k = heads(attn->Wk, attn->bk), v = heads(attn->Wv, attn->bv);
  at::Tensor p = at::softmax(at::matmul(q, k.transpose(-2, -1)) / std::sqrt(double(E / H)), -1);
  at::Tensor exact = at::linear(at::matmul(p, v).transpose(1, 2).reshape({B, L, E}), attn->W0, attn->b0);
  const double rel = (y - exact).norm().item<double>() / exact.norm().item<double>();
  EXPECT_LT(rel, 0.1);
  // Causal: the first position sees only itself.
  at::Tensor yc = attn(x, x, x, std::nullopt, /*causal=*/true);
  at::Tensor first = at::linear(v.narrow(2, 0, 1).transpose(1, 2).reshape({B, 1, E}), attn->W0, attn->b0);
  EXPECT_LT((yc.narrow(1, 0, 1) - first).abs().max().item<double>(), 1e-8);
  // Backward in C++ reaches every weight.
  y.square().sum().backward();
  for (const auto& kv : attn->named_parameters()) {
    ASSERT_TRUE(kv.value().grad().defined()) << kv.key();
    EXPECT_GT(kv.value().grad().abs().sum().item<double>(), 0.0) << kv.key();
  }
}

TEST(RandMultiHeadAttentionModule, ForwardWithoutTheOpThrowsNamingIt) {
  if (has_favor_attention()) GTEST_SKIP() << "panther::favor_attention is in this build";
  panther::nn::RandMultiHeadAttention attn(16, 4, 12);
  at::Tensor x = at::randn({1, 3, 16});
  try {
    attn(x, x, x);
    ADD_FAILURE() << "expected c10::Error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("favor_attention"), std::string::npos);
  }
}

}  // namespace
