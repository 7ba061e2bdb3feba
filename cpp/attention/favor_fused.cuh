// Fused FAVOR+ kernels for CUDA, bf16, causal and non-causal (tensor cores via WMMA, and in
// states_kernel via mma.sync fragments of mma.cuh; fp32 accumulation). Same math and the same
// stabilisers as the ATen implementation in cpp/attention/impl.cpp (read its header comment
// first); this file only reorganises the work so that every (batch*head, chunk of kC positions)
// is one thread block that keeps its features, its C x C block and its state in shared memory
// instead of ~40 passes over HBM.
//
// Pipeline (per call; BH = batch*heads, n = chunks of kC positions):
//   states_kernel   (n, BH): key features relative to the chunk's own max m_c, the chunk state
//                   T'_c = khat'^T [v, 1] (M x E1p) and the chunk's sum of [v, 1]; a_j (the row
//                   max of each key's pre-activation) for the stabiliser.
//   stab_kernel     (BH):    r_j = running max of a_j (causal) or the max over all keys, and per
//                   chunk P_c, R_c, alpha_c = exp(P_c - R_c), kscale_c = exp(m_c - R_c).
//   scan_kernel:             causal: H_c = sum_{c' < c} (decayed) kscale T'; non-causal: every
//                   chunk gets the total. Stored in the input dtype for the tensor cores.
//   forward_kernel  (n, BH): phi, khat, A' = (phi khat^T) o E (+ eps), y = s phi H + A' [v, 1].
// Backward: states/stab/scan again (or, from autograd, the forward's, kept in `saved`, where
// causal calls also keep the features that forward_kernel computed, so back1/back2 load phi and
// khat instead of computing them), then
//   back1_kernel    (n, BH): recomputes y, forms Yb = d loss / d [num, den], dq (and its dW part),
//                   the chunk's gradient state dH_c = phi^T (s Yb); a reverse scan gives dT_c;
//                   causal: also the intra-chunk part of dv (A'^T Yb) and Wm, the intra-chunk
//                   weights from which back2 forms dkhat's part (Wm^T phi): both need only the
//                   chunk's own queries (nq == nk: the same chunk grid);
//   back2_kernel    (n, BH): dk, dv (and the key part of dW) from dT_c plus those parts.
// Stabilisers are constants (as in the ATen path). Non-causal runs the same kernels with no
// intra-chunk block (every key is in the "state") and query/key chunk counts of their own.
//
// The file compiles as CUDA and, with PANTHER_CUDA_EMU defined, as host C++ against
// tests/emu/cuda_emu.h (a thread-per-CUDA-thread emulator used to test the kernels without a GPU).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/mma.cuh"

#ifdef PANTHER_CUDA_EMU
#include "cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <mma.h>
#ifndef PANTHER_DYNAMIC_SMEM
#define PANTHER_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif
#endif

namespace panther::fused {
namespace wmma = nvcuda::wmma;

constexpr int kC = 64;                 // positions per chunk (one thread block)
constexpr int kWarps = 16;             // one block per SM (shared memory): 4 warps per scheduler
constexpr int kThreads = kWarps * 32;
constexpr int kRT = kC / 16;           // row tiles of a kC-row operand
// Tiles of a (kC x X) output are enumerated t = warp, warp + kWarps, ...; tile t is
// (t % kRT, t / kRT),
// so with 4 row tiles and 16 warps every warp keeps one row tile (warp % 4) and a quarter of the
// tiles (warp / 4): a row reduction combines kGroups partials.
static_assert(kWarps % kRT == 0, "every warp must keep one row tile");
constexpr int kGroups = kWarps / kRT;  // warps sharing a row tile (row partials to combine)
constexpr int kPad = 8;               // shared leading dimensions: cols + kPad (see smem_layout)
constexpr int kLC = kC + kPad;
constexpr int kMaxE1p = 256;           // value dim + 1, padded to 16, at most this
constexpr int kSavedOutMaxDv = 64;     // largest value dim whose y / den the forward keeps
constexpr int kVecFloats = 16 * kC + kMaxE1p;
static_assert(6 + kGroups <= 10, "Blk's per-row vectors: red[] holds kGroups rows of kC");

using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
using RowM = wmma::row_major;
using ColM = wmma::col_major;

template <class T> struct Cvt;
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 t(float x) { return __float2bfloat16(x); }
};

template <class T>
struct Params {
  int BH, H;              // batch*heads, heads (b = bh / H)
  int Lq, Lk, nq, nk;     // lengths and chunk counts (causal: equal)
  int D, Dv, M, E1p;      // head dim, value dim, features, Dv + 1 padded to 16
  bool softmax, causal;
  float xscale, sM, ek;   // x' = xscale x; sM = M^-1/2; eps of the features (phi = f + ek)
  // Inputs (b, h, l, c) at ptr + b*sb + h*sh + l*sl + c.
  const T *q, *k, *v, *g;
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, g_sb, g_sh, g_sl;
  const T* W;             // (M, D) contiguous
  const bool* pad;        // (B, Lk) true = padded key, or null
  float* a;               // (BH, nk*kC) key row max (-inf: padded or past the end)
  float* r;               // (BH, nk*kC) key stabiliser per position (causal calls only)
  float* cs;              // (BH, nk, 4): P_c, R_c, alpha_c, kscale_c (states_kernel leaves the
                          // chunk max m_c in kscale_c's place for stab_kernel)
  T* st;                  // (BH, nk, (M+1)*E1p) per-chunk key states (summed in fp32 by the scan)
  float* gst;             // (BH, nq, (M+1)*E1p) per-chunk gradient states dH (fp32: the
                          // backward's d phi is a small difference of large terms)
  T* hs;                  // (BH, nk|1, M*E1p) scanned states (forward H, backward dT)
  float* hx;              // (BH, nk|1, E1p) scanned extra row (forward sum v, backward G)
  T* out;                 // (B, H, Lq, Dv), strides o_sb, o_sh, o_sl (last dim dense)
  int64_t o_sb, o_sh, o_sl;
  T *dq, *dk, *dv;        // (BH, Lq|Lk|Lk, D|D|Dv)
  float* dvp;             // causal backward, back1 -> back2: the intra-chunk part of dv, A'^T Yb
                          // (BH, nk*kC, 16 ceil(Dv/16)), fp32 (GEMM accumulators, unrounded)
  T* fwm;                 // causal backward, back1 -> back2: Wm (BH, nk*kC, kC), from which (with
                          // phi, in fph) back2 forms the intra-chunk part of dkhat, Wm^T phi
  float* dW;              // (M, D) fp32 accumulator, or null
  // Causal calls from autograd: kFeatSave, forward_kernel also writes each chunk's features, A',
  // output and denominators (the backward's GEMMs need exactly these); kFeatLoad, back1/back2
  // read them instead of computing features, A' and y again. Causal backward calls without them
  // (kFeatCompute) point fph at a workspace that back1 fills with phi for back2.
  int feat;
  T *fph, *fkh;           // (BH, nk*kC, M) query features phi, key features khat
  T* fsa;                 // (BH, nk, kC*kC) A'
  float* fyo;             // (BH, nk*kC, Dv) y / den before rounding, or null (Dv > 64)
  float *fps, *fdn;       // (BH, nk*kC) row sums of phi, denominators (with fyo)
  bool bulk;              // save_features / save_back2_inputs may use bulk copies (sm_90 code
                          // only; false: the portable path, see mma::bulk_store)
};
enum Feat { kFeatCompute = 0, kFeatSave = 1, kFeatLoad = 2 };

enum Kind { kStates = 0, kForward = 1, kBack1 = 2, kBack2 = 3 };

struct Smem {
  int w, x, kh, v, stage, vec, phi, s, h, y, gm, yb, ys, total;
};

__host__ __device__ inline int align128(int x) { return (x + 127) & ~127; }

// Byte offsets of every shared buffer of a kernel kind (same function on host and device).
__host__ __device__ inline Smem smem_layout(int kind, int D, int M, int E1p, int tsize) {
  Smem s{};
  int off = 0;
#define PANTHER_TAKE(field, bytes) \
  s.field = off;                   \
  off = align128(off + (bytes))
  // Leading dimensions are padded by kPad elements: rows 2^k x 128 bytes apart would put every
  // row of a WMMA tile in the same shared-memory banks.
  const int lx = D + kPad, lm = M + kPad, le = E1p + kPad;
  PANTHER_TAKE(w, M * lx * tsize);
  PANTHER_TAKE(x, kC * lx * tsize);
  PANTHER_TAKE(kh, kC * lm * tsize);
  PANTHER_TAKE(v, kC * le * tsize);
  if (kind != kStates) {  // states_kernel keeps its tiles in mma.sync fragments (no staging)
    PANTHER_TAKE(stage, kWarps * 256 * 4);
  }
  PANTHER_TAKE(vec, kVecFloats * 4);
  if (kind != kStates) {
    PANTHER_TAKE(phi, kC * lm * tsize);  // back2: the chunk's query features, for Wm^T phi
  }
  if (kind == kForward || kind == kBack1) {
    PANTHER_TAKE(s, kC * kLC * tsize);
  }
  if (kind == kBack2) {
    PANTHER_TAKE(gm, kC * kLC * tsize);
  }
  if (kind != kStates) {
    PANTHER_TAKE(h, M * le * tsize);
  }
  if (kind == kForward) {
    PANTHER_TAKE(y, kC * E1p * 4);
  }
  if (kind == kBack1) {
    PANTHER_TAKE(gm, kC * kLC * tsize);
    PANTHER_TAKE(yb, kC * le * tsize);
    PANTHER_TAKE(ys, kC * le * tsize);
  }
#undef PANTHER_TAKE
  s.total = off;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Warp-level helpers

// acc += A (16 x K) B (K x 16). A, B point at the tile's origin; layouts as in WMMA:
// A row-major: (r, k) at A[r*lda + k]; col-major: A[r + k*lda]. B row-major: (k, c) at
// B[k*ldb + c]; col-major: B[k + c*ldb].
// Operand loads from shared memory. NVVM does not infer the shared state space for the bf16
// WMMA load intrinsics (every load came out generic, ~10x slower per MMA step on an H100), so the
// CUDA build issues wmma.load ... .shared itself; the emulator uses the WMMA API.
template <class Use, class T, class L>
__device__ __forceinline__ void load_shared(wmma::fragment<Use, 16, 16, 16, T, L>& f, const T* p,
                                            int ld) {
#if defined(PANTHER_CUDA_EMU)
  wmma::load_matrix_sync(f, p, ld);
#else
  static_assert(std::is_same<T, __nv_bfloat16>::value, "shared WMMA loads are written for bf16");
  static_assert(sizeof(f.x) == 16, "a bf16 m16n16k16 a/b fragment is 4 registers");
  unsigned* r = reinterpret_cast<unsigned*>(&f.x[0]);
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  constexpr bool is_a = std::is_same<Use, wmma::matrix_a>::value;
  constexpr bool row = std::is_same<L, RowM>::value;
  if (is_a && row)
    asm volatile("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16 {%0,%1,%2,%3}, [%4], %5;"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a), "r"(ld));
  else if (is_a)
    asm volatile("wmma.load.a.sync.aligned.col.m16n16k16.shared.bf16 {%0,%1,%2,%3}, [%4], %5;"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a), "r"(ld));
  else if (row)
    asm volatile("wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16 {%0,%1,%2,%3}, [%4], %5;"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a), "r"(ld));
  else
    asm volatile("wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16 {%0,%1,%2,%3}, [%4], %5;"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a), "r"(ld));
#endif
}

template <class T, class LA, class LB>
__device__ __forceinline__ void mma_acc(Acc& acc, const T* A, int lda, const T* B, int ldb, int K) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb;
  const int da = std::is_same<LA, RowM>::value ? 16 : 16 * lda;
  const int db = std::is_same<LB, RowM>::value ? 16 * ldb : 16;
#pragma unroll 4
  for (int k = 0; k < K; k += 16) {
    load_shared(fa, A, lda);
    load_shared(fb, B, ldb);
    wmma::mma_sync(acc, fa, fb, acc);
    A += da;
    B += db;
  }
}

// A warp's tiles of a (kC x 16 n) output: t = warp, warp + kWarps, ... < kRT n, all in row tile
// warp % kRT (kWarps % kRT == 0), column tiles t / kRT. Loops over them in batches of up to kNT
// (column tiles kCS apart) so that a batch's MMA chains run side by side and share their A
// fragments: one tile at a time, every MMA waited for the one before it and for its own loads.
constexpr int kNT = 4;
constexpr int kCS = kWarps / kRT;
template <int N = kNT>
__device__ __forceinline__ int batch_count(int t0, int n_tiles) {
  const int left = (n_tiles - t0 + kWarps - 1) / kWarps;
  return left < N ? left : N;
}

// acc[u] += A (16 x K) B_u (K x 16) for u < cnt, B_u the column tile ct0 + u kCS of B (layouts
// as in mma_acc).
template <class T, class LA, class LB, int N>
__device__ __forceinline__ void mma_acc_cols(Acc (&acc)[N], int cnt, const T* A, int lda,
                                             const T* B, int ldb, int ct0, int K) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb[N];
  const int da = std::is_same<LA, RowM>::value ? 16 : 16 * lda;
  const int db = std::is_same<LB, RowM>::value ? 16 * ldb : 16;
  const int64_t cs = std::is_same<LB, RowM>::value ? 16 * kCS : int64_t{16} * kCS * ldb;
  B += std::is_same<LB, RowM>::value ? ct0 * 16 : static_cast<int64_t>(ct0) * 16 * ldb;
  for (int k = 0; k < K; k += 16) {
    load_shared(fa, A, lda);
#pragma unroll
    for (int u = 0; u < N; ++u)
      if (u < cnt) load_shared(fb[u], B + u * cs, ldb);
#pragma unroll
    for (int u = 0; u < N; ++u)
      if (u < cnt) wmma::mma_sync(acc[u], fa, fb[u], acc[u]);
    A += da;
    B += db;
  }
}
template <int N>
__device__ __forceinline__ void zero_accs(Acc (&acc)[N]) {
#pragma unroll
  for (int u = 0; u < N; ++u) wmma::fill_fragment(acc[u], 0.f);
}

// Tile origins (rt, ct in tiles of 16).
template <class L, class T>
__device__ __forceinline__ const T* tileA(const T* A, int lda, int rt) {
  return std::is_same<L, RowM>::value ? A + static_cast<int64_t>(rt) * 16 * lda : A + rt * 16;
}
template <class L, class T>
__device__ __forceinline__ const T* tileB(const T* B, int ldb, int ct) {
  return std::is_same<L, RowM>::value ? B + ct * 16 : B + static_cast<int64_t>(ct) * 16 * ldb;
}

// Stores acc in the warp's staging tile and copies this lane's 8 values (row lane/2, columns
// (lane%2)*8 ..+8 of the tile) into v.
__device__ __forceinline__ void stage8(float* stage, const Acc& acc, int lane, float v[8]) {
  __syncwarp();
  wmma::store_matrix_sync(stage, acc, 16, wmma::mem_row_major);
  __syncwarp();
  const float4* p = reinterpret_cast<const float4*>(stage + (lane >> 1) * 16 + (lane & 1) * 8);
  const float4 a = p[0], b = p[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

// Rounds 8 floats to T and writes them with one 16-byte store (dst 16-byte aligned).
template <class T>
__device__ __forceinline__ void store8(T* dst, const float v[8]) {
  static_assert(sizeof(T) == 2, "8 x 16-bit values per 16-byte store");
  alignas(16) T tmp[8];
#pragma unroll
  for (int q = 0; q < 8; ++q) tmp[q] = Cvt<T>::t(v[q]);
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(tmp);
}

// Reads 8 consecutive 16-bit values (16-byte aligned) as floats.
template <class T>
__device__ __forceinline__ void load8(const T* src, float v[8]) {
  alignas(16) T tmp[8];
  *reinterpret_cast<uint4*>(tmp) = *reinterpret_cast<const uint4*>(src);
#pragma unroll
  for (int q = 0; q < 8; ++q) v[q] = Cvt<T>::f(tmp[q]);
}

// Reads 8 consecutive floats (32-byte aligned, global memory) with two 16-byte loads.
__device__ __forceinline__ void load8f(const float* src, float v[8]) {
  const float4* p = reinterpret_cast<const float4*>(src);
  const float4 a = p[0], b = p[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void zero8(float v[8]) {
#pragma unroll
  for (int q = 0; q < 8; ++q) v[q] = 0.f;
}

__device__ __forceinline__ float pair_max(float x) {
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
}
__device__ __forceinline__ float pair_sum(float x) {
  return x + __shfl_xor_sync(0xffffffffu, x, 1);
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ---------------------------------------------------------------------------------------------
// Block-level pieces (all threads call them; they end with __syncthreads()).

template <class T>
struct Blk {
  T *w, *x, *kh, *v, *phi, *s, *h, *gm, *yb, *ys;
  float *stage, *stage0, *y;  // stage: this warp's 256 floats of stage0
  // per-row vectors (kC each) and one E1p vector
  float *hn, *r, *si, *valid, *phisum, *rowc, *red, *rs, *kfac, *den, *gn, *yc, *extra;
  int warp, lane, bh, b, hd, chunk, row0, rows;
  int lx, lm, le;  // padded leading dims of x/w, phi/kh, and v/h/yb/ys
};

template <class T>
__device__ Blk<T> make_blk(const Params<T>& p, unsigned char* base, const Smem& L, int chunk,
                           int bh, int len) {
  const int H = p.H;
  Blk<T> k;
  k.lx = p.D + kPad;
  k.lm = p.M + kPad;
  k.le = p.E1p + kPad;
  k.w = reinterpret_cast<T*>(base + L.w);
  k.x = reinterpret_cast<T*>(base + L.x);
  k.kh = reinterpret_cast<T*>(base + L.kh);
  k.v = reinterpret_cast<T*>(base + L.v);
  k.phi = reinterpret_cast<T*>(base + L.phi);
  k.s = reinterpret_cast<T*>(base + L.s);
  k.h = reinterpret_cast<T*>(base + L.h);
  k.gm = reinterpret_cast<T*>(base + L.gm);
  k.yb = reinterpret_cast<T*>(base + L.yb);
  k.ys = reinterpret_cast<T*>(base + L.ys);
  k.y = reinterpret_cast<float*>(base + L.y);
  k.stage0 = reinterpret_cast<float*>(base + L.stage);
  k.stage = k.stage0 + (threadIdx.x >> 5) * 256;
  float* vec = reinterpret_cast<float*>(base + L.vec);
  k.hn = vec;
  k.r = vec + kC;
  k.si = vec + 2 * kC;
  k.valid = vec + 3 * kC;
  k.phisum = vec + 4 * kC;
  k.rowc = vec + 5 * kC;
  k.red = vec + 6 * kC;  // kGroups * kC
  k.rs = vec + 10 * kC;
  k.kfac = vec + 11 * kC;
  k.den = vec + 12 * kC;
  k.gn = vec + 13 * kC;
  k.yc = vec + 14 * kC;
  k.extra = vec + 16 * kC;
  k.warp = threadIdx.x >> 5;
  k.lane = threadIdx.x & 31;
  k.bh = bh;
  k.b = bh / H;
  k.hd = bh - k.b * H;
  k.chunk = chunk;
  k.row0 = chunk * kC;
  k.rows = len - k.row0 < kC ? len - k.row0 : kC;
  return k;
}

// n / d for 0 <= n < 2^22, d > 0, given rd = __frcp_rn(d): (n + 0.5) / d lies at least 0.5 / d
// from an integer, and the two roundings (reciprocal, product) move it by less than that.
__device__ __forceinline__ int div_rcp(int n, float rd) {
  return static_cast<int>((static_cast<float>(n) + 0.5f) * rd);
}

// dst (rows_total x cols, leading dim ld, shared) <- rows [0, rows) of src (row stride sl), zero
// rows in [rows, rows_total). 16-byte vectors, kU of them in flight per thread, when every row
// start is 16-byte aligned (else element by element): one block per SM cannot hide the latency
// of one load at a time.
template <class T>
__device__ void copy_rows(T* dst, int ld, const T* src, int64_t sl, int rows, int rows_total,
                          int cols) {
  constexpr int kE = 16 / sizeof(T);
  const bool vec = cols % kE == 0 && sl % kE == 0 && ld % kE == 0 &&
                   reinterpret_cast<uintptr_t>(src) % 16 == 0;
  if (vec) {
    constexpr int kU = 8;
    // r = idx / vpr via div_rcp (idx < total + kU kThreads, total <= shared bytes / 16): a
    // runtime integer division per vector costs more than the copy itself.
    const int vpr = cols / kE, total = rows_total * vpr;
    const float rvpr = __frcp_rn(static_cast<float>(vpr));
    for (int base = threadIdx.x; base < total; base += kThreads * kU) {
      uint4 tmp[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int idx = base + u * kThreads;
        const int r = div_rcp(idx, rvpr), c = idx - r * vpr;
        if (idx < total && r < rows) {
          tmp[u] = *reinterpret_cast<const uint4*>(src + static_cast<int64_t>(r) * sl + c * kE);
        } else {
          tmp[u].x = tmp[u].y = tmp[u].z = tmp[u].w = 0u;
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int idx = base + u * kThreads;
        const int r = div_rcp(idx, rvpr), c = idx - r * vpr;
        if (idx < total) *reinterpret_cast<uint4*>(dst + r * ld + c * kE) = tmp[u];
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < rows_total * cols; idx += kThreads) {
      const int r = idx / cols, c = idx - r * cols;
      dst[r * ld + c] = r < rows ? src[static_cast<int64_t>(r) * sl + c] : Cvt<T>::t(0.f);
    }
  }
}

// dst (rows x cols, leading dim ld) <- a dense rows x cols matrix.
template <class T>
__device__ void load_matrix(T* dst, int ld, const T* src, int rows, int cols) {
  copy_rows(dst, ld, src, cols, rows, rows, cols);
}

// copy_rows issued as cp.async (mma::cp_async16: 16 bytes, zero-filling the rows past `rows`)
// when every row start is 16-byte aligned; else the synchronous copy_rows. Either way dst may be
// touched only after async_commit() and the async_wait<N>() that covers it (the emulator performs
// the copies only then, so a missing wait fails its tests).
template <class T>
__device__ void copy_rows_async(T* dst, int ld, const T* src, int64_t sl, int rows,
                                int rows_total, int cols) {
  constexpr int kE = 16 / sizeof(T);
  const bool vec = cols % kE == 0 && sl % kE == 0 && ld % kE == 0 &&
                   reinterpret_cast<uintptr_t>(src) % 16 == 0;
  if (vec) {
    // (A cheaper index (a shift per vector where vpr is a power of two) measured slower on an
    // H200 for the generic instantiations, back1 at 8k 317 -> 344 us, forward 250 -> 262, as a
    // one-column-per-thread loop did on the H100: our reading is that the copies of later groups,
    // issued sooner, delay the first group's.)
    const int vpr = cols / kE, total = rows_total * vpr;
    const float rvpr = __frcp_rn(static_cast<float>(vpr));
    for (int idx = threadIdx.x; idx < total; idx += kThreads) {
      const int r = div_rcp(idx, rvpr), c = idx - r * vpr;
      const bool in = r < rows;
      mma::cp_async16(dst + r * ld + c * kE, in ? src + static_cast<int64_t>(r) * sl + c * kE : src,
                      in);
    }
    return;
  }
  copy_rows(dst, ld, src, sl, rows, rows_total, cols);
}

// Closes this thread's group of cp.async copies.
__device__ __forceinline__ void async_commit() { mma::cp_async_commit(); }

// Waits until at most N of the committed groups are in flight, then for the whole block (the
// synchronous fallback's plain stores are published by the same barrier).
template <int N>
__device__ __forceinline__ void async_wait() {
  mma::cp_async_wait<N>();
  __syncthreads();
}

// This chunk's query or key rows (row stride in *sl).
template <class T>
__device__ __forceinline__ const T* x_rows(const Params<T>& p, const Blk<T>& k, bool keys,
                                           int64_t* sl) {
  *sl = keys ? p.k_sl : p.q_sl;
  return keys ? p.k + k.b * p.k_sb + k.hd * p.k_sh + static_cast<int64_t>(k.row0) * p.k_sl
              : p.q + k.b * p.q_sb + k.hd * p.q_sh + static_cast<int64_t>(k.row0) * p.q_sl;
}

// Issues x <- query or key rows (cp.async); keys need x_norms after the wait.
template <class T>
__device__ void issue_x(const Params<T>& p, Blk<T>& k, bool keys) {
  int64_t sl;
  const T* base = x_rows(p, k, keys, &sl);
  copy_rows_async(k.x, k.lx, base, sl, k.rows, kC, p.D);
}

// hn = |x'|^2 / 2 per row of k.x (the key features need it; for queries it cancels against the
// normalisation). Eight threads per row, each summing every eighth element, then a shuffle.
template <class T>
__device__ void x_norms(const Params<T>& p, Blk<T>& k) {
  static_assert(kThreads == 8 * kC, "eight threads per row");
  const int i = threadIdx.x >> 3, part = threadIdx.x & 7;
  float acc = 0.f;
  for (int d = part; d < p.D; d += 8) {
    const float xv = Cvt<T>::f(k.x[i * k.lx + d]);
    acc += xv * xv;
  }
  acc += __shfl_xor_sync(0xffffffffu, acc, 1);
  acc += __shfl_xor_sync(0xffffffffu, acc, 2);
  acc += __shfl_xor_sync(0xffffffffu, acc, 4);
  if (part == 0) k.hn[i] = 0.5f * p.xscale * p.xscale * acc;
  __syncthreads();
}

// valid[] per key row (no barrier).
template <class T>
__device__ void key_valid(const Params<T>& p, Blk<T>& k) {
  for (int i = threadIdx.x; i < kC; i += kThreads) {
    bool ok = i < k.rows;
    if (ok && p.pad) ok = !p.pad[static_cast<int64_t>(k.b) * p.Lk + k.row0 + i];
    k.valid[i] = ok ? 1.f : 0.f;
  }
}

// Issues the copy of this chunk's value rows into k.v (cp.async); finish with fix_values.
template <class T>
__device__ void issue_values(const Params<T>& p, Blk<T>& k) {
  const T* base = p.v + k.b * p.v_sb + k.hd * p.v_sh + static_cast<int64_t>(k.row0) * p.v_sl;
  copy_rows_async(k.v, k.le, base, p.v_sl, k.rows, kC, p.Dv);
}

// v <- [v, 1, 0...] * valid once the copy and valid[] are complete (after a barrier).
template <class T>
__device__ void fix_values(const Params<T>& p, Blk<T>& k) {
  for (int i = k.warp; i < kC; i += kWarps) {
    const bool ok = k.valid[i] != 0.f;
    for (int e = ok ? p.Dv + k.lane : k.lane; e < p.E1p; e += 32)
      k.v[i * k.le + e] = Cvt<T>::t(ok && e == p.Dv ? 1.f : 0.f);
  }
  __syncthreads();
}

// Pre-activation tile (before xscale): x (kC x D) rows of tile rt times W rows of tile ct.
template <class T>
__device__ __forceinline__ void pre_tile(Acc& acc, const Blk<T>& k, int D, int rt, int ct) {
  wmma::fill_fragment(acc, 0.f);
  mma_acc<T, RowM, ColM>(acc, tileA<RowM>(k.x, k.lx, rt), k.lx, tileB<ColM>(k.w, k.lx, ct), k.lx,
                         D);
}

// pre_tile for a batch: cnt column tiles ct0 + u kCS of row tile rt (mma_acc_cols).
template <class T>
__device__ __forceinline__ void pre_tiles(Acc (&acc)[kNT], int cnt, const Blk<T>& k, int D, int rt,
                                          int ct0) {
  zero_accs(acc);
  mma_acc_cols<T, RowM, ColM>(acc, cnt, tileA<RowM>(k.x, k.lx, rt), k.lx, k.w, k.lx, ct0, D);
}

// Combines the per-warp-group row partials in red[] with op (max or sum) into out[].
__device__ __forceinline__ void combine_rows(const float* red, float* out, bool is_max) {
  __syncthreads();
  for (int i = threadIdx.x; i < kC; i += kThreads)
  {
    float acc = red[i];
    for (int g = 1; g < kGroups; ++g) acc = is_max ? fmaxf(acc, red[g * kC + i]) : acc + red[g * kC + i];
    out[i] = acc;
  }
  __syncthreads();
}

// Column sums over the kC rows of a shared (kC x E1p, leading dim ld) matrix: calls
// put(e, sum_i wt(i) m[i][e]) for every e < E1p, from lane e % 8 of the warp that owns e (the
// other lanes of that warp hold the same sum). A warp takes 8 columns at a time (E1p / 8 units,
// warps striding over them); its 4 lane groups of 8 each sum every fourth row, then two shuffles
// combine them. No barrier; every lane of a warp takes the same trips (the shuffles).
template <class T, class Wt, class Put>
__device__ __forceinline__ void col_sums(const T* m, int ld, int E1p, int warp, int lane, Wt&& wt,
                                         Put&& put) {
  const int c = lane & 7, rg = lane >> 3;
  for (int u = warp; u < E1p / 8; u += kWarps) {
    const int e = u * 8 + c;
    float s = 0.f;
#pragma unroll 4
    for (int i = rg; i < kC; i += 4) s += wt(i) * Cvt<T>::f(m[i * ld + e]);
    s += __shfl_xor_sync(0xffffffffu, s, 8);
    s += __shfl_xor_sync(0xffffffffu, s, 16);
    if (rg == 0) put(e, s);
  }
}

// ---- Register-level fragments (mma.cuh; g = lane / 4, t = lane % 4), used by states_kernel.

__device__ __forceinline__ float quad_max(float x) {  // over the 4 lanes of a quad (same g)
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// 16-byte store of u[0..3] (16-byte aligned; memcpy under the emulator).
__device__ __forceinline__ void put16(void* dst, const unsigned (&u)[4]) {
#if defined(PANTHER_CUDA_EMU)
  std::memcpy(dst, u, 16);
#else
  *reinterpret_cast<uint4*>(dst) = make_uint4(u[0], u[1], u[2], u[3]);
#endif
}

// 4 x 4 transpose within each quad: lane t's u[q] becomes lane q's old u[t]. Round i: lane t
// sends its u[t ^ i] to lane t ^ i, which keeps it as u[t] (indices by selects: no local memory).
__device__ __forceinline__ void quad_transpose(unsigned (&u)[4], int t) {
  unsigned r[4];
  r[0] = u[0], r[1] = u[1], r[2] = u[2], r[3] = u[3];
#pragma unroll
  for (int i = 1; i < 4; ++i) {
    const int q = t ^ i;
    const unsigned send = q == 0 ? u[0] : q == 1 ? u[1] : q == 2 ? u[2] : u[3];
    const unsigned got = __shfl_xor_sync(0xffffffffu, send, i);
#pragma unroll
    for (int c = 0; c < 4; ++c) r[c] = c == q ? got : r[c];
  }
  u[0] = r[0], u[1] = r[1], u[2] = r[2], u[3] = r[3];
}

// Pre-activations (before xscale) of x rows [16 rt, +16) times W rows [n0, n0 + 8 nt) into
// m16n8 accumulators acc[0 .. nt) (nt even, <= 4; acc[nt ..] untouched): lane (g, t) gets rows
// 16 rt + g (acc[j][0..1]) and + 8 (acc[j][2..3]), columns n0 + 8 j + 2t, + 1. A = x row-major,
// B = W^T stored n-major (W's rows), both via ldmatrix_x4 (B: two n8 tiles per load).
template <class T>
__device__ __forceinline__ void pre_frag(float (&acc)[4][4], const Blk<T>& k, int D, int rt,
                                         int n0, int nt) {
#pragma unroll
  for (int j = 0; j < 4; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  const T* a = k.x + (rt * 16 + (k.lane & 15)) * k.lx + (k.lane >> 4) * 8;
  const T* b = k.w + (n0 + (k.lane & 7) + (k.lane >> 4) * 8) * k.lx + ((k.lane >> 3) & 1) * 8;
#pragma unroll 2
  for (int d = 0; d < D; d += 16) {
    unsigned fa[4];
    mma::ldmatrix_x4(fa, a + d);
#pragma unroll
    for (int j = 0; j < 4; j += 2) {
      if (j < nt) {  // warp-uniform
        unsigned fb[4];
        mma::ldmatrix_x4(fb, b + j * 8 * k.lx + d);
        const unsigned b0[2] = {fb[0], fb[1]}, b1[2] = {fb[2], fb[3]};
        mma::mma_16816<T>(acc[j], fa, b0, acc[j]);
        mma::mma_16816<T>(acc[j + 1], fa, b1, acc[j + 1]);
      }
    }
  }
}

// Query features phi = f(pre) + ek into k.phi (kC x M), row sums into k.phisum.
template <class T>
__device__ void query_features(const Params<T>& p, Blk<T>& k) {
  const int CT = p.M / 16, rr = k.lane >> 1, c0 = (k.lane & 1) * 8, grp = k.warp / kRT;
  const int rt = k.warp % kRT, i = rt * 16 + rr;
  Acc acc;
  float v[8];
  // Softmax with at most kKeep tiles per warp (M <= 256): pass 1 keeps this lane's 8 values of
  // each tile in registers for pass 2 instead of recomputing them. (states_kernel recomputes:
  // it must stay within 64 registers for two blocks per SM.)
  constexpr int kKeep = kNT;
  if (p.softmax && kRT * CT <= kKeep * kWarps) {
    float pre[kKeep][8];
    float mx = -INFINITY;
    {
      const int cnt = batch_count(k.warp, kRT * CT);
      Acc accs[kNT];
      pre_tiles(accs, cnt, k, p.D, rt, k.warp / kRT);
#pragma unroll
      for (int u = 0; u < kKeep; ++u) {
        if (u >= cnt) continue;
        stage8(k.stage, accs[u], k.lane, pre[u]);
#pragma unroll
        for (int q = 0; q < 8; ++q) mx = fmaxf(mx, pre[u][q]);
      }
    }
    mx = pair_max(mx);
    if ((k.lane & 1) == 0) k.red[grp * kC + i] = mx;
    combine_rows(k.red, k.rowc, true);
    const float ci = k.rowc[i];
    float sum = 0.f;
#pragma unroll
    for (int u = 0; u < kKeep; ++u) {
      const int t = k.warp + u * kWarps;
      if (t < kRT * CT) {
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          v[q] = p.sM * __expf((pre[u][q] - ci) * p.xscale) + p.ek;
          sum += v[q];
        }
        store8(k.phi + i * k.lm + (t / kRT) * 16 + c0, v);
      }
    }
    sum = pair_sum(sum);
    if ((k.lane & 1) == 0) k.red[grp * kC + i] = sum;
    combine_rows(k.red, k.phisum, false);
    return;
  }
  if (p.softmax) {  // pass 1: row max of x W^T (the query stabiliser, per row)
    float mx = -INFINITY;
    for (int t = k.warp; t < kRT * CT; t += kWarps) {
      pre_tile(acc, k, p.D, rt, t / kRT);
      stage8(k.stage, acc, k.lane, v);
#pragma unroll
      for (int q = 0; q < 8; ++q) mx = fmaxf(mx, v[q]);
    }
    mx = pair_max(mx);
    if ((k.lane & 1) == 0) k.red[grp * kC + i] = mx;
    combine_rows(k.red, k.rowc, true);
  }
  float sum = 0.f;
  for (int t = k.warp; t < kRT * CT; t += kWarps) {
    const int ct = t / kRT;
    pre_tile(acc, k, p.D, rt, ct);
    stage8(k.stage, acc, k.lane, v);
    const float ci = k.rowc[i];
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const float f = p.softmax ? p.sM * __expf((v[q] - ci) * p.xscale) : p.sM * fmaxf(v[q], 0.f);
      v[q] = f + p.ek;
      sum += v[q];
    }
    store8(k.phi + i * k.lm + ct * 16 + c0, v);
  }
  sum = pair_sum(sum);
  if ((k.lane & 1) == 0) k.red[grp * kC + i] = sum;
  combine_rows(k.red, k.phisum, false);
}

// Key features with a known per-row stabiliser k.r[]: khat = sM exp(x'W^T - |x'|^2/2 - r) * valid
// (relu: sM relu(x W^T) * valid) into k.kh.
template <class T>
__device__ void key_features(const Params<T>& p, Blk<T>& k) {
  const int CT = p.M / 16, rr = k.lane >> 1, c0 = (k.lane & 1) * 8;
  const int rt = k.warp % kRT, i = rt * 16 + rr;
  const int n = kRT * CT;
  const bool ok = k.valid[i] != 0.f;
  const float off = k.hn[i] + k.r[i];
  for (int t0 = k.warp; t0 < n; t0 += kNT * kWarps) {
    const int cnt = batch_count(t0, n), ct0 = t0 / kRT;
    Acc accs[kNT];
    pre_tiles(accs, cnt, k, p.D, rt, ct0);
#pragma unroll
    for (int u = 0; u < kNT; ++u) {
      if (u >= cnt) continue;
      float v[8];
      stage8(k.stage, accs[u], k.lane, v);
#pragma unroll
      for (int q = 0; q < 8; ++q)
        v[q] = !ok ? 0.f
               : p.softmax ? p.sM * __expf(v[q] * p.xscale - off) : p.sM * fmaxf(v[q], 0.f);
      store8(k.kh + i * k.lm + (ct0 + u * kCS) * 16 + c0, v);
    }
  }
  __syncthreads();
}

// A' (kC x kC) = (phi khat^T) o E + ek phisum_i on j <= i, 0 above the diagonal, into k.s.
template <class T>
__device__ void attn_block(const Params<T>& p, Blk<T>& k) {
  const int rr = k.lane >> 1, c0 = (k.lane & 1) * 8;
  Acc acc;
  float v[8];
  for (int t = k.warp; t < kRT * kRT; t += kWarps) {
    const int rt = t % kRT, ct = t / kRT, i = rt * 16 + rr;
    T* dst = k.s + i * kLC + ct * 16 + c0;
    if (ct > rt) {
#pragma unroll
      for (int q = 0; q < 8; ++q) dst[q] = Cvt<T>::t(0.f);
      continue;
    }
    wmma::fill_fragment(acc, 0.f);
    mma_acc<T, RowM, ColM>(acc, tileA<RowM>(k.phi, k.lm, rt), k.lm, tileB<ColM>(k.kh, k.lm, ct),
                           k.lm, p.M);
    stage8(k.stage, acc, k.lane, v);
    const float ri = k.r[i], epsi = p.ek * k.phisum[i];
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const int j = ct * 16 + c0 + q;
      v[q] = j <= i ? v[q] * (p.softmax ? __expf(fminf(k.r[j] - ri, 0.f)) : 1.f) + epsi : 0.f;
    }
    store8(dst, v);
  }
  __syncthreads();
}

// Per-chunk scalars and per-row stabiliser data: r, s_i = exp(P - r_i), kfac_j = exp(r_j - R), in
// two halves so that the loads overlap the block's copies instead of queueing behind them: a
// kernel calls stab_fetch (thread i < kC loads what row i needs; no barrier, one round trip)
// before issuing its cp.async copies and stab_store (no barrier either) after; the barrier of
// the next async_wait publishes the values.
struct StabRegs {
  float P = 0.f, R = 0.f, r = 0.f;
};
template <class T>
__device__ __forceinline__ StabRegs stab_fetch(const Params<T>& p, const Blk<T>& k) {
  StabRegs s;
  const int i = threadIdx.x;
  if (i >= kC) return s;
  const int64_t cb = static_cast<int64_t>(k.bh) * p.nk;
  if (p.causal) {
    s.P = p.cs[(cb + k.chunk) * 4 + 0];
    s.R = p.cs[(cb + k.chunk) * 4 + 1];
    if (p.softmax) s.r = p.r[cb * kC + k.row0 + i];
  } else {  // non-causal: one stabiliser R for every key; queries see the whole state (s = 1)
    s.R = p.cs[cb * 4 + 1];
    s.P = s.R;
    if (p.softmax) s.r = s.R;
  }
  return s;
}
template <class T>
__device__ __forceinline__ void stab_store(const Params<T>& p, Blk<T>& k, const StabRegs& s,
                                           bool query_side_only) {
  const int i = threadIdx.x;
  if (i >= kC) return;
  k.r[i] = s.r;
  k.si[i] = p.softmax && p.causal ? __expf(s.P - s.r) : 1.f;
  k.kfac[i] = p.softmax && !query_side_only ? __expf(fminf(s.r - s.R, 0.f)) : 1.f;
}

// ---------------------------------------------------------------------------------------------
// Kernels
//
// Each big kernel comes in two instantiations: kShape = kShapeAny reads D, M, Dv, E1p and the
// kernel choice from the parameters; kShapeD64M256 is the common Performer shape (softmax
// kernel, head and value dim 64, 256 features), with those fixed at compile time. Every helper
// is inlined into the kernel, so the constants reach every loop bound, shared-memory offset and
// leading dimension, and every softmax/relu choice is made once: the WMMA operand addresses, the
// copy loops' index arithmetic, the tile loops and the feature maps lose most of their integer
// and branch instructions (the profile of the generic build: ~40% of its instructions were IMAD,
// ISETP, BRA, LEA, SHF and LOP3).
enum Shape { kShapeAny = 0, kShapeD64M256 = 1 };

// (forward, back1 and back2 run one block per SM, their shared memory allows no more: their
// launch bounds say so, else ptxas may cap them at 64 registers for two blocks and spill.)

// Overwrites p's sizes with the constants of kShape (the host launched this instantiation only
// for those sizes).
template <int kShape, class T>
__device__ __forceinline__ void fix_shape(Params<T>& p) {
  if constexpr (kShape == kShapeD64M256) {
    p.softmax = true;
    p.D = 64;
    p.M = 256;
    p.Dv = 64;
    p.E1p = 80;
  }
}

// Chunk states (see the top of the file). grid (nk, BH).
template <class T, int kShape>
__global__ void __launch_bounds__(kThreads) states_kernel(Params<T> p) {
  fix_shape<kShape>(p);
  PANTHER_DYNAMIC_SMEM(smem);
  const Smem L = smem_layout(kStates, p.D, p.M, p.E1p, sizeof(T));
  Blk<T> k = make_blk<T>(p, smem, L, blockIdx.x, blockIdx.y, p.Lk);
  // cp.async groups: {W, keys}, then v (filled while the features are computed).
  copy_rows_async(k.w, k.lx, p.W, p.D, p.M, p.M, p.D);
  issue_x(p, k, /*keys=*/true);
  async_commit();
  issue_values(p, k);
  async_commit();
  key_valid(p, k);
  async_wait<1>();  // W, keys
  x_norms(p, k);
  // x W^T in mma.sync fragments: warp w keeps row tile rt = w % kRT (lane rows i0 = 16 rt + g,
  // i1 = i0 + 8) and the 32-column slabs s = grp, grp + kGroups, ... (the last one 16 wide when
  // M % 32 == 16); a row's values lie in the 4 lanes of a quad, across slabs and kGroups warps.
  const int g = k.lane >> 2, t = k.lane & 3, grp = k.warp / kRT, rt = k.warp % kRT;
  const int i0 = rt * 16 + g, i1 = i0 + 8, S = (p.M + 31) / 32;
  float acc[4][4];
  float mc = 0.f;  // chunk max (softmax)
  if (p.softmax) {
    float m0 = -INFINITY, m1 = -INFINITY;
    for (int s = grp; s < S; s += kGroups) {
      const int nt = p.M - 32 * s >= 32 ? 4 : 2;
      pre_frag(acc, k, p.D, rt, 32 * s, nt);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (j < nt) {
          m0 = fmaxf(m0, fmaxf(acc[j][0], acc[j][1]));
          m1 = fmaxf(m1, fmaxf(acc[j][2], acc[j][3]));
        }
    }
    m0 = quad_max(m0);
    m1 = quad_max(m1);
    if (t == 0) {
      k.red[grp * kC + i0] = m0;
      k.red[grp * kC + i1] = m1;
    }
    combine_rows(k.red, k.rowc, true);
    for (int j = threadIdx.x; j < kC; j += kThreads) {
      const float aj = k.valid[j] != 0.f ? k.rowc[j] * p.xscale - k.hn[j] : -INFINITY;
      k.rowc[j] = aj;
      p.a[static_cast<int64_t>(k.bh) * p.nk * kC + k.row0 + j] = aj;
    }
    __syncthreads();
    static_assert(kC == 64, "two rows per lane");
    mc = fmaxf(k.rowc[k.lane], k.rowc[k.lane + 32]);
    for (int o = 16; o > 0; o >>= 1) mc = fmaxf(mc, __shfl_xor_sync(0xffffffffu, mc, o));
    // The chunk max for stab_kernel (which turns it into kscale_c = exp(m_c - R_c)).
    if (threadIdx.x == 0) p.cs[(static_cast<int64_t>(k.bh) * p.nk + k.chunk) * 4 + 3] = mc;
  }
  {  // pass 2 (recomputes x W^T): khat = sM exp(pre xscale - hn - mc) (relu: sM relu(pre)), 0 for
     // invalid keys, rounded to T into k.kh
    const bool ok0 = k.valid[i0] != 0.f, ok1 = k.valid[i1] != 0.f;
    const float off0 = k.hn[i0] + mc, off1 = k.hn[i1] + mc;
    auto feat = [&](float x, bool ok, float off) {
      return !ok ? 0.f : p.softmax ? p.sM * __expf(x * p.xscale - off) : p.sM * fmaxf(x, 0.f);
    };
    for (int s = grp; s < S; s += kGroups) {
      const int nt = p.M - 32 * s >= 32 ? 4 : 2;
      pre_frag(acc, k, p.D, rt, 32 * s, nt);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (j < nt) {
          T* dst = k.kh + 32 * s + 8 * j + 2 * t;
          mma::store_pair(dst + i0 * k.lm,
                   mma::pack2<T>(feat(acc[j][0], ok0, off0), feat(acc[j][1], ok0, off0)));
          mma::store_pair(dst + i1 * k.lm,
                   mma::pack2<T>(feat(acc[j][2], ok1, off1), feat(acc[j][3], ok1, off1)));
        }
    }
  }
  async_wait<0>();  // v
  fix_values(p, k);
  // T'_c = khat'^T [v, 1]  (M x E1p) to global, then the chunk's sum of [v, 1]. Work item: an
  // m tile mt (16 features) and every P-th 16-column tile of E1p from part; A = khat^T (kh is its
  // k-major storage: ldmatrix_x4_trans), all kC/16 k steps kept in registers; B = [v, 1] k-major
  // (ldmatrix_x4_trans, two n8 tiles per load). Accumulators go straight to global (16 bytes).
  T* out = p.st + (static_cast<int64_t>(k.bh) * p.nk + k.chunk) * (p.M + 1) * p.E1p;
  const int CT = p.M / 16, ET = p.E1p / 16;
  const int P = kWarps / CT < 1 ? 1 : kWarps / CT < ET ? kWarps / CT : ET;
  for (int w = k.warp; w < CT * P; w += kWarps) {
    const int mt = w % CT, part = w / CT;
    unsigned a[kC / 16][4];
    const T* pa =
        k.kh + ((k.lane & 7) + (k.lane >> 4) * 8) * k.lm + mt * 16 + ((k.lane >> 3) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < kC / 16; ++kk) mma::ldmatrix_x4_trans(a[kk], pa + kk * 16 * k.lm);
    for (int et = part; et < ET; et += P) {
      const T* pb = k.v + (k.lane & 15) * k.le + et * 16 + (k.lane >> 4) * 8;
      float c[2][4] = {};
#pragma unroll
      for (int kk = 0; kk < kC / 16; ++kk) {
        unsigned b[4];
        mma::ldmatrix_x4_trans(b, pb + kk * 16 * k.le);
        const unsigned b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        mma::mma_16816<T>(c[0], a[kk], b0, c[0]);
        mma::mma_16816<T>(c[1], a[kk], b1, c[1]);
      }
      // The lane's pairs are part t of the quad's 4 row segments (16 bytes each): q = 2h + j is
      // row 16 mt + g + 8h, columns 16 et + 8j .. + 8. After quad_transpose lane t holds all of
      // segment t: one 16-byte store (two lanes fill a 32-byte sector).
      unsigned u[4] = {mma::pack2<T>(c[0][0], c[0][1]), mma::pack2<T>(c[1][0], c[1][1]),
                       mma::pack2<T>(c[0][2], c[0][3]), mma::pack2<T>(c[1][2], c[1][3])};
      quad_transpose(u, t);
      put16(out + static_cast<int64_t>(mt * 16 + g + 8 * (t >> 1)) * p.E1p + et * 16 + 8 * (t & 1),
            u);
    }
  }
  // The chunk's sum of [v, 1] over its kC rows (all warps: see col_sums).
  T* out_x = out + static_cast<int64_t>(p.M) * p.E1p;
  col_sums(k.v, k.le, p.E1p, k.warp, k.lane, [](int) { return 1.f; },
           [&](int e, float s) { out_x[e] = Cvt<T>::t(s); });
}

// Key stabiliser per position and chunk scalars. grid (BH), block 1024.
//   causal: r_j = max over valid keys j' <= j of a_j' (positions before the first valid key get
//   the first finite value, 0 if none); P_c = r at the chunk's first position (c = 0) or at the
//   previous chunk's last; R_c = r at the chunk's last position.
//   non-causal: R = max over all valid keys (0 if none), stored in cs[bh, 0, 1].
template <class T>
__global__ void __launch_bounds__(1024) stab_kernel(Params<T> p) {
  PANTHER_DYNAMIC_SMEM(smem);
  float* part = reinterpret_cast<float*>(smem);  // 2 * 1024
  const int tid = threadIdx.x, nt = blockDim.x, bh = blockIdx.x;
  const int Lp = p.nk * kC, seg = (Lp + nt - 1) / nt, j0 = tid * seg;
  const int j1 = j0 + seg < Lp ? j0 + seg : Lp;
  const float* a = p.a + static_cast<int64_t>(bh) * Lp;
  float* r = p.r + static_cast<int64_t>(bh) * Lp;
  float* cs = p.cs + static_cast<int64_t>(bh) * p.nk * 4;
  if (!p.softmax) {  // (r is read by causal calls only: non-causal ones keep no room for it)
    if (p.causal)
      for (int j = tid; j < Lp; j += nt) r[j] = 0.f;
    for (int c = tid; c < p.nk; c += nt) {
      cs[c * 4 + 0] = 0.f;
      cs[c * 4 + 1] = 0.f;
      cs[c * 4 + 2] = 1.f;
      cs[c * 4 + 3] = 1.f;
    }
    return;
  }
  // (Loops over a[] are unrolled so that their loads are issued together: one at a time, each
  // waited for, made this kernel latency-bound.)
  float m = -INFINITY;
#pragma unroll 8
  for (int j = j0; j < j1; ++j) m = fmaxf(m, a[j]);
  part[tid] = m;
  __syncthreads();
  // Inclusive max-scan of the segment maxima (Hillis-Steele, ping-pong buffers).
  float* src = part;
  float* dst = part + nt;
  for (int o = 1; o < nt; o <<= 1) {
    dst[tid] = tid >= o ? fmaxf(src[tid], src[tid - o]) : src[tid];
    __syncthreads();
    float* tmp = src;
    src = dst;
    dst = tmp;
  }
  const float total = src[nt - 1];
  float run = tid > 0 ? src[tid - 1] : -INFINITY;
  __syncthreads();
  if (p.causal) {
    // First finite r = the first valid key's a (r is non-decreasing).
    float first = INFINITY;
#pragma unroll 8
    for (int j = j0; j < j1; ++j) {
      run = fmaxf(run, a[j]);
      r[j] = run;
      if (run > -INFINITY) first = fminf(first, run);
    }
    dst[tid] = first;  // reuse the other buffer for a min-reduction
    __syncthreads();
    for (int o = nt / 2; o > 0; o >>= 1) {
      if (tid < o) dst[tid] = fminf(dst[tid], dst[tid + o]);
      __syncthreads();
    }
    const float f = dst[0] < INFINITY ? dst[0] : 0.f;
    for (int j = j0; j < j1; ++j)
      if (!(r[j] > -INFINITY)) r[j] = f;
    __syncthreads();
    for (int c = tid; c < p.nk; c += nt) {
      const float R = r[(c + 1) * kC - 1];
      const float P = c == 0 ? r[0] : r[c * kC - 1];
      const float mc = cs[c * 4 + 3];  // the chunk max of a, from states_kernel
      cs[c * 4 + 0] = P;
      cs[c * 4 + 1] = R;
      cs[c * 4 + 2] = __expf(P - R);
      cs[c * 4 + 3] = mc > -INFINITY ? __expf(mc - R) : 0.f;
    }
  } else {
    const float R = total > -INFINITY ? total : 0.f;
    for (int c = tid; c < p.nk; c += nt) {
      const float mc = cs[c * 4 + 3];  // the chunk max of a, from states_kernel
      cs[c * 4 + 0] = R;
      cs[c * 4 + 1] = R;
      cs[c * 4 + 2] = 1.f;
      cs[c * 4 + 3] = mc > -INFINITY ? __expf(mc - R) : 0.f;
    }
  }
}

// Two adjacent values as one aligned vector access (p aligned to 2 sizeof(S)). The emulator
// copies with memcpy, which host compilers may not reorder around the other threads' accesses.
template <class S>
struct alignas(2 * sizeof(S)) Two {
  S v[2];
};
template <class S>
__device__ __forceinline__ Two<S> load_two(const S* p) {
#if defined(PANTHER_CUDA_EMU)
  Two<S> t;
  memcpy(&t, p, sizeof(t));
  return t;
#else
  return *reinterpret_cast<const Two<S>*>(p);
#endif
}
template <class S>
__device__ __forceinline__ void store_two(S* p, S a, S b) {
  Two<S> t;
  t.v[0] = a;
  t.v[1] = b;
#if defined(PANTHER_CUDA_EMU)
  memcpy(p, &t, sizeof(t));
#else
  *reinterpret_cast<Two<S>*>(p) = t;
#endif
}
template <class S>
__device__ __forceinline__ float to_float(S x) {
  if constexpr (std::is_same<S, float>::value) return x;
  else return Cvt<S>::f(x);
}

// States over chunks; one thread per (bh, pair of state entries), entries [0, ME) are the
// M x E1p state (scaled by kscale_c when use_kscale, decayed by alpha_c), [ME, ME + E1p) the
// extra row (plain sum); ME and E1p are even, so a pair never straddles the two. causal:
// exclusive scan (forward, or reverse); non-causal: the total, once per bh. The walk over chunks
// is latency-bound: loads come in batches of kScanU chunks, all issued before the first is used,
// and pairs double the bytes per load (one entry per thread left half the bandwidth unused).
constexpr int kScanU = 8;
constexpr int kScanThreads = 256;
template <class T, class S>
__global__ void __launch_bounds__(kScanThreads, 4) scan_kernel(const S* __restrict__ st, const float* __restrict__ cs,
                            T* __restrict__ hs, float* __restrict__ hx, int BH, int n, int ncs,
                            int ME, int E1p, bool causal, bool reverse, bool use_kscale) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t W = ME + E1p, P = W / 2;
  if (idx >= BH * P) return;
  const int64_t bh = idx / P;
  const int e = 2 * static_cast<int>(idx - bh * P);
  const bool state = e < ME;
  const S* x = st + bh * n * W + e;
  const float* c4 = cs + bh * ncs * 4;
  auto put = [&](int64_t row, float a0, float a1) {  // row: bh * n + c, or bh (non-causal)
    if (state) store_two(hs + row * ME + e, Cvt<T>::t(a0), Cvt<T>::t(a1));
    else store_two(hx + row * E1p + (e - ME), a0, a1);
  };
  float acc0 = 0.f, acc1 = 0.f;
  auto chunk = [&](int step) { return reverse ? n - 1 - step : step; };
  auto step_in = [&](int c, float x0, float x1, float al, float sc) {
    if (causal) put(bh * n + c, acc0, acc1);
    acc0 = al * acc0 + sc * x0;
    acc1 = al * acc1 + sc * x1;
  };
  auto fetch = [&](int c, float& x0, float& x1, float& al, float& sc) {
    const Two<S> t = load_two(x + static_cast<int64_t>(c) * W);
    x0 = to_float(t.v[0]), x1 = to_float(t.v[1]);
    al = state && causal ? c4[c * 4 + 2] : 1.f;
    sc = state && use_kscale ? c4[c * 4 + 3] : 1.f;
  };
  int s0 = 0;
  for (; s0 + kScanU <= n; s0 += kScanU) {  // whole batches: no bounds checks between loads
    float x0[kScanU], x1[kScanU], al[kScanU], sc[kScanU];
#pragma unroll
    for (int u = 0; u < kScanU; ++u) fetch(chunk(s0 + u), x0[u], x1[u], al[u], sc[u]);
#pragma unroll
    for (int u = 0; u < kScanU; ++u) step_in(chunk(s0 + u), x0[u], x1[u], al[u], sc[u]);
  }
  for (; s0 < n; ++s0) {
    float x0, x1, al, sc;
    fetch(chunk(s0), x0, x1, al, sc);
    step_in(chunk(s0), x0, x1, al, sc);
  }
  if (!causal) put(bh, acc0, acc1);
}

// n floats (16-byte aligned, n a multiple of 4) from global to shared memory with cp.async, as
// 16-bit pairs (usable after the covering async_wait).
template <class T>
__device__ __forceinline__ void copy_floats_async(float* dst, const float* src, int n) {
  copy_rows_async(reinterpret_cast<T*>(dst), 2 * n, reinterpret_cast<const T*>(src), 2 * n, 1, 1,
                  2 * n);
}

// Loads this chunk's scanned state (M x E1p, input dtype) into k.h and its extra row into
// k.extra, with cp.async if `async` (usable after the covering async_wait: a plain load issued
// after the other copies would wait behind them) or synchronously.
template <class T>
__device__ void load_state(const Params<T>& p, Blk<T>& k, bool async = false) {
  const int64_t sidx = p.causal ? static_cast<int64_t>(k.bh) * p.nk + k.chunk : k.bh;
  const T* src = p.hs + sidx * p.M * p.E1p;
  if (async) {
    copy_rows_async(k.h, k.le, src, p.E1p, p.M, p.M, p.E1p);
    copy_floats_async<T>(k.extra, p.hx + sidx * p.E1p, p.E1p);
  } else {
    load_matrix(k.h, k.le, src, p.M, p.E1p);
    for (int e = threadIdx.x; e < p.E1p; e += kThreads) k.extra[e] = p.hx[sidx * p.E1p + e];
  }
}

// y (kC x E1p) = s_i phi H + A' [v, 1] + ek phisum_i extra; calls f(i, e, y) for each element.
template <class T, class F>
__device__ void y_tiles(const Params<T>& p, Blk<T>& k, F&& f) {
  const int ET = p.E1p / 16, rr = k.lane >> 1, c0 = (k.lane & 1) * 8;
  Acc a1, a2;
  float v1[8], v2[8];
  for (int t = k.warp; t < kRT * ET; t += kWarps) {
    const int rt = t % kRT, et = t / kRT, i = rt * 16 + rr;
    wmma::fill_fragment(a1, 0.f);
    mma_acc<T, RowM, RowM>(a1, tileA<RowM>(k.phi, k.lm, rt), k.lm, tileB<RowM>(k.h, k.le, et),
                           k.le, p.M);
    wmma::fill_fragment(a2, 0.f);
    if (p.causal)
      mma_acc<T, RowM, RowM>(a2, tileA<RowM>(k.s, kLC, rt), kLC, tileB<RowM>(k.v, k.le, et),
                             k.le, kC);
    stage8(k.stage, a1, k.lane, v1);
    stage8(k.stage, a2, k.lane, v2);
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const int e = et * 16 + c0 + q;
      f(i, e, k.si[i] * v1[q] + v2[q] + p.ek * k.phisum[i] * k.extra[e]);
    }
  }
}

// First row of this chunk in the saved features (fph, fkh, fps).
template <class T>
__device__ __forceinline__ int64_t feat_row0(const Params<T>& p, const Blk<T>& k) {
  return (static_cast<int64_t>(k.bh) * p.nk + k.chunk) * kC;
}

// forward_kernel under kFeatSave: phi, its row sums, khat and A' of this chunk (all kC rows, as
// the backward's GEMMs use them) to the saved tensor, one bulk (TMA) copy per row, issued by
// 3 kC + 1 threads: on sm_90 the block goes on while the copy engine writes (all blocks write at
// about the same time: stores through registers stalled the block ~4K cycles); elsewhere, or with
// p.bulk false, the threads store the rows themselves. Call after a barrier; the
// buffers are only read from here on. Returns whether this thread issued a copy: it must call
// mma::bulk_store_wait_read before the block exits.
template <class T>
__device__ bool save_features(const Params<T>& p, const Blk<T>& k) {
  static_assert(3 * kC + 1 <= kThreads, "one thread per row");
  const int64_t r0 = feat_row0(p, k);
  const int t = threadIdx.x, i = t % kC;
  if (t > 3 * kC) return false;
  mma::bulk_store_fence(p.bulk);
  const unsigned row = static_cast<unsigned>(p.M * sizeof(T));  // M % 16 == 0: 32-byte multiple
  if (t < kC) mma::bulk_store(p.fph + (r0 + i) * p.M, k.phi + i * k.lm, row, p.bulk);
  else if (t < 2 * kC) mma::bulk_store(p.fkh + (r0 + i) * p.M, k.kh + i * k.lm, row, p.bulk);
  else if (t < 3 * kC)
    mma::bulk_store(p.fsa + (r0 + i) * kC, k.s + i * kLC, kC * sizeof(T), p.bulk);
  else mma::bulk_store(p.fps + r0, k.phisum, kC * sizeof(float), p.bulk);
  mma::bulk_store_commit(p.bulk);
  return true;
}

// Causal back1: Wm (and, where the forward's features are not kept, phi) to global memory for
// back2, one bulk copy per row (as save_features), issued after the barrier that ends wm_block's
// pass. Returns whether this thread issued a copy: it must call mma::bulk_store_wait_read before
// phi is overwritten.
template <class T>
__device__ bool save_back2_inputs(const Params<T>& p, const Blk<T>& k) {
  const int64_t r0 = feat_row0(p, k);
  const int t = threadIdx.x, i = t % kC;
  if (t >= (p.feat == kFeatLoad ? 1 : 2) * kC) return false;
  mma::bulk_store_fence(p.bulk);
  if (t < kC) mma::bulk_store(p.fwm + (r0 + i) * kC, k.gm + i * kLC, kC * sizeof(T), p.bulk);
  else mma::bulk_store(p.fph + (r0 + i) * p.M, k.phi + i * k.lm, p.M * sizeof(T), p.bulk);
  mma::bulk_store_commit(p.bulk);
  return true;
}

// The start of forward_kernel and back1_kernel: this chunk's query features, H, and (causal)
// [v, 1], the key features and A'; with_g also loads g into k.ys (zero rows past the end).
// cp.async groups: {W, q}, then {H, g, v} (filled while the query features are computed), then
// the keys once query_features is done with k.x. No buffer of a group is touched before its wait;
// every copy has landed on return.
template <class T>
__device__ void query_chunk_start(const Params<T>& p, Blk<T>& k, bool with_g) {
  const StabRegs sr = stab_fetch(p, k);
  if (p.feat == kFeatLoad) {  // (causal back1) the forward's features, A', output: no GEMMs
    // cp.async groups in order of first use, so that the later ones land while back1 computes
    // (all blocks load at about the same time: the first wait is bound by HBM): {g, y / den, v,
    // A', phi, its row sums, den} (Yb, dH, Wm, back2's parts), {H and its extra row, khat} (yc
    // and d phi: back1 waits for them there), {W} (dq: waited for before finish_input_grads).
    // Without y / den, y_tiles needs H at once.
    static_assert(kWarps * 256 >= kC * kSavedOutMaxDv, "k.stage0 holds kC x Dv floats");
    const int64_t r0 = feat_row0(p, k);
    copy_rows_async(k.ys, k.le,
                    p.g + k.b * p.g_sb + k.hd * p.g_sh + static_cast<int64_t>(k.row0) * p.g_sl,
                    p.g_sl, k.rows, kC, p.Dv);
    if (p.fyo) copy_floats_async<T>(k.stage0, p.fyo + r0 * p.Dv, kC * p.Dv);  // y / den, kC x Dv
    issue_values(p, k);
    copy_rows_async(k.s, kLC, p.fsa + r0 * kC, kC, kC, kC, kC);
    copy_rows_async(k.phi, k.lm, p.fph + r0 * p.M, p.M, kC, kC, p.M);
    copy_floats_async<T>(k.phisum, p.fps + r0, kC);
    if (p.fyo) copy_floats_async<T>(k.den, p.fdn + r0, kC);
    async_commit();
    load_state(p, k, /*async=*/true);
    copy_rows_async(k.kh, k.lm, p.fkh + r0 * p.M, p.M, kC, kC, p.M);
    async_commit();
    copy_rows_async(k.w, k.lx, p.W, p.D, p.M, p.M, p.D);
    async_commit();
    stab_store(p, k, sr, /*query_side_only=*/true);
    key_valid(p, k);
    if (p.fyo) async_wait<2>();
    else async_wait<1>();
    fix_values(p, k);
    return;
  }
  copy_rows_async(k.w, k.lx, p.W, p.D, p.M, p.M, p.D);
  issue_x(p, k, /*keys=*/false);
  async_commit();
  load_state(p, k, /*async=*/true);
  if (with_g)
    copy_rows_async(k.ys, k.le,
                    p.g + k.b * p.g_sb + k.hd * p.g_sh + static_cast<int64_t>(k.row0) * p.g_sl,
                    p.g_sl, k.rows, kC, p.Dv);
  if (p.causal) issue_values(p, k);
  async_commit();
  stab_store(p, k, sr, /*query_side_only=*/true);
  async_wait<1>();  // W, q
  query_features(p, k);  // ends with a barrier: k.x is free
  if (p.causal) {
    issue_x(p, k, /*keys=*/true);
    async_commit();
    key_valid(p, k);
    async_wait<1>();  // H, g, v
    fix_values(p, k);
    async_wait<0>();  // keys
    x_norms(p, k);
    key_features(p, k);
    attn_block(p, k);
  } else {
    async_wait<0>();  // H, g
  }
}

// Forward output. grid (nq, BH).
template <class T, int kShape>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(Params<T> p) {
  fix_shape<kShape>(p);
  PANTHER_DYNAMIC_SMEM(smem);
  const Smem L = smem_layout(kForward, p.D, p.M, p.E1p, sizeof(T));
  Blk<T> k = make_blk<T>(p, smem, L, blockIdx.x, blockIdx.y, p.Lq);
  query_chunk_start(p, k, /*with_g=*/false);
  const bool bulk_issued = p.feat == kFeatSave && save_features(p, k);
  float* Y = k.y;
  const int E1p = p.E1p;
  y_tiles(p, k, [&](int i, int e, float y) { Y[i * E1p + e] = y; });
  __syncthreads();
  T* out = p.out + k.b * p.o_sb + k.hd * p.o_sh + static_cast<int64_t>(k.row0) * p.o_sl;
  const bool save_y = p.feat == kFeatSave && p.fyo;
  const int64_t r0 = save_y ? feat_row0(p, k) : 0;
  // Two columns per lane where every output row start is 4-byte aligned (E1p and Dv even: Y and
  // fyo pairs are 8-byte aligned).
  const bool pairs = p.Dv % 2 == 0 && p.o_sl % 2 == 0 && reinterpret_cast<uintptr_t>(out) % 4 == 0;
  for (int i = k.warp; i < (save_y ? kC : k.rows); i += kWarps) {  // (saved: every row written)
    const float den = Y[i * E1p + p.Dv];
    const float inv = den == 0.f ? 0.f : 1.f / den;
    if (pairs) {
      for (int e = 2 * k.lane; e < p.Dv; e += 64) {
        const Two<float> y = load_two(Y + i * E1p + e);
        const float o0 = y.v[0] * inv, o1 = y.v[1] * inv;
        if (i < k.rows) store_two(out + i * p.o_sl + e, Cvt<T>::t(o0), Cvt<T>::t(o1));
        if (save_y) store_two(p.fyo + (r0 + i) * p.Dv + e, o0, o1);
      }
    } else {
      for (int e = k.lane; e < p.Dv; e += 32) {
        const float o = Y[i * E1p + e] * inv;
        if (i < k.rows) out[i * p.o_sl + e] = Cvt<T>::t(o);
        if (save_y) p.fyo[(r0 + i) * p.Dv + e] = o;
      }
    }
    if (save_y && k.lane == 0) p.fdn[r0 + i] = den;
  }
  if (bulk_issued) mma::bulk_store_wait_read(p.bulk);  // (the copies may not outlive the shared memory)
}

// Writes dx = (dpre W - rowsum(dpre) x') xscale (softmax) or dpre W (relu) for the rows of this
// chunk; dpre (kC x M) in `dpre`, rowsums in k.rs; x re-read from global.
template <class T>
__device__ void input_grad(const Params<T>& p, Blk<T>& k, const T* dpre, const T* x, int64_t sl,
                           T* dx) {
  const int DT = p.D / 16, rr = k.lane >> 1, c0 = (k.lane & 1) * 8;
  // 16-byte loads of x and stores of dx (8 values of a lane) when every row start of both is
  // 16-byte aligned (dx is dense with D % 16 == 0: its base decides); else element by element.
  constexpr int kE = 16 / sizeof(T);
  const bool vec = sl % kE == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(dx) % 16 == 0;
  Acc acc;
  float v[8];
  for (int t = k.warp; t < kRT * DT; t += kWarps) {
    const int rt = t % kRT, dt = t / kRT, i = rt * 16 + rr;
    const T* xr = x + static_cast<int64_t>(i) * sl + dt * 16 + c0;
    float xv[8];
    if (vec && p.softmax && i < k.rows) load8(xr, xv);  // before the GEMM, which hides its latency
    wmma::fill_fragment(acc, 0.f);
    mma_acc<T, RowM, RowM>(acc, tileA<RowM>(dpre, k.lm, rt), k.lm, tileB<RowM>(k.w, k.lx, dt),
                           k.lx, p.M);
    stage8(k.stage, acc, k.lane, v);
    if (i < k.rows) {
      T* dr = dx + static_cast<int64_t>(i) * p.D + dt * 16 + c0;
      if (vec) {
        if (p.softmax) {
          const float rsx = k.rs[i] * p.xscale;
#pragma unroll
          for (int q = 0; q < 8; ++q) v[q] = (v[q] - rsx * xv[q]) * p.xscale;
        }
        store8(dr, v);
        continue;
      }
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const float g = p.softmax
                            ? (v[q] - k.rs[i] * p.xscale * Cvt<T>::f(xr[q])) * p.xscale
                            : v[q];
        dr[q] = Cvt<T>::t(g);
      }
    }
  }
}

// dW += dpre^T x' over this chunk's rows (atomics into fp32). k.x must hold x.
template <class T>
__device__ void proj_grad(const Params<T>& p, Blk<T>& k, const T* dpre) {
  const int CT = p.M / 16, DT = p.D / 16, rr = k.lane >> 1, c0 = (k.lane & 1) * 8;
  Acc acc;
  float v[8];
  for (int t = k.warp; t < CT * DT; t += kWarps) {
    const int mt = t % CT, dt = t / CT;
    wmma::fill_fragment(acc, 0.f);
    mma_acc<T, ColM, RowM>(acc, tileA<ColM>(dpre, k.lm, mt), k.lm, tileB<RowM>(k.x, k.lx, dt),
                           k.lx, kC);
    stage8(k.stage, acc, k.lane, v);
    float* dst = p.dW + static_cast<int64_t>(mt * 16 + rr) * p.D + dt * 16 + c0;
#pragma unroll
    for (int q = 0; q < 8; ++q) atomicAdd(dst + q, v[q] * p.xscale);
  }
}

// The end of both backward kernels: rowsum(dpre) from each lane's partial `rsum` for row i, then
// dq (or dk) and this chunk's part of the projection gradient. dpre (kC x M) is in shared memory.
template <class T>
__device__ void finish_input_grads(const Params<T>& p, Blk<T>& k, const T* dpre, bool keys,
                                   float rsum, int i) {
  rsum = pair_sum(rsum);
  if ((k.lane & 1) == 0) k.red[(k.warp / kRT) * kC + i] = rsum;
  combine_rows(k.red, k.rs, false);
  int64_t sl;
  const T* x = x_rows(p, k, keys, &sl);
  T* dx = (keys ? p.dk + static_cast<int64_t>(k.bh) * p.Lk * p.D
                : p.dq + static_cast<int64_t>(k.bh) * p.Lq * p.D) +
          static_cast<int64_t>(k.row0) * p.D;
  input_grad(p, k, dpre, x, sl, dx);
  if (p.dW) {  // x back into k.x (the features' buffers reused it) for dW
    __syncthreads();
    copy_rows(k.x, k.lx, x, sl, k.rows, kC, p.D);
    __syncthreads();
    proj_grad(p, k, dpre);
  }
}

// Wm = (Yb V^T) o E on j <= i (0 above) into k.gm; returns this lane's partial row sum of
// Yb V^T over j <= i (row rt*16 + lane/2), which back1 needs for the eps part of d phi.
template <class T>
__device__ float wm_block(const Params<T>& p, Blk<T>& k) {
  const int rr = k.lane >> 1, c0 = (k.lane & 1) * 8, rt = k.warp % kRT, i = rt * 16 + rr;
  Acc acc;
  float v[8], cy = 0.f;
  for (int t = k.warp; t < kRT * kRT; t += kWarps) {
    const int ct = t / kRT;
    T* gd = k.gm + i * kLC + ct * 16 + c0;
    if (ct > rt) {
#pragma unroll
      for (int q = 0; q < 8; ++q) v[q] = 0.f;
      store8(gd, v);
      continue;
    }
    wmma::fill_fragment(acc, 0.f);
    mma_acc<T, RowM, ColM>(acc, tileA<RowM>(k.yb, k.le, rt), k.le, tileB<ColM>(k.v, k.le, ct),
                           k.le, p.E1p);
    stage8(k.stage, acc, k.lane, v);
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const int j = ct * 16 + c0 + q;
      float w = 0.f;
      if (j <= i) {
        cy += v[q];
        w = v[q] * (p.softmax ? __expf(fminf(k.r[j] - k.r[i], 0.f)) : 1.f);
      }
      v[q] = w;
    }
    store8(gd, v);
  }
  return cy;
}

// Backward pass 1: Yb, dq, gradient states, back2's intra-chunk parts (causal). grid (nq, BH).
template <class T, int kShape>
__global__ void __launch_bounds__(kThreads, 1) back1_kernel(Params<T> p) {
  fix_shape<kShape>(p);
  PANTHER_DYNAMIC_SMEM(smem);
  const Smem L = smem_layout(kBack1, p.D, p.M, p.E1p, sizeof(T));
  Blk<T> k = make_blk<T>(p, smem, L, blockIdx.x, blockIdx.y, p.Lq);
  const int E1p = p.E1p, Dv = p.Dv, grp = k.warp / kRT, rr = k.lane >> 1;
  query_chunk_start(p, k, /*with_g=*/true);  // g into k.ys
  const bool loaded = p.feat == kFeatLoad;  // then H, khat and W may still be in flight
  // y per row: den and g . num (row partials across the two warp halves). g sits in k.ys
  // (loaded at the start) until Yb replaces it.
  if (loaded && p.fyo) {
    // From the forward: den (loaded into k.den) and y / den (fp32, in k.stage0): g . num =
    // den (g . y / den), one warp per row.
    for (int i = k.warp; i < kC; i += kWarps) {
      float acc = 0.f;
      for (int e = k.lane; e < Dv; e += 32)
        acc += Cvt<T>::f(k.ys[i * k.le + e]) * k.stage0[i * Dv + e];
      acc = warp_sum(acc);
      if (k.lane == 0) k.gn[i] = k.den[i] * acc;
    }
    __syncthreads();
  } else {
    float gn = 0.f;
    const int rt = k.warp % kRT, i = rt * 16 + rr;
    y_tiles(p, k, [&](int ii, int e, float y) {
      if (e < Dv) gn += Cvt<T>::f(k.ys[ii * k.le + e]) * y;
      if (e == Dv) k.den[ii] = y;
    });
    gn = pair_sum(gn);
    if ((k.lane & 1) == 0) k.red[grp * kC + i] = gn;
    combine_rows(k.red, k.gn, false);
  }
  // Yb = [g / den, -(g . num) / den^2] (0 where the row is past the end or sees no key).
  // (One reciprocal per row: a division per element made this loop cost as much as a GEMM.)
  for (int i = k.warp; i < kC; i += kWarps) {
    const float den = k.den[i];
    const bool ok = i < k.rows && den != 0.f;
    const float inv = ok ? __frcp_rn(den) : 0.f, ext = ok ? -(k.gn[i] * inv) * inv : 0.f;
    const float si = k.si[i];
    for (int e = k.lane; e < E1p; e += 32) {
      const float val = e < Dv ? Cvt<T>::f(k.ys[i * k.le + e]) * inv : e == Dv ? ext : 0.f;
      const T vt = Cvt<T>::t(val);
      k.yb[i * k.le + e] = vt;
      k.ys[i * k.le + e] = Cvt<T>::t(si * Cvt<T>::f(vt));
    }
  }
  __syncthreads();
  // Gradient state of this chunk: dH = phi^T (s Yb) (M x E1p), extra row sum_i phisum_i Yb_i.
  float* dst = p.gst + (static_cast<int64_t>(k.bh) * p.nq + k.chunk) * (p.M + 1) * E1p;
  const int CT = p.M / 16, ET = E1p / 16, c0 = (k.lane & 1) * 8;
  Acc acc;
  float v[8];
  for (int t = k.warp; t < CT * ET; t += kWarps) {
    const int mt = t % CT, et = t / CT;
    wmma::fill_fragment(acc, 0.f);
    mma_acc<T, ColM, RowM>(acc, tileA<ColM>(k.phi, k.lm, mt), k.lm, tileB<RowM>(k.ys, k.le, et),
                           k.le, kC);
    wmma::store_matrix_sync(dst + static_cast<int64_t>(mt) * 16 * E1p + et * 16, acc, E1p,
                            wmma::mem_row_major);
  }
  {  // the extra row (all warps: see col_sums)
    float* dst_x = dst + static_cast<int64_t>(p.M) * E1p;
    const float* phisum = k.phisum;
    col_sums(k.yb, k.le, E1p, k.warp, k.lane, [&](int i) { return phisum[i]; },
             [&](int e, float s) { dst_x[e] = s; });
  }
  // yc_i = ek Yb_i . (sum of [v, 1] over keys j <= i) (the eps part of dphi).
  bool bulk_issued = false;
  if (p.causal) {
    // Wm into k.gm; row sums of Yb V^T on j <= i.
    const int i = (k.warp % kRT) * 16 + rr;
    float cy = wm_block(p, k);
    cy = pair_sum(cy);
    if ((k.lane & 1) == 0) k.red[grp * kC + i] = cy;
    combine_rows(k.red, k.yc, false);
    // For back2, this chunk's keys: Wm (and phi) by the copy engine, and A'^T Yb (kC x 16 DvT).
    // (Wm^T phi, kC x M fp32, was written here once: back2 forms it from 5x fewer bytes.)
    bulk_issued = save_back2_inputs(p, k);
    const int DvT = (Dv + 15) / 16;
    const int64_t row = static_cast<int64_t>(k.bh) * p.nk * kC + k.row0;
    for (int t = k.warp; t < kRT * DvT; t += kWarps) {
      const int rt = t % kRT, et = t / kRT;
      wmma::fill_fragment(acc, 0.f);
      mma_acc<T, ColM, RowM>(acc, tileA<ColM>(k.s, kLC, rt), kLC, tileB<RowM>(k.yb, k.le, et),
                             k.le, kC);
      wmma::store_matrix_sync(p.dvp + (row + rt * 16) * (16 * DvT) + et * 16, acc, 16 * DvT,
                              wmma::mem_row_major);
    }
  } else {
    for (int i = threadIdx.x; i < kC; i += kThreads) k.yc[i] = 0.f;
    __syncthreads();
  }
  if (bulk_issued) mma::bulk_store_wait_read(p.bulk);  // phi is overwritten below
  if (loaded) async_wait<1>();  // H, its extra row, khat
  // yc_i = ek (yc_i + Yb_i . extra): warp w takes rows w, w + kWarps, ..., its lanes stride over e.
  for (int i = k.warp; i < kC; i += kWarps) {
    float s = 0.f;
    for (int e = k.lane; e < E1p; e += 32) s += Cvt<T>::f(k.yb[i * k.le + e]) * k.extra[e];
    s = warp_sum(s);
    if (k.lane == 0) k.yc[i] = p.ek * (k.yc[i] + s);
  }
  __syncthreads();
  const float ek_t = Cvt<T>::f(Cvt<T>::t(p.ek));
  // dphi = (s Yb) H^T + Wm khat + yc; dpre = dphi (phi - ek) (softmax) or dphi sM [u > 0] (relu),
  // written over phi (no GEMM below reads phi), row sums into k.rs.
  {
    const int rt = k.warp % kRT, i = rt * 16 + rr, n = kRT * CT;
    const float yci = k.yc[i];
    float rsum = 0.f;
    for (int t0 = k.warp; t0 < n; t0 += kNT * kWarps) {
      const int cnt = batch_count(t0, n), ct0 = t0 / kRT;
      Acc accs[kNT];
      zero_accs(accs);
      mma_acc_cols<T, RowM, ColM>(accs, cnt, tileA<RowM>(k.ys, k.le, rt), k.le, k.h, k.le, ct0,
                                  E1p);
      if (p.causal)
        mma_acc_cols<T, RowM, RowM>(accs, cnt, tileA<RowM>(k.gm, kLC, rt), kLC, k.kh, k.lm, ct0,
                                    kC);
#pragma unroll
      for (int u = 0; u < kNT; ++u) {
        if (u >= cnt) continue;
        stage8(k.stage, accs[u], k.lane, v);
        T* ph = k.phi + i * k.lm + (ct0 + u * kCS) * 16 + c0;
        float phv[8];
        load8(ph, phv);
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const float phi = phv[q], dphi = v[q] + yci;
          // relu: u > 0 exactly when the stored feature exceeds the stored eps
          const float dpre = i >= k.rows ? 0.f
                             : p.softmax ? dphi * (phi - p.ek) : (phi > ek_t ? dphi * p.sM : 0.f);
          v[q] = Cvt<T>::f(Cvt<T>::t(dpre));  // the row sum of what is stored
          rsum += v[q];
        }
        store8(ph, v);
      }
    }
    if (loaded) async_wait<0>();  // W
    finish_input_grads(p, k, k.phi, /*keys=*/false, rsum, i);
  }
}

// back2's tile loops with a per-tile part (8 floats per lane) read from global memory: this warp's
// tiles are t = warp, warp + kWarps, ... < n; the first kPre parts are loaded ahead into pre[]
// (prefetch_parts) and the loop (tiles_with_parts) loads the others as it goes.
template <int kPre, class Fetch>
__device__ __forceinline__ void prefetch_parts(int warp, int n, float (&pre)[kPre][8],
                                               Fetch&& fetch) {
#pragma unroll
  for (int u = 0; u < kPre; ++u)
    if (warp + u * kWarps < n) fetch(warp + u * kWarps, pre[u]);
}
template <int kPre, class Tile, class Fetch>
__device__ __forceinline__ void tiles_with_parts(int warp, int n, const float (&pre)[kPre][8],
                                                 Tile&& tile, Fetch&& fetch) {
#pragma unroll
  for (int u = 0; u < kPre; ++u)
    if (warp + u * kWarps < n) tile(warp + u * kWarps, pre[u]);
  for (int t = warp + kPre * kWarps; t < n; t += kWarps) {
    float v[8];
    fetch(t, v);
    tile(t, v);
  }
}

// Backward pass 2: dk, dv. grid (nk, BH).
template <class T, int kShape>
__global__ void __launch_bounds__(kThreads, 1) back2_kernel(Params<T> p) {
  fix_shape<kShape>(p);
  PANTHER_DYNAMIC_SMEM(smem);
  const Smem L = smem_layout(kBack2, p.D, p.M, p.E1p, sizeof(T));
  Blk<T> k = make_blk<T>(p, smem, L, blockIdx.x, blockIdx.y, p.Lk);
  const int E1p = p.E1p, Dv = p.Dv, rr = k.lane >> 1, c0 = (k.lane & 1) * 8;
  const int CT = p.M / 16, ET = E1p / 16, DvT = (Dv + 15) / 16;
  const int64_t row = static_cast<int64_t>(k.bh) * p.nk * kC + k.row0;  // in dvp, fph, fwm
  // cp.async groups: {W, keys}, {dT, v} (filled while the key features are computed), {phi, Wm}
  // (causal: back1's, for the intra-chunk part of dkhat); with the forward's key features,
  // {khat, dT, v}, then {phi, Wm} and {W} (only dk needs it: waited for there).
  const bool load_feat = p.feat == kFeatLoad;
  const StabRegs sr = stab_fetch(p, k);
  auto issue_wm_phi = [&] {
    if (p.causal) {
      copy_rows_async(k.phi, k.lm, p.fph + row * p.M, p.M, kC, kC, p.M);
      copy_rows_async(k.gm, kLC, p.fwm + row * kC, kC, kC, kC, kC);
    }
    async_commit();
  };
  // With the forward's features, {phi, Wm} and {W} go out only once the first group has landed:
  // every block loads at the same time, and copies in flight together share HBM, so issuing
  // them at once delayed the first group by their bytes (H100, 16k: 439 -> 424 us; the same
  // change made back1 and forward_kernel slower, 608 -> 625 and 490 -> 513 us).
  if (load_feat) {
    copy_rows_async(k.kh, k.lm, p.fkh + feat_row0(p, k) * p.M, p.M, kC, kC, p.M);
    load_state(p, k, /*async=*/true);  // dT_c and G_c
    issue_values(p, k);
    async_commit();
  } else {
    copy_rows_async(k.w, k.lx, p.W, p.D, p.M, p.M, p.D);
    issue_x(p, k, /*keys=*/true);
    async_commit();
    load_state(p, k, /*async=*/true);  // dT_c and G_c
    issue_values(p, k);
    async_commit();
    issue_wm_phi();
  }
  // back1's intra-chunk part of dv (causal; fp32 in global memory) for this warp's first tiles
  // of the dv loop, loaded ahead: read inside the loop, its latency was exposed once per tile.
  // Tiles t = warp + u kWarps keep row tile warp % kRT (kWarps % kRT == 0).
  constexpr int kPreV = 2;
  float pv[kPreV][8];
  const int jw = (k.warp % kRT) * 16 + rr;
  auto dv_part = [&](int t, float (&v)[8]) {  // dv tile t: columns et = t / kRT
    const int et = t / kRT;
    if (p.causal && et < DvT) load8f(p.dvp + (row + jw) * (16 * DvT) + et * 16 + c0, v);
    else zero8(v);
  };
  prefetch_parts(k.warp, kRT * ET, pv, dv_part);
  stab_store(p, k, sr, /*query_side_only=*/false);
  key_valid(p, k);
  if (load_feat) {
    async_wait<0>();  // khat, dT, v
    issue_wm_phi();
    copy_rows_async(k.w, k.lx, p.W, p.D, p.M, p.M, p.D);
    async_commit();
  } else {
    async_wait<2>();  // W, keys
    x_norms(p, k);
    key_features(p, k);
    async_wait<1>();  // dT, v
  }
  fix_values(p, k);
  // dv = kfac_j (khat dT) + A'^T Yb (causal: from back1) + ek G  (masked by valid).
  {
    T* dv = p.dv + (static_cast<int64_t>(k.bh) * p.Lk + k.row0) * Dv;
    auto tile = [&](int t, const float (&v2)[8]) {
      const int rt = t % kRT, et = t / kRT, j = rt * 16 + rr;
      Acc a1;
      float v1[8];
      wmma::fill_fragment(a1, 0.f);
      mma_acc<T, RowM, RowM>(a1, tileA<RowM>(k.kh, k.lm, rt), k.lm, tileB<RowM>(k.h, k.le, et),
                             k.le, p.M);
      stage8(k.stage, a1, k.lane, v1);
      if (j < k.rows) {
        const int e0 = et * 16 + c0;
        if (Dv % 8 == 0) {  // the 8 columns are all < Dv or all past it; one 16-byte store
          if (e0 < Dv) {
#pragma unroll
            for (int q = 0; q < 8; ++q)
              v1[q] = (k.kfac[j] * v1[q] + v2[q] + p.ek * k.extra[e0 + q]) * k.valid[j];
            store8(dv + j * Dv + e0, v1);
          }
        } else {
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            const int e = e0 + q;
            if (e < Dv)
              dv[j * Dv + e] =
                  Cvt<T>::t((k.kfac[j] * v1[q] + v2[q] + p.ek * k.extra[e]) * k.valid[j]);
          }
        }
      }
    };
    tiles_with_parts(k.warp, kRT * ET, pv, tile, dv_part);
  }
  if (load_feat) async_wait<1>();  // phi, Wm
  else async_wait<0>();
  __syncthreads();
  // dkhat = kfac_j (V dT^T) + Wm^T phi (causal); dpre_k = dkhat khat (softmax) or
  // dkhat sM [khat > 0], written over khat; row sums into k.rs.
  {
    const int rt = k.warp % kRT, j = rt * 16 + rr, n = kRT * CT;
    const float kf = k.kfac[j];
    float rsum = 0.f;
    // (batches of 2: 4 needed more than 128 registers)
    constexpr int kN = 2;
    for (int t0 = k.warp; t0 < n; t0 += kN * kWarps) {
      const int cnt = batch_count<kN>(t0, n), ct0 = t0 / kRT;
      Acc acc[kN];
      float v2[kN][8];
      zero_accs(acc);
      if (p.causal) {
        mma_acc_cols<T, ColM, RowM>(acc, cnt, tileA<ColM>(k.gm, kLC, rt), kLC, k.phi, k.lm, ct0,
                                    kC);
#pragma unroll
        for (int u = 0; u < kN; ++u)
          if (u < cnt) stage8(k.stage, acc[u], k.lane, v2[u]);
        zero_accs(acc);
      } else {
#pragma unroll
        for (int u = 0; u < kN; ++u) zero8(v2[u]);
      }
      mma_acc_cols<T, RowM, ColM>(acc, cnt, tileA<RowM>(k.v, k.le, rt), k.le, k.h, k.le, ct0,
                                  E1p);
#pragma unroll
      for (int u = 0; u < kN; ++u) {
        if (u >= cnt) continue;
        float v1[8];
        stage8(k.stage, acc[u], k.lane, v1);
        T* kh = k.kh + j * k.lm + (ct0 + u * kCS) * 16 + c0;
        float khv[8];
        load8(kh, khv);
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const float khat = khv[q], dk = kf * v1[q] + v2[u][q];
          v1[q] = Cvt<T>::f(Cvt<T>::t(p.softmax ? dk * khat : (khat > 0.f ? dk * p.sM : 0.f)));
          rsum += v1[q];
        }
        store8(kh, v1);
      }
    }
    if (load_feat) async_wait<0>();  // W
    finish_input_grads(p, k, k.kh, /*keys=*/true, rsum, j);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: which calls the fused path takes, and the launch sequence. Written against ATen so
// the same code drives real CUDA launches and the CPU emulator (tests/emu).
}  // namespace panther::fused

#include <ATen/ATen.h>
#include <algorithm>
#include <array>
#include <cstdlib>
#include <optional>
#include <string>

#include "attention/impl.h"

#include "common/launch.cuh"

namespace panther::fused {

using ::panther::max_smem_optin;

static_assert(kC == detail::kFavorFusedChunk, "favor_saved_layout's chunk size");
static_assert(kSavedOutMaxDv == detail::kFavorSavedOutMaxDv, "favor_saved_layout's yo");
inline int e1p_of(int64_t Dv) { return static_cast<int>(detail::favor_fused_e1p(Dv)); }

// Shared memory the largest kernel needs (bytes).
inline int64_t smem_needed(const detail::FavorDims& d, int tsize) {
  const int E1p = e1p_of(d.Dv);
  int64_t m = 0;
  for (int kind : {kStates, kForward, kBack1, kBack2})
    m = std::max<int64_t>(m, smem_layout(kind, static_cast<int>(d.D), static_cast<int>(d.M), E1p,
                                         tsize).total);
  return m;
}

// The fused path covers bf16 with head_dim and num_random_features multiples of 16 whose
// buffers fit in max_smem bytes of shared memory; everything else takes the ATen path. fp16 is
// left to the ATen path (fp32 compute): its range is too narrow for features relative to a
// stabiliser (exp(-20) already underflows) and for the backward's 1/den factors.
static_assert(kMaxE1p == 256, "favor_fused_shapes' limit");
inline bool supported(const detail::FavorDims& d, at::ScalarType dt, int64_t max_smem) {
  if (!detail::favor_fused_shapes(d.B * d.H, d.Lq, d.Lk, d.D, d.Dv, d.M, dt)) return false;
  return smem_needed(d, 2) <= max_smem;
}

namespace host {

inline at::Tensor last_dim_dense(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

template <class T>
Params<T> make_params(const detail::FavorDims& d, bool causal, const at::Tensor& q,
                      const at::Tensor& k, const at::Tensor& v, const at::Tensor& W,
                      const at::Tensor& pad) {
  Params<T> p{};
  p.BH = static_cast<int>(d.B * d.H);
  p.H = static_cast<int>(d.H);
  p.Lq = static_cast<int>(d.Lq);
  p.Lk = static_cast<int>(d.Lk);
  p.nq = static_cast<int>((d.Lq + kC - 1) / kC);
  p.nk = static_cast<int>((d.Lk + kC - 1) / kC);
  p.D = static_cast<int>(d.D);
  p.Dv = static_cast<int>(d.Dv);
  p.M = static_cast<int>(d.M);
  p.E1p = e1p_of(d.Dv);
  p.softmax = d.kernel == detail::FavorKernel::Softmax;
  p.causal = causal;
  p.sM = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d.M)));
  p.xscale = p.softmax ? static_cast<float>(std::pow(static_cast<double>(d.D), -0.25)) : 1.f;
  p.ek = p.softmax ? static_cast<float>(detail::kFavorSoftmaxEps) * p.sM
                   : static_cast<float>(detail::kFavorReluEps);
  p.q = reinterpret_cast<const T*>(q.data_ptr());
  p.k = reinterpret_cast<const T*>(k.data_ptr());
  p.v = reinterpret_cast<const T*>(v.data_ptr());
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  p.W = reinterpret_cast<const T*>(W.data_ptr());
  p.pad = pad.defined() ? pad.data_ptr<bool>() : nullptr;
  p.bulk = !::panther::portable_kernels();
  return p;
}

// Buffers and launches shared by forward and backward: key states, stabilisers, scanned states.
// The stabilisers r, cs and the scanned states hs, hx (and, for autograd's causal calls, the
// features) lie as detail::favor_saved_layout says,
//   keep == reuse == null: in the workspace `ws`, with a and st (one allocation: each costs host
//     time that short sequences feel);
//   keep (forward for autograd): in a new tensor *keep that the backward gets back;
//   reuse (backward): read from *reuse (never written: a second backward may read it again), with
//     the gradient scan's output (grad_hs, grad_hx) in `ws`.
// The rest of ws: a (BH, nk kC) fp32, the key row maxima; st (BH, nk, (M+1) E1p), chunk states.
template <class T>
struct Run {
  Params<T> p;
  at::Tensor q, k, v, W, pad, ws;
  Smem layout[4];
  T* grad_hs = nullptr;     // where scan(/*grad=*/true) writes dT and G
  float* grad_hx = nullptr;

  Run(const detail::FavorDims& d, bool causal, const at::Tensor& query, const at::Tensor& key,
      const at::Tensor& value, const at::Tensor& projection,
      const std::optional<at::Tensor>& mask, at::Tensor* keep = nullptr,
      const at::Tensor* reuse = nullptr) {
    static_assert(sizeof(T) == 2, "favor_saved_layout is written for 16-bit states");
    q = last_dim_dense(query);
    k = last_dim_dense(key);
    v = last_dim_dense(value);
    W = projection.to(query.scalar_type()).contiguous();
    if (mask.has_value() && mask->defined()) pad = mask->contiguous();
    p = make_params<T>(d, causal, q, k, v, W, pad);
    for (int kind = 0; kind < 4; ++kind) layout[kind] = smem_layout(kind, p.D, p.M, p.E1p, 2);
    // The features are kept only for autograd: forward(..., saved) and backward(..., saved).
    const detail::FavorSaved sv =
        detail::favor_saved_layout(d, causal, at::kBFloat16, /*features=*/keep || reuse);
    TORCH_INTERNAL_ASSERT(sv.total > 0);
    auto round = [](int64_t b) { return (b + 255) / 256 * 256; };
    const int64_t BH = p.BH, nst = causal ? p.nk : 1;
    const int64_t a_bytes = round(BH * p.nk * kC * 4);
    const int64_t st_bytes = round(BH * p.nk * static_cast<int64_t>(p.M + 1) * p.E1p * 2);
    const at::TensorOptions bytes = query.options().dtype(at::kByte);
    unsigned char* sbase;  // the saved layout
    if (reuse) {
      sbase = static_cast<unsigned char*>(reuse->data_ptr());
      const int64_t hs_bytes = round(BH * nst * static_cast<int64_t>(p.M) * p.E1p * 2);
      ws = at::empty({hs_bytes + round(BH * nst * p.E1p * 4)}, bytes);
      grad_hs = reinterpret_cast<T*>(ws.data_ptr<unsigned char>());
      grad_hx = reinterpret_cast<float*>(ws.data_ptr<unsigned char>() + hs_bytes);
    } else {
      unsigned char* tbase;  // a, st
      if (keep) {
        *keep = at::empty({sv.total}, bytes);
        ws = at::empty({a_bytes + st_bytes}, bytes);
        sbase = keep->data_ptr<unsigned char>();
        tbase = ws.data_ptr<unsigned char>();
      } else {
        ws = at::empty({round(sv.total) + a_bytes + st_bytes}, bytes);
        sbase = ws.data_ptr<unsigned char>();
        tbase = sbase + round(sv.total);
      }
      p.a = reinterpret_cast<float*>(tbase);
      p.st = reinterpret_cast<T*>(tbase + a_bytes);
    }
    p.r = reinterpret_cast<float*>(sbase + sv.r);
    p.cs = reinterpret_cast<float*>(sbase + sv.cs);
    p.hs = reinterpret_cast<T*>(sbase + sv.hs);
    p.hx = reinterpret_cast<float*>(sbase + sv.hx);
    if (!reuse) grad_hs = p.hs, grad_hx = p.hx;  // dT overwrites H, which back1 has finished with
    p.feat = !causal ? kFeatCompute : keep ? kFeatSave : reuse ? kFeatLoad : kFeatCompute;
    if (p.feat != kFeatCompute) {
      p.fph = reinterpret_cast<T*>(sbase + sv.ph);
      p.fkh = reinterpret_cast<T*>(sbase + sv.kf);
      p.fsa = reinterpret_cast<T*>(sbase + sv.sa);
      p.fyo = p.Dv <= kSavedOutMaxDv ? reinterpret_cast<float*>(sbase + sv.yo) : nullptr;
      p.fps = reinterpret_cast<float*>(sbase + sv.ps);
      p.fdn = reinterpret_cast<float*>(sbase + sv.dn);
    }
  }

  // Whether the kShapeD64M256 instantiations run this call (PANTHER_FAVOR_SHAPE=any forces the
  // generic ones, for comparisons).
  bool fixed_shape() const {
    static const bool allowed = [] {
      const char* e = std::getenv("PANTHER_FAVOR_SHAPE");
      return !(e && std::string(e) == "any");
    }();
    return allowed && p.softmax && p.D == 64 && p.M == 256 && p.Dv == 64;
  }

  // Launches Fixed(p) or Any(p) (the kShapeD64M256 and the generic instantiation of one of the
  // big kernels), as fixed_shape says, on grid (n, BH) with `kind`'s shared memory. (Template
  // arguments, so that each kernel gets launch sites of its own: see launch.cuh.)
  template <auto Fixed, auto Any>
  void launch(int n, int kind) {
    const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(p.BH)), block(kThreads);
    if (fixed_shape()) {
      PANTHER_LAUNCH(Fixed, grid, block, layout[kind].total, p);
    } else {
      PANTHER_LAUNCH(Any, grid, block, layout[kind].total, p);
    }
  }

  // Forward: the key states p.st (n = nk); backward (grad): the gradient states p.gst (n = nq).
  void scan(bool grad) {
    const int64_t ME = static_cast<int64_t>(p.M) * p.E1p;
    const int64_t total = p.BH * (ME + p.E1p) / 2;  // one thread per pair of entries
    const int threads = kScanThreads;
    const dim3 grid(static_cast<unsigned>((total + threads - 1) / threads));
    if (grad) {  // then p.hs, p.hx are dT and G for back2
      auto* kernel = &scan_kernel<T, float>;
      PANTHER_LAUNCH(kernel, grid, dim3(threads), 0, p.gst, p.cs, grad_hs, grad_hx, p.BH, p.nq,
                     p.nk, static_cast<int>(ME), p.E1p, p.causal, /*reverse=*/true,
                     /*use_kscale=*/false);
      p.hs = grad_hs;
      p.hx = grad_hx;
    } else {
      auto* kernel = &scan_kernel<T, T>;
      PANTHER_LAUNCH(kernel, grid, dim3(threads), 0, p.st, p.cs, p.hs, p.hx,
                           p.BH, p.nk, p.nk, static_cast<int>(ME), p.E1p, p.causal,
                           /*reverse=*/false, /*use_kscale=*/true);
    }
  }

  // Key states, stabilisers and the scanned (forward) states H.
  void states() {
    launch<&states_kernel<T, kShapeD64M256>, &states_kernel<T, kShapeAny>>(p.nk, kStates);
    PANTHER_LAUNCH(stab_kernel<T>, dim3(p.BH), dim3(1024), 2 * 1024 * sizeof(float), p);
    scan(/*grad=*/false);
  }
};

}  // namespace host

// saved: when given, receives the stabilisers and scanned states for backward(..., saved).
template <class T>
at::Tensor forward(const detail::FavorDims& d, const at::Tensor& query, const at::Tensor& key,
                   const at::Tensor& value, const at::Tensor& projection, bool causal,
                   const std::optional<at::Tensor>& mask, at::Tensor* saved = nullptr) {
  host::Run<T> run(d, causal, query, key, value, projection, mask, saved);
  at::Tensor out = detail::favor_output(d, query.options());
  run.p.out = reinterpret_cast<T*>(out.data_ptr());
  run.p.o_sb = out.stride(0), run.p.o_sh = out.stride(1), run.p.o_sl = out.stride(2);
  run.states();
  run.template launch<&forward_kernel<T, kShapeD64M256>, &forward_kernel<T, kShapeAny>>(run.p.nq,
                                                                                      kForward);
  return out;
}

template <class T>
detail::FavorGrads backward(const detail::FavorDims& d, const at::Tensor& grad_output,
                            const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, const at::Tensor& projection, bool causal,
                            const std::optional<at::Tensor>& mask, std::array<bool, 4> want,
                            const at::Tensor* saved = nullptr) {
  // saved: forward(..., &saved) of the same inputs; its states replace states() here.
  host::Run<T> run(d, causal, query, key, value, projection, mask, nullptr, saved);
  Params<T>& p = run.p;
  const auto opts = query.options();
  at::Tensor g = host::last_dim_dense(grad_output);
  p.g = reinterpret_cast<const T*>(g.data_ptr());
  p.g_sb = g.stride(0), p.g_sh = g.stride(1), p.g_sl = g.stride(2);
  at::Tensor dq = at::empty({d.B, d.H, d.Lq, d.D}, opts);
  at::Tensor dk = at::empty({d.B, d.H, d.Lk, d.D}, opts);
  at::Tensor dv = at::empty({d.B, d.H, d.Lk, d.Dv}, opts);
  // Causal: back1's outputs for back2, as Params says: dvp (fp32), Wm and, without the
  // forward's features, phi (bf16).
  at::Tensor part;
  if (causal) {
    const int64_t rows = p.BH * static_cast<int64_t>(p.nk) * kC, dvw = (p.Dv + 15) / 16 * 16;
    const int64_t fwm = rows * dvw * 4, fph = fwm + rows * kC * 2;
    part = at::empty({fph + (saved ? 0 : rows * p.M * 2)}, opts.dtype(at::kByte));
    unsigned char* base = part.data_ptr<unsigned char>();
    p.dvp = reinterpret_cast<float*>(base);
    p.fwm = reinterpret_cast<T*>(base + fwm);
    if (!saved) p.fph = reinterpret_cast<T*>(base + fph);
  }
  at::Tensor gst = at::empty({p.BH, p.nq, static_cast<int64_t>(p.M + 1) * p.E1p},
                             opts.dtype(at::kFloat));
  p.gst = gst.data_ptr<float>();
  at::Tensor dW;
  if (want[3]) dW = at::zeros({d.M, d.D}, opts.dtype(at::kFloat));
  p.dq = reinterpret_cast<T*>(dq.data_ptr());
  p.dk = reinterpret_cast<T*>(dk.data_ptr());
  p.dv = reinterpret_cast<T*>(dv.data_ptr());
  p.dW = want[3] ? dW.data_ptr<float>() : nullptr;
  if (!saved) run.states();
  run.template launch<&back1_kernel<T, kShapeD64M256>, &back1_kernel<T, kShapeAny>>(p.nq, kBack1);
  // Gradient states: the reverse scan (causal) or the total (non-causal) of dH.
  run.scan(/*grad=*/true);
  run.template launch<&back2_kernel<T, kShapeD64M256>, &back2_kernel<T, kShapeAny>>(p.nk, kBack2);
  detail::FavorGrads out;
  if (want[0]) std::get<0>(out) = dq;
  if (want[1]) std::get<1>(out) = dk;
  if (want[2]) std::get<2>(out) = dv;
  if (want[3]) std::get<3>(out) = dW.to(projection.scalar_type());
  return out;
}

}  // namespace panther::fused
