// Tile primitives of the fused FAVOR+ kernels (favor_kernels.cuh has the overview): sizes,
// the kernel parameters, the shared-memory layout, and the warp- and block-level pieces
// (copies, WMMA tile products, reductions, stabiliser loads) that the kernels are built from.
// Compiles as CUDA and, with PANTHER_CUDA_EMU defined, as host C++ against tests/emu/cuda_emu.h.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/device.cuh"
#include "common/mma.cuh"

#ifndef PANTHER_CUDA_EMU
#include <mma.h>  // WMMA (the emulator has its own)
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
  float* mx;              // (BH, nk) causal softmax (else null): the chunk maxima m_c (written
                          // by kStatesMax and kStatesAll, read by kStatesOnly instead of
                          // computing them again)
  T* st;                  // (BH, st_n, (M+1)*E1p) per-chunk key states (summed in fp32 by the
  int st_n;               // scan) of chunks chunk0 .. chunk0 + st_n - 1
  int smode;              // states_kernel: kStatesAll, kStatesMax or kStatesOnly
  int sn;                 // stab_kernel: chunks chunk0 .. chunk0 + sn - 1 of each row
  float* gst;             // (BH, slots, (M+1)*E1p) gradient states dH (fp32: the backward's
                          // d phi is a small difference of large terms): causal, one per chunk
                          // of the launch; non-causal, sums over chunks (see back1_kernel)
  int slots, chunk0;      // back1/back2: gst's states per row (dvp, fwm: chunks per row); every
                          // kernel on an (n, BH) grid: the first chunk of the launch
  T* hs;                  // (BH, hs_n|1, M*E1p) scanned states (forward H, backward dT)
  float* hx;              // (BH, hs_n|1, E1p) scanned extra row (forward sum v, backward G)
  int hs_n, hs_c0;        // causal: hs, hx hold chunks hs_c0 .. hs_c0 + hs_n - 1 of each row
  T* out;                 // (B, H, Lq, Dv), strides o_sb, o_sh, o_sl (last dim dense)
  int64_t o_sb, o_sh, o_sl;
  T *dq, *dk, *dv;        // (BH, Lq|Lk|Lk, D|D|Dv)
  float* dvp;             // causal backward, back1 -> back2: the intra-chunk part of dv, A'^T Yb
                          // (BH, slots*kC, 16 ceil(Dv/16)), fp32 (GEMM accumulators, unrounded)
  T* fwm;                 // causal backward, back1 -> back2: Wm (BH, slots*kC, kC), from which
                          // (with phi, in fph) back2 forms the intra-chunk part of dkhat, Wm^T phi
  float* dW;              // (M, D) fp32 accumulator, or null
  // Causal calls from autograd: kFeatSave, forward_kernel also writes each chunk's features, A',
  // output and denominators (the backward's GEMMs need exactly these); kFeatLoad, back1/back2
  // read them instead of computing features, A' and y again. Causal backward calls without them
  // (kFeatCompute) point fph at a workspace that back1 fills with phi for back2 (the rows of one
  // launch's chunks, as dvp).
  int feat;
  T *fph, *fkh;           // (BH, nk*kC, M) query features phi, key features khat
  T* fsa;                 // (BH, nk, kC*kC) A'
  float* fyo;             // (BH, nk*kC, Dv) y / den before rounding, or null (Dv > 64)
  float *fps, *fdn;       // (BH, nk*kC) row sums of phi, denominators (with fyo)
  bool bulk;              // save_features / save_back2_inputs may use bulk copies (sm_90 code
                          // only; false: the portable path, see mma::bulk_store)
};
enum Feat { kFeatCompute = 0, kFeatSave = 1, kFeatLoad = 2 };
// What states_kernel computes: everything (a, the chunk maxima in cs for stab_kernel and, causal,
// in mx; the states st); only a and the chunk maxima (before the states of the causal launches,
// where the stabilisers need every key maximum first: see Run::causal_pass); only the states,
// with the chunk maxima from mx (cs already holds stab_kernel's chunk scalars, which the chunk
// maxima would overwrite).
enum StatesMode { kStatesAll = 0, kStatesMax = 1, kStatesOnly = 2 };

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

}  // namespace panther::fused
