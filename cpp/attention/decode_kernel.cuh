// The fused decoding step of causal FAVOR+ (panther::_favor_decode_step_ on CUDA): one thread
// block per row (batch*head) does the whole step that panther._favor_math.decode_step spells in a
// few dozen small ATen ops: both feature maps, the key stabiliser, the state's rescale, the
// outer-product update and the readout. Decoding is latency-bound (one position, a few kB of
// state per head), so the win is one launch instead of many, not bandwidth.
//
// Per row (sM = M^-1/2; x' = x D^-1/4 for softmax, x for relu):
//   pre_x[m] = x' . W[m] (- |x'|^2/2 softmax)                    warp per feature m, smem q', k'
//   softmax: c_q = max pre_q, r_new = max(r, max pre_k)           block max (shuffles + smem)
//            phi = sM (exp(pre_q - c_q) + eps), kf = sM exp(pre_k - r_new), alpha = exp(r - r_new)
//   relu:    phi = sM relu(pre_q) + eps, kf = sM relu(pre_k), alpha = 1
//   v_sum += [v, 1];  kv[m] = alpha kv[m] + kf[m] [v, 1]          warp per row m of kv (coalesced)
//   y[j] = sum_m phi[m] (kv[m, j] + e_k v_sum[j]); out = y[:Dv] / y[Dv]   per-warp partial sums
// Staged calls (opt-in: the wide configuration where the head's kv block and the projection fit
// in shared memory, with 16-byte aligned blocks; see choose()) first copy both there with every
// load issued at once, so the step waits on global memory once instead of once per pass of each
// phase.
// Accumulation in T (float or double, the state's dtype); the query, key and value come in I (the
// layer's dtype: T, half or bfloat16) and the projection in I or T, each converted to T on load,
// and the output is written in I. The rows of q, k and v may be strided (RowLayout: the query,
// key and value views of one fused projection need no copies). No allocation but the output, no
// host synchronisation (CUDA graph capture works). The file compiles as CUDA and, with
// PANTHER_CUDA_EMU, as host C++ against tests/emu/cuda_emu.h (tests/emu/decode_test.cpp).
#pragma once
#include "common/device.cuh"

#include <ATen/ATen.h>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>

#include "attention/impl.h"
#include "common/launch.cuh"

namespace panther::decode {

// Two configurations of the kernel (template arguments kThreads, kCols; kCols = columns of kv per
// lane in the update/readout loop, value_dim + 1 <= 32 kCols):
//   wide (1024, 3): value_dim + 1 <= 96 and >= 256 features (the Performer head: 64 + 1 columns,
//     256 features): 32 warps, so each warp's chains of dependent loads and shuffles (a feature's
//     pre-activation, a row of kv) are a quarter as long as with 8; the latency-bound step
//     finishes sooner on the one SM of its head. Staged (Params::staged; opt-in, see choose()):
//     the head's kv block and W are copied to shared memory first;
//   general (256, 9): every other call, value_dim up to 256.
constexpr int kWideThreads = 1024, kWideCols = 3;
constexpr int kGeneralThreads = 256, kGeneralCols = 9;
// Rows (features) a warp works on at once.
constexpr int kRows = 4;
constexpr int64_t kMaxDv = 256;
static_assert(kMaxDv + 1 <= 32 * kGeneralCols, "kv row must fit the lanes' columns");

// Where row `row` (of R = outer x inner rows) of a (..., n) input starts: the rows of a tensor
// whose leading dims collapse to (outer, inner) with strides (so, si) and unit last stride.
struct RowLayout {
  int64_t inner, si, so;
  __host__ __device__ int64_t offset(int64_t row) const {
    const int64_t o = row / inner;
    return o * so + (row - o * inner) * si;
  }
};

template <class T, class I, class WT>
struct Params {
  bool staged;  // kv block and W copied to shared memory first (staged_bytes more of it)
  const I* q;
  const I* k;
  const I* v;
  const WT* W;
  RowLayout lq, lk, lv;
  T* kv;
  T* v_sum;
  T* r;
  I* out;
  int64_t* length;  // (optional) the positions the state holds: one more after the step
  int D, Dv, M;
  bool softmax;
  T xscale, sM, eps, ek;  // eps: of the query features; ek: of the key features
};

// A value of I (float, double, half or bfloat16) as T, and back (rounded to nearest).
template <class T, class I>
__device__ __forceinline__ T load_as(const I* p) {
  if constexpr (std::is_same_v<I, __half>) return static_cast<T>(__half2float(p[0]));
  else if constexpr (std::is_same_v<I, __nv_bfloat16>) return static_cast<T>(__bfloat162float(p[0]));
  else return static_cast<T>(p[0]);
}
template <class I, class T>
__device__ __forceinline__ I store_as(T x) {
  if constexpr (std::is_same_v<I, __half>) return __float2half_rn(static_cast<float>(x));
  else if constexpr (std::is_same_v<I, __nv_bfloat16>) return __float2bfloat16_rn(static_cast<float>(x));
  else return static_cast<I>(x);
}

template <class T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <class T>
__device__ __forceinline__ T exp_t(T x) {
  if constexpr (sizeof(T) == 4) return expf(x);
  else return exp(x);
}

template <class T>
__device__ __forceinline__ T max_t(T a, T b) { return a > b ? a : b; }

// Shared memory (elements of T): q', k' (D each), [v, 1] and the new v_sum (E1 each), the
// pre-activations then features of the query and key (M each), the warps' maxima (2 kWarps) and
// partial readouts (kWarps E1).
inline int64_t smem_elems(int64_t D, int64_t Dv, int64_t M, int warps) {
  const int64_t E1 = Dv + 1;
  return 2 * D + 2 * E1 + 2 * M + 2 * warps + warps * E1;
}

// Bytes of the staged copies at the start of shared memory: the head's kv block (M x E1 of the
// state's dtype, `ts` bytes each), then W (M x D, `ws` bytes each); each a multiple of 16 bytes
// (else the call is not staged).
inline int64_t staged_bytes(int64_t D, int64_t Dv, int64_t M, int64_t ts, int64_t ws) {
  return M * (Dv + 1) * ts + M * D * ws;
}

// 16-byte words per thread loaded before any is stored in the staging copy (all of a Performer
// head's 6208 words in one round with 1024 threads).
constexpr int kStageUnroll = 8;

// Copies n16 16-byte words from a (then b, after na16 of a) to dst, kStageUnroll words per
// thread in flight.
__device__ __forceinline__ void stage_copy(const uint4* __restrict__ a, int64_t na16,
                                           const uint4* __restrict__ b, int64_t n16,
                                           uint4* __restrict__ dst, int tid, int threads) {
  for (int64_t base = tid; base < n16; base += static_cast<int64_t>(threads) * kStageUnroll) {
    uint4 t[kStageUnroll];
#pragma unroll
    for (int u = 0; u < kStageUnroll; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * threads;
      if (i < n16) t[u] = i < na16 ? a[i] : b[i - na16];
    }
#pragma unroll
    for (int u = 0; u < kStageUnroll; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * threads;
      if (i < n16) dst[i] = t[u];
    }
  }
}

template <class T, class I, class WT, int kThreads, int kCols>
__global__ void __launch_bounds__(kThreads) decode_step_kernel(const Params<T, I, WT> p) {
  constexpr int kWarps = kThreads / 32;
  PANTHER_DYNAMIC_SMEM(smem_raw);
  const int D = p.D, Dv = p.Dv, E1 = Dv + 1, M = p.M;
  const int64_t kv_bytes = p.staged ? static_cast<int64_t>(M) * E1 * sizeof(T) : 0;
  const int64_t w_bytes = p.staged ? static_cast<int64_t>(M) * D * sizeof(WT) : 0;
  T* skv = reinterpret_cast<T*>(smem_raw);
  const WT* sW = reinterpret_cast<const WT*>(smem_raw + kv_bytes);
  T* sq = reinterpret_cast<T*>(smem_raw + kv_bytes + w_bytes);
  T* sk = sq + D;
  T* sv = sk + D;
  T* svs = sv + E1;
  T* sfq = svs + E1;
  T* sfk = sfq + M;
  T* smax = sfk + M;
  T* syp = smax + 2 * kWarps;
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const I* q = p.q + p.lq.offset(row);
  const I* k = p.k + p.lk.offset(row);
  const I* v = p.v + p.lv.offset(row);
  T* kv = p.kv + row * M * E1;
  T* vs = p.v_sum + row * E1;

  // 1. Stage the inputs (staged: also this head's kv block and W); v_sum += [v, 1] (one thread
  //    per entry). Every thread reads the old stabiliser here, before the barrier after which
  //    thread 0 overwrites it.
  if (p.staged)
    stage_copy(reinterpret_cast<const uint4*>(kv), kv_bytes / 16,
               reinterpret_cast<const uint4*>(p.W), (kv_bytes + w_bytes) / 16,
               reinterpret_cast<uint4*>(smem_raw), tid, kThreads);
  // Where the later phases read kv and W: the staged copies or global memory.
  const T* kv_src = p.staged ? skv : kv;
  const WT* W_src = p.staged ? sW : p.W;
  for (int i = tid; i < D; i += kThreads) {
    sq[i] = load_as<T>(q + i) * p.xscale;
    sk[i] = load_as<T>(k + i) * p.xscale;
  }
  for (int j = tid; j < E1; j += kThreads) {
    const T vj = j < Dv ? load_as<T>(v + j) : T(1);
    sv[j] = vj;
    const T s = vs[j] + vj;
    vs[j] = s;
    svs[j] = s;
  }
  const T r_old = p.softmax ? p.r[row] : T(0);
  if (p.length != nullptr && row == 0 && tid == 0) *p.length += 1;
  __syncthreads();

  // 2. Pre-activations, one warp per feature (W's row read once, coalesced, for q and k).
  T hq = 0, hk = 0;  // |x'|^2 / 2 (softmax)
  if (p.softmax) {
    for (int d = lane; d < D; d += 32) {
      hq += sq[d] * sq[d];
      hk += sk[d] * sk[d];
    }
    hq = warp_sum(hq) * T(0.5);
    hk = warp_sum(hk) * T(0.5);
  }
  // kRows features per warp at a time: independent loads and shuffle chains to overlap.
  T mq = -INFINITY, mk = -INFINITY;
  for (int m0 = warp * kRows; m0 < M; m0 += kWarps * kRows) {
    T aq[kRows], ak[kRows];
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      aq[u] = 0;
      ak[u] = 0;
      if (m0 + u < M) {
        const WT* w = W_src + static_cast<int64_t>(m0 + u) * D;
        for (int d = lane; d < D; d += 32) {
          const T wd = load_as<T>(w + d);
          aq[u] += sq[d] * wd;
          ak[u] += sk[d] * wd;
        }
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        aq[u] += __shfl_xor_sync(0xffffffffu, aq[u], o);
        ak[u] += __shfl_xor_sync(0xffffffffu, ak[u], o);
      }
    }
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      if (m0 + u < M) {
        aq[u] -= hq;
        ak[u] -= hk;
        mq = max_t(mq, aq[u]);
        mk = max_t(mk, ak[u]);
        if (lane == 0) {
          sfq[m0 + u] = aq[u];
          sfk[m0 + u] = ak[u];
        }
      }
    }
  }
  if (lane == 0) {
    smax[warp] = mq;
    smax[kWarps + warp] = mk;
  }
  __syncthreads();

  // 3. Stabilisers and features (in place of the pre-activations).
  T alpha = 1, cq = 0, r_new = r_old;
  if (p.softmax) {
    cq = smax[0];
    T ck = smax[kWarps];
    for (int w = 1; w < kWarps; ++w) {
      cq = max_t(cq, smax[w]);
      ck = max_t(ck, smax[kWarps + w]);
    }
    r_new = max_t(r_old, ck);
    alpha = exp_t(r_old - r_new);  // <= 1; 0 for an empty state (r_old = -inf)
  }
  for (int m = tid; m < M; m += kThreads) {
    if (p.softmax) {
      sfq[m] = p.sM * (exp_t(sfq[m] - cq) + p.eps);
      sfk[m] = p.sM * exp_t(sfk[m] - r_new);
    } else {
      sfq[m] = p.sM * max_t(sfq[m], T(0)) + p.eps;
      sfk[m] = p.sM * max_t(sfk[m], T(0));
    }
  }
  if (p.softmax && tid == 0) p.r[row] = r_new;
  __syncthreads();

  // 4. State update and readout, one warp per row of kv, lanes along its columns.
  T acc[kCols];
#pragma unroll
  for (int i = 0; i < kCols; ++i) acc[i] = 0;
  // kRows rows of kv per warp at a time, all loaded before any is stored: the loads overlap.
  for (int m0 = warp * kRows; m0 < M; m0 += kWarps * kRows) {
    T x[kRows][kCols];
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
#pragma unroll
      for (int i = 0; i < kCols; ++i) {
        const int j = lane + 32 * i;
        x[u][i] = m0 + u < M && j < E1 ? kv_src[static_cast<int64_t>(m0 + u) * E1 + j] : T(0);
      }
    }
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      if (m0 + u < M) {
        const T ph = sfq[m0 + u], kf = sfk[m0 + u];
        T* kvr = kv + static_cast<int64_t>(m0 + u) * E1;
#pragma unroll
        for (int i = 0; i < kCols; ++i) {
          const int j = lane + 32 * i;
          if (j < E1) {
            const T nkv = alpha * x[u][i] + kf * sv[j];
            kvr[j] = nkv;
            acc[i] += ph * (nkv + p.ek * svs[j]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kCols; ++i) {
    const int j = lane + 32 * i;
    if (j < E1) syp[warp * E1 + j] = acc[i];
  }
  __syncthreads();

  // 5. out = num / den (den > 0: the query sees at least its own key, every feature >= eps).
  T den = 0;
  for (int w = 0; w < kWarps; ++w) den += syp[w * E1 + Dv];
  I* out = p.out + row * Dv;
  for (int j = tid; j < Dv; j += kThreads) {
    T num = 0;
    for (int w = 0; w < kWarps; ++w) num += syp[w * E1 + j];
    out[j] = store_as<I>(num / den);
  }
}

// Which configuration runs a call: the general one, the wide one reading kv and W from global
// memory, or the wide one staged through shared memory.
enum class Config { Auto, General, Wide, WideStaged };

// Whether a call fits the wide configuration.
inline bool wide_fits(const detail::DecodeDims& d) {
  return d.Dv + 1 <= 32 * kWideCols && d.M >= 256;
}

// Shared memory bytes of a call in configuration c (Auto: not allowed), state dtype size ts,
// projection dtype size ws.
inline int64_t smem_bytes(const detail::DecodeDims& d, Config c, int64_t ts, int64_t ws) {
  const int warps = (c == Config::General ? kGeneralThreads : kWideThreads) / 32;
  return smem_elems(d.D, d.Dv, d.M, warps) * ts +
         (c == Config::WideStaged ? staged_bytes(d.D, d.Dv, d.M, ts, ws) : 0);
}

// Whether the staged copies of a call are whole 16-byte words from 16-byte aligned addresses
// (every head's kv block then starts on one).
inline bool stage_aligned(const detail::DecodeDims& d, const void* kv, const void* W, int64_t ts,
                          int64_t ws) {
  return d.M * (d.Dv + 1) * ts % 16 == 0 && d.M * d.D * ws % 16 == 0 &&
         reinterpret_cast<uintptr_t>(kv) % 16 == 0 && reinterpret_cast<uintptr_t>(W) % 16 == 0;
}

// The configuration of a call (Auto resolved): wide where it fits, else general. With
// PANTHER_DECODE_STAGE=1 the wide configuration is staged where that also fits `max_smem` and the
// copies are aligned (H100, 12 layers' step at 64k context in a CUDA graph: 0.296 ms staged,
// 0.324 ms unstaged; the CUDA tests run the default configuration, the emulator test both).
// PANTHER_DECODE_WIDE=0 forces the general configuration (for comparisons).
inline Config choose(const detail::DecodeDims& d, const void* kv, const void* W, int64_t ts,
                     int64_t ws, int64_t max_smem) {
  static const bool wide_allowed = [] {
    const char* e = std::getenv("PANTHER_DECODE_WIDE");
    return !(e && std::string(e) == "0");
  }();
  static const bool stage_allowed = [] {
    const char* e = std::getenv("PANTHER_DECODE_STAGE");
    return e && std::string(e) == "1";
  }();
  if (!wide_allowed || !wide_fits(d)) return Config::General;
  if (stage_allowed && stage_aligned(d, kv, W, ts, ws) &&
      smem_bytes(d, Config::WideStaged, ts, ws) <= max_smem)
    return Config::WideStaged;
  return smem_bytes(d, Config::Wide, ts, ws) <= max_smem ? Config::Wide : Config::General;
}

// Whether the kernel takes a call: value_dim <= kMaxDv (the lanes' columns), sizes in int, and
// the general configuration's shared memory fits `max_smem` bytes. Others run the ATen math.
inline bool takes(const detail::DecodeDims& d, at::ScalarType dt, int64_t max_smem) {
  if (dt != at::kFloat && dt != at::kDouble) return false;  // (the state's dtype)
  if (d.Dv > kMaxDv || d.R > INT_MAX || d.D > INT_MAX / 2 || d.M > INT_MAX / 2) return false;
  if (d.M * (d.Dv + 1) > INT_MAX) return false;
  return smem_bytes(d, Config::General, at::elementSize(dt), 1) <= max_smem;
}

// The row layout of a (..., n) input with unit last stride whose leading dims collapse to
// (outer, inner) (a contiguous tensor, or a slice of one along a dim before the last two); else
// nullopt (the caller copies it contiguous).
inline std::optional<RowLayout> row_layout(const at::Tensor& t) {
  if (t.dim() == 0 || t.stride(-1) != 1) return std::nullopt;
  if (t.dim() == 1) return RowLayout{1, 0, 0};
  const int64_t nd = t.dim();
  RowLayout l{t.size(nd - 2), t.stride(nd - 2), 0};
  if (nd == 2) return l;
  for (int64_t i = 0; i + 3 < nd; ++i)  // the outer dims must merge into one of stride(nd - 3)
    if (t.size(i) != 1 && t.stride(i) != t.stride(i + 1) * t.size(i + 1)) return std::nullopt;
  l.so = t.stride(nd - 3);
  return l;
}

// The feature map's constants of a call into kernel parameters `p` (this file's Params or
// decode_layer.cuh's LayerParams): softmax, sM = M^-1/2, xscale (D^-1/4 for softmax), eps and ek.
template <class P>
inline void set_feature_constants(P& p, bool softmax, int64_t D, int64_t M) {
  using T = decltype(p.sM);
  const double sM = 1.0 / std::sqrt(static_cast<double>(M));
  p.softmax = softmax;
  p.sM = static_cast<T>(sM);
  p.xscale = softmax ? static_cast<T>(std::pow(static_cast<double>(D), -0.25)) : T(1);
  p.eps = static_cast<T>(softmax ? detail::kFavorSoftmaxEps : detail::kFavorReluEps);
  p.ek = static_cast<T>(softmax ? detail::kFavorSoftmaxEps * sM : detail::kFavorReluEps);
}

// One block of kThreads per row, on the current stream.
template <int kThreads, int kCols, class T, class I, class WT>
void launch(const Params<T, I, WT>& p, unsigned rows, size_t smem) {
  auto* kernel = &decode_step_kernel<T, I, WT, kThreads, kCols>;
  PANTHER_LAUNCH(kernel, dim3(rows), dim3(kThreads), smem, p);
}

// Runs the step on the kernel with state dtype T, input dtype I and projection dtype WT in
// configuration `config` (Auto: choose's; the caller checked the arguments and `takes`, and that
// a forced configuration fits; on CUDA it also set the device). Inputs whose rows
// row_layout cannot describe are copied contiguous; a non-contiguous state goes through
// contiguous copies written back.
template <class T, class I, class WT>
at::Tensor step(const detail::DecodeDims& d, const at::Tensor& query, const at::Tensor& key,
                const at::Tensor& value, const at::Tensor& projection, const at::Tensor& kv,
                const at::Tensor& v_sum, const at::Tensor& stabiliser,
                const std::optional<at::Tensor>& length, Config config) {
  std::vector<int64_t> osize = query.sizes().vec();
  osize.back() = d.Dv;
  at::Tensor out = at::empty(osize, query.options());
  const bool counts = length.has_value() && length->defined();
  if (d.R == 0) {  // no row, no block: the length still moves on
    if (counts) length->add_(1);
    return out;
  }
  auto rows = [](const at::Tensor& t, RowLayout& l) {
    if (auto r = row_layout(t)) {
      l = *r;
      return t;
    }
    at::Tensor c = t.contiguous();
    l = *row_layout(c);
    return c;
  };
  Params<T, I, WT> p{};
  const at::Tensor q = rows(query, p.lq), k = rows(key, p.lk), v = rows(value, p.lv),
                   W = projection.contiguous();
  const at::Tensor kvc = kv.contiguous(), vsc = v_sum.contiguous(), rc = stabiliser.contiguous();
  p.q = reinterpret_cast<const I*>(q.data_ptr());
  p.k = reinterpret_cast<const I*>(k.data_ptr());
  p.v = reinterpret_cast<const I*>(v.data_ptr());
  p.W = reinterpret_cast<const WT*>(W.data_ptr());
  p.kv = kvc.data_ptr<T>();
  p.v_sum = vsc.data_ptr<T>();
  p.r = rc.data_ptr<T>();
  p.out = reinterpret_cast<I*>(out.data_ptr());
  p.length = counts ? length->data_ptr<int64_t>() : nullptr;  // (0-d: always contiguous)
  p.D = static_cast<int>(d.D);
  p.Dv = static_cast<int>(d.Dv);
  p.M = static_cast<int>(d.M);
  set_feature_constants(p, d.kernel == detail::FavorKernel::Softmax, d.D, d.M);
  const int64_t ts = sizeof(T), ws = sizeof(WT);
  if (config == Config::Auto)
    config = choose(d, p.kv, p.W, ts, ws, ::panther::max_smem_optin(kvc.get_device()));
  TORCH_CHECK(config != Config::WideStaged || stage_aligned(d, p.kv, p.W, ts, ws),
              "panther::_favor_decode_step_: staged configuration on unaligned operands");
  p.staged = config == Config::WideStaged;
  const size_t smem = static_cast<size_t>(smem_bytes(d, config, ts, ws));
  const auto blocks = static_cast<unsigned>(d.R);
  if (config == Config::General) launch<kGeneralThreads, kGeneralCols>(p, blocks, smem);
  else launch<kWideThreads, kWideCols>(p, blocks, smem);
  if (!kvc.is_same(kv)) kv.copy_(kvc);
  if (!vsc.is_same(v_sum)) v_sum.copy_(vsc);
  if (!rc.is_same(stabiliser)) stabiliser.copy_(rc);
  return out;
}

// step() with the types of the call's tensors: T the state's (kv) dtype, I the query's, the
// projection in I or T (check_favor_decode_step allows those).
inline at::Tensor run_step(const detail::DecodeDims& d, const at::Tensor& query,
                           const at::Tensor& key, const at::Tensor& value,
                           const at::Tensor& projection, const at::Tensor& kv,
                           const at::Tensor& v_sum, const at::Tensor& stabiliser,
                           const std::optional<at::Tensor>& length = std::nullopt,
                           Config config = Config::Auto) {
  const at::ScalarType it = query.scalar_type();
  const bool w_state = projection.scalar_type() != it;  // then it is the state's dtype
#define PANTHER_DECODE_STEP(T, I, WT) \
  step<T, I, WT>(d, query, key, value, projection, kv, v_sum, stabiliser, length, config)
  if (kv.scalar_type() == at::kDouble) return PANTHER_DECODE_STEP(double, double, double);
  if (it == at::kHalf)
    return w_state ? PANTHER_DECODE_STEP(float, __half, float)
                   : PANTHER_DECODE_STEP(float, __half, __half);
  if (it == at::kBFloat16)
    return w_state ? PANTHER_DECODE_STEP(float, __nv_bfloat16, float)
                   : PANTHER_DECODE_STEP(float, __nv_bfloat16, __nv_bfloat16);
  return PANTHER_DECODE_STEP(float, float, float);
#undef PANTHER_DECODE_STEP
}

}  // namespace panther::decode
