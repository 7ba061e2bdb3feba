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
// Causal calls run states, stab, scan and forward_kernel in launches of whole groups of chunks,
// first to last: stab_kernel carries the running max of the key maxima on from the launch
// before, and the scan its fp32 running state, through boundary states (one per group), which are
// all the forward keeps of the states. So the per-chunk states and H exist for one launch's
// chunks at a time. (With a padding mask and several launches, states_kernel first runs once for
// every chunk's key maxima alone and stab_kernel over whole rows: see Run::causal_pass.) Later
// states_kernel launches of the same call read each chunk's maximum back instead of computing it
// again.
// Backward: non-causal, states/stab/scan again (or, from autograd, the forward's total state);
// causal, per launch (last first) the launch's states and H again from the boundary state before
// it (the boundary states and stabilisers from autograd's forward, else from a pass of the
// forward without output; with PANTHER_FAVOR_SAVE_FEATURES=1 the forward also keeps the
// features, so that back1/back2 load phi and khat instead of computing them), then
//   back1_kernel    (n, BH): recomputes y, forms Yb = d loss / d [num, den], dq (and its dW part),
//                   the chunk's gradient state dH_c = phi^T (s Yb); a reverse scan gives dT_c
//                   (non-causal: a few launches add the dH_c into a few states per row);
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
#include "attention/favor_tiles.cuh"

namespace panther::fused {

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

// Chunk states (see the top of the file), or part of them (p.smode). grid (n, BH): chunks
// chunk0 .. chunk0 + n - 1.
template <class T, int kShape>
__global__ void __launch_bounds__(kThreads) states_kernel(Params<T> p) {
  fix_shape<kShape>(p);
  PANTHER_DYNAMIC_SMEM(smem);
  const Smem L = smem_layout(kStates, p.D, p.M, p.E1p, sizeof(T));
  Blk<T> k = make_blk<T>(p, smem, L, p.chunk0 + blockIdx.x, blockIdx.y, p.Lk);
  const bool max_only = p.smode == kStatesMax;
  // cp.async groups: {W, keys}, then v (filled while the features are computed).
  copy_rows_async(k.w, k.lx, p.W, p.D, p.M, p.M, p.D);
  issue_x(p, k, /*keys=*/true);
  async_commit();
  if (!max_only) issue_values(p, k);
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
  if (p.softmax && p.smode == kStatesOnly) {
    mc = p.mx[static_cast<int64_t>(k.bh) * p.nk + k.chunk];  // (kStatesMax's pass 1)
  } else if (p.softmax) {
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
    if (threadIdx.x == 0) {
      p.cs[(static_cast<int64_t>(k.bh) * p.nk + k.chunk) * 4 + 3] = mc;
      if (p.mx != nullptr) p.mx[static_cast<int64_t>(k.bh) * p.nk + k.chunk] = mc;
    }
  }
  if (max_only) {
    async_wait<0>();
    return;
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
  // (ldmatrix_x4_trans, two n8 tiles per load), every k step's fragments loaded before the first
  // mma (loaded one step at a time, the SASS had each mma wait for its own load). Where T'_c fits
  // over W and the keys (dead since pass 2: fix_values ended with a barrier), the accumulators go
  // there as pairs and leave in one bulk copy per row, issued after a barrier (as
  // save_features); else straight to global, 16 bytes per lane.
  T* out = p.st + (static_cast<int64_t>(k.bh) * p.st_n + k.chunk - p.chunk0) * (p.M + 1) * p.E1p;
  const int CT = p.M / 16, ET = p.E1p / 16;
  const int P = kWarps / CT < 1 ? 1 : kWarps / CT < ET ? kWarps / CT : ET;
  const bool staged = static_cast<int64_t>(p.M) * p.E1p * sizeof(T) <= L.kh - L.w;
  T* tile = k.w;  // (staged) T'_c, M x E1p dense
  for (int w = k.warp; w < CT * P; w += kWarps) {
    const int mt = w % CT, part = w / CT;
    unsigned a[kC / 16][4];
    const T* pa =
        k.kh + ((k.lane & 7) + (k.lane >> 4) * 8) * k.lm + mt * 16 + ((k.lane >> 3) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < kC / 16; ++kk) mma::ldmatrix_x4_trans(a[kk], pa + kk * 16 * k.lm);
    for (int et = part; et < ET; et += P) {
      const T* pb = k.v + (k.lane & 15) * k.le + et * 16 + (k.lane >> 4) * 8;
      unsigned b[kC / 16][4];
#pragma unroll
      for (int kk = 0; kk < kC / 16; ++kk) mma::ldmatrix_x4_trans(b[kk], pb + kk * 16 * k.le);
      float c[2][4] = {};
#pragma unroll
      for (int kk = 0; kk < kC / 16; ++kk) {
        const unsigned b0[2] = {b[kk][0], b[kk][1]}, b1[2] = {b[kk][2], b[kk][3]};
        mma::mma_16816<T>(c[0], a[kk], b0, c[0]);
        mma::mma_16816<T>(c[1], a[kk], b1, c[1]);
      }
      unsigned u[4] = {mma::pack2<T>(c[0][0], c[0][1]), mma::pack2<T>(c[1][0], c[1][1]),
                       mma::pack2<T>(c[0][2], c[0][3]), mma::pack2<T>(c[1][2], c[1][3])};
      if (staged) {  // lane (g, t): rows 16 mt + g, + 8; columns 16 et + 2t, + 8
        T* d = tile + (mt * 16 + g) * p.E1p + et * 16 + 2 * t;
        mma::store_pair(d, u[0]);
        mma::store_pair(d + 8, u[1]);
        mma::store_pair(d + 8 * p.E1p, u[2]);
        mma::store_pair(d + 8 * p.E1p + 8, u[3]);
        continue;
      }
      // The lane's pairs are part t of the quad's 4 row segments (16 bytes each): q = 2h + j is
      // row 16 mt + g + 8h, columns 16 et + 8j .. + 8. After quad_transpose lane t holds all of
      // segment t: one 16-byte store (two lanes fill a 32-byte sector).
      quad_transpose(u, t);
      put16(out + static_cast<int64_t>(mt * 16 + g + 8 * (t >> 1)) * p.E1p + et * 16 + 8 * (t & 1),
            u);
    }
  }
  bool bulk_issued = false;
  if (staged) {
    __syncthreads();
    if (threadIdx.x < p.M) {
      mma::bulk_store_fence(p.bulk);
      for (int i = threadIdx.x; i < p.M; i += kThreads)
        mma::bulk_store(out + static_cast<int64_t>(i) * p.E1p, tile + i * p.E1p,
                        p.E1p * sizeof(T), p.bulk);
      mma::bulk_store_commit(p.bulk);
      bulk_issued = true;
    }
  }
  // The chunk's sum of [v, 1] over its kC rows (all warps: see col_sums).
  T* out_x = out + static_cast<int64_t>(p.M) * p.E1p;
  col_sums(k.v, k.le, p.E1p, k.warp, k.lane, [](int) { return 1.f; },
           [&](int e, float s) { out_x[e] = Cvt<T>::t(s); });
  if (bulk_issued) mma::bulk_store_wait_read(p.bulk);  // (the copies may not outlive the block)
}

// Key stabiliser per position and chunk scalars of chunks chunk0 .. chunk0 + sn - 1 of each row
// (non-causal: all of them). grid (BH), block 1024.
//   causal: r_j = max over valid keys j' <= j of a_j' (positions before the first valid key get
//   the first finite value, 0 if none); P_c = r at the chunk's first position (c = 0) or at the
//   previous chunk's last; R_c = r at the chunk's last position. A range after the first
//   (chunk0 > 0) carries the running max on from R of chunk chunk0 - 1, which an earlier launch
//   wrote; the fill before the first valid key then sees only this range (the host gives ranges
//   only where that cannot change it: see Run::causal_pass).
//   non-causal: R = max over all valid keys (0 if none), stored in cs[bh, 0, 1].
template <class T>
__global__ void __launch_bounds__(1024) stab_kernel(Params<T> p) {
  PANTHER_DYNAMIC_SMEM(smem);
  float* part = reinterpret_cast<float*>(smem);  // 2 * 1024
  const int tid = threadIdx.x, nt = blockDim.x, bh = blockIdx.x;
  const int c0 = p.chunk0, ce = c0 + p.sn, je = ce * kC;  // chunks c0 .. ce - 1, positions .. je - 1
  const int seg = (p.sn * kC + nt - 1) / nt, j0 = c0 * kC + tid * seg;
  const int j1 = j0 + seg < je ? j0 + seg : je;
  const float* a = p.a + static_cast<int64_t>(bh) * p.nk * kC;
  float* r = p.r + static_cast<int64_t>(bh) * p.nk * kC;
  float* cs = p.cs + static_cast<int64_t>(bh) * p.nk * 4;
  if (!p.softmax) {  // (r is read by causal calls only: non-causal ones keep no room for it)
    if (p.causal)
      for (int j = c0 * kC + tid; j < je; j += nt) r[j] = 0.f;
    for (int c = c0 + tid; c < ce; c += nt) {
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
  const float carried = c0 > 0 ? cs[(c0 - 1) * 4 + 1] : -INFINITY;  // (causal ranges)
  float run = fmaxf(carried, tid > 0 ? src[tid - 1] : -INFINITY);
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
    for (int c = c0 + tid; c < ce; c += nt) {
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
// The n input states of a row (in_n states apart) are chunks c0 .. c0 + n - 1 (cs holds ncs
// chunks per row); the causal output of chunk c is row bh * out_n + c - out_c0 of hs and hx.
// carry (BH x (ME + E1p) fp32, or null): the scan starts from it when carry_in (else from zero)
// and leaves its final sum there, so a reverse scan can run over the chunks in pieces, last
// piece first.
// bnd (BH x nbnd x (ME + E1p) fp32, or null; forward scans): slot s holds the running sum before
// chunk (s + 1) every. A scan from c0 > 0 (a multiple of every) starts from c0's slot; with
// bnd_write it fills the slots of the chunks it passes, so a forward scan can run in pieces,
// first piece first, and a later one can start again from any slot.
struct ScanRange {
  int in_n, c0, out_n, out_c0;
  float* carry;
  bool carry_in;
  float* bnd = nullptr;
  int every = 1, nbnd = 0;
  bool bnd_write = false;
};
constexpr int kScanU = 8;
constexpr int kScanThreads = 256;
template <class T, class S>
__global__ void __launch_bounds__(kScanThreads, 4) scan_kernel(const S* __restrict__ st, const float* __restrict__ cs,
                            T* __restrict__ hs, float* __restrict__ hx, int BH, int n, int ncs,
                            int ME, int E1p, bool causal, bool reverse, bool use_kscale,
                            ScanRange rg) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t W = ME + E1p, P = W / 2;
  if (idx >= BH * P) return;
  const int64_t bh = idx / P;
  const int e = 2 * static_cast<int>(idx - bh * P);
  const bool state = e < ME;
  const S* x = st + bh * rg.in_n * W + e;
  const float* c4 = cs + (bh * ncs + rg.c0) * 4;
  auto put = [&](int64_t row, float a0, float a1) {  // row: of hs / hx
    if (state) store_two(hs + row * ME + e, Cvt<T>::t(a0), Cvt<T>::t(a1));
    else store_two(hx + row * E1p + (e - ME), a0, a1);
  };
  float* carry = rg.carry != nullptr ? rg.carry + bh * W + e : nullptr;
  float* bnd = rg.bnd != nullptr ? rg.bnd + bh * rg.nbnd * W + e : nullptr;
  float acc0 = 0.f, acc1 = 0.f;
  if (carry != nullptr && rg.carry_in) acc0 = carry[0], acc1 = carry[1];
  if (bnd != nullptr && rg.c0 > 0) {
    const float* b = bnd + static_cast<int64_t>(rg.c0 / rg.every - 1) * W;
    acc0 = b[0], acc1 = b[1];
  }
  auto save_bnd = [&](int cc) {  // the running sum before chunk cc, if that is a slot's
    if (cc % rg.every != 0 || cc / rg.every > rg.nbnd) return;
    float* b = bnd + static_cast<int64_t>(cc / rg.every - 1) * W;
    b[0] = acc0, b[1] = acc1;
  };
  auto chunk = [&](int step) { return reverse ? n - 1 - step : step; };
  auto step_in = [&](int c, float x0, float x1, float al, float sc) {
    if (causal) put(bh * rg.out_n + rg.c0 + c - rg.out_c0, acc0, acc1);
    if (rg.bnd_write && c > 0) save_bnd(rg.c0 + c);
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
  if (carry != nullptr) carry[0] = acc0, carry[1] = acc1;
  if (rg.bnd_write) save_bnd(rg.c0 + n);
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
  const int64_t sidx = p.causal ? static_cast<int64_t>(k.bh) * p.hs_n + k.chunk - p.hs_c0 : k.bh;
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

// First row of this chunk in back1's outputs for back2 (dvp, fwm, and fph where the forward's
// features are not kept), which hold the chunks of one back1/back2 launch: chunk chunk0 + x in
// the rows of block x of the row's p.slots.
template <class T>
__device__ __forceinline__ int64_t part_row0(const Params<T>& p, const Blk<T>& k) {
  return (static_cast<int64_t>(k.bh) * p.slots + k.chunk - p.chunk0) * kC;
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
  const int64_t r0 = part_row0(p, k);
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

// Forward output. grid (n, BH): query chunks chunk0 .. chunk0 + n - 1.
template <class T, int kShape>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(Params<T> p) {
  fix_shape<kShape>(p);
  PANTHER_DYNAMIC_SMEM(smem);
  const Smem L = smem_layout(kForward, p.D, p.M, p.E1p, sizeof(T));
  Blk<T> k = make_blk<T>(p, smem, L, p.chunk0 + blockIdx.x, blockIdx.y, p.Lq);
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

// Backward pass 1: Yb, dq, gradient states, back2's intra-chunk parts (causal). grid (n, BH):
// block x takes query chunk chunk0 + x, its gradient state goes to slot x of its row in gst
// ((M+1) x E1p fp32 each, `slots` per row). The host runs launches of `slots` chunks one after
// the other (fused::backward). Causal: from the last chunks to the first, each launch storing
// its chunks' states for the reverse scan that follows it. Non-causal, where only the states'
// total is used: the first launch stores, later ones add, so gst holds `slots` states per row
// instead of nq and the sum's order is fixed (the gradients are the same bits on every call).
template <class T, int kShape>
__global__ void __launch_bounds__(kThreads, 1) back1_kernel(Params<T> p) {
  fix_shape<kShape>(p);
  PANTHER_DYNAMIC_SMEM(smem);
  const Smem L = smem_layout(kBack1, p.D, p.M, p.E1p, sizeof(T));
  const int chunk = p.chunk0 + blockIdx.x;
  Blk<T> k = make_blk<T>(p, smem, L, chunk, blockIdx.y, p.Lq);
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
  const bool first = p.causal || p.chunk0 == 0;
  float* dst = p.gst + (static_cast<int64_t>(k.bh) * p.slots + blockIdx.x) * (p.M + 1) * E1p;
  const int CT = p.M / 16, ET = E1p / 16, c0 = (k.lane & 1) * 8;
  Acc acc;
  float v[8];
  for (int t = k.warp; t < CT * ET; t += kWarps) {
    const int mt = t % CT, et = t / CT;
    float* d = dst + static_cast<int64_t>(mt) * 16 * E1p + et * 16;
    if (first) wmma::fill_fragment(acc, 0.f);
    else wmma::load_matrix_sync(acc, d, E1p, wmma::mem_row_major);
    mma_acc<T, ColM, RowM>(acc, tileA<ColM>(k.phi, k.lm, mt), k.lm, tileB<RowM>(k.ys, k.le, et),
                           k.le, kC);
    wmma::store_matrix_sync(d, acc, E1p, wmma::mem_row_major);
  }
  {  // the extra row (all warps: see col_sums)
    float* dst_x = dst + static_cast<int64_t>(p.M) * E1p;
    const float* phisum = k.phisum;
    col_sums(k.yb, k.le, E1p, k.warp, k.lane, [&](int i) { return phisum[i]; },
             [&](int e, float s) { dst_x[e] = first ? s : dst_x[e] + s; });
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
    const int64_t row = part_row0(p, k);
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

// Backward pass 2: dk, dv. grid (n, BH): block x takes key chunk chunk0 + x (causal: the chunks
// of the back1 launch before it; non-causal: one launch, n = nk).
template <class T, int kShape>
__global__ void __launch_bounds__(kThreads, 1) back2_kernel(Params<T> p) {
  fix_shape<kShape>(p);
  PANTHER_DYNAMIC_SMEM(smem);
  const Smem L = smem_layout(kBack2, p.D, p.M, p.E1p, sizeof(T));
  Blk<T> k = make_blk<T>(p, smem, L, p.chunk0 + blockIdx.x, blockIdx.y, p.Lk);
  const int E1p = p.E1p, Dv = p.Dv, rr = k.lane >> 1, c0 = (k.lane & 1) * 8;
  const int CT = p.M / 16, ET = E1p / 16, DvT = (Dv + 15) / 16;
  const int64_t prow = part_row0(p, k);  // in dvp, fwm (and fph when back1 wrote it)
  const int64_t row = p.feat == kFeatLoad ? feat_row0(p, k) : prow;  // in fph
  // cp.async groups: {W, keys}, {dT, v} (filled while the key features are computed), {phi, Wm}
  // (causal: back1's, for the intra-chunk part of dkhat); with the forward's key features,
  // {khat, dT, v}, then {phi, Wm} and {W} (only dk needs it: waited for there).
  const bool load_feat = p.feat == kFeatLoad;
  const StabRegs sr = stab_fetch(p, k);
  auto issue_wm_phi = [&] {
    if (p.causal) {
      copy_rows_async(k.phi, k.lm, p.fph + row * p.M, p.M, kC, kC, p.M);
      copy_rows_async(k.gm, kLC, p.fwm + prow * kC, kC, kC, kC, kC);
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
    if (p.causal && et < DvT) load8f(p.dvp + (prow + jw) * (16 * DvT) + et * 16 + c0, v);
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

}  // namespace panther::fused
