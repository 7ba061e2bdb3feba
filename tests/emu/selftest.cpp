// Self-test for cuda_emu.h and the emulated cpp/common/mma.cuh. Built and run by
// scripts/emu_test.sh; by hand, from the repository root:
//   g++ -std=c++20 -O2 -Wall -Wextra -pthread -Itests/emu -Icpp -I/work/main/.venv/lib/python3.11/site-packages/torch/include tests/emu/selftest.cpp -o /tmp/emu_selftest && /tmp/emu_selftest
// (torch include dir: .venv/bin/python -c 'import torch,os;print(os.path.dirname(torch.__file__))'
//  + /include; c10 BFloat16/Half are header-only, no libc10 needed.)
//
// The kernels below are written as they would be in a .cu file (only the
// include line differs) and exercise every part of the emulator surface.
#include "cuda_emu.h"
#include "common/cluster.cuh"
#include "common/mma.cuh"

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>

using namespace nvcuda;

// ===== (a) 64x48 = (64x32)@(32x48) + C0 with wmma, all a/b layout combinations =====
constexpr int M = 64, N = 48, K = 32;
constexpr int kPad = 8;  // 16 B row padding in smem, keeps ldm a multiple of 16 B
constexpr int kTilesN = N / 16, kTiles = (M / 16) * kTilesN;  // 12 tiles over 8 warps
// smem: padded A, padded B, then (128 B aligned) one 16x16 float staging tile per warp
constexpr int lda_smem(bool a_cm) { return (a_cm ? M : K) + kPad; }
constexpr int ldb_smem(bool b_cm) { return (b_cm ? K : N) + kPad; }
constexpr size_t stage_offset(bool a_cm, bool b_cm, size_t esz) {
  return (((a_cm ? K : M) * lda_smem(a_cm) + (b_cm ? N : K) * ldb_smem(b_cm)) * esz + 127) / 128 * 128;
}
constexpr size_t gemm_smem_bytes(size_t esz) {
  size_t s = 0;
  for (int c = 0; c < 4; ++c) s = std::max(s, stage_offset(c & 2, c & 1, esz));
  return s + 8 * 256 * sizeof(float);
}

struct GemmArgs {
  const void* a[2];  // [0] row-major (ld K), [1] col-major (ld M)
  const void* b[2];  // [0] row-major (ld N), [1] col-major (ld K)
  const float* c0_rm;  // initial accumulator, row-major ld N
  const float* c0_cm;  // same values, col-major ld M
  float* out;          // 4 results (one per layout combo), row-major ld N
};

// One block per layout combination. k-step 0 reads fragments from shared memory
// (staged with padding), k-step 1 straight from global memory. Even tiles store
// directly to global (row-major); odd tiles go through a per-warp smem staging
// tile stored col-major and are copied out lane-wise.
template <class T, class LA, class LB>
__device__ void gemm_block(const GemmArgs& g, float* out) {
  constexpr bool a_cm = std::is_same_v<LA, wmma::col_major>, b_cm = std::is_same_v<LB, wmma::col_major>;
  constexpr int lda_s = lda_smem(a_cm), ldb_s = ldb_smem(b_cm);
  PANTHER_DYNAMIC_SMEM(smem_raw);
  T* sA = reinterpret_cast<T*>(smem_raw);
  T* sB = sA + (a_cm ? K : M) * lda_s;
  float* sC = reinterpret_cast<float*>(smem_raw + stage_offset(a_cm, b_cm, sizeof(T)));

  const T* A = static_cast<const T*>(g.a[a_cm]);
  const T* B = static_cast<const T*>(g.b[b_cm]);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int a_rows = a_cm ? K : M, a_ld = a_cm ? M : K, b_rows = b_cm ? N : K, b_ld = b_cm ? K : N;
  for (int i = tid; i < a_rows * a_ld; i += blockDim.x) sA[(i / a_ld) * lda_s + i % a_ld] = A[i];
  for (int i = tid; i < b_rows * b_ld; i += blockDim.x) sB[(i / b_ld) * ldb_s + i % b_ld] = B[i];
  __syncthreads();

  float* stage = sC + warp * 256;
  for (int t = warp; t < kTiles; t += blockDim.x / 32) {
    const int m0 = (t / kTilesN) * 16, n0 = (t % kTilesN) * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if (t % 2 == 0) wmma::load_matrix_sync(acc, g.c0_rm + m0 * N + n0, N, wmma::mem_row_major);
    else            wmma::load_matrix_sync(acc, g.c0_cm + m0 + n0 * M, M, wmma::mem_col_major);
    for (int k0 = 0; k0 < K; k0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb;
      const bool from_smem = k0 == 0;
      // element (r,k) of A at A[r*ld+k] (row-major) or A[r+k*ld] (col-major)
      const T* pa = from_smem ? sA + (a_cm ? k0 * lda_s + m0 : m0 * lda_s + k0) : A + (a_cm ? k0 * M + m0 : m0 * K + k0);
      const T* pb = from_smem ? sB + (b_cm ? n0 * ldb_s + k0 : k0 * ldb_s + n0) : B + (b_cm ? n0 * K + k0 : k0 * N + n0);
      wmma::load_matrix_sync(fa, pa, from_smem ? lda_s : a_ld);
      wmma::load_matrix_sync(fb, pb, from_smem ? ldb_s : b_ld);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    if (t % 2 == 0) {
      wmma::store_matrix_sync(out + m0 * N + n0, acc, N, wmma::mem_row_major);
    } else {
      wmma::store_matrix_sync(stage, acc, 16, wmma::mem_col_major);
      __syncwarp();
      for (int i = lane; i < 256; i += 32) out[(m0 + i % 16) * N + n0 + i / 16] = stage[i];
      __syncwarp();  // before the next tile reuses `stage`
    }
  }
}

template <class T>
__global__ void __launch_bounds__(256) gemm_kernel(GemmArgs g) {
  float* out = g.out + blockIdx.x * M * N;
  switch (blockIdx.x) {
    case 0: gemm_block<T, wmma::row_major, wmma::row_major>(g, out); break;
    case 1: gemm_block<T, wmma::row_major, wmma::col_major>(g, out); break;
    case 2: gemm_block<T, wmma::col_major, wmma::row_major>(g, out); break;
    default: gemm_block<T, wmma::col_major, wmma::col_major>(g, out); break;
  }
}

// ===== (b) warp reductions with shuffles =====
__global__ void warp_max_kernel(const float* __restrict__ in, float* __restrict__ out, int* __restrict__ isum,
                                int* __restrict__ gsum8, int* __restrict__ cross) {
  const int gid = blockIdx.x * blockDim.x + threadIdx.x;
  float v = in[gid];
  int s = gid, s8 = gid;
  for (int off = 16; off > 0; off >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    s += __shfl_xor_sync(0xffffffffu, s, off);
  }
  for (int off = 4; off > 0; off >>= 1) s8 += __shfl_xor_sync(0xffffffffu, s8, off, 8);  // groups of 8 lanes
  out[gid] = v;  // every lane must hold the warp max
  isum[gid] = s;
  gsum8[gid] = s8;
  cross[gid] = __shfl_xor_sync(0xffffffffu, gid, 16, 8);  // later group -> own value, earlier group allowed
}

// ===== (c) block reduction: warp partials -> smem -> barrier -> warp 0 -> barrier =====
__global__ void block_sum_kernel(const float* __restrict__ in, float* __restrict__ out, int* __restrict__ smem_was_garbage) {
  PANTHER_DYNAMIC_SMEM(smem_raw);
  float* partial = reinterpret_cast<float*>(smem_raw);
  if (threadIdx.x == 0) smem_was_garbage[blockIdx.x] = std::isnan(partial[0]) && std::isnan(partial[8]);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float p = lane < nwarps ? partial[lane] : 0.0f;
    for (int off = 16; off > 0; off >>= 1) p += __shfl_xor_sync(0xffffffffu, p, off);
    if (lane == 0) partial[nwarps] = p;
  }
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = partial[nwarps];  // everyone sees the total
}

// (c') classic tree reduction (8 barriers) after half the block has exited:
// exited threads must not hold up __syncthreads of the survivors (sm_70+ rule).
__global__ void tree_sum_kernel(const float* __restrict__ in, float* __restrict__ out) {
  PANTHER_DYNAMIC_SMEM(smem_raw);
  float* s = reinterpret_cast<float*>(smem_raw);
  const unsigned n = blockDim.x / 2;
  if (threadIdx.x >= n) return;
  s[threadIdx.x] = in[blockIdx.x * n + threadIdx.x];
  __syncthreads();
  for (unsigned stride = n / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = s[0];
}

// ===== (d) atomics =====
__global__ void atomic_kernel(float* total, float* bins, int reps) {
  for (int r = 0; r < reps; ++r) {
    atomicAdd(total, 1.0f);
    atomicAdd(&bins[(blockIdx.x * blockDim.x + threadIdx.x) % 7], 0.5f);
  }
}

// ===== (e) fill_fragment, conversions, fast-math wrappers (one warp) =====
__global__ void misc_kernel(float* __restrict__ out) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(fa, __float2bfloat16(1.5f));
  wmma::fill_fragment(fb, __float2bfloat16_rn(-2.0f));
  wmma::fill_fragment(acc, 1.0f);
  wmma::mma_sync(acc, fa, fb, acc);  // 1 + 16 * (1.5 * -2) = -47 everywhere
  wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
  if (threadIdx.x == 0) {
    out[256] = __bfloat162float(__float2bfloat16_rn(1.0f + 3.0f / 512));  // RNE to 8 bits: 1 + 1/128
    out[257] = __half2float(__float2half(65519.0f));                     // rounds to 65504
    out[258] = __expf(0.0f) + __logf(1.0f) + __fdividef(1.0f, 4.0f) + fmaxf(-INFINITY, 0.5f) + fminf(2.f, expf(0.f));
  }
}

// ===== (f) emulator error paths: must throw, not deadlock =====
__global__ void misaligned_wmma_kernel(const __nv_bfloat16* p) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, p + 1, 16);  // +2 bytes: violates the 32 B rule
  __syncthreads();
}
__global__ void smem_overflow_kernel(int n) {
  PANTHER_DYNAMIC_SMEM(smem_raw);
  if (threadIdx.x == 0) smem_raw[n] = 0;  // one past the end
}

// ===== (g) PTX-level warp MMA (cpp/common/mma.cuh): hardware lane <-> element mapping =====
namespace pm = panther::mma;

// ldmatrix: four 8x8 b16 matrices with element (j, i, c) = ld_code(j, i, c), rows stored in a
// scrambled order (row i of matrix j in slot ld_slot(j, i)) with a padded stride, so a wrong
// address or element shows. out[(variant * 32 + lane) * 4 + reg], variants x4, x2, x1 and
// their .trans; lanes whose addresses x2/x1 must ignore pass a misaligned one (would throw).
constexpr int kLdStride = 24;  // elements (48 B) between row slots
constexpr uint16_t ld_code(int j, int i, int c) { return uint16_t(0x1000 + j * 64 + i * 8 + c); }
constexpr int ld_slot(int j, int i) { return (j * 8 + i) * 13 % 32; }  // a permutation of 0..31
__global__ void ldmatrix_kernel(unsigned* out) {
  PANTHER_DYNAMIC_SMEM(smem_raw);
  uint16_t* s = reinterpret_cast<uint16_t*>(smem_raw);
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) s[ld_slot(i / 64, i / 8 % 8) * kLdStride + i % 8] = ld_code(i / 64, i / 8 % 8, i % 8);
  __syncwarp();
  const uint16_t* row = s + ld_slot(lane / 8, lane % 8) * kLdStride;
  const void* p2 = lane < 16 ? (const void*)row : smem_raw + 2;
  const void* p1 = lane < 8 ? (const void*)row : smem_raw + 2;
  unsigned r4[4], r2[2], r1[1];
  unsigned* o = out + lane * 4;
  pm::ldmatrix_x4(r4, row);       std::memcpy(o + 0 * 128, r4, 16);
  pm::ldmatrix_x2(r2, p2);        std::memcpy(o + 1 * 128, r2, 8);
  pm::ldmatrix_x1(r1, p1);        std::memcpy(o + 2 * 128, r1, 4);
  pm::ldmatrix_x4_trans(r4, row); std::memcpy(o + 3 * 128, r4, 16);
  pm::ldmatrix_x2_trans(r2, p2);  std::memcpy(o + 4 * 128, r2, 8);
  pm::ldmatrix_x1_trans(r1, p1);  std::memcpy(o + 5 * 128, r1, 4);
}

// D = A B + C for A 16x16, B 16x8 (row-major float inputs), twice: d = A B + c, then
// d = A B + d in place, so D = 2 A B + C. mode 0: A by ldmatrix_x4, B stored k-major by
// ldmatrix_x2_trans; mode 1: B stored n-major, ldmatrix_x2; mode 2: no ldmatrix, registers built
// from global memory with pack2 and the documented fragment formula. D stored in the C layout.
constexpr int kLdA = 24, kLdB = 16;  // smem leading dims (elements): 48 B, 32 B
template <class T>
__global__ void mma_kernel(const float* A, const float* B, const float* C, float* D, int mode) {
  PANTHER_DYNAMIC_SMEM(smem_raw);
  T* sA = reinterpret_cast<T*>(smem_raw);  // A[r][k] at sA[r * kLdA + k]
  T* sB = sA + 16 * kLdA;                  // B[k][n] at sB[k * kLdB + n] (mode 0), sB[n * kLdA + k] (1)
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  for (int i = lane; i < 256; i += 32) sA[i / 16 * kLdA + i % 16] = T(A[i]);
  for (int i = lane; i < 128; i += 32) sB[mode == 1 ? i % 8 * kLdA + i / 8 : i / 8 * kLdB + i % 8] = T(B[i]);
  __syncwarp();
  unsigned a[4], b[2];
  if (mode == 2) {
    auto At = [&](int r, int k) { return A[r * 16 + k]; };
    auto Bt = [&](int k, int n) { return B[k * 8 + n]; };
    a[0] = pm::pack2<T>(At(g, 2 * t), At(g, 2 * t + 1));
    a[1] = pm::pack2<T>(At(g + 8, 2 * t), At(g + 8, 2 * t + 1));
    a[2] = pm::pack2<T>(At(g, 2 * t + 8), At(g, 2 * t + 9));
    a[3] = pm::pack2<T>(At(g + 8, 2 * t + 8), At(g + 8, 2 * t + 9));
    b[0] = pm::pack2<T>(Bt(2 * t, g), Bt(2 * t + 1, g));
    b[1] = pm::pack2<T>(Bt(2 * t + 8, g), Bt(2 * t + 9, g));
  } else {
    pm::ldmatrix_x4(a, sA + (lane % 16) * kLdA + (lane / 16) * 8);
    if (mode == 0) pm::ldmatrix_x2_trans(b, sB + (lane % 16) * kLdB);
    else pm::ldmatrix_x2(b, sB + (lane % 8) * kLdA + (lane / 8 % 2) * 8);
  }
  float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]}, d[4];
  pm::mma_16816<T>(d, a, b, c);
  pm::mma_16816<T>(d, a, b, d);
  D[g * 8 + 2 * t] = d[0], D[g * 8 + 2 * t + 1] = d[1];
  D[(g + 8) * 8 + 2 * t] = d[2], D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// cp.async, one warp: group 0 = chunks 0..31 (odd lanes !valid: zero-fill), group 1 = chunks
// 32..63 (16 B each). Snapshot after wait<1> (out[0..255]) and after wait<0> (out[256..511]).
__global__ void cp_async_kernel(const float* src, float* out) {
  PANTHER_DYNAMIC_SMEM(smem_raw);
  float* s = reinterpret_cast<float*>(smem_raw);
  const int lane = threadIdx.x;
  pm::cp_async16(s + lane * 4, src + lane * 4, lane % 2 == 0);
  pm::cp_async_commit();
  pm::cp_async16(s + (32 + lane) * 4, src + (32 + lane) * 4, true);
  pm::cp_async_commit();
  pm::cp_async_wait<1>();
  __syncwarp();
  for (int i = lane; i < 256; i += 32) out[i] = s[i];
  __syncwarp();  // every lane has taken its snapshot before any lane's group 1 lands
  pm::cp_async_wait<0>();
  __syncwarp();
  for (int i = lane; i < 256; i += 32) out[256 + i] = s[i];
}

__global__ void ldmatrix_global_kernel(const __nv_bfloat16* p) {  // not shared memory: must throw
  unsigned r[4];
  pm::ldmatrix_x4(r, p + (threadIdx.x % 32) * 8);
  __syncthreads();
}

// ---------------------------------------------------------------------------------
static int failures = 0;
static void report(const char* name, bool ok, const std::string& detail = "") {
  std::printf("%s  %s%s%s\n", ok ? "PASS" : "FAIL", name, detail.empty() ? "" : "  -- ", detail.c_str());
  failures += !ok;
}
static void run_case(const char* name, const std::function<bool(std::string&)>& body) {
  std::string detail;
  bool ok = false;
  try {
    ok = body(detail);
  } catch (const std::exception& e) {
    detail = std::string("exception: ") + e.what();
  }
  report(name, ok, detail);
}

template <class T> struct AlignedVec {  // 256-byte aligned, like cudaMalloc
  T* p;
  size_t n;
  explicit AlignedVec(size_t n_) : p(static_cast<T*>(::operator new(n_ * sizeof(T), std::align_val_t{256}))), n(n_) {}
  ~AlignedVec() { ::operator delete(p, std::align_val_t{256}); }
  T& operator[](size_t i) { return p[i]; }
};

template <class T>
static bool test_gemm(std::string& detail) {
  std::mt19937 rng(42);
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  AlignedVec<T> a_rm(M * K), a_cm(M * K), b_rm(K * N), b_cm(K * N);
  AlignedVec<float> c_rm(M * N), c_cm(M * N), out(4 * M * N);
  std::vector<double> ref(M * N);
  for (int r = 0; r < M; ++r)
    for (int k = 0; k < K; ++k) a_rm[r * K + k] = a_cm[r + k * M] = T(U(rng));
  for (int k = 0; k < K; ++k)
    for (int c = 0; c < N; ++c) b_rm[k * N + c] = b_cm[k + c * K] = T(U(rng));
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) c_rm[r * N + c] = c_cm[r + c * M] = U(rng);
  for (int i = 0; i < 4 * M * N; ++i) out[i] = -12345.f;
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) {
      double s = c_rm[r * N + c];
      for (int k = 0; k < K; ++k) s += double(float(a_rm[r * K + k])) * double(float(b_rm[k * N + c]));
      ref[r * N + c] = s;
    }
  GemmArgs g{{a_rm.p, a_cm.p}, {b_rm.p, b_cm.p}, c_rm.p, c_cm.p, out.p};
  emu::launch(gemm_kernel<T>, dim3(4), dim3(256), gemm_smem_bytes(sizeof(T)), g);
  double worst = 0;
  int bad = 0;
  for (int combo = 0; combo < 4; ++combo)
    for (int i = 0; i < M * N; ++i) {
      const double e = std::abs(out[combo * M * N + i] - ref[i]);
      worst = std::max(worst, e);
      bad += !(e <= 1e-5);  // float accumulation of K=32 exact products: error ~1e-6
    }
  detail = "max |err| = " + std::to_string(worst) + ", bad = " + std::to_string(bad);
  return bad == 0;
}

// ===== (h) thread block clusters: ranks, the cluster barrier, another block's shared memory =====
// Each block writes its own values into its shared memory; after the cluster barrier every thread
// reads the next rank's value (map) and the sum over the cluster's blocks; a second barrier keeps
// every block alive until the others have read it.
__global__ void cluster_kernel(int* next_out, int* sum_out, unsigned* rank_out) {
  PANTHER_DYNAMIC_SMEM(smem);
  int* mine = reinterpret_cast<int*>(smem);
  const unsigned r = panther::cluster::rank(), n = panther::cluster::size();
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  mine[threadIdx.x] = static_cast<int>(blockIdx.x * 1000 + threadIdx.x);
  panther::cluster::sync();
  next_out[i] = panther::cluster::map(mine, (r + 1) % n)[threadIdx.x];
  int s = 0;
  for (unsigned q = 0; q < n; ++q) s += panther::cluster::map(mine, q)[0];
  sum_out[i] = s;
  rank_out[i] = r;
  panther::cluster::sync();
}

__global__ void cluster_bad_map_kernel(int* global) { (void)panther::cluster::map(global, 0); }

int main() {
  run_case("(h) clusters of 4 blocks (grid 8): rank, cluster barrier, map_shared_rank", [](std::string& d) {
    const unsigned blocks = 8, threads = 64, cl = 4, n = blocks * threads;
    std::vector<int> next(n, -1), sum(n, -1);
    std::vector<unsigned> rank(n, 99);
    PANTHER_LAUNCH_CLUSTER(cluster_kernel, dim3(blocks), dim3(threads), cl, threads * sizeof(int), next.data(),
                           sum.data(), rank.data());
    int bad = 0;
    for (unsigned b = 0; b < blocks; ++b) {
      const unsigned base = b / cl * cl, r = b % cl;
      int want_sum = 0;
      for (unsigned q = 0; q < cl; ++q) want_sum += static_cast<int>((base + q) * 1000);
      for (unsigned t = 0; t < threads; ++t) {
        const unsigned i = b * threads + t;
        bad += next[i] != static_cast<int>((base + (r + 1) % cl) * 1000 + t) || sum[i] != want_sum || rank[i] != r;
      }
    }
    d = "bad = " + std::to_string(bad);
    return bad == 0;
  });

  run_case("(h') map_shared_rank of a non-shared address, and a cluster size not dividing grid.x, throw", [](std::string& d) {
    int x = 0;
    int thrown = 0;
    try {
      PANTHER_LAUNCH_CLUSTER(cluster_bad_map_kernel, dim3(2), dim3(32), 2u, 64, &x);
    } catch (const std::invalid_argument& e) {
      d = e.what();
      ++thrown;
    }
    try {
      PANTHER_LAUNCH_CLUSTER(cluster_bad_map_kernel, dim3(3), dim3(32), 2u, 64, &x);
    } catch (const std::invalid_argument&) {
      ++thrown;
    }
    return thrown == 2;
  });

  run_case("(a) wmma GEMM bf16, 4 layout combos (1 block each), smem+global operands", test_gemm<__nv_bfloat16>);
  run_case("(a') wmma GEMM half, 4 layout combos", test_gemm<__half>);

  run_case("(b) warp max/sum via __shfl_xor_sync (float, int, width=8 groups)", [](std::string& d) {
    const int blocks = 4, n = blocks * 256;
    std::vector<float> in(n), out(n);
    std::vector<int> isum(n), s8(n), cross(n);
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> U(-100.f, 100.f);
    for (auto& x : in) x = U(rng);
    emu::launch(warp_max_kernel, dim3(blocks), dim3(256), 0, in.data(), out.data(), isum.data(), s8.data(), cross.data());
    int bad = 0;
    for (int w = 0; w < n / 32; ++w) {
      float mx = -INFINITY;
      int sm = 0;
      for (int l = 0; l < 32; ++l) mx = fmaxf(mx, in[w * 32 + l]), sm += w * 32 + l;
      for (int l = 0; l < 32; ++l) {
        const int i = w * 32 + l, g0 = i & ~7;
        bad += out[i] != mx || isum[i] != sm || s8[i] != 8 * g0 + 28 || cross[i] != (l < 16 ? i : i - 16);
      }
    }
    d = "bad lanes = " + std::to_string(bad);
    return bad == 0;
  });

  run_case("(c) block sum via smem + 2x __syncthreads (3 blocks)", [](std::string& d) {
    const int blocks = 3, n = blocks * 256;
    std::vector<float> in(n), out(n, 0.f);
    std::vector<int> garbage(blocks, 0);
    for (int i = 0; i < n; ++i) in[i] = float(i % 97) - 40.f;  // integers: exact sums
    emu::launch(block_sum_kernel, dim3(blocks), dim3(256), 64, in.data(), out.data(), garbage.data());
    int bad = 0;
    for (int b = 0; b < blocks; ++b) {
      float s = 0;
      for (int t = 0; t < 256; ++t) s += in[b * 256 + t];
      for (int t = 0; t < 256; ++t) bad += out[b * 256 + t] != s;
      bad += !garbage[b];
    }
    d = "bad = " + std::to_string(bad);
    return bad == 0;
  });

  run_case("(c') tree reduction, 8 barriers, half the block exited", [](std::string& d) {
    const int blocks = 5;
    std::vector<float> in(blocks * 128), out(blocks);
    for (size_t i = 0; i < in.size(); ++i) in[i] = float(i % 13);
    emu::launch(tree_sum_kernel, dim3(blocks), dim3(256), 128 * sizeof(float), in.data(), out.data());
    int bad = 0;
    for (int b = 0; b < blocks; ++b) {
      float s = 0;
      for (int t = 0; t < 128; ++t) s += in[b * 128 + t];
      bad += out[b] != s;
    }
    d = "bad = " + std::to_string(bad);
    return bad == 0;
  });

  run_case("(d) atomicAdd float from 8 blocks x 256 threads x 16 reps", [](std::string& d) {
    const int blocks = 8, reps = 16;
    float total = 0.f;
    std::vector<float> bins(7, 0.f);
    emu::launch(atomic_kernel, dim3(blocks), dim3(256), 0, &total, bins.data(), reps);
    bool ok = total == float(blocks * 256 * reps);
    for (int b = 0; b < 7; ++b) {
      int cnt = 0;
      for (int t = 0; t < blocks * 256; ++t) cnt += t % 7 == b;
      ok &= bins[b] == 0.5f * cnt * reps;
    }
    d = "total = " + std::to_string(total);
    return ok;
  });

  run_case("(e) fill_fragment / mma / conversions / math", [](std::string& d) {
    AlignedVec<float> out(260);
    emu::launch(misc_kernel, dim3(1), dim3(32), 0, out.p);
    int bad = 0;
    for (int i = 0; i < 256; ++i) bad += out[i] != -47.f;
    bad += out[256] != 1.0f + 1.0f / 128;
    bad += out[257] != 65504.f;
    bad += out[258] != 2.75f;
    d = "bad = " + std::to_string(bad);
    return bad == 0;
  });

  run_case("(f) misaligned wmma pointer throws from launch", [](std::string& d) {
    AlignedVec<__nv_bfloat16> buf(512);
    try {
      emu::launch(misaligned_wmma_kernel, dim3(2), dim3(64), 0, buf.p);
    } catch (const std::invalid_argument& e) {
      d = e.what();
      return true;
    }
    return false;
  });
  run_case("(f') shared-memory overflow detected", [](std::string& d) {
    try {
      emu::launch(smem_overflow_kernel, dim3(1), dim3(32), 100, 100);
    } catch (const std::runtime_error& e) {
      d = e.what();
      return true;
    }
    return false;
  });

  run_case("(g) ldmatrix x1/x2/x4 and .trans: lane mapping = documented formula", [](std::string& d) {
    std::vector<unsigned> out(6 * 32 * 4, 0xDEADBEEFu);
    emu::launch(ldmatrix_kernel, dim3(1), dim3(32), 32 * kLdStride * 2, out.data());
    const int nmat[6] = {4, 2, 1, 4, 2, 1};
    int bad = 0;
    for (int v = 0; v < 6; ++v)
      for (int l = 0; l < 32; ++l)
        for (int j = 0; j < nmat[v]; ++j) {
          const int g = l >> 2, t = l & 3;
          const unsigned lo = v < 3 ? ld_code(j, g, 2 * t) : ld_code(j, 2 * t, g);
          const unsigned hi = v < 3 ? ld_code(j, g, 2 * t + 1) : ld_code(j, 2 * t + 1, g);
          bad += out[(v * 32 + l) * 4 + j] != (lo | hi << 16);
        }
    d = "bad registers = " + std::to_string(bad);
    return bad == 0;
  });

  auto mma_case = [](auto tag, int mode) {
    return [mode](std::string& d) {
      using T = decltype(tag);
      std::mt19937 rng(7 + mode);
      std::uniform_int_distribution<int> U(-8, 8), UC(-64, 64);
      std::vector<float> A(256), B(128), C(128), D(128, -12345.f);
      for (auto& x : A) x = float(U(rng));
      for (auto& x : B) x = float(U(rng));
      for (auto& x : C) x = float(UC(rng));
      emu::launch(mma_kernel<T>, dim3(1), dim3(32), (16 * kLdA + 16 * kLdB) * 2, A.data(), B.data(), C.data(),
                  D.data(), mode);
      int bad = 0;
      for (int r = 0; r < 16; ++r)
        for (int n = 0; n < 8; ++n) {
          double s = 0;
          for (int k = 0; k < 16; ++k) s += double(A[r * 16 + k]) * double(B[k * 8 + n]);
          bad += D[r * 8 + n] != 2 * s + C[r * 8 + n];  // small integers: exact
        }
      d = "bad = " + std::to_string(bad);
      return bad == 0;
    };
  };
  const char* mma_names[2][3] = {
      {"(g') mma_16816 bf16: ldmatrix_x4 A + ldmatrix_x2_trans B (k-major), accumulate twice",
       "(g') mma_16816 bf16: ldmatrix_x4 A + ldmatrix_x2 B (n-major)",
       "(g') mma_16816 bf16: fragments from the documented formula via pack2"},
      {"(g') mma_16816 fp16: ldmatrix_x4 A + ldmatrix_x2_trans B (k-major), accumulate twice",
       "(g') mma_16816 fp16: ldmatrix_x4 A + ldmatrix_x2 B (n-major)",
       "(g') mma_16816 fp16: fragments from the documented formula via pack2"}};
  for (int mode = 0; mode < 3; ++mode) run_case(mma_names[0][mode], mma_case(__nv_bfloat16{}, mode));
  for (int mode = 0; mode < 3; ++mode) run_case(mma_names[1][mode], mma_case(__half{}, mode));

  run_case("(g'') pack2 bf16/fp16: round to nearest even, lo in the low half", [](std::string& d) {
    const unsigned b1 = pm::pack2<__nv_bfloat16>(1.0f + 3.0f / 512, -2.0f);   // 1+1.5 ulp/2 -> 1+1/128
    const unsigned b2 = pm::pack2<__nv_bfloat16>(1.0f + 1.0f / 256, 1.0f + 3.0f / 256);  // ties -> even
    const unsigned h1 = pm::pack2<__half>(1.0f + 1.0f / 2048, 1.0f + 3.0f / 2048);       // ties -> even
    char buf[96];
    std::snprintf(buf, sizeof buf, "%08x %08x %08x", b1, b2, h1);
    d = buf;
    return b1 == 0xC0003F81u && b2 == 0x3F823F80u && h1 == 0x3C023C00u;
  });

  run_case("(g''') cp.async: zero-fill, groups land at cp_async_wait<N> (emulator defers copies)", [](std::string& d) {
    AlignedVec<float> src(256);
    std::vector<float> out(512);
    for (int i = 0; i < 256; ++i) src[i] = float(i + 1);
    emu::launch(cp_async_kernel, dim3(1), dim3(32), 1024, src.p, out.data());
    int bad = 0;
    for (int i = 0; i < 256; ++i) {
      const int chunk = i / 4;
      const float want1 = chunk < 32 ? (chunk % 2 ? 0.f : src[i]) : NAN;  // group 1 still pending
      bad += chunk < 32 ? out[i] != want1 : !std::isnan(out[i]);
      bad += out[256 + i] != (chunk < 32 ? want1 : src[i]);
    }
    d = "bad = " + std::to_string(bad);
    return bad == 0;
  });

  run_case("(g'''') ldmatrix on a non-shared address throws from launch", [](std::string& d) {
    AlignedVec<__nv_bfloat16> buf(512);
    try {
      emu::launch(ldmatrix_global_kernel, dim3(1), dim3(64), 64, buf.p);
    } catch (const std::invalid_argument& e) {
      d = e.what();
      return true;
    }
    return false;
  });

  std::printf("%s (%d failure%s)\n", failures ? "SELFTEST FAILED" : "SELFTEST PASSED", failures, failures == 1 ? "" : "s");
  return failures ? 1 : 0;
}
