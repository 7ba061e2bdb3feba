// Runs a TorchScript model saved from Python (examples/export_torchscript.py) with no Python in
// the process, and checks its output against the one Python saved.
//
//   panther_run_torchscript DIR [cpu|cuda]     (DIR holds model.pt and io.pt)
//
// Prints "match (max abs diff ...)" and exits 0, or "MISMATCH ..." and exits 1.
// The model calls panther::sketched_linear (and panther::favor_attention when the model has
// attention): this program links libpanther_ops with --no-as-needed so that the library's
// TORCH_LIBRARY registrations run at start-up, before torch::jit::load resolves the ops.
#include <torch/script.h>

#include <cstdio>
#include <iostream>
#include <string>

#include "panther/ops.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: " << argv[0] << " DIR [cpu|cuda]   (DIR from examples/export_torchscript.py)\n";
    return 2;
  }
  const std::string dir = argv[1];
  const torch::Device device(argc > 2 ? argv[2] : "cpu");
  try {
    std::cout << "panther (built with torch " << panther::built_with_torch() << "): loading "
              << dir << "/model.pt\n";
    torch::jit::Module model = torch::jit::load(dir + "/model.pt", device);
    model.eval();
    torch::jit::Module io = torch::jit::load(dir + "/io.pt");
    at::Tensor input = io.attr("input").toTensor().to(device);
    at::Tensor expected = io.attr("output").toTensor();

    torch::NoGradGuard no_grad;
    at::Tensor out = model.forward({input}).toTensor().to(at::kCPU);
    if (out.sizes() != expected.sizes()) {
      std::cout << "MISMATCH: output shape " << out.sizes() << ", Python saved " << expected.sizes() << "\n";
      return 1;
    }
    const double diff = (out - expected).abs().max().item<double>();
    const double tol = device.is_cuda() ? 1e-3 : 1e-5;
    if (!(diff <= tol)) {
      std::printf("MISMATCH (max abs diff %.3g > %.1g)\n", diff, tol);
      return 1;
    }
    std::printf("match (max abs diff %.3g, output shape [%ld, %ld, %ld], device %s)\n", diff,
                static_cast<long>(out.size(0)), static_cast<long>(out.size(1)),
                static_cast<long>(out.size(2)), device.str().c_str());
    return 0;
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return 1;
  }
}
