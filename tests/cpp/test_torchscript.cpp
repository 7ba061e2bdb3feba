// GoogleTest tests of loading, in C++, the TorchScript model written by
// examples/export_torchscript.py (directory $PANTHER_DEPLOY_DIR/ts, made by the ctest fixture
// export_torchscript): it uses Panther's ops, matches Python's output, and trains (backward in C++).
// Also: the C++ modules draw the same parameters as the Python layers from the same seed
// (reference written by write_reference_modules.py).
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/optim/adam.h>
#include <torch/script.h>

#include <cstdlib>
#include <string>

#include "panther/nn.h"

namespace {

std::string model_dir() {
  const char* d = std::getenv("PANTHER_DEPLOY_DIR");
  return std::string(d ? d : "deploy-artifacts") + "/ts";
}

TEST(TorchScriptModel, OpsAreRegistered) {
  // Registered by linking libpanther_ops (no Python, no load_library).
  auto op = c10::Dispatcher::singleton().findSchema({"panther::sketched_linear", ""});
  EXPECT_TRUE(op.has_value());
}

TEST(TorchScriptModel, LoadsAndMatchesPython) {
  torch::jit::Module model = torch::jit::load(model_dir() + "/model.pt");
  model.eval();
  torch::jit::Module io = torch::jit::load(model_dir() + "/io.pt");
  at::Tensor x = io.attr("input").toTensor();
  at::Tensor expected = io.attr("output").toTensor();
  // The graph really calls Panther's op (not a traced dense copy).
  bool uses_panther = false;
  for (const auto& sub : model.modules()) {
    if (!sub.find_method("forward")) continue;
    const auto g = sub.get_method("forward").graph()->toString();
    if (g.find("panther::sketched_linear") != std::string::npos) uses_panther = true;
  }
  EXPECT_TRUE(uses_panther);
  at::NoGradGuard ng;
  at::Tensor y = model.forward({x}).toTensor();
  ASSERT_EQ(y.sizes(), expected.sizes());
  EXPECT_LT((y - expected).abs().max().item<double>(), 1e-5);
}

TEST(TorchScriptModel, TrainsInCpp) {
  // Backward through the loaded scripted model: gradients reach every sketch parameter, and a few
  // Adam steps fit a fixed target better than the start.
  torch::jit::Module model = torch::jit::load(model_dir() + "/model.pt");
  model.train();
  torch::jit::Module io = torch::jit::load(model_dir() + "/io.pt");
  at::Tensor x = io.attr("input").toTensor();
  at::manual_seed(0);
  at::Tensor target = at::randn_like(io.attr("output").toTensor());
  std::vector<at::Tensor> params;
  for (const auto& p : model.named_parameters()) params.push_back(p.value);
  ASSERT_FALSE(params.empty());
  torch::optim::Adam opt(params, torch::optim::AdamOptions(1e-2));
  auto loss_now = [&] { return at::mse_loss(model.forward({x}).toTensor(), target); };
  const double first = loss_now().item<double>();
  for (int step = 0; step < 20; ++step) {
    opt.zero_grad();
    at::Tensor loss = loss_now();
    loss.backward();
    if (step == 0) {
      int sketch_grads = 0;
      for (const auto& p : model.named_parameters()) {
        if (p.name.find("S1s") != std::string::npos || p.name.find("S2s") != std::string::npos) {
          ASSERT_TRUE(p.value.grad().defined()) << p.name;
          EXPECT_TRUE(p.value.grad().isfinite().all().item<bool>()) << p.name;
          ++sketch_grads;
        }
      }
      EXPECT_GE(sketch_grads, 4);  // ff1 and ff2: S1s, S2s each
    }
    opt.step();
  }
  EXPECT_LT(loss_now().item<double>(), first);
}

TEST(TorchScriptModel, CppModulesDrawLikePython) {
  torch::jit::Module ref = torch::jit::load(model_dir() + "/reference_modules.pt");
  at::manual_seed(123);
  panther::nn::SKLinear lin(12, 7, /*num_terms=*/2, /*low_rank=*/3);
  int compared = 0;
  for (const auto& kv : lin->named_parameters()) {
    EXPECT_TRUE(at::allclose(kv.value(), ref.attr("sklinear_" + kv.key()).toTensor(), 1e-6, 1e-7)) << kv.key();
    ++compared;
  }
  for (const auto& kv : lin->named_buffers()) {
    EXPECT_TRUE(at::equal(kv.value(), ref.attr("sklinear_" + kv.key()).toTensor())) << kv.key();
    ++compared;
  }
  EXPECT_EQ(compared, 5);
  if (!ref.hasattr("attention_Wq")) GTEST_SKIP() << "this Panther build has no RandMultiHeadAttention";
  at::manual_seed(123);
  panther::nn::RandMultiHeadAttention attn(16, 4, 12);
  for (const auto& kv : attn->named_parameters()) {
    EXPECT_TRUE(at::allclose(kv.value(), ref.attr("attention_" + kv.key()).toTensor(), 1e-6, 1e-7)) << kv.key();
  }
  EXPECT_TRUE(at::allclose(attn->projection_matrix, ref.attr("attention_projection_matrix").toTensor(), 1e-5, 1e-6));
}

}  // namespace
