// Runs an AOTInductor package compiled from Python (examples/export_aoti.py) with no Python in
// the process, via torch::inductor::AOTIModelPackageLoader, and checks the output against eager.
//
//   panther_run_aoti DIR      (DIR holds model.pt2 and io.pt)
//
// The compiled model calls Panther's ops through the dispatcher (they are not compiled into the
// package), so libpanther_ops must be loaded in this process: it is linked with --no-as-needed,
// which runs its TORCH_LIBRARY registrations at start-up. Prints "match (...)" or exits 1.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "panther/ops.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: " << argv[0] << " DIR   (DIR from examples/export_aoti.py)\n";
    return 2;
  }
  const std::string dir = argv[1];
  try {
    std::cout << "panther (built with torch " << panther::built_with_torch() << "): loading "
              << dir << "/model.pt2\n";
    torch::inductor::AOTIModelPackageLoader loader(dir + "/model.pt2");
    torch::jit::Module io = torch::jit::load(dir + "/io.pt");
    at::Tensor input = io.attr("input").toTensor();
    at::Tensor expected = io.attr("output").toTensor();
    // The package was compiled for one device; feed the input there (from its metadata).
    const auto meta = loader.get_metadata();
    const auto it = meta.find("AOTI_DEVICE_KEY");
    const std::string device = it != meta.end() ? it->second : "cpu";
    input = input.to(torch::Device(device));

    torch::NoGradGuard no_grad;
    std::vector<at::Tensor> outputs = loader.run({input});
    if (outputs.size() != 1) {
      std::cout << "MISMATCH: expected one output, got " << outputs.size() << "\n";
      return 1;
    }
    at::Tensor out = outputs[0].to(at::kCPU);
    if (out.sizes() != expected.sizes()) {
      std::cout << "MISMATCH: output shape " << out.sizes() << ", Python saved " << expected.sizes() << "\n";
      return 1;
    }
    const double diff = (out - expected).abs().max().item<double>();
    const double tol = device == "cpu" ? 1e-4 : 1e-3;
    if (!(diff <= tol)) {
      std::printf("MISMATCH (max abs diff %.3g > %.1g)\n", diff, tol);
      return 1;
    }
    std::printf("match (max abs diff %.3g vs eager, device %s)\n", diff, device.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
