// Google Benchmark microbenchmarks (panther_bench): panther::sketched_linear vs at::linear, and
// panther::favor_attention (when the library registers it) vs at::scaled_dot_product_attention,
// forward and forward+backward, on the CPU and, when a CUDA device is present, on CUDA.
// Registers nothing in the dispatcher; benchmarks are registered at run time in main().
//
// Timing: CPU cases use wall-clock time (ATen runs its own thread pool, so the calling thread's
// CPU time means little). CUDA cases time kInner back-to-back calls and one device
// synchronisation with a wall clock (manual time), so every launch is waited for but one
// synchronisation is spread over several calls.
// Counters: FLOP/s and bytes/s are rates over the measured time of the FLOPs and the fewest
// bytes each call must move (inputs read once, outputs written once; see the case builders).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <benchmark/benchmark.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/cuda.h>

#include <panther/ops.h>

#include <chrono>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace {

constexpr int kInner = 10;  // calls per synchronisation (CUDA)

using Fn = std::function<void()>;

struct Device {
  at::Device device;
  bool cuda;
  const char* name;
};

void sync(const Device& d) {
  if (d.cuda) torch::cuda::synchronize();
}

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "fp32";
    case at::kHalf: return "fp16";
    case at::kBFloat16: return "bf16";
    case at::kDouble: return "fp64";
    default: return "other";
  }
}

// Times fn (already bound to its inputs) and reports FLOP/s and bytes/s.
void run_case(benchmark::State& state, const Device& d, const Fn& fn, double flop, double bytes) {
  try {
    fn();  // warm-up: handles, workspaces, allocator
    fn();
    sync(d);
    if (d.cuda) {
      for (auto _ : state) {
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < kInner; ++i) fn();
        sync(d);
        auto t1 = std::chrono::steady_clock::now();
        state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count() / kInner);
      }
    } else {
      for (auto _ : state) fn();
    }
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  state.counters["FLOP/s"] = benchmark::Counter(flop, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bytes/s"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
}

void add(const std::string& name, const Device& d, std::function<Fn()> make, double flop, double bytes) {
  // Inputs are built lazily (only for benchmarks that pass the filter) and freed afterwards.
  auto* b = benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& state) {
    Fn fn = make();
    run_case(state, d, fn, flop, bytes);
  });
  if (d.cuda) {
    b->UseManualTime();
  } else {
    b->UseRealTime();
  }
  b->Unit(benchmark::kMillisecond);
}

// ---------------------------------------------------------------- sketched linear vs at::linear

struct LinearCase {
  int64_t N, d, L, k;
};

void register_linear(const Device& dev, at::ScalarType dt, const LinearCase& c) {
  const auto opts = at::TensorOptions().device(dev.device).dtype(dt);
  const double es = static_cast<double>(c10::elementSize(dt));
  const double N = c.N, d = c.d, r = 2.0 * c.L * c.k;
  char shape[96];
  std::snprintf(shape, sizeof(shape), "N%lld_d%lld_L%lld_k%lld", (long long)c.N, (long long)c.d,
                (long long)c.L, (long long)c.k);
  const std::string tag = std::string("/") + dev.name + "/" + dtype_name(dt) + "/" + shape;

  // Sketch: fwd FLOPs 2 N r (d_in + d_out); bytes x, y, the packed sketches, bias.
  const double sk_flop = 2.0 * N * r * 2.0 * d;
  const double sk_bytes = es * (2.0 * N * d + 2.0 * r * d + d);
  // Dense: fwd FLOPs 2 N d_in d_out; bytes x, W, y, bias.
  const double dn_flop = 2.0 * N * d * d;
  const double dn_bytes = es * (2.0 * N * d + d * d + d);
  // fwd+bwd: 3x the FLOPs; bytes add dy, x again, dx, params again and their gradients.
  const double sk_bwd_bytes = sk_bytes + es * (3.0 * N * d + 2.0 * (2.0 * r * d + d));
  const double dn_bwd_bytes = dn_bytes + es * (3.0 * N * d + 2.0 * (d * d + d));

  auto sketch_inputs = [=](bool grad) {
    at::manual_seed(0);
    const double s = 1.0 / std::sqrt(static_cast<double>(c.k));
    std::vector<at::Tensor> t = {
        at::randn({c.N, c.d}, opts),                                       // x
        at::randn({c.L, c.d, c.k}, opts).mul_(1.0 / std::sqrt(c.d)),       // S1s
        at::randn({c.L, c.k, c.d}, opts).mul_(1.0 / std::sqrt(c.d)),       // S2s
        at::randint(0, 2, {c.L, c.k, c.d}, opts).mul_(2).sub_(1).mul_(s),  // U1s
        at::randint(0, 2, {c.L, c.d, c.k}, opts).mul_(2).sub_(1).mul_(s),  // U2s
        at::randn({c.d}, opts),                                            // bias
    };
    if (grad)
      for (int i : {0, 1, 2, 5}) t[i].requires_grad_(true);
    return t;
  };
  auto dense_inputs = [=](bool grad) {
    at::manual_seed(0);
    std::vector<at::Tensor> t = {at::randn({c.N, c.d}, opts),
                                 at::randn({c.d, c.d}, opts).mul_(1.0 / std::sqrt(c.d)),
                                 at::randn({c.d}, opts)};
    if (grad)
      for (auto& x : t) x.requires_grad_(true);
    return t;
  };

  add("sketched_linear" + tag + "/fwd", dev, [=] {
    auto t = sketch_inputs(false);
    return Fn([t] {
      c10::InferenceMode guard;
      at::Tensor y = panther::sketched_linear(t[0], t[1], t[2], t[3], t[4], t[5]);
      benchmark::DoNotOptimize(y);
    });
  }, sk_flop, sk_bytes);
  add("at::linear" + tag + "/fwd", dev, [=] {
    auto t = dense_inputs(false);
    return Fn([t] {
      c10::InferenceMode guard;
      at::Tensor y = at::linear(t[0], t[1], t[2]);
      benchmark::DoNotOptimize(y);
    });
  }, dn_flop, dn_bytes);
  add("sketched_linear" + tag + "/fwd+bwd", dev, [=] {
    auto t = sketch_inputs(true);
    at::Tensor g = at::randn({c.N, c.d}, opts);
    return Fn([t, g] {
      at::Tensor y = panther::sketched_linear(t[0], t[1], t[2], t[3], t[4], t[5]);
      auto grads = torch::autograd::grad({y}, {t[0], t[1], t[2], t[5]}, {g});
      benchmark::DoNotOptimize(grads);
    });
  }, 3 * sk_flop, sk_bwd_bytes);
  add("at::linear" + tag + "/fwd+bwd", dev, [=] {
    auto t = dense_inputs(true);
    at::Tensor g = at::randn({c.N, c.d}, opts);
    return Fn([t, g] {
      at::Tensor y = at::linear(t[0], t[1], t[2]);
      auto grads = torch::autograd::grad({y}, {t[0], t[1], t[2]}, {g});
      benchmark::DoNotOptimize(grads);
    });
  }, 3 * dn_flop, dn_bwd_bytes);
}

// ---------------------------------------------------------------- attention vs SDPA

constexpr int64_t kB = 1, kH = 12, kD = 64, kM = 256, kChunk = 64;

// The op's arguments in schema order: the four tensors (q, k, v, projection), the kernel
// ("softmax", or 0 if the schema takes an int), the causal flag, defaults / None for the rest.
std::optional<std::vector<c10::IValue>> favor_stack(const c10::FunctionSchema& s,
                                                    const std::vector<at::Tensor>& t, bool causal) {
  std::vector<c10::IValue> st;
  size_t ti = 0;
  bool kernel_done = false, causal_done = false;
  for (const auto& a : s.arguments()) {
    const auto kind = a.type()->kind();
    if (kind == c10::TypeKind::TensorType && ti < t.size()) {
      st.emplace_back(t[ti++]);
    } else if (kind == c10::TypeKind::StringType && !kernel_done) {
      st.emplace_back(std::string("softmax"));
      kernel_done = true;
    } else if (kind == c10::TypeKind::IntType && !kernel_done) {
      st.emplace_back(static_cast<int64_t>(0));
      kernel_done = true;
    } else if (kind == c10::TypeKind::BoolType && !causal_done) {
      st.emplace_back(causal);
      causal_done = true;
    } else if (a.default_value().has_value()) {
      st.push_back(*a.default_value());
    } else if (kind == c10::TypeKind::OptionalType) {
      st.emplace_back();
    } else {
      return std::nullopt;
    }
  }
  if (ti != t.size()) return std::nullopt;
  return st;
}

void register_attention(const Device& dev, at::ScalarType dt, int64_t L, bool causal,
                        const std::optional<c10::OperatorHandle>& favor) {
  const auto opts = at::TensorOptions().device(dev.device).dtype(dt);
  const double es = static_cast<double>(c10::elementSize(dt));
  const double BH = static_cast<double>(kB * kH), Ld = static_cast<double>(L);
  const std::string tag = std::string("/") + dev.name + "/" + dtype_name(dt) + "/L" +
                          std::to_string(L) + (causal ? "_causal" : "_full");
  const double tensor = es * BH * Ld * kD;
  // FAVOR+: 8 L M D per head (+ 2 L C (M + D) causal in-chunk); exact: 4 L^2 D per head (halved causal).
  const double favor_flop = BH * (8.0 * Ld * kM * kD + (causal ? 2.0 * Ld * kChunk * (kM + kD) : 0.0));
  const double sdpa_flop = BH * 4.0 * Ld * Ld * kD * (causal ? 0.5 : 1.0);
  const double fwd_bytes = 4 * tensor, fb_bytes = 11 * tensor;

  auto inputs = [=](bool grad) {
    at::manual_seed(0);
    std::vector<at::Tensor> t = {at::randn({kB, kH, L, kD}, opts), at::randn({kB, kH, L, kD}, opts),
                                 at::randn({kB, kH, L, kD}, opts)};
    if (grad)
      for (auto& x : t) x.requires_grad_(true);
    return t;
  };
  auto sdpa = [causal](const std::vector<at::Tensor>& t) {
    return at::scaled_dot_product_attention(t[0], t[1], t[2], /*attn_mask=*/std::nullopt,
                                            /*dropout_p=*/0.0, /*is_causal=*/causal);
  };
  add("sdpa" + tag + "/fwd", dev, [=] {
    auto t = inputs(false);
    return Fn([t, sdpa] {
      c10::InferenceMode guard;
      at::Tensor y = sdpa(t);
      benchmark::DoNotOptimize(y);
    });
  }, sdpa_flop, fwd_bytes);
  add("sdpa" + tag + "/fwd+bwd", dev, [=] {
    auto t = inputs(true);
    at::Tensor g = at::randn({kB, kH, L, kD}, opts);
    return Fn([t, g, sdpa] {
      auto grads = torch::autograd::grad({sdpa(t)}, t, {g});
      benchmark::DoNotOptimize(grads);
    });
  }, 3.5 * sdpa_flop, fb_bytes);  // flash backward: 2.5x the forward's matmul FLOPs

  if (!favor.has_value()) return;
  const c10::OperatorHandle op = *favor;
  auto call = [op, causal](const std::vector<at::Tensor>& t, const at::Tensor& proj) {
    auto st = favor_stack(op.schema(), {t[0], t[1], t[2], proj}, causal);
    TORCH_CHECK(st.has_value(), "panther_bench: cannot build arguments for ", op.schema());
    op.callBoxed(&*st);
    return (*st)[0].toTensor();
  };
  auto projection = [opts] {
    return at::randn({kM, kD}, opts.dtype(at::kFloat)).to(opts.dtype().toScalarType());
  };
  add("favor_attention" + tag + "/fwd", dev, [=] {
    auto t = inputs(false);
    at::Tensor p = projection();
    return Fn([t, p, call] {
      c10::InferenceMode guard;
      at::Tensor y = call(t, p);
      benchmark::DoNotOptimize(y);
    });
  }, favor_flop, fwd_bytes);
  add("favor_attention" + tag + "/fwd+bwd", dev, [=] {
    auto t = inputs(true);
    at::Tensor p = projection();
    at::Tensor g = at::randn({kB, kH, L, kD}, opts);
    return Fn([t, p, g, call] {
      auto grads = torch::autograd::grad({call(t, p)}, t, {g});
      benchmark::DoNotOptimize(grads);
    });
  }, 3.0 * favor_flop, fb_bytes);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  auto& disp = c10::Dispatcher::singleton();
  if (!disp.findSchema({"panther::sketched_linear", ""}).has_value()) {
    std::fprintf(stderr,
                 "panther_bench: panther::sketched_linear is not registered: libpanther_ops was not "
                 "loaded (built with torch %s)\n",
                 panther::built_with_torch());
    return 1;
  }
  std::optional<c10::OperatorHandle> favor = disp.findSchema({"panther::favor_attention", ""});
  std::fprintf(stderr, "panther_bench: ops from libpanther_ops (torch %s): sketched_linear%s\n",
               panther::built_with_torch(),
               favor ? ", favor_attention" : "; favor_attention not registered (attention: SDPA only)");

  const Device cpu{at::Device(at::kCPU), false, "cpu"};
  for (const LinearCase& c : {LinearCase{256, 1024, 1, 16}, LinearCase{2048, 4096, 1, 16}})
    register_linear(cpu, at::kFloat, c);
  for (int64_t L : {1024, 4096})
    for (bool causal : {false, true}) register_attention(cpu, at::kFloat, L, causal, favor);

  if (torch::cuda::is_available()) {
    const Device gpu{at::Device(at::kCUDA, 0), true, "cuda"};
    // TF32 off: fp32 means fp32 (as in the Python benchmarks).
    at::globalContext().setAllowTF32CuBLAS(false);
    for (at::ScalarType dt : {at::kBFloat16, at::kFloat})
      for (const LinearCase& c :
           {LinearCase{64, 8192, 1, 16}, LinearCase{4096, 4096, 2, 64}, LinearCase{8192, 8192, 1, 16}})
        register_linear(gpu, dt, c);
    for (int64_t L : {1024, 4096, 16384})
      for (bool causal : {false, true}) register_attention(gpu, at::kBFloat16, L, causal, favor);
  } else {
    std::fprintf(stderr, "panther_bench: no CUDA device; CPU benchmarks only\n");
  }

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
