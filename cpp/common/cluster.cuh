// Thread block clusters (sm_90) for the hand-written kernels, the same code on the GPU and in the
// CPU emulator (tests/emu/cuda_emu.h): the block's rank in its cluster, the cluster barrier, and
// a pointer into another block's shared memory (distributed shared memory). Launch with
// PANTHER_LAUNCH_CLUSTER(kernel, grid, block, cluster_x, smem, args...): clusters of cluster_x
// blocks along x (grid.x a multiple of it), on the current stream.
//
// Memory order: cluster_sync() is a release/acquire barrier over the cluster's shared memory
// (barrier.cluster.arrive.release / wait.acquire), so what a block wrote to its shared memory
// before it is visible to every block of the cluster after it. A block must not exit while
// another may still read its shared memory: end with cluster_sync() after the last remote read.
#pragma once
#include "common/device.cuh"
#include "common/launch.cuh"

#ifndef PANTHER_CUDA_EMU
#include <cooperative_groups.h>
#endif

// Device code for architectures below 9.0 (a build for several, say "8.0;9.0") has no clusters:
// there the functions below act as for a cluster of one block. Kernels that use them are
// launched only on devices of compute capability 9.0 or newer.
#if !defined(PANTHER_CUDA_EMU) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PANTHER_CLUSTERS 1
#else
#define PANTHER_CLUSTERS 0
#endif

namespace panther::cluster {

__device__ __forceinline__ unsigned rank() {
#ifdef PANTHER_CUDA_EMU
  return ::emu::cluster_rank();
#elif PANTHER_CLUSTERS
  return cooperative_groups::this_cluster().block_rank();
#else
  return 0;
#endif
}

__device__ __forceinline__ unsigned size() {
#ifdef PANTHER_CUDA_EMU
  return ::emu::cluster_size();
#elif PANTHER_CLUSTERS
  return cooperative_groups::this_cluster().num_blocks();
#else
  return 1;
#endif
}

__device__ __forceinline__ void sync() {
#ifdef PANTHER_CUDA_EMU
  ::emu::cluster_sync();
#elif PANTHER_CLUSTERS
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();
#endif
}

// The address in block `r`'s shared memory of what `p` addresses in the caller's.
template <class T>
__device__ __forceinline__ T* map(T* p, unsigned r) {
#ifdef PANTHER_CUDA_EMU
  return ::emu::map_shared_rank(p, r);
#elif PANTHER_CLUSTERS
  return cooperative_groups::this_cluster().map_shared_rank(p, r);
#else
  (void)r;
  return p;
#endif
}

}  // namespace panther::cluster

#ifdef PANTHER_CUDA_EMU
#define PANTHER_LAUNCH_CLUSTER(kernel, grid, block, cluster_x, smem, ...) \
  ::emu::launch_cluster(kernel, grid, block, cluster_x, smem, __VA_ARGS__)
#else
// As PANTHER_LAUNCH, through cudaLaunchKernelEx with the cluster dimension attribute.
#define PANTHER_LAUNCH_CLUSTER(kernel, grid, block, cluster_x, smem, ...)                     \
  do {                                                                                        \
    cudaLaunchAttribute panther_cluster = {};                                                 \
    panther_cluster.id = cudaLaunchAttributeClusterDimension;                                 \
    panther_cluster.val.clusterDim.x = (cluster_x);                                           \
    panther_cluster.val.clusterDim.y = 1;                                                     \
    panther_cluster.val.clusterDim.z = 1;                                                     \
    PANTHER_LAUNCH_WITH(kernel, grid, block, smem, panther_cluster, __VA_ARGS__);             \
  } while (0)
#endif
