// panther._C (nanobind): build information only. Tensors never cross this module; the operators
// are reached through torch.ops.panther.* after the op library is loaded.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

namespace nb = nanobind;

NB_MODULE(_C, m) {
  m.doc() = "Panther build information";
  m.def("build_info", []() {
    nb::dict d;
    d["version"] = PANTHER_VERSION;
    d["torch_version"] = PANTHER_TORCH_VERSION;
    d["torch_cuda_version"] = PANTHER_TORCH_CUDA_VERSION;
    d["cuda_arch_list"] = PANTHER_CUDA_ARCH_LIST;  // TORCH_CUDA_ARCH_LIST of the build, or ""
#ifdef PANTHER_WITH_CUDA
    d["with_cuda"] = true;
#else
    d["with_cuda"] = false;
#endif
    return d;
  });
}
