// cuda_emu.h -- run hand-written CUDA kernels on the CPU for unit tests.
//
// Include this header *first*; a kernel header guarded with
//   #ifdef PANTHER_CUDA_EMU  #include "cuda_emu.h"  #else <cuda_bf16.h> ... #endif
// then compiles unchanged as host C++ (g++ >= 12, -std=c++20 -pthread,
// -I<torch>/include for the header-only c10 BFloat16/Half).
//
// Execution model: emu::launch runs the blocks of a grid one after another; each
// block gets one std::thread per CUDA thread, so __syncthreads, warp shuffles and
// shared memory behave as on the GPU (modulo the caveats below).
//
// Caveats a kernel author must respect (most are CUDA rules anyway):
//  * Warp-collective calls (__shfl_*_sync, __ballot_sync/__any_sync/__all_sync,
//    __syncwarp, wmma::load_matrix_sync/store_matrix_sync) must be reached by
//    every live lane of the warp, in the same order; `mask` is ignored. A lane
//    that skips one deadlocks the test (CUDA: undefined behaviour).
//  * Threads that *return* are removed from their block/warp barriers, like
//    exited threads on sm_70+. Shuffling with an exited lane reads a stale value.
//  * Dynamic shared memory only, declared inside the kernel body with
//    PANTHER_DYNAMIC_SMEM(name). `__shared__` is deliberately left undefined so
//    static shared arrays fail to compile instead of silently becoming per-thread.
//    The buffer is 128-byte aligned, filled with 0xFF (NaN for float/bf16/half)
//    and followed by a guard zone that is checked after the block (overflow ->
//    exception from launch).
//  * wmma: only m16n16k16; every thread holds the whole tile, in row-major order
//    (x[r*cols + c]); the thread <-> element mapping of real hardware is NOT
//    emulated, so code that relies on which element of frag.x a lane owns is not
//    portable (element-wise ops over all num_elements are fine). num_elements is
//    256 here, not 8. Pointer (32 B) and ldm (multiple of 16 B) requirements are
//    checked and throw std::invalid_argument.
//  * PTX-level warp MMA (cpp/common/mma.cuh: mma.sync m16n8k16, ldmatrix, cp.async) is
//    emulated there on top of emu::warp_allgather, WITH the hardware's lane <-> element
//    mapping; its ldmatrix/mma calls are warp collectives like those above.
//  * __CUDA_ARCH__ is not defined; intrinsics such as __expf are exact libm calls.
//  * Blocks run sequentially: inter-block communication other than via atomics
//    (e.g. spin-waiting on another block) deadlocks. Thread block clusters (sm_90,
//    emu::launch_cluster) are the exception: the blocks of one cluster run at once,
//    with a cluster barrier (emu::cluster_sync) and each other's shared memory
//    (emu::map_shared_rank), as cooperative_groups::this_cluster() gives on the GPU;
//    clusters still run one after another.
#pragma once

#ifndef PANTHER_CUDA_EMU
#define PANTHER_CUDA_EMU 1
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <bit>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <exception>
#include <math.h>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// ---- qualifiers ------------------------------------------------------------
#define __global__
#define __device__
#define __host__
// nvcc defines it as `__inline__ __attribute__((always_inline))`; `inline` keeps
// header-defined helpers ODR-safe when several test TUs include the kernel.
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
// Dropped: restrict promises are per-thread and buy nothing in a test build.
#define __restrict__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define PANTHER_DYNAMIC_SMEM(name) unsigned char* const name = ::emu::block_smem()

// ---- built-in types and variables -----------------------------------------
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// Per emulated thread, set by emu::launch before the kernel runs.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

using __nv_bfloat16 = c10::BFloat16;
using __half = c10::Half;

namespace emu {

#ifndef EMU_MAX_DYNAMIC_SMEM
#define EMU_MAX_DYNAMIC_SMEM (227 * 1024)  // sm_90 opt-in maximum per block
#endif
inline constexpr size_t kSmemAlign = 128, kSmemGuard = 256;
inline constexpr unsigned char kSmemFill = 0xFF, kGuardFill = 0xA5;

struct Warp {
  explicit Warp(ptrdiff_t n) : bar(n) {}
  std::barrier<> bar;
  // Double-buffered exchange slots: shuffle #i uses buffer i&1, so one barrier
  // per shuffle suffices -- a lane can only overwrite buffer i&1 again (shuffle
  // i+2) after every lane passed shuffle i+1's barrier, i.e. finished reading i.
  uint64_t slot[2][32] = {};  // lanes missing from a partial last warp read as 0
};

struct Block {
  Block(unsigned nthreads, size_t smem_bytes)
      : bar(nthreads), smem_bytes(smem_bytes),
        smem(static_cast<unsigned char*>(::operator new(smem_bytes + kSmemGuard, std::align_val_t{kSmemAlign}))) {
    std::memset(smem, kSmemFill, smem_bytes);
    std::memset(smem + smem_bytes, kGuardFill, kSmemGuard);
    for (unsigned w = 0; w * 32 < nthreads; ++w) warps.emplace_back(std::min(32u, nthreads - w * 32));
  }
  ~Block() { ::operator delete(smem, std::align_val_t{kSmemAlign}); }
  bool guard_intact() const {
    for (size_t i = 0; i < kSmemGuard; ++i)
      if (smem[smem_bytes + i] != kGuardFill) return false;
    return true;
  }
  std::barrier<> bar;
  std::deque<Warp> warps;  // deque: std::barrier is immovable
  size_t smem_bytes;
  unsigned char* smem;
};

// The blocks of one thread block cluster, running together.
struct Cluster {
  explicit Cluster(ptrdiff_t nthreads) : bar(nthreads) {}
  std::barrier<> bar;  // every thread of every block of the cluster
  std::vector<Block*> blocks;
};

struct ThreadCtx {
  Block* block = nullptr;
  Warp* warp = nullptr;
  unsigned lane = 0;
  unsigned shfl_count = 0;  // selects the slot buffer, identical across a warp
  Cluster* cluster = nullptr;
  unsigned rank = 0;  // the block's rank in its cluster
};
inline thread_local ThreadCtx tctx;

inline ThreadCtx& ctx() {
  if (!tctx.block) throw std::logic_error("cuda_emu: device function called outside emu::launch");
  return tctx;
}
inline unsigned char* block_smem() { return ctx().block->smem; }

// Cluster of the calling block (emu::launch_cluster; a plain launch is a cluster of one block).
inline void cluster_sync() { ctx().cluster->bar.arrive_and_wait(); }
inline unsigned cluster_rank() { return ctx().rank; }
inline unsigned cluster_size() { return static_cast<unsigned>(ctx().cluster->blocks.size()); }
// The address in block `rank`'s shared memory that corresponds to `p` in the caller's (p must
// lie in the caller's dynamic shared memory, as for mapa / map_shared_rank on the GPU).
template <class T>
T* map_shared_rank(T* p, unsigned rank) {
  ThreadCtx& c = ctx();
  const Block& own = *c.block;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), s = reinterpret_cast<uintptr_t>(own.smem);
  if (a < s || a - s >= own.smem_bytes)
    throw std::invalid_argument("emu::map_shared_rank: pointer outside the block's shared memory");
  if (rank >= c.cluster->blocks.size())
    throw std::invalid_argument("emu::map_shared_rank: rank outside the cluster");
  return reinterpret_cast<T*>(c.cluster->blocks[rank]->smem + (a - s));
}
inline void warp_barrier() { ctx().warp->bar.arrive_and_wait(); }
inline unsigned lane_id() { return ctx().lane; }

// All lanes publish `bits`; returns the whole warp's slot row (valid until the
// warp's next-but-one exchange).
inline const uint64_t* warp_exchange(uint64_t bits) {
  ThreadCtx& c = ctx();
  uint64_t* row = c.warp->slot[c.shfl_count++ & 1];
  row[c.lane] = bits;
  c.warp->bar.arrive_and_wait();  // barrier = release/acquire for the slots
  return row;
}

template <class T>
concept Shufflable = std::is_trivially_copyable_v<T> && sizeof(T) <= 8;

template <Shufflable T>
T shuffle_from(T v, int src_lane) {  // src_lane < 0: keep own value
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  const uint64_t* row = warp_exchange(bits);
  if (src_lane < 0) return v;
  T out;
  std::memcpy(&out, &row[src_lane], sizeof(T));
  return out;
}

// Every lane publishes `v` (any trivially copyable type: a pointer, a uint4, a struct of
// registers); returns all 32 lanes' values. One warp_exchange (= one warp barrier) per 8 bytes;
// each slot row is copied out before the next exchange, so the double buffering stays valid.
// Same rules as a shuffle: every live lane calls it, in the same order; lanes missing from a
// partial last warp read as zero bytes, exited lanes as stale values.
template <class T>
  requires std::is_trivially_copyable_v<T> && std::is_default_constructible_v<T>
std::array<T, 32> warp_allgather(const T& v) {
  constexpr size_t kWords = (sizeof(T) + 7) / 8;
  uint64_t mine[kWords] = {}, all[32][kWords];
  std::memcpy(mine, &v, sizeof(T));
  for (size_t w = 0; w < kWords; ++w) {
    const uint64_t* row = warp_exchange(mine[w]);
    for (int l = 0; l < 32; ++l) all[l][w] = row[l];
  }
  std::array<T, 32> out;
  for (int l = 0; l < 32; ++l) std::memcpy(&out[l], all[l], sizeof(T));
  return out;
}

// True if [p, p + n) lies inside the calling block's dynamic shared memory (checks for the
// .shared-only instructions: ldmatrix, cp.async destinations).
inline bool in_block_smem(const void* p, size_t n) {
  const Block& b = *ctx().block;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), s = reinterpret_cast<uintptr_t>(b.smem);
  return a >= s && a - s <= b.smem_bytes && n <= b.smem_bytes - (a - s);
}

// Runs `kernel` on `grid` in clusters of `cluster_x` blocks along x (grid.x a multiple of it):
// the blocks of one cluster at once, the clusters one after another.
template <class... KArgs, class... Args>
void launch_cluster(void (*kernel)(KArgs...), dim3 grid, dim3 block, unsigned cluster_x, size_t smem_bytes,
                    Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "emu::launch: wrong number of kernel arguments");
  const unsigned nthreads = block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || grid.x * grid.y * grid.z == 0)
    throw std::invalid_argument("emu::launch: invalid grid/block dimensions");
  if (cluster_x == 0 || cluster_x > 16 || grid.x % cluster_x != 0)
    throw std::invalid_argument("emu::launch_cluster: the cluster size must divide grid.x (and be 1..16)");
  if (smem_bytes > EMU_MAX_DYNAMIC_SMEM) throw std::invalid_argument("emu::launch: too much dynamic shared memory");
  // Convert once, as cudaLaunchKernel does; each thread then gets its own copy.
  const std::tuple<std::remove_cvref_t<KArgs>...> params(std::forward<Args>(args)...);

  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx0 = 0; bx0 < grid.x; bx0 += cluster_x) {
        std::deque<Block> blks;  // deque: Block holds immovable barriers
        Cluster cl(static_cast<ptrdiff_t>(nthreads) * cluster_x);
        for (unsigned r = 0; r < cluster_x; ++r) cl.blocks.push_back(&blks.emplace_back(nthreads, smem_bytes));
        std::exception_ptr err;
        std::mutex err_mu;
        std::vector<std::thread> threads;
        threads.reserve(static_cast<size_t>(nthreads) * cluster_x);
        for (unsigned r = 0; r < cluster_x; ++r)
          for (unsigned t = 0; t < nthreads; ++t)
            threads.emplace_back([&, r, t] {
              Block& blk = *cl.blocks[r];
              threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
              blockIdx = {bx0 + r, by, bz};
              blockDim = block;
              gridDim = grid;
              tctx = {&blk, &blk.warps[t / 32], t % 32, 0, &cl, r};
              try {
                std::apply(kernel, params);
              } catch (...) {
                std::lock_guard<std::mutex> g(err_mu);
                if (!err) err = std::current_exception();
              }
              // Exited (or failed) threads leave the barriers so the rest of the
              // block does not deadlock -- matches sm_70+ __syncthreads semantics.
              tctx.warp->bar.arrive_and_drop();
              blk.bar.arrive_and_drop();
              cl.bar.arrive_and_drop();
              tctx = {};
            });
        for (auto& th : threads) th.join();
        if (err) std::rethrow_exception(err);
        for (const Block& blk : blks)
          if (!blk.guard_intact()) throw std::runtime_error("emu::launch: write past the end of dynamic shared memory");
      }
}

template <class... KArgs, class... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Args&&... args) {
  launch_cluster(kernel, grid, block, 1, smem_bytes, std::forward<Args>(args)...);
}

}  // namespace emu

// ---- synchronisation, warp intrinsics ----------------------------------------
inline void __syncthreads() { emu::ctx().block->bar.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned __activemask() { return 0xffffffffu; }

// Width semantics follow the CUDA guide: lanes are split into groups of `width`;
// a source outside the caller's group (later group for xor/down, earlier for up)
// yields the caller's own value.
template <emu::Shufflable T>
T __shfl_sync(unsigned, T v, int src, int width = warpSize) {
  const int lane = int(emu::lane_id()), base = lane & ~(width - 1);
  return emu::shuffle_from(v, base + (src & (width - 1)));
}
template <emu::Shufflable T>
T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = warpSize) {
  const int lane = int(emu::lane_id()), src = lane ^ lane_mask;
  return emu::shuffle_from(v, src >= (lane & ~(width - 1)) + width ? -1 : src);
}
template <emu::Shufflable T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int width = warpSize) {
  const int lane = int(emu::lane_id()), src = lane + int(delta);
  return emu::shuffle_from(v, src >= (lane & ~(width - 1)) + width ? -1 : src);
}
template <emu::Shufflable T>
T __shfl_up_sync(unsigned, T v, unsigned delta, int width = warpSize) {
  const int lane = int(emu::lane_id()), src = lane - int(delta);
  return emu::shuffle_from(v, src < (lane & ~(width - 1)) ? -1 : src);
}
inline unsigned __ballot_sync(unsigned, int pred) {
  const uint64_t* row = emu::warp_exchange(pred != 0);
  unsigned m = 0;
  for (unsigned l = 0; l < 32; ++l) m |= unsigned(row[l] & 1) << l;
  return m;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == 0xffffffffu; }

// ---- atomics (std::atomic_ref: lock-free, float via CAS loop in libstdc++) ----
#define EMU_ATOMIC_RMW(NAME, T, EXPR)                                \
  inline T NAME(T* addr, T v) {                                      \
    std::atomic_ref<T> a(*addr);                                     \
    return EXPR;                                                     \
  }
EMU_ATOMIC_RMW(atomicAdd, float, a.fetch_add(v))
EMU_ATOMIC_RMW(atomicAdd, double, a.fetch_add(v))
EMU_ATOMIC_RMW(atomicAdd, int, a.fetch_add(v))
EMU_ATOMIC_RMW(atomicAdd, unsigned, a.fetch_add(v))
EMU_ATOMIC_RMW(atomicAdd, unsigned long long, a.fetch_add(v))
EMU_ATOMIC_RMW(atomicExch, float, a.exchange(v))
EMU_ATOMIC_RMW(atomicExch, int, a.exchange(v))
EMU_ATOMIC_RMW(atomicExch, unsigned, a.exchange(v))
#undef EMU_ATOMIC_RMW
namespace emu {
template <class T>
T atomic_minmax(T* addr, T v, bool is_max) {
  std::atomic_ref<T> a(*addr);
  T old = a.load();
  while ((is_max ? v > old : v < old) && !a.compare_exchange_weak(old, v)) {}
  return old;
}
}  // namespace emu
inline int atomicMax(int* p, int v) { return emu::atomic_minmax(p, v, true); }
inline unsigned atomicMax(unsigned* p, unsigned v) { return emu::atomic_minmax(p, v, true); }
inline int atomicMin(int* p, int v) { return emu::atomic_minmax(p, v, false); }
inline unsigned atomicMin(unsigned* p, unsigned v) { return emu::atomic_minmax(p, v, false); }
template <class T>
  requires std::is_integral_v<T>
T atomicCAS(T* addr, T compare, T val) {
  std::atomic_ref<T>(*addr).compare_exchange_strong(compare, val);
  return compare;  // holds the old value in both outcomes
}

// ---- conversions and math -----------------------------------------------------
// c10 float->bf16/half conversions round to nearest even, like the _rn intrinsics.
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return float(b); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return float(h); }

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanhf(float x) { return std::tanh(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }  // NaN -> 0 like CUDA
template <class T> T __ldg(const T* p) { return *p; }
// CUDA's global min/max overloads for arithmetic types (std::min wants equal types).
template <class A, class B>
  requires(std::is_arithmetic_v<A> && std::is_arithmetic_v<B>)
constexpr std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <class A, class B>
  requires(std::is_arithmetic_v<A> && std::is_arithmetic_v<B>)
constexpr std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

// ---- nvcuda::wmma (m16n16k16) ----------------------------------------------------
namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int m, int n, int k> struct frag_shape;
template <int m, int n, int k> struct frag_shape<matrix_a, m, n, k> { static constexpr int rows = m, cols = k; };
template <int m, int n, int k> struct frag_shape<matrix_b, m, n, k> { static constexpr int rows = k, cols = n; };
template <int m, int n, int k> struct frag_shape<accumulator, m, n, k> { static constexpr int rows = m, cols = n; };

// Whole tile in every thread, logical row-major: element (r, c) is x[r*cols + c].
template <class Use, int m, int n, int k, class T, class Layout = void>
struct fragment {
  static_assert(m == 16 && n == 16 && k == 16, "cuda_emu: only m16n16k16 wmma is emulated");
  static_assert(std::is_same_v<Use, accumulator> ? std::is_void_v<Layout>
                                                 : (std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>),
                "cuda_emu: matrix_a/matrix_b need row_major/col_major, accumulator takes no layout");
  using use_type = Use;
  using element_type = T;
  using storage_element_type = T;
  using layout = Layout;
  static constexpr int rows = frag_shape<Use, m, n, k>::rows, cols = frag_shape<Use, m, n, k>::cols;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];
  T& at(int r, int c) { return x[r * cols + c]; }
  const T& at(int r, int c) const { return x[r * cols + c]; }
};

namespace detail {
template <class T>
void check_ptr(const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    throw std::invalid_argument("wmma: matrix pointer must be 256-bit (32-byte) aligned");
  if ((size_t(ldm) * sizeof(T)) % 16 != 0)
    throw std::invalid_argument("wmma: ldm must be a multiple of 16 bytes");
}
// element (r, c) of a tile stored row-major (or col-major) with leading dim ldm
inline size_t offset(int r, int c, unsigned ldm, bool col_major) {
  return col_major ? size_t(r) + size_t(c) * ldm : size_t(r) * ldm + size_t(c);
}
}  // namespace detail

template <class Use, int m, int n, int k, class T, class L, class V>
void fill_fragment(fragment<Use, m, n, k, T, L>& f, const V& v) {
  const T t = static_cast<T>(v);
  for (auto& e : f.x) e = t;
}

// Entry barrier = "waits until all warp lanes have arrived" (CUDA docs), so lane
// writes made before the call by other lanes are visible.
template <class Use, int m, int n, int k, class T, class L>
  requires(!std::is_same_v<Use, accumulator>)
void load_matrix_sync(fragment<Use, m, n, k, T, L>& f, const std::type_identity_t<T>* p, unsigned ldm) {
  detail::check_ptr(p, ldm);
  emu::warp_barrier();
  using F = fragment<Use, m, n, k, T, L>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.at(r, c) = p[detail::offset(r, c, ldm, std::is_same_v<L, col_major>)];
}

template <int m, int n, int k, class T>
void load_matrix_sync(fragment<accumulator, m, n, k, T>& f, const std::type_identity_t<T>* p, unsigned ldm,
                      layout_t layout) {
  detail::check_ptr(p, ldm);
  emu::warp_barrier();
  for (int r = 0; r < m; ++r)
    for (int c = 0; c < n; ++c) f.at(r, c) = p[detail::offset(r, c, ldm, layout == mem_col_major)];
}

// Only lane 0 writes (all lanes hold identical tiles), so there is no racy
// duplicate store. Barrier before: every lane has finished earlier reads of the
// destination (e.g. an in-place load/mma/store). Barrier after: the other lanes
// see the tile when they return -- i.e. store_matrix_sync also acts as __syncwarp.
template <int m, int n, int k, class T>
void store_matrix_sync(std::type_identity_t<T>* p, const fragment<accumulator, m, n, k, T>& f, unsigned ldm,
                       layout_t layout) {
  detail::check_ptr(p, ldm);
  emu::warp_barrier();
  if (emu::lane_id() == 0)
    for (int r = 0; r < m; ++r)
      for (int c = 0; c < n; ++c) p[detail::offset(r, c, ldm, layout == mem_col_major)] = f.at(r, c);
  emu::warp_barrier();
}

// d = a*b + c; products and sums in float, k ascending. d may alias c. Purely
// thread-local (every lane has full copies), so no synchronisation needed.
template <int m, int n, int k, class Ta, class La, class Tb, class Lb, class Tc, class Td>
void mma_sync(fragment<accumulator, m, n, k, Td>& d, const fragment<matrix_a, m, n, k, Ta, La>& a,
              const fragment<matrix_b, m, n, k, Tb, Lb>& b, const fragment<accumulator, m, n, k, Tc>& c,
              bool /*satf*/ = false) {
  static_assert(std::is_same_v<Ta, Tb>, "wmma: matrix_a and matrix_b must have the same element type");
  float out[m * n];
  for (int r = 0; r < m; ++r)
    for (int col = 0; col < n; ++col) {
      float acc = static_cast<float>(c.at(r, col));
      for (int kk = 0; kk < k; ++kk) acc += static_cast<float>(a.at(r, kk)) * static_cast<float>(b.at(kk, col));
      out[r * n + col] = acc;
    }
  for (int i = 0; i < m * n; ++i) d.x[i] = static_cast<Td>(out[i]);
}
}  // namespace nvcuda::wmma
