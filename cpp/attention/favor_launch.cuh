// Host side of the fused FAVOR+ kernels (favor_kernels.cuh): which calls the fused path takes,
// and the launch sequence (entry points fused::forward, fused::backward). Written against ATen
// so the same code drives real CUDA launches and the CPU emulator (tests/emu).
#pragma once
#include "attention/favor_kernels.cuh"

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
  p.hs_n = p.nk;
  p.st_n = p.nk;
  p.sn = p.nk;
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
// What lies as detail::favor_saved_layout says (the stabilisers r, cs; non-causal, the total
// state hs, hx; causal, the boundary states and, for autograd with favor_saves_features(), the
// features) is
//   keep == reuse == null: in the workspace `ws` (one allocation: each costs host time that
//     short sequences feel);
//   keep (forward for autograd): in a new tensor *keep that the backward gets back;
//   reuse (backward): read from *reuse (never written: a second backward may read it again).
// The rest of ws: a (BH, nk kC) fp32, the key row maxima (not for reuse); st (BH, st_n,
// (M+1) E1p), chunk states (st_n: nk, or causal, one launch's chunks; the causal backward's
// share its gradient states' memory, p.gst, also in ws); causal, the scanned states of one
// launch's chunks (hbuf, hxbuf); non-causal reuse, the total gradient state.
template <class T>
struct Run {
  Params<T> p;
  at::Tensor q, k, v, W, pad, ws;
  Smem layout[4];
  T* grad_hs = nullptr;     // where scan_grad writes dT and G
  float* grad_hx = nullptr;
  // Causal: chunks per launch (`group`, the forward's or the backward's: a multiple of
  // kFavorBoundaryChunks, or all of them), the boundary states (bnd: nbnd per row, saved or in
  // ws) and one launch's scanned states.
  int group = 0, nbnd = 0;
  float* bnd = nullptr;
  float* carry = nullptr;  // (a forward without boundary states: the scan's sum between launches)
  T* hbuf = nullptr;
  float* hxbuf = nullptr;

  Run(const detail::FavorDims& d, bool causal, const at::Tensor& query, const at::Tensor& key,
      const at::Tensor& value, const at::Tensor& projection,
      const std::optional<at::Tensor>& mask, at::Tensor* keep = nullptr,
      const at::Tensor* reuse = nullptr, bool backward = false) {
    static_assert(sizeof(T) == 2, "favor_saved_layout is written for 16-bit states");
    q = last_dim_dense(query);
    k = last_dim_dense(key);
    v = last_dim_dense(value);
    W = projection.to(query.scalar_type()).contiguous();
    if (mask.has_value() && mask->defined()) pad = mask->contiguous();
    p = make_params<T>(d, causal, q, k, v, W, pad);
    const int dev = query.get_device();
    if (causal) {
      p.slots = launch_chunks(dev);
      group = backward ? p.slots : forward_chunks(p.slots);
      p.st_n = group;
      nbnd = static_cast<int>(detail::favor_boundary_states<int64_t>(p.nk));
    } else {
      p.slots = back1_slots(dev);
    }
    for (int kind = 0; kind < 4; ++kind) layout[kind] = smem_layout(kind, p.D, p.M, p.E1p, 2);
    // The features are kept only for autograd: forward(..., saved) and backward(..., saved).
    const bool features = causal && (keep || reuse) && detail::favor_saves_features();
    // A forward without autograd chains its launches through `carry` instead of the boundary
    // states, which only a backward reads.
    const bool boundaries = keep || reuse || backward;
    const detail::FavorSaved sv =
        detail::favor_saved_layout(d, causal, at::kBFloat16, features, boundaries);
    TORCH_INTERNAL_ASSERT(sv.total > 0);
    const int64_t BH = p.BH, ME = static_cast<int64_t>(p.M) * p.E1p, W1 = ME + p.E1p;
    int64_t off = 0;
    auto take = [&off](bool want, int64_t bytes) {
      if (!want) return int64_t{-1};
      const int64_t at = off;
      off += (bytes + 255) / 256 * 256;
      return at;
    };
    const int64_t o_sv = take(!keep && !reuse, sv.total);
    const int64_t o_a = take(!reuse, BH * p.nk * kC * 4);
    // The causal backward's gradient states (p.gst: `group` chunks and the reverse scan's carry
    // per row, fp32) also hold the chunk states: the forward scan has read them before back1
    // writes gst, and the next launch's states_kernel runs after the reverse scan read gst.
    const bool own_gst = causal && backward;
    const int64_t o_gst = take(own_gst, BH * (group + 1) * W1 * 4);
    const int64_t o_st = take((!reuse || causal) && !own_gst, BH * p.st_n * W1 * 2);
    const int64_t n_h = causal ? group : 1;  // scanned states (non-causal: only to reuse)
    const int64_t o_h = take(causal || reuse, BH * n_h * ME * 2);
    const int64_t o_hx = take(causal || reuse, BH * n_h * p.E1p * 4);
    const int64_t o_carry = take(causal && !boundaries, BH * W1 * 4);
    const at::TensorOptions bytes = query.options().dtype(at::kByte);
    ws = at::empty({off}, bytes);
    unsigned char* base = ws.data_ptr<unsigned char>();
    if (keep) *keep = at::empty({sv.total}, bytes);
    unsigned char* sbase = reuse  ? static_cast<unsigned char*>(reuse->data_ptr())
                           : keep ? keep->data_ptr<unsigned char>()
                                  : base + o_sv;
    if (o_a >= 0) p.a = reinterpret_cast<float*>(base + o_a);
    if (o_st >= 0) p.st = reinterpret_cast<T*>(base + o_st);
    if (own_gst) {
      p.gst = reinterpret_cast<float*>(base + o_gst);
      p.st = reinterpret_cast<T*>(p.gst);
    }
    p.r = reinterpret_cast<float*>(sbase + sv.r);
    p.cs = reinterpret_cast<float*>(sbase + sv.cs);
    if (causal) {
      // dT goes over the launch's H, which back1 has finished with
      if (boundaries) bnd = reinterpret_cast<float*>(sbase + sv.bd);
      else carry = reinterpret_cast<float*>(base + o_carry);
      // (only softmax has key maxima: relu's layout has no region for them)
      if (p.softmax) p.mx = reinterpret_cast<float*>(sbase + sv.mx);
      p.hs = grad_hs = hbuf = reinterpret_cast<T*>(base + o_h);
      p.hx = grad_hx = hxbuf = reinterpret_cast<float*>(base + o_hx);
    } else {
      p.hs = reinterpret_cast<T*>(sbase + sv.hs);
      p.hx = reinterpret_cast<float*>(sbase + sv.hx);
      grad_hs = reuse ? reinterpret_cast<T*>(base + o_h) : p.hs;  // (without reuse: over H)
      grad_hx = reuse ? reinterpret_cast<float*>(base + o_hx) : p.hx;
    }
    p.feat = !features ? kFeatCompute : keep ? kFeatSave : kFeatLoad;
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

  // Chunks per row of one back1 launch and gradient states per row in gst (Params::slots): at
  // most nq, enough for kBackWaves waves of back1 on the device (one block per SM). Non-causal:
  // slot x sums the states of chunks x, x + slots, ... (the causal launches: launch_chunks).
  // PANTHER_FAVOR_BACK_WAVES=n sets the waves (0: every chunk in one launch; for comparisons).
  static constexpr int64_t kBackWaves = 4;
  static int64_t env_waves() {
    static const int64_t waves = [] {
      const char* e = std::getenv("PANTHER_FAVOR_BACK_WAVES");
      return e != nullptr && e[0] != '\0' ? std::max<int64_t>(0, std::atoll(e)) : int64_t{-1};
    }();
    return waves;
  }
  // Chunks per row that make `waves` waves of blocks on device dev (at most nq; 0 waves: nq).
  int64_t wave_chunks(int dev, int64_t waves) const {
    if (waves == 0) return p.nq;
    const int64_t per_row = (waves * ::panther::sm_count(dev) + p.BH - 1) / p.BH;
    return std::max<int64_t>(1, std::min<int64_t>(p.nq, per_row));
  }
  int back1_slots(int dev) const {
    return static_cast<int>(wave_chunks(dev, env_waves() >= 0 ? env_waves() : kBackWaves));
  }

  // Causal: chunks per launch of the forward and the backward, whose buffers between kernels
  // hold one launch's chunks (about 180 KB per chunk and row: the gradient states, which the
  // chunk states share, dT over H, back1's parts for back2): kBackWaves waves of blocks, but
  // (unless PANTHER_FAVOR_BACK_WAVES sets the waves) at most an eighth of the chunks, which keeps
  // those buffers below the size of the output and its gradients, or two waves if that is more;
  // rounded down to whole groups of kFavorBoundaryChunks (at least one), so that every launch
  // starts at a boundary state. 12 heads on a 132-SM GPU: 16 chunks at 8k tokens, 32 from 16k.
  // (The emulator, whose rows are a few chunks long, sizes launches by the waves alone.)
  int launch_chunks(int dev) const {
    const int64_t G = detail::kFavorBoundaryChunks;
    int64_t n = back1_slots(dev);
#if !defined(PANTHER_CUDA_EMU)
    if (env_waves() < 0) n = std::min(n, std::max<int64_t>(p.nq / 8, wave_chunks(dev, 2)));
#endif
    if (n >= p.nq) return p.nq;
    return static_cast<int>(std::max<int64_t>(1, n / G) * G);
  }

  // Causal forward: chunks per launch, four times the backward's (its buffers, the chunk states
  // and H, take under half of the backward's per chunk, and the backward also holds the input
  // gradients), or all of them.
  int forward_chunks(int backward_chunks) const {
    return static_cast<int>(std::min<int64_t>(p.nq, 4 * static_cast<int64_t>(backward_chunks)));
  }

  int scan_blocks() const {
    const int64_t total = p.BH * (static_cast<int64_t>(p.M) * p.E1p + p.E1p) / 2;
    return static_cast<int>((total + kScanThreads - 1) / kScanThreads);  // a thread per pair
  }

  // Backward: the reverse scan (causal) of n gradient states from p.gst, or their total
  // (non-causal), into grad_hs and grad_hx (rg: where they go; see scan_kernel). Afterwards
  // p.hs, p.hx point at them for back2.
  void scan_grad(int n, const ScanRange& rg) {
    const int ME = p.M * p.E1p;
    auto* kernel = &scan_kernel<T, float>;
    PANTHER_LAUNCH(kernel, dim3(scan_blocks()), dim3(kScanThreads), 0, p.gst, p.cs, grad_hs,
                   grad_hx, p.BH, n, p.nk, ME, p.E1p, p.causal, /*reverse=*/true,
                   /*use_kscale=*/false, rg);
    p.hs = grad_hs;
    p.hx = grad_hx;
    p.hs_n = rg.out_n;
    p.hs_c0 = rg.out_c0;
  }

  // Non-causal forward: the total of the key states p.st (n = nk) into p.hs, p.hx.
  void scan() {
    auto* kernel = &scan_kernel<T, T>;
    PANTHER_LAUNCH(kernel, dim3(scan_blocks()), dim3(kScanThreads), 0, p.st, p.cs, p.hs, p.hx,
                   p.BH, p.nk, p.nk, p.M * p.E1p, p.E1p, false, /*reverse=*/false,
                   /*use_kscale=*/true, ScanRange{p.nk, 0, p.nk, 0, nullptr, false});
  }

  // Non-causal: key states, stabilisers and the scanned (forward) states H.
  void states() {
    launch<&states_kernel<T, kShapeD64M256>, &states_kernel<T, kShapeAny>>(p.nk, kStates);
    stab();
    scan();
  }

  void stab() {
    PANTHER_LAUNCH(stab_kernel<T>, dim3(p.BH), dim3(1024), 2 * 1024 * sizeof(float), p);
  }

  // Causal: in launches of `group` chunks, first to last, each launch's states and their scan
  // (carried from launch to launch through the boundary states, which it fills) and, with
  // `output`, forward_kernel. Each launch's states kernel also finds its chunks' key maxima, and
  // their stabilisers follow (the running max carried on from the launch before), unless a
  // padding mask spreads a row over several launches: a row's positions before its first valid
  // key take that key's stabiliser, which may lie in a later launch, so there one pass finds
  // every key maximum and the stabilisers of whole rows first.
  void causal_pass(bool output) {
    const bool per_launch = p.pad == nullptr || group >= p.nk;
    if (!per_launch) {
      p.chunk0 = 0;
      if (p.softmax) {
        p.smode = kStatesMax;
        launch<&states_kernel<T, kShapeD64M256>, &states_kernel<T, kShapeAny>>(p.nk, kStates);
      }
      p.sn = p.nk;
      stab();
    }
    for (int c0 = 0; c0 < p.nk; c0 += group) {
      const int n = std::min(group, p.nk - c0);
      launch_states(c0, n, /*fill=*/bnd != nullptr, /*stabilisers=*/per_launch);
      if (output)
        launch<&forward_kernel<T, kShapeD64M256>, &forward_kernel<T, kShapeAny>>(n, kForward);
    }
    p.chunk0 = 0;
  }

  // Causal: the states of chunks c0 .. c0 + n - 1 (c0 a multiple of group) and their scanned
  // states H into hbuf, starting from the boundary state before c0 (without boundary states:
  // from the previous launch's carry); fill: also write the boundary states the scan passes;
  // stabilisers: the states kernel also finds the chunks' key maxima, and stab_kernel their
  // stabilisers (else both come from earlier: causal_pass, or the forward's saved tensor).
  // Leaves p.chunk0 = c0 and p.hs on H.
  void launch_states(int c0, int n, bool fill, bool stabilisers = false) {
    p.smode = stabilisers ? kStatesAll : kStatesOnly;
    p.chunk0 = c0;
    launch<&states_kernel<T, kShapeD64M256>, &states_kernel<T, kShapeAny>>(n, kStates);
    if (stabilisers) {
      p.sn = n;
      stab();
    }
    auto* kernel = &scan_kernel<T, T>;
    ScanRange rg{group, c0, group, c0, carry, /*carry_in=*/c0 > 0};
    rg.bnd = bnd;
    rg.every = static_cast<int>(detail::kFavorBoundaryChunks);
    rg.nbnd = nbnd;
    rg.bnd_write = fill;
    PANTHER_LAUNCH(kernel, dim3(scan_blocks()), dim3(kScanThreads), 0, p.st, p.cs, hbuf, hxbuf,
                   p.BH, n, p.nk, p.M * p.E1p, p.E1p, true, /*reverse=*/false,
                   /*use_kscale=*/true, rg);
    p.hs = hbuf;
    p.hx = hxbuf;
    p.hs_n = group;
    p.hs_c0 = c0;
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
  if (causal) {
    run.causal_pass(/*output=*/true);
  } else {
    run.states();
    run.template launch<&forward_kernel<T, kShapeD64M256>, &forward_kernel<T, kShapeAny>>(
        run.p.nq, kForward);
  }
  return out;
}

template <class T>
detail::FavorGrads backward(const detail::FavorDims& d, const at::Tensor& grad_output,
                            const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, const at::Tensor& projection, bool causal,
                            const std::optional<at::Tensor>& mask, std::array<bool, 4> want,
                            const at::Tensor* saved = nullptr) {
  // saved: forward(..., &saved) of the same inputs; its states replace states() here.
  host::Run<T> run(d, causal, query, key, value, projection, mask, nullptr, saved,
                   /*backward=*/true);
  Params<T>& p = run.p;
  const auto opts = query.options();
  at::Tensor g = host::last_dim_dense(grad_output);
  p.g = reinterpret_cast<const T*>(g.data_ptr());
  p.g_sb = g.stride(0), p.g_sh = g.stride(1), p.g_sl = g.stride(2);
  at::Tensor dq = at::empty({d.B, d.H, d.Lq, d.D}, opts);
  at::Tensor dk = at::empty({d.B, d.H, d.Lk, d.D}, opts);
  at::Tensor dv = at::empty({d.B, d.H, d.Lk, d.Dv}, opts);
  // Causal: back1's outputs for back2, as Params says, for the chunks of one launch: dvp (fp32),
  // Wm and, without the forward's features, phi (bf16).
  at::Tensor part;
  if (causal) {
    const int64_t rows = p.BH * static_cast<int64_t>(p.slots) * kC, dvw = (p.Dv + 15) / 16 * 16;
    const int64_t fwm = rows * dvw * 4, fph = fwm + rows * kC * 2;
    const bool own_phi = p.feat != kFeatLoad;
    part = at::empty({fph + (own_phi ? rows * p.M * 2 : 0)}, opts.dtype(at::kByte));
    unsigned char* base = part.data_ptr<unsigned char>();
    p.dvp = reinterpret_cast<float*>(base);
    p.fwm = reinterpret_cast<T*>(base + fwm);
    if (own_phi) p.fph = reinterpret_cast<T*>(base + fph);
  }
  // Gradient states, p.slots per row (non-causal: Run::back1_slots; causal: Run::launch_chunks,
  // in run's workspace, then the reverse scan's carry).
  const int64_t W1 = static_cast<int64_t>(p.M + 1) * p.E1p;
  at::Tensor gst;
  if (!causal) {
    gst = at::empty({p.BH * p.slots * W1}, opts.dtype(at::kFloat));
    p.gst = gst.data_ptr<float>();
  }
  at::Tensor dW;
  if (want[3]) dW = at::zeros({d.M, d.D}, opts.dtype(at::kFloat));
  p.dq = reinterpret_cast<T*>(dq.data_ptr());
  p.dk = reinterpret_cast<T*>(dk.data_ptr());
  p.dv = reinterpret_cast<T*>(dv.data_ptr());
  p.dW = want[3] ? dW.data_ptr<float>() : nullptr;
  auto back1 = [&](int n) {
    run.template launch<&back1_kernel<T, kShapeD64M256>, &back1_kernel<T, kShapeAny>>(n, kBack1);
  };
  auto back2 = [&](int n) {
    run.template launch<&back2_kernel<T, kShapeD64M256>, &back2_kernel<T, kShapeAny>>(n, kBack2);
  };
  if (causal) {
    // Launches of run.group chunks, last first: the launch's states and H again (from the
    // boundary state before it), back1, the reverse scan (carried over from the later chunks)
    // into dT over H, back2.
    if (!saved) run.causal_pass(/*output=*/false);  // the boundary states
    float* carry = p.gst + p.BH * static_cast<int64_t>(p.slots) * W1;
    const int last = (p.nq - 1) / run.group;
    for (int li = last; li >= 0; --li) {
      const int c0 = li * run.group, n = std::min(run.group, p.nq - c0);
      run.launch_states(c0, n, /*fill=*/false);
      back1(n);
      run.scan_grad(n, ScanRange{p.slots, c0, p.slots, c0, carry, /*carry_in=*/li != last});
      back2(n);
    }
  } else {
    if (!saved) run.states();
    // back1 in launches of p.slots chunks adding into the slots, their total, one back2 launch.
    for (p.chunk0 = 0; p.chunk0 < p.nq; p.chunk0 += p.slots)
      back1(std::min(p.slots, p.nq - p.chunk0));
    p.chunk0 = 0;
    run.scan_grad(p.slots, ScanRange{p.slots, 0, 1, 0, nullptr, false});
    back2(p.nk);
  }
  detail::FavorGrads out;
  if (want[0]) std::get<0>(out) = dq;
  if (want[1]) std::get<1>(out) = dk;
  if (want[2]) std::get<2>(out) = dv;
  if (want[3]) std::get<3>(out) = dW.to(projection.scalar_type());
  return out;
}

}  // namespace panther::fused
