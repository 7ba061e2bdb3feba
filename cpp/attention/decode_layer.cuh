// The decoding step of a whole causal FAVOR+ self-attention layer's attention part on CUDA
// (panther::_favor_decode_layer_): the q, k and v projections of the new position and the step of
// decode_kernel.cuh in one launch, each (batch, head) row on a thread block cluster (sm_90) of
// kCluster blocks instead of one block, so a batch-1 step of 12 heads runs on 96 SMs, not 12.
// The output projection (it sums over every head) is a second kernel, a warp per output feature
// (linear_rows_kernel, which also serves the q/k/v projections where the cluster kernel does not
// run). The q, k and v weights are the layer's own three matrices.
//
// Per row (b, h), block c of the cluster (rank c), kLayerThreads threads:
//   0. every load, issued at once in the order of use: x[b] (then into shared memory), the
//      first q/k/v weight words and biases, the old v_sum and stabiliser, projection row tid,
//      this block's kv rows (registers, unconverted until used).
//   1. rows c*rpc .. of the head's 2D + Dv projection rows (q, then k, then v; rpc = ceil of
//      (2D + Dv) / kCluster): a warp per row, x . w + bias, stored into every block's q/k/v
//      (distributed shared memory).                                           cluster barrier
//   2. the pre-activations of all M features (thread m: feature m; every block forms them all
//      the same way, so their maxima need no exchange) and their maxima; this block's features
//      (c*Mc .. (c+1)*Mc - 1, Mc = M / kCluster) kept in shared memory.
//   3. the stabilisers, the features, the update of this block's kv rows and their part of
//      the readout, summed over the block and stored into block 0.             cluster barrier
//   then the state's global stores (each block its kv rows; rank 0 the new v_sum and
//   stabiliser, and in row 0 the count of `length`), none before: a cluster barrier's release
//   fence waits for every outstanding global store. Two cluster barriers in all.
//   4. block 0: out = num / den over the blocks' parts, written to ctx[b, h*Dv : (h+1)*Dv].
// Accumulation in T (the state's dtype,
// float or double); x and the projection weights in I (the layer's dtype), the feature
// projection in I or T; ctx in I. The math is decode_kernel.cuh's (same names), so the two agree
// to rounding. No allocation but ctx, no host synchronisation (CUDA graph capture works). Compiles as
// CUDA and, with PANTHER_CUDA_EMU, as host C++ against tests/emu/cuda_emu.h
// (tests/emu/decode_test.cpp).
#pragma once
#include "attention/decode_kernel.cuh"
#include "common/cluster.cuh"

#include <cstring>

namespace panther::decode {

// Blocks per row, threads per block, kv rows (features) per warp, the largest head_dim
// (kMaxD), kv columns per lane (Dv + 1 <= 32 kLayerCols); a projection row of at most
// kWRowWords 16-byte words is kept in registers from the start.
constexpr int kCluster = 8, kLayerThreads = 256, kLayerRows = 4, kMaxD = 128, kLayerCols = 3;
constexpr int kWRowWords = 8;
// q/k/v projection rows a warp computes together (step 1); elements of x and of v_sum per thread
// loaded into registers first (x beyond kXPer kLayerThreads elements is read in a loop after).
constexpr int kQRows = 3, kXPer = 4, kVsPer = 1;
static_assert(32 * kLayerCols <= kVsPer * kLayerThreads, "v_sum (Dv + 1 <= 32 kLayerCols)");
constexpr int kLayerWarps = kLayerThreads / 32;
// (every block forms all M <= kCluster kLayerWarps kLayerRows pre-activations, one per thread)
static_assert(kCluster * kLayerWarps * kLayerRows <= kLayerThreads, "a thread per feature");

template <class T, class I, class WT>
struct LayerParams {
  const I* x;  // (B, E) rows of stride x_stride
  int64_t x_stride;
  const I* w[3];     // w_q (H D, E), w_k (H D, E), w_v (H Dv, E), contiguous
  const I* bias[3];  // b_q, b_k, b_v, each or null
  const WT* W;  // (M, D), contiguous
  T* kv;        // (B H, M, Dv + 1), contiguous
  T* v_sum;     // (B H, Dv + 1)
  T* r;         // (B H)
  I* ctx;       // (B, H Dv)
  int64_t* length;
  int E, H, D, Dv, M;
  bool vec;   // weight rows read as 16-byte words (E a multiple of 16 / sizeof(I), aligned)
  bool wvec;  // projection rows read as <= kWRowWords 16-byte words (D likewise, aligned)
  bool softmax;
  T xscale, sM, eps, ek;
};

// Shared memory (elements of T): x (E), q/k/v (2D + Dv), the old then new v_sum (E1), this
// block's query and key pre-activations (2 Mc), the warps' maxima (2 kLayerWarps), the warps'
// readout parts (kLayerWarps E1), the blocks' readout parts (kCluster E1, block 0's used).
inline int64_t layer_smem_elems(int64_t E, int64_t D, int64_t Dv, int64_t M) {
  const int64_t E1 = Dv + 1, Mc = (M + kCluster - 1) / kCluster;
  return E + 2 * D + Dv + E1 + 2 * Mc + 2 * kLayerWarps + kLayerWarps * E1 + kCluster * E1;
}

// x . w over E for one lane (its share of the columns; the caller sums over the warp), one
// element at a time: the path for weight rows that are not read as 16-byte words.
template <class T, class I>
__device__ __forceinline__ T lane_dot(const I* __restrict__ w, const T* __restrict__ sx, int E,
                                      int lane) {
  T acc = 0;
  for (int e = lane; e < E; e += 32) acc += load_as<T>(w + e) * sx[e];
  return acc;
}

// Weight rows read as 16-byte words, a chunk at a time: words base + lane + 32 u (u < kWords) of
// R rows, all issued before any is used, so a warp waits for one memory latency per chunk, not
// one per word and row (a 768-wide bf16 row is one chunk).
constexpr int kWords = 4;

template <int R, class I>
__device__ __forceinline__ void load_words(uint4 (&words)[R][kWords], const I* const (&rows)[R],
                                           int nw, int base, int lane) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int u = 0; u < kWords; ++u) {
      const int i = base + lane + 32 * u;
      words[r][u] = rows[r] != nullptr && i < nw ? reinterpret_cast<const uint4*>(rows[r])[i]
                                                 : make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// acc[r][v] += (row r's words of the chunk at base) . (the same columns of vector v), for the nv
// <= V vectors sx + v * ld (shared memory, in T); one lane's share.
template <int R, int V, class T, class I>
__device__ __forceinline__ void dot_words(const uint4 (&words)[R][kWords],
                                          const T* __restrict__ sx, int64_t ld, int nv, int nw,
                                          int base, int lane, T (&acc)[R][V]) {
  constexpr int kPer = 16 / sizeof(I);
#pragma unroll
  for (int u = 0; u < kWords; ++u) {
    const int i = base + lane + 32 * u;
    if (i >= nw) continue;
    T wt[R][kPer];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      I wi[kPer];  // (a copy, not a cast: reading a uint4 through I* breaks aliasing rules)
      memcpy(wi, &words[r][u], sizeof(wi));
#pragma unroll
      for (int k = 0; k < kPer; ++k) wt[r][k] = load_as<T>(wi + k);
    }
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if (v >= nv) continue;
      const T* xv = sx + v * ld + static_cast<int64_t>(i) * kPer;
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const T xk = xv[k];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][v] += wt[r][k] * xk;
      }
    }
  }
}

template <class T, class I, class WT>
__global__ void __launch_bounds__(kLayerThreads)
    decode_layer_kernel(const LayerParams<T, I, WT> p) {
  PANTHER_DYNAMIC_SMEM(smem_raw);
  const int E = p.E, D = p.D, Dv = p.Dv, E1 = Dv + 1, M = p.M, H = p.H;
  const int Mc = (M + kCluster - 1) / kCluster, nq = 2 * D + Dv;
  const int rpc = (nq + kCluster - 1) / kCluster;
  T* sx = reinterpret_cast<T*>(smem_raw);
  T* sqkv = sx + E;  // q (D), k (D), v (Dv)
  T* svs = sqkv + nq;
  T* sfq = svs + E1;
  T* sfk = sfq + Mc;
  T* smax = sfk + Mc;                 // the warps' query maxima, then their key maxima
  T* swarp = smax + 2 * kLayerWarps;  // kLayerWarps x E1
  T* syp = swarp + kLayerWarps * E1;  // kCluster x E1
  const unsigned c = panther::cluster::rank();
  const int64_t row = blockIdx.x / kCluster;
  const int64_t b = row / H;
  const int h = static_cast<int>(row - b * H);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int m_lo = static_cast<int>(c) * Mc;
  const int m_hi = m_lo + Mc < M ? m_lo + Mc : M;
  T* kv = p.kv + row * M * E1;

  // 0. The loads, in the order they are needed: x (step 1 waits for it), the first chunk of this
  // warp's q/k/v weight rows and their biases (step 1), the old v_sum and stabiliser, this warp's
  // projection rows (step 2) and kv rows (step 3). Values stay as loaded (no conversion) until
  // their use, so before the barrier only the stores of x and v_sum into shared memory wait for
  // memory, once, with every load in flight.
  const I* x = p.x + b * p.x_stride;
  I xr[kXPer];  // x[tid + kLayerThreads j]; beyond kXPer kLayerThreads, a loop below
#pragma unroll
  for (int j = 0; j < kXPer; ++j) {
    const int e = tid + kLayerThreads * j;
    if (e < E) xr[j] = x[e];
  }
  const int q_lo = static_cast<int>(c) * rpc, q_hi = q_lo + rpc < nq ? q_lo + rpc : nq;
  const int q_first = q_lo + warp, nw = p.vec ? E / (16 / static_cast<int>(sizeof(I))) : 0;
  const I* qrows[kQRows];
  int qwhich[kQRows];   // 0, 1, 2: q, k, v
  int64_t qwr[kQRows];  // their rows of that weight
  auto set_rows = [&](int i0) {
#pragma unroll
    for (int r = 0; r < kQRows; ++r) {
      const int i = i0 + kLayerWarps * r;
      const int which = i < D ? 0 : i < 2 * D ? 1 : 2;  // q, k or v
      const int64_t wr = which < 2 ? static_cast<int64_t>(h) * D + (i - which * D)
                                   : static_cast<int64_t>(h) * Dv + (i - 2 * D);
      qwhich[r] = which;
      qwr[r] = wr;
      qrows[r] = i < q_hi ? p.w[which] + wr * E : nullptr;
    }
  };
  set_rows(q_first);
  uint4 words[kQRows][kWords];
  if (p.vec) load_words(words, qrows, nw, 0, lane);
  I qb[kQRows];  // the first group's biases
#pragma unroll
  for (int r = 0; r < kQRows; ++r)
    if (qrows[r] != nullptr && p.bias[qwhich[r]] != nullptr) qb[r] = p.bias[qwhich[r]][qwr[r]];
  T vs_old[kVsPer];
#pragma unroll
  for (int i = 0; i < kVsPer; ++i) {
    const int j = tid + kLayerThreads * i;
    if (j < E1) vs_old[i] = p.v_sum[row * E1 + j];
  }
  const T r_old = p.softmax ? p.r[row] : T(0);
  // Projection row `tid` (every block forms all M pre-activations, step 2), as 16-byte words
  // where it is kWRowWords of them or fewer.
  constexpr int kWPer = 16 / static_cast<int>(sizeof(WT));
  const int nwrow = p.wvec ? D / kWPer : 0;
  uint4 wrow[kWRowWords];
#pragma unroll
  for (int k = 0; k < kWRowWords; ++k)
    if (tid < M && k < nwrow)
      wrow[k] = reinterpret_cast<const uint4*>(p.W + static_cast<int64_t>(tid) * D)[k];
  const int m0 = m_lo + warp * kLayerRows;  // kLayerWarps * kLayerRows >= Mc (layer_takes)
  T xkv[kLayerRows][kLayerCols];  // the kv rows; after step 3, their new values
#pragma unroll
  for (int u = 0; u < kLayerRows; ++u) {
    const bool in = m0 + u < m_hi;
#pragma unroll
    for (int i = 0; i < kLayerCols; ++i) {
      const int j = lane + 32 * i;
      xkv[u][i] = in && j < E1 ? kv[static_cast<int64_t>(m0 + u) * E1 + j] : T(0);
    }
  }
  panther::launch_dependents();  // the output projection may start fetching its weights
#pragma unroll
  for (int j = 0; j < kXPer; ++j) {
    const int e = tid + kLayerThreads * j;
    if (e < E) sx[e] = load_as<T>(&xr[j]);
  }
  for (int e = tid + kLayerThreads * kXPer; e < E; e += kLayerThreads) sx[e] = load_as<T>(x + e);
#pragma unroll
  for (int i = 0; i < kVsPer; ++i) {
    const int j = tid + kLayerThreads * i;
    if (j < E1) svs[j] = vs_old[i];
  }
  __syncthreads();

  // 1. This block's share of the head's q, k, v rows (a warp per row, kQRows rows at a time),
  // into every block.
  for (int i0 = q_first; i0 < q_hi; i0 += kLayerWarps * kQRows) {
    if (i0 != q_first) set_rows(i0);
    T acc[kQRows][1];
#pragma unroll
    for (int r = 0; r < kQRows; ++r) acc[r][0] = 0;
    if (p.vec) {
      for (int base = 0; base < nw; base += 32 * kWords) {
        if (i0 != q_first || base != 0) load_words(words, qrows, nw, base, lane);
        dot_words<kQRows, 1, T, I>(words, sx, 0, 1, nw, base, lane, acc);
      }
    } else {
#pragma unroll
      for (int r = 0; r < kQRows; ++r)
        if (qrows[r] != nullptr) acc[r][0] = lane_dot<T, I>(qrows[r], sx, E, lane);
    }
#pragma unroll
    for (int r = 0; r < kQRows; ++r) {
      const int i = i0 + kLayerWarps * r;
      if (i >= q_hi) continue;
      T y = warp_sum(acc[r][0]);
      if (p.bias[qwhich[r]] != nullptr)
        y += load_as<T>(i0 == q_first ? &qb[r] : p.bias[qwhich[r]] + qwr[r]);
      if (lane < kCluster) *panther::cluster::map(sqkv + i, static_cast<unsigned>(lane)) = y;
    }
  }
  panther::cluster::sync();  // (1 of 2)

  // 2. Pre-activations of this block's features (one warp per kLayerRows of them).
  const T* sq = sqkv;
  const T* sk = sqkv + D;
  const T* sv = sqkv + 2 * D;
  T hq = 0, hk = 0;  // |x'|^2 / 2 (softmax)
  if (p.softmax) {
    for (int d = lane; d < D; d += 32) {
      const T qd = sq[d] * p.xscale, kd = sk[d] * p.xscale;
      hq += qd * qd;
      hk += kd * kd;
    }
    hq = warp_sum(hq) * T(0.5);
    hk = warp_sum(hk) * T(0.5);
  }
  // Thread m: feature m's pre-activations; their maxima over all M features (each block forms
  // them all, the same way, so no exchange is needed); this block's own into sfq, sfk.
  T aq_m = 0, ak_m = 0;
  if (tid < M) {
    auto add = [&](int d, T w) {
      aq_m += sq[d] * p.xscale * w;
      ak_m += sk[d] * p.xscale * w;
    };
    if (nwrow > 0) {
#pragma unroll
      for (int k = 0; k < kWRowWords; ++k) {
        if (k >= nwrow) continue;
        WT wk[kWPer];
        memcpy(wk, &wrow[k], sizeof(wk));
#pragma unroll
        for (int e = 0; e < kWPer; ++e) add(k * kWPer + e, load_as<T>(wk + e));
      }
    } else {
      const WT* w = p.W + static_cast<int64_t>(tid) * D;
      for (int d = 0; d < D; ++d) add(d, load_as<T>(w + d));
    }
    aq_m -= hq;
    ak_m -= hk;
    if (tid >= m_lo && tid < m_hi) {
      sfq[tid - m_lo] = aq_m;
      sfk[tid - m_lo] = ak_m;
    }
  }
  T mq = tid < M ? aq_m : T(-INFINITY), mk = tid < M ? ak_m : T(-INFINITY);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    mq = max_t(mq, __shfl_xor_sync(0xffffffffu, mq, o));
    mk = max_t(mk, __shfl_xor_sync(0xffffffffu, mk, o));
  }
  if (lane == 0) {
    smax[warp] = mq;
    smax[kLayerWarps + warp] = mk;
  }
  // The new v_sum (this block's copy; block 0 writes it back after the last barrier).
  for (int j = tid; j < E1; j += kLayerThreads) svs[j] += j < Dv ? sv[j] : T(1);
  __syncthreads();

  // 3. Stabilisers, features, this block's kv rows and readout part.
  T alpha = 1, cq = 0, r_new = r_old;
  if (p.softmax) {
    cq = smax[0];
    T ck = smax[kLayerWarps];
    for (int w = 1; w < kLayerWarps; ++w) {
      cq = max_t(cq, smax[w]);
      ck = max_t(ck, smax[kLayerWarps + w]);
    }
    r_new = max_t(r_old, ck);
    alpha = exp_t(r_old - r_new);  // <= 1; 0 for an empty state (r_old = -inf)
  }
  T aq[kLayerRows], ak[kLayerRows];
#pragma unroll
  for (int u = 0; u < kLayerRows; ++u) {
    const bool in = m0 + u < m_hi;
    aq[u] = in ? sfq[m0 + u - m_lo] : T(0);
    ak[u] = in ? sfk[m0 + u - m_lo] : T(0);
  }
  T acc[kLayerCols];
#pragma unroll
  for (int i = 0; i < kLayerCols; ++i) acc[i] = 0;
#pragma unroll
  for (int u = 0; u < kLayerRows; ++u) {
    if (m0 + u < m_hi) {
      T ph, kf;
      if (p.softmax) {
        ph = p.sM * (exp_t(aq[u] - cq) + p.eps);
        kf = p.sM * exp_t(ak[u] - r_new);
      } else {
        ph = p.sM * max_t(aq[u], T(0)) + p.eps;
        kf = p.sM * max_t(ak[u], T(0));
      }
#pragma unroll
      for (int i = 0; i < kLayerCols; ++i) {
        const int j = lane + 32 * i;
        if (j < E1) {
          const T nkv = alpha * xkv[u][i] + kf * (j < Dv ? sv[j] : T(1));
          xkv[u][i] = nkv;  // (stored after the last barrier)
          acc[i] += ph * (nkv + p.ek * svs[j]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kLayerCols; ++i) {
    const int j = lane + 32 * i;
    if (j < E1) swarp[warp * E1 + j] = acc[i];
  }
  __syncthreads();
  {
    T* dst = panther::cluster::map(syp, 0u) + static_cast<int64_t>(c) * E1;
    for (int j = tid; j < E1; j += kLayerThreads) {
      T s = 0;
      for (int w = 0; w < kLayerWarps; ++w) s += swarp[w * E1 + j];
      dst[j] = s;
    }
  }
  panther::cluster::sync();  // (2 of 2)

  // The state's global stores, after the last cluster barrier: its fence (the release of the
  // distributed shared memory writes) then has no global store to wait for.
#pragma unroll
  for (int u = 0; u < kLayerRows; ++u) {
    if (m0 + u >= m_hi) continue;
    T* kvr = kv + static_cast<int64_t>(m0 + u) * E1;
#pragma unroll
    for (int i = 0; i < kLayerCols; ++i) {
      const int j = lane + 32 * i;
      if (j < E1) kvr[j] = xkv[u][i];
    }
  }
  if (c == 0) {
    for (int j = tid; j < E1; j += kLayerThreads) p.v_sum[row * E1 + j] = svs[j];
    if (p.softmax && tid == 0) p.r[row] = r_new;
    if (p.length != nullptr && row == 0 && tid == 0) *p.length += 1;
  }

  // 4. Block 0: out = num / den (den > 0: the query sees at least its own key).
  if (c == 0) {
    T den = 0;
    for (int r = 0; r < kCluster; ++r) den += syp[r * E1 + Dv];
    I* out = p.ctx + b * (static_cast<int64_t>(H) * Dv) + static_cast<int64_t>(h) * Dv;
    for (int j = tid; j < Dv; j += kLayerThreads) {
      T num = 0;
      for (int r = 0; r < kCluster; ++r) num += syp[r * E1 + j];
      out[j] = store_as<I>(num / den);
    }
  }
}

// A linear layer on a few rows, out = ctx w^T + bias (B <= kOutMaxRows rows of ctx): the output
// projection of a decoding step (and its q, k and v projections where the cluster kernel does
// not run). A warp per output feature, kOutWarps features per block, so a 768-wide layer
// runs on 96 blocks (cuBLAS picks 64-row tiles for one row of ctx: 12 blocks, ~4.4 us on an
// H100 for 768 x 768 in bf16). ctx is staged in shared memory in T; w rows are read as 16-byte
// words where aligned (`vec`); accumulation in T, the output rounded to I. It is a programmatic
// dependent launch: on sm_90 its first weight words are fetched while the kernel before it (the
// cluster kernel, which lets it start early) still runs, and it reads ctx after the wait.
constexpr int kOutThreads = 256, kOutWarps = kOutThreads / 32, kOutMaxRows = 8;

template <class T, class I>
struct LinearRowsParams {
  const I* ctx;   // (B, K) contiguous
  const I* w;     // (N, K) contiguous
  const I* bias;  // (N) or null
  I* out;         // (B, N)
  int B, K, N;
  bool vec;
};

template <class T, class I>
__global__ void __launch_bounds__(kOutThreads) linear_rows_kernel(const LinearRowsParams<T, I> p) {
  PANTHER_DYNAMIC_SMEM(smem_raw);
  T* sc = reinterpret_cast<T*>(smem_raw);  // B x K
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n = blockIdx.x * kOutWarps + warp;
  const I* rows[1] = {n < p.N ? p.w + static_cast<int64_t>(n) * p.K : nullptr};
  const int nw = p.vec ? p.K / (16 / static_cast<int>(sizeof(I))) : 0;
  uint4 words[1][kWords];
  if (p.vec) load_words(words, rows, nw, 0, lane);  // in flight while ctx is staged
  panther::grid_dependency_wait();                   // ctx is the previous kernel's output
  for (int i = tid; i < p.B * p.K; i += kOutThreads) sc[i] = load_as<T>(p.ctx + i);
  __syncthreads();
  if (n >= p.N) return;
  T acc[1][kOutMaxRows];
#pragma unroll
  for (int b = 0; b < kOutMaxRows; ++b) acc[0][b] = 0;
  if (p.vec) {
    for (int base = 0; base < nw; base += 32 * kWords) {
      if (base != 0) load_words(words, rows, nw, base, lane);
      dot_words<1, kOutMaxRows, T, I>(words, sc, p.K, p.B, nw, base, lane, acc);
    }
  } else {
#pragma unroll
    for (int b = 0; b < kOutMaxRows; ++b)
      if (b < p.B)
        acc[0][b] = lane_dot<T, I>(rows[0], sc + static_cast<int64_t>(b) * p.K, p.K, lane);
  }
  const T bias = p.bias != nullptr ? load_as<T>(p.bias + n) : T(0);
#pragma unroll
  for (int b = 0; b < kOutMaxRows; ++b) {
    if (b < p.B) {
      const T y = warp_sum(acc[0][b]) + bias;
      if (lane == 0) p.out[static_cast<int64_t>(b) * p.N + n] = store_as<I>(y);
    }
  }
}

// Whether the cluster kernel takes a layer: x (., E), head_dim D, value_dim Dv, M features, the
// state in `st`; block shared memory within `max_smem`; `clusters`: the device launches
// thread block clusters (compute capability 9.0 or newer). Others take the q/k/v GEMM and the
// one-block step kernel (or its ATen math).
inline bool layer_takes(int64_t E, int64_t D, int64_t Dv, int64_t M, at::ScalarType st,
                        int64_t max_smem, bool clusters) {
  if (!clusters || (st != at::kFloat && st != at::kDouble)) return false;
  if (E < 1 || E > INT_MAX / 2 || D > kMaxD || Dv + 1 > 32 * kLayerCols) return false;
  if ((M + kCluster - 1) / kCluster > kLayerWarps * kLayerRows) return false;
  return layer_smem_elems(E, D, Dv, M) * at::elementSize(st) <= max_smem;
}

// ctx (B, H Dv) in x's dtype from the cluster kernel, state dtype T, layer dtype I, projection
// dtype WT (the caller checked the arguments and layer_takes, and set the device). The weights
// and the state are read through contiguous copies (the module's parameters and state are
// contiguous: no copy); a non-contiguous state is written back.
template <class T, class I, class WT>
at::Tensor layer_step(const at::Tensor& x, const detail::QkvWeights& qkv,
                      const at::Tensor& projection, bool softmax, const at::Tensor& kv,
                      const at::Tensor& v_sum, const at::Tensor& stabiliser,
                      const std::optional<at::Tensor>& length) {
  const int64_t B = x.size(0), E = x.size(1), H = kv.size(1), M = kv.size(2),
                Dv = kv.size(3) - 1, D = projection.size(1);
  at::Tensor ctx = at::empty({B, H * Dv}, x.options());
  const bool counts = length.has_value() && length->defined();
  if (B == 0) {
    if (counts) length->add_(1);
    return ctx;
  }
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor w[3] = {qkv.w_q.contiguous(), qkv.w_k.contiguous(), qkv.w_v.contiguous()};
  const std::optional<at::Tensor>* b[3] = {&qkv.b_q, &qkv.b_k, &qkv.b_v};
  at::Tensor bias[3];
  const at::Tensor W = projection.contiguous();
  const at::Tensor kvc = kv.contiguous(), vsc = v_sum.contiguous(), rc = stabiliser.contiguous();
  LayerParams<T, I, WT> p{};
  p.x = reinterpret_cast<const I*>(xc.data_ptr());
  p.x_stride = xc.stride(0);
  constexpr int64_t kPer = 16 / static_cast<int64_t>(sizeof(I));
  p.vec = E % kPer == 0;
  for (int i = 0; i < 3; ++i) {
    p.w[i] = reinterpret_cast<const I*>(w[i].data_ptr());
    p.vec = p.vec && reinterpret_cast<uintptr_t>(p.w[i]) % 16 == 0;
    if (b[i]->has_value() && (*b[i])->defined()) bias[i] = (*b[i])->contiguous();
    p.bias[i] = bias[i].defined() ? reinterpret_cast<const I*>(bias[i].data_ptr()) : nullptr;
  }
  p.W = reinterpret_cast<const WT*>(W.data_ptr());
  p.kv = kvc.data_ptr<T>();
  p.v_sum = vsc.data_ptr<T>();
  p.r = rc.data_ptr<T>();
  p.ctx = reinterpret_cast<I*>(ctx.data_ptr());
  p.length = counts ? length->data_ptr<int64_t>() : nullptr;
  p.E = static_cast<int>(E);
  p.H = static_cast<int>(H);
  p.D = static_cast<int>(D);
  p.Dv = static_cast<int>(Dv);
  p.M = static_cast<int>(M);
  const int64_t wbytes = D * static_cast<int64_t>(sizeof(WT));
  p.wvec = wbytes % 16 == 0 && wbytes <= 16 * kWRowWords &&
           reinterpret_cast<uintptr_t>(W.data_ptr()) % 16 == 0;
  set_feature_constants(p, softmax, D, M);
  const size_t smem = static_cast<size_t>(layer_smem_elems(E, D, Dv, M) * sizeof(T));
  auto* kernel = &decode_layer_kernel<T, I, WT>;
  PANTHER_LAUNCH_CLUSTER(kernel, dim3(static_cast<unsigned>(B * H * kCluster)),
                         dim3(kLayerThreads), kCluster, smem, p);
  if (!kvc.is_same(kv)) kv.copy_(kvc);
  if (!vsc.is_same(v_sum)) v_sum.copy_(vsc);
  if (!rc.is_same(stabiliser)) stabiliser.copy_(rc);
  return ctx;
}

// layer_step with the types of the call's tensors (as run_step).
inline at::Tensor run_layer_step(const at::Tensor& x, const detail::QkvWeights& qkv,
                                 const at::Tensor& projection, bool softmax, const at::Tensor& kv,
                                 const at::Tensor& v_sum, const at::Tensor& stabiliser,
                                 const std::optional<at::Tensor>& length) {
  const at::ScalarType it = x.scalar_type();
  const bool w_state = projection.scalar_type() != it;
#define PANTHER_DECODE_LAYER(T, I, WT) \
  layer_step<T, I, WT>(x, qkv, projection, softmax, kv, v_sum, stabiliser, length)
  if (kv.scalar_type() == at::kDouble) return PANTHER_DECODE_LAYER(double, double, double);
  if (it == at::kHalf)
    return w_state ? PANTHER_DECODE_LAYER(float, __half, float)
                   : PANTHER_DECODE_LAYER(float, __half, __half);
  if (it == at::kBFloat16)
    return w_state ? PANTHER_DECODE_LAYER(float, __nv_bfloat16, float)
                   : PANTHER_DECODE_LAYER(float, __nv_bfloat16, __nv_bfloat16);
  return PANTHER_DECODE_LAYER(float, float, float);
#undef PANTHER_DECODE_LAYER
}

// ctx w_out^T + b_out (B, N) in ctx's dtype: linear_rows_kernel for B <= kOutMaxRows rows whose
// shared-memory copy fits `max_smem` (the caller set the device), else at::linear.
inline at::Tensor linear_rows(const at::Tensor& ctx, const at::Tensor& w_out,
                              const std::optional<at::Tensor>& b_out, int64_t max_smem) {
  const int64_t B = ctx.size(0), K = ctx.size(1), N = w_out.size(0);
  const at::ScalarType it = ctx.scalar_type();
  const int64_t ts = it == at::kDouble ? 8 : 4;
  if (B == 0 || B > kOutMaxRows || K > INT_MAX / kOutMaxRows || N > INT_MAX - kOutWarps ||
      B * K * ts > max_smem)
    return at::linear(ctx, w_out, b_out);
  at::Tensor out = at::empty({B, N}, ctx.options());
  const at::Tensor c = ctx.contiguous(), w = w_out.contiguous();
  const at::Tensor bias =
      b_out.has_value() && b_out->defined() ? b_out->contiguous() : at::Tensor();
  auto go = [&](auto tag_t, auto tag_i) {
    using T = decltype(tag_t);
    using I = decltype(tag_i);
    LinearRowsParams<T, I> p{};
    p.ctx = reinterpret_cast<const I*>(c.data_ptr());
    p.w = reinterpret_cast<const I*>(w.data_ptr());
    p.bias = bias.defined() ? reinterpret_cast<const I*>(bias.data_ptr()) : nullptr;
    p.out = reinterpret_cast<I*>(out.data_ptr());
    p.B = static_cast<int>(B);
    p.K = static_cast<int>(K);
    p.N = static_cast<int>(N);
    p.vec = K % (16 / static_cast<int64_t>(sizeof(I))) == 0 &&
            reinterpret_cast<uintptr_t>(p.w) % 16 == 0;
    auto* kernel = &linear_rows_kernel<T, I>;
    PANTHER_LAUNCH_DEPENDENT(kernel, dim3(static_cast<unsigned>((N + kOutWarps - 1) / kOutWarps)),
                             dim3(kOutThreads), static_cast<size_t>(B * K * ts), p);
  };
  if (it == at::kDouble) go(double{}, double{});
  else if (it == at::kHalf) go(float{}, __half{});
  else if (it == at::kBFloat16) go(float{}, __nv_bfloat16{});
  else go(float{}, float{});
  return out;
}

}  // namespace panther::decode
