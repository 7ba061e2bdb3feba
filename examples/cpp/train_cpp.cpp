// Trains a small model built from Panther's C++ API, entirely in C++: two panther::nn::SKLinear
// layers with a ReLU, torch::optim::Adam, on a synthetic regression task (targets from a fixed
// random teacher network). Backward runs through the dispatcher's Autograd kernel of
// panther::sketched_linear, exactly as in Python.
//
//   panther_train_cpp [steps]
//
// Prints the loss every few steps; exits 0 when the final loss is below half the initial one.
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>

#include "panther/nn.h"

namespace {

// x (batch, 32) -> SKLinear(32, 64) -> ReLU -> SKLinear(64, 8) -> (batch, 8)
struct SketchedMLPImpl : torch::nn::Module {
  SketchedMLPImpl(int64_t d_in, int64_t hidden, int64_t d_out)
      : fc1(register_module("fc1", panther::nn::SKLinear(d_in, hidden, /*num_terms=*/2, /*low_rank=*/8))),
        fc2(register_module("fc2", panther::nn::SKLinear(hidden, d_out, /*num_terms=*/2, /*low_rank=*/4))) {}
  at::Tensor forward(const at::Tensor& x) { return fc2(torch::relu(fc1(x))); }
  panther::nn::SKLinear fc1, fc2;
};
TORCH_MODULE(SketchedMLP);

}  // namespace

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 200;
  torch::manual_seed(0);
  const int64_t d_in = 32, hidden = 64, d_out = 8, n = 512;

  // Synthetic task: a fixed random teacher MLP plus a little noise.
  torch::nn::Sequential teacher(torch::nn::Linear(d_in, 32), torch::nn::Functional(torch::tanh),
                                torch::nn::Linear(32, d_out));
  at::Tensor x = torch::randn({n, d_in});
  at::Tensor y;
  {
    torch::NoGradGuard ng;
    y = teacher->forward(x) + 0.01 * torch::randn({n, d_out});
  }

  SketchedMLP model(d_in, hidden, d_out);
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(3e-3));
  double first = 0, last = 0;
  for (int step = 0; step <= steps; ++step) {
    opt.zero_grad();
    at::Tensor loss = torch::mse_loss(model(x), y);
    const double l = loss.item<double>();
    if (step == 0) first = l;
    last = l;
    if (step % 50 == 0 || step == steps) std::printf("step %4d  loss %.5f\n", step, l);
    if (step == steps) break;
    loss.backward();
    opt.step();
  }
  const bool ok = last < 0.5 * first;
  std::printf("%s: loss %.5f -> %.5f (%.1f%% of initial)\n", ok ? "loss fell" : "LOSS DID NOT FALL",
              first, last, 100.0 * last / first);
  return ok ? 0 : 1;
}
