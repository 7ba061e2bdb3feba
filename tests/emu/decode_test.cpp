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
#include "attention/decode_layer.cuh"

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

// The whole layer's step on the cluster kernel (decode_layer.cuh): q, k, v projected from x
// inside it, against at::linear in the state's dtype then the ATen
// step math.
struct LayerCase {
  int64_t B, H, D, Dv, M, E;
  bool softmax;
  at::ScalarType dt;     // the state's
  at::ScalarType in_dt;  // x and the weights (the layer's)
  bool bias;
  bool w_state;   // the projection in the state's dtype, else in in_dt
  bool strided_x; // x as a (B, E) slice of a (B, 2E) tensor
  int steps;
};

bool run_layer(const LayerCase& c) {
  const auto o = at::TensorOptions().dtype(c.dt);
  const auto io = at::TensorOptions().dtype(c.in_dt);
  const std::string kern = c.softmax ? "softmax" : "relu";
  const at::Tensor wq = (at::randn({c.H * c.D, c.E}, o) / std::sqrt(double(c.E))).to(c.in_dt);
  const at::Tensor wk = (at::randn({c.H * c.D, c.E}, o) / std::sqrt(double(c.E))).to(c.in_dt);
  const at::Tensor wv = (at::randn({c.H * c.Dv, c.E}, o) / std::sqrt(double(c.E))).to(c.in_dt);
  std::optional<at::Tensor> bq, bk, bv;
  if (c.bias) {
    bq = at::randn({c.H * c.D}, o).to(c.in_dt);
    bk = at::randn({c.H * c.D}, o).to(c.in_dt);
    bv = at::randn({c.H * c.Dv}, o).to(c.in_dt);
  }
  const at::Tensor W = at::randn({c.M, c.D}, c.w_state ? o : io);
  const double ninf = c.softmax ? -std::numeric_limits<double>::infinity() : 0.0;
  at::Tensor kv = at::zeros({c.B, c.H, c.M, c.Dv + 1}, o), vs = at::zeros({c.B, c.H, c.Dv + 1}, o),
             r = at::full({c.B, c.H}, ninf, o);
  at::Tensor kv_ref = kv.clone(), vs_ref = vs.clone(), r_ref = r.clone();
  const at::Tensor length = at::full({}, 3, at::kLong), length_ref = length.clone();
  const double tol = c.dt == at::kFloat ? 2e-5 : 1e-12;
  const double out_tol = c.in_dt == at::kBFloat16 ? 1e-2 : c.in_dt == at::kHalf ? 2e-3 : tol;
  auto lin = [&](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                 int64_t n) {
    return at::linear(x.to(c.dt), w.to(c.dt), b ? std::optional<at::Tensor>(b->to(c.dt))
                                                 : std::optional<at::Tensor>())
        .view({c.B, c.H, n});
  };
  const int64_t smem = panther::max_smem_optin(0);
  bool ok = panther::decode::layer_takes(c.E, c.D, c.Dv, c.M, c.dt, smem, true);
  double worst = 0, worst_out = 0;
  bool rescaled = false;
  for (int t = 0; ok && t < c.steps; ++t) {
    // Shrinking: the keys' largest pre-activation (x W - |x|^2 / 2) rises, so does the stabiliser.
    const double scale = 2.0 / (1 + t);
    at::Tensor x = (at::randn({c.B, c.strided_x ? 2 * c.E : c.E}, o) * scale).to(c.in_dt);
    if (c.strided_x) x = x.narrow(1, c.E / 2, c.E);
    const at::Tensor q = lin(x, wq, bq, c.D), k = lin(x, wk, bk, c.D), v = lin(x, wv, bv, c.Dv);
    const at::Tensor Wt = W.to(c.dt);  // (the reference computes in the state's dtype)
    const DecodeDims d = panther::detail::check_favor_decode_step(
        "test", q, k, v, Wt, kern, kv_ref, vs_ref, r_ref, length_ref);
    const at::Tensor r_before = r_ref.clone();
    const at::Tensor ref =
        panther::detail::favor_decode_step_aten(d, q, k, v, Wt, kv_ref, vs_ref, r_ref, length_ref)
            .reshape({c.B, c.H * c.Dv});
    const at::Tensor out = panther::decode::run_layer_step(
        x, panther::detail::QkvWeights{wq, wk, wv, bq, bk, bv}, W, c.softmax, kv, vs, r, length);
    ok = ok && out.scalar_type() == c.in_dt && out.sizes() == ref.sizes();
    ok = ok && length.item<int64_t>() == 4 + t && length_ref.item<int64_t>() == 4 + t;
    const double eo = rel_err(out, ref.to(c.in_dt));
    worst_out = std::max(worst_out, eo);
    ok = ok && eo < out_tol;
    for (const auto& [got, want] : {std::make_pair(kv, kv_ref), std::make_pair(vs, vs_ref),
                                    std::make_pair(r, r_ref)}) {
      const double e = rel_err(got, want);
      worst = std::max(worst, e);
      ok = ok && e < tol;
    }
    if (c.softmax && t > 0) rescaled = rescaled || (r_ref > r_before).any().item<bool>();
  }
  ok = ok && (rescaled || !c.softmax);
  std::printf("[layer, clusters of %d] B=%lld H=%lld E=%lld D=%lld Dv=%lld M=%lld %s state %s "
              "layer %s%s%s%s, %d steps: max rel err state %.1e, output %.1e -> %s\n",
              panther::decode::kCluster, (long long)c.B, (long long)c.H, (long long)c.E,
              (long long)c.D, (long long)c.Dv, (long long)c.M, kern.c_str(), c10::toString(c.dt),
              c10::toString(c.in_dt), c.bias ? ", bias" : "",
              c.w_state ? "" : ", projection in the layer's dtype",
              c.strided_x ? ", strided x" : "", c.steps, worst, worst_out, ok ? "PASS" : "FAIL");
  return ok;
}

// The rows-linear kernel (linear_rows_kernel, the output projection) against at::linear in its accumulation dtype.
bool run_out(int64_t B, int64_t K, int64_t N, at::ScalarType dt, bool bias) {
  const auto o = at::TensorOptions().dtype(dt);
  const at::Tensor ctx = at::randn({B, K}, o), w = at::randn({N, K}, o);
  const std::optional<at::Tensor> b =
      bias ? std::optional<at::Tensor>(at::randn({N}, o)) : std::nullopt;
  const at::ScalarType acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor ref =
      at::linear(ctx.to(acc), w.to(acc), b ? std::optional<at::Tensor>(b->to(acc)) : std::nullopt);
  const at::Tensor got = panther::decode::linear_rows(ctx, w, b, panther::max_smem_optin(0));
  const double tol = dt == at::kBFloat16 ? 1e-2
                     : dt == at::kHalf   ? 2e-3
                     : dt == at::kFloat  ? 1e-5
                                         : 1e-12;
  const double e = rel_err(got, ref.to(dt));
  const bool ok = got.scalar_type() == dt && got.sizes() == ref.sizes() && e < tol;
  std::printf("[output projection] B=%lld K=%lld N=%lld %s%s: max rel err %.1e -> %s\n",
              (long long)B, (long long)K, (long long)N, c10::toString(dt), bias ? ", bias" : "", e,
              ok ? "PASS" : "FAIL");
  return ok;
}
}  // namespace

// Usage: decode_test [layer]   (layer: only the whole-layer cases)
int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  at::manual_seed(0);
  const bool layer_only = argc > 1 && std::string(argv[1]) == "layer";
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
  const std::vector<Case> step_cases =
      layer_only ? std::vector<Case>{} : std::vector<Case>(std::begin(cases), std::end(cases));
  for (const Case& c : step_cases) {
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
  const LayerCase layers[] = {
      // the Performer head of a GPT-2-small layer (one head block per cluster), bf16 layer
      {1, 3, 64, 64, 256, 96, true, at::kFloat, at::kBFloat16, true, false, false, 3},
      {2, 2, 64, 64, 256, 64, true, at::kFloat, at::kBFloat16, false, true, true, 3},
      // features not a multiple of the cluster, head_dim not of the warp; float64; relu; fp16
      {2, 2, 5, 3, 13, 12, true, at::kDouble, at::kDouble, true, true, false, 3},
      {1, 2, 33, 95, 100, 40, false, at::kFloat, at::kFloat, true, true, true, 2},
      {2, 1, 16, 16, 40, 24, true, at::kFloat, at::kHalf, true, false, false, 3},
      // two groups of q/k/v rows per warp (2D + Dv = 351) and two chunks of weight words per row
      // (E = 1040 in bf16); weight rows not read as 16-byte words (E = 20 in fp16)
      {1, 1, 128, 95, 64, 1040, true, at::kFloat, at::kBFloat16, true, false, false, 2},
      {1, 2, 8, 8, 16, 20, true, at::kFloat, at::kHalf, false, false, false, 2},
  };
  int layer_fails = 0;
  for (const LayerCase& c : layers) layer_fails += !run_layer(c);
  // (the GPT-2-small width; K not a multiple of 16 bytes; all rows the kernel takes; float64)
  layer_fails += !run_out(1, 768, 768, at::kBFloat16, true);
  layer_fails += !run_out(3, 20, 33, at::kHalf, false);
  layer_fails += !run_out(panther::decode::kOutMaxRows, 40, 13, at::kFloat, true);
  layer_fails += !run_out(2, 12, 9, at::kDouble, true);
  layer_fails += !run_out(2, 1040, 24, at::kBFloat16, true);  // two chunks of words per row
  std::printf("%d of %d layer and output-projection runs failed\n", layer_fails,
              static_cast<int>(std::size(layers)) + 5);
  fails += layer_fails;
  std::printf("%d of %d decode runs failed (%d staged)\n", fails, n, staged);
  if (staged < 3 && !layer_only) {
    std::printf("FAIL: expected the staged configuration in at least 3 runs\n");
    return 1;
  }
  return fails ? 1 : 0;
}
