// Runs the fused decoding-step kernel (cpp/attention/decode_kernel.cuh) on the CPU emulator and
// compares it, step after step, with the ATen math of cpp/attention/impl.cpp
// (favor_decode_step_aten, the CPU kernel): output, kv, v_sum and stabiliser. Softmax and relu,
// float32 and float64, from an empty state (kv = 0, v_sum = 0, stabiliser = -inf) with inputs
// growing in scale (the stabiliser rises and the state is rescaled), fewer features than warps,
// features not a multiple of the block, value_dim at the kernel's limit, a non-contiguous state;
// bfloat16 and float16 inputs on a float32 state (the projection in either dtype), and query, key
// and value as strided views of one fused projection. Each case runs in every kernel
// configuration that takes it (general; wide, staged or not).
// Built and run by scripts/emu_test.sh.
#include "cuda_emu.h"
#include "attention/decode_kernel.cuh"

#include <ATen/ATen.h>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "attention/impl.h"

namespace {
using panther::detail::DecodeDims;

double rel_err(const at::Tensor& got, const at::Tensor& ref) {
  const at::Tensor g = got.to(at::kDouble), r = ref.to(at::kDouble);
  const at::Tensor fin = at::isfinite(r);
  if (!at::equal(fin, at::isfinite(g))) return 1e30;
  if (!at::equal(r.masked_select(fin.logical_not()), g.masked_select(fin.logical_not()))) return 1e30;
  const double scale = r.masked_select(fin).abs().max().item<double>() + 1e-12;
  return (g - r).masked_select(fin).abs().max().item<double>() / scale;
}

struct Case {
  int64_t B, H, D, Dv, M;
  bool softmax;
  at::ScalarType dt;
  bool strided_state;  // kv, v_sum, stabiliser as non-contiguous views
  int steps;
  at::ScalarType in_dt = at::kFloat;  // query, key, value (the layer's dtype; dt is the state's)
  bool w_state = true;                // the projection in the state's dtype, else in in_dt
  bool fused_qkv = false;             // q, k, v as views of one (B, 3, H, D) tensor (D == Dv)
};

bool run(const Case& c, panther::decode::Config config) {
  const auto dt = c.dt;
  const auto o = at::TensorOptions().dtype(dt);
  const std::string kern = c.softmax ? "softmax" : "relu";
  const auto io = at::TensorOptions().dtype(c.dt == at::kDouble ? at::kDouble : c.in_dt);
  at::Tensor W = at::randn({c.M, c.D}, c.w_state ? o : io);
  // Two copies of the state: one for the kernel, one for the ATen math.
  auto empty_state = [&] {
    at::Tensor kv, vs, r;
    if (c.strided_state) {  // (H, B, ...) memory seen as (B, H, ...)
      kv = at::zeros({c.H, c.B, c.M, c.Dv + 1}, o).transpose(0, 1);
      vs = at::zeros({c.H, c.B, c.Dv + 1}, o).transpose(0, 1);
      r = at::full({c.H, c.B}, c.softmax ? -std::numeric_limits<double>::infinity() : 0.0, o)
              .transpose(0, 1);
    } else {
      kv = at::zeros({c.B, c.H, c.M, c.Dv + 1}, o);
      vs = at::zeros({c.B, c.H, c.Dv + 1}, o);
      r = at::full({c.B, c.H}, c.softmax ? -std::numeric_limits<double>::infinity() : 0.0, o);
    }
    return std::make_tuple(kv, vs, r);
  };
  auto [kv, vs, r] = empty_state();
  auto [kv_ref, vs_ref, r_ref] = empty_state();
  const double tol = dt == at::kFloat ? 2e-5 : 1e-12;
  // The output is rounded once to the input dtype, by the kernel and the reference alike: the
  // two may differ by one rounding step there.
  const double out_tol = io.dtype() == at::kBFloat16 ? 1e-2 : io.dtype() == at::kHalf ? 2e-3 : tol;
  double worst = 0, worst_out = 0;
  bool rescaled = false;
  bool ok = true;
  const DecodeDims d = panther::detail::check_favor_decode_step(
      "test", at::empty({c.B, c.H, c.D}, io), at::empty({c.B, c.H, c.D}, io),
      at::empty({c.B, c.H, c.Dv}, io), W, kern, kv, vs, r, std::nullopt);
  ok = ok && panther::decode::takes(d, dt, panther::max_smem_optin(0));
  // The state's length, counted by the kernel (block 0) on every step, and by the reference.
  const at::Tensor length = at::full({}, 7, at::kLong), length_ref = length.clone();
  for (int t = 0; t < c.steps; ++t) {
    const double scale = 0.5 + 0.6 * t;  // growing: the key stabiliser rises
    at::Tensor q, k, v;
    if (c.fused_qkv) {  // (B, 3, H, D): each of q, k, v has rows of stride D, batches of 3 H D
      const at::Tensor qkv = (at::randn({c.B, 3, c.H, c.D}, o) *
                              at::tensor({scale, scale, 1.0}, o).view({1, 3, 1, 1})).to(io.dtype());
      q = qkv.select(1, 0), k = qkv.select(1, 1), v = qkv.select(1, 2);
      // (not copied: the kernel reads the views in place)
      ok = ok && (c.B == 1 || !q.is_contiguous()) && panther::decode::row_layout(q).has_value();
    } else {
      q = (at::randn({c.B, c.H, c.D}, o) * scale).to(io.dtype());
      k = (at::randn({c.B, c.H, c.D}, o) * scale).to(io.dtype());
      v = at::randn({c.B, c.H, c.Dv}, o).to(io.dtype());
    }
    const at::Tensor r_before = r_ref.clone();
    at::Tensor ref =
        panther::detail::favor_decode_step_aten(d, q, k, v, W, kv_ref, vs_ref, r_ref, length_ref);
    at::Tensor out = panther::decode::run_step(d, q, k, v, W, kv, vs, r, length, config);
    ok = ok && length.item<int64_t>() == 8 + t && length_ref.item<int64_t>() == 8 + t;
    ok = ok && out.scalar_type() == q.scalar_type();
    const double eo = rel_err(out, ref);
    worst_out = std::max(worst_out, eo);
    ok = ok && eo < out_tol && out.sizes() == ref.sizes();
    for (const auto& [got, want] : {std::make_pair(kv, kv_ref), std::make_pair(vs, vs_ref),
                                    std::make_pair(r, r_ref)}) {
      const double e = rel_err(got, want);
      worst = std::max(worst, e);
      ok = ok && e < tol && got.sizes() == want.sizes();
    }
    if (c.softmax && t > 0) rescaled = rescaled || (r_ref > r_before).any().item<bool>();
  }
  ok = ok && (rescaled || !c.softmax);  // the state's rescale was exercised
  static const char* names[] = {"auto", "general", "wide", "wide staged"};
  std::printf("[%s] B=%lld H=%lld D=%lld Dv=%lld M=%lld %s state %s inputs %s projection "
              "%s%s%s, %d steps: max rel err state %.1e, output %.1e -> %s\n",
              names[static_cast<int>(config)], (long long)c.B, (long long)c.H, (long long)c.D,
              (long long)c.Dv, (long long)c.M,
              kern.c_str(), c10::toString(dt), c10::toString(io.dtype().toScalarType()),
              c10::toString(W.scalar_type()), c.strided_state ? ", strided state" : "",
              c.fused_qkv ? ", fused qkv views" : "", c.steps, worst, worst_out,
              ok ? "PASS" : "FAIL");
  return ok;
}
}  // namespace

int main() {
  at::manual_seed(0);
  const Case cases[] = {
      {1, 1, 4, 3, 3, true, at::kDouble, false, 3},     // fewer features than warps
      {2, 3, 64, 64, 256, true, at::kFloat, false, 3},  // the common Performer head
      {2, 3, 4, 3, 300, false, at::kFloat, false, 3},   // relu, features not a block multiple
      {2, 3, 64, 3, 300, true, at::kDouble, true, 3},   // non-contiguous state
      {1, 2, 16, 256, 40, true, at::kFloat, false, 2},  // value_dim at the limit (9 columns/lane)
      {2, 1, 33, 64, 256, false, at::kDouble, false, 2},
      {2, 3, 64, 64, 256, true, at::kFloat, false, 3, at::kBFloat16, false, true},  // the module's
      {2, 3, 64, 64, 256, true, at::kFloat, true, 3, at::kBFloat16, true, false},
      {1, 2, 16, 16, 40, false, at::kFloat, false, 2, at::kHalf, false, true},
      {1, 2, 16, 16, 40, true, at::kFloat, false, 2, at::kHalf, true, false},
  };
  using panther::decode::Config;
  int fails = 0, n = 0, staged = 0;
  for (const Case& c : cases) {
    const DecodeDims d{c.B * c.H, c.D, c.Dv, c.M, panther::detail::FavorKernel::Softmax};
    const int64_t ts = at::elementSize(c.dt);
    const int64_t ws = c.w_state || c.dt == at::kDouble ? ts : at::elementSize(c.in_dt);
    const int64_t smem = panther::max_smem_optin(0);
    std::vector<Config> configs{Config::General};
    if (panther::decode::wide_fits(d) &&
        panther::decode::smem_bytes(d, Config::Wide, ts, ws) <= smem) {
      configs.push_back(Config::Wide);
      // (the emulator's tensors are allocated 16-byte aligned)
      if (panther::decode::smem_bytes(d, Config::WideStaged, ts, ws) <= smem &&
          panther::decode::stage_aligned(d, nullptr, nullptr, ts, ws))
        configs.push_back(Config::WideStaged);
    }
    for (Config config : configs) {
      fails += !run(c, config);
      ++n;
      staged += config == Config::WideStaged;
    }
  }
  std::printf("%d of %d decode runs failed (%d staged)\n", fails, n, staged);
  if (staged < 3) {
    std::printf("FAIL: expected the staged configuration in at least 3 runs\n");
    return 1;
  }
  return fails ? 1 : 0;
}
