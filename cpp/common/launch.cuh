// Launches of the hand-written kernels, the same code for real CUDA launches and for the CPU
// emulator (tests/emu): PANTHER_LAUNCH(kernel, grid, block, smem, args...) on the current stream.
// On CUDA it first lets `kernel` use all the dynamic shared memory the device allows, once per
// (launch site, device): the attribute call costs microseconds of host time, which short calls
// feel. A launch site must always launch the same kernel (a local `auto* kernel = &k<T>;` in a
// template is one site per instantiation).
#pragma once
#include <cstdint>
#include <cstdlib>

#ifdef PANTHER_CUDA_EMU
#include "cuda_emu.h"
#define PANTHER_LAUNCH(kernel, grid, block, smem, ...) \
  ::emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#define PANTHER_LAUNCH_DEPENDENT(kernel, grid, block, smem, ...) \
  ::emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <atomic>
// Lets `kernel` use all the dynamic shared memory the device allows, once per (launch site,
// device); PANTHER_LAUNCH and PANTHER_LAUNCH_CLUSTER (common/cluster.cuh) start with it.
#define PANTHER_ALLOW_MAX_SMEM(kernel)                                                        \
  do {                                                                                        \
    static std::atomic<uint64_t> panther_smem_set{0};                                         \
    const int panther_dev = c10::cuda::current_device();                                      \
    const uint64_t panther_bit = uint64_t{1} << (panther_dev & 63);                           \
    if (!(panther_smem_set.load(std::memory_order_acquire) & panther_bit)) {                  \
      C10_CUDA_CHECK(cudaFuncSetAttribute(                                                    \
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,                                \
          static_cast<int>(::panther::max_smem_optin(panther_dev))));                         \
      panther_smem_set.fetch_or(panther_bit, std::memory_order_acq_rel);                      \
    }                                                                                         \
  } while (0)
#define PANTHER_LAUNCH(kernel, grid, block, smem, ...)                                        \
  do {                                                                                        \
    PANTHER_ALLOW_MAX_SMEM(kernel);                                                           \
    kernel<<<grid, block, smem, at::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);             \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                           \
  } while (0)
// cudaLaunchKernelEx of `kernel` on the current stream with one launch attribute `attr` (a
// cudaLaunchAttribute), after PANTHER_ALLOW_MAX_SMEM.
#define PANTHER_LAUNCH_WITH(kernel, grid, block, smem, attr, ...)                             \
  do {                                                                                        \
    PANTHER_ALLOW_MAX_SMEM(kernel);                                                           \
    cudaLaunchConfig_t panther_cfg = {};                                                      \
    panther_cfg.gridDim = (grid);                                                             \
    panther_cfg.blockDim = (block);                                                           \
    panther_cfg.dynamicSmemBytes = (smem);                                                    \
    panther_cfg.stream = at::cuda::getCurrentCUDAStream();                                    \
    cudaLaunchAttribute panther_attr[1] = {(attr)};                                           \
    panther_cfg.attrs = panther_attr;                                                         \
    panther_cfg.numAttrs = 1;                                                                 \
    C10_CUDA_CHECK(cudaLaunchKernelEx(&panther_cfg, kernel, __VA_ARGS__));                    \
  } while (0)
// As PANTHER_LAUNCH, as a programmatic dependent launch (common/device.cuh says what the kernel
// must do) on devices of compute capability 9.0 or newer, unless portable kernels are asked for.
#define PANTHER_LAUNCH_DEPENDENT(kernel, grid, block, smem, ...)                              \
  do {                                                                                        \
    const int panther_pdl_dev = c10::cuda::current_device();                                  \
    if (::panther::device_attribute<cudaDevAttrComputeCapabilityMajor>(panther_pdl_dev) < 9 || \
        ::panther::portable_kernels()) {                                                      \
      PANTHER_LAUNCH(kernel, grid, block, smem, __VA_ARGS__);                                 \
      break;                                                                                  \
    }                                                                                         \
    cudaLaunchAttribute panther_pdl = {};                                                     \
    panther_pdl.id = cudaLaunchAttributeProgrammaticStreamSerialization;                      \
    panther_pdl.val.programmaticStreamSerializationAllowed = 1;                               \
    PANTHER_LAUNCH_WITH(kernel, grid, block, smem, panther_pdl, __VA_ARGS__);                 \
  } while (0)
#endif

namespace panther {

// Whether kernels must take their portable path on GPUs that have a faster architecture-specific
// one (Hopper's bulk copies, see mma.cuh): the environment variable PANTHER_PORTABLE_KERNELS set
// to anything but "" or "0" (Python: panther.set_portable_kernels). Read at every call, so a
// change applies to the next call; code compiled for architectures below 9.0 is portable anyway.
inline bool portable_kernels() {
  const char* e = std::getenv("PANTHER_PORTABLE_KERNELS");
  return e != nullptr && e[0] != '\0' && !(e[0] == '0' && e[1] == '\0');
}

#ifndef PANTHER_CUDA_EMU
// A device attribute, read once per device.
template <cudaDeviceAttr kAttr>
inline int device_attribute(int dev) {
  static std::atomic<int> cache[64] = {};
  int v = dev >= 0 && dev < 64 ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, kAttr, dev));
    if (dev >= 0 && dev < 64) cache[dev].store(v, std::memory_order_relaxed);
  }
  return v;
}
#endif

// Largest dynamic shared memory per block the device allows.
inline int64_t max_smem_optin(int dev) {
#ifdef PANTHER_CUDA_EMU
  (void)dev;
  return 227 * 1024;
#else
  return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(dev);
#endif
}

// Streaming multiprocessors of the device. The CPU emulator reports 1, so its tests see grids
// sized for a small device.
inline int64_t sm_count(int dev) {
#ifdef PANTHER_CUDA_EMU
  (void)dev;
  return 1;
#else
  return device_attribute<cudaDevAttrMultiProcessorCount>(dev);
#endif
}

}  // namespace panther
