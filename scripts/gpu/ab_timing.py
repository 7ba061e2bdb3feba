"""A/B timing (developer tool for gpu_ab.sh, not part of the suite): causal favor_attention (bf16,
B=1, 12 x 64 heads, M=256) against SDPA at a few lengths, fwd and fwd+bwd, medians of CUDA-event
timings with the two measured round-robin (common.time_fns, as bench_attention.py); then GPU
time per kernel of the op's fwd+bwd. Run once per build (scripts/gpu/gpu_ab.sh runs it for two
builds of the same tree, A/B).
With AB_WHAT=decode: the decoding step of 12 GPT-2-small layers' attention instead (bf16, M=256,
batch 1), graph-replayed and eager, and its GPU time per kernel. With AB_WHAT=linear: host submit
and total time of the BERT-base-shaped encoder's training step and inference with every Linear
sketched (L=1, k=64; bench_models.py), and of one eager SKLinear 768 x 768 fwd+bwd at 16384
tokens, with its kernels.
Usage: python3 scripts/gpu/ab_timing.py [LABEL]    env: PROBE_LENGTHS (default 8192,16384), AB_WHAT"""
import os
import sys

import torch
import torch.nn.functional as F

import panther  # noqa: F401

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(_ROOT, "bench", "python"))
import common as C  # noqa: E402

label = sys.argv[1] if len(sys.argv) > 1 else "build"
dev, dt = "cuda", torch.bfloat16
op = torch.ops.panther.favor_attention


def median_ms(fns):
    """Medians of the benchmarks' round-robin CUDA-event timing (bench/python/common.py)."""
    t = C.time_fns(fns, torch.device(dev), warmup=5, reps=40, min_reps=40, budget_s=60.0)
    return {k: v.median_ms for k, v in t.items()}


def kernel_times(fn, n=20):
    """GPU time per kernel name of one call of fn (us), largest first."""
    return [(k, t) for k, t, _ in C.kernel_rows(fn, n)]


if os.environ.get("AB_WHAT", "attention") == "linear":
    import bench_models as BM  # noqa: E402

    torch.manual_seed(0)
    spec = BM.ENCODER
    B, S, d = spec["batch"], spec["seq"], spec["d"]
    kw = dict(heads=spec["heads"], ffn=spec["ffn"], causal=spec["causal"], fused_qkv=spec["fused_qkv"], device=dev)
    x = torch.randn(B, S, d, device=dev, dtype=dt)
    gy = torch.randn(B, S, d, device=dev, dtype=dt)
    base = BM.Stack(spec["layers"], d, dtype=dt, **kw)
    sk = BM.Variant("SK L=1 k=64", BM.sketched(base, 1, 64), x, gy)
    for what, fn in (("train step", sk.train_step), ("inference", sk.infer)):
        h, t = C.host_and_total_us(fn, torch.device(dev), 10, warmup=1)
        print(f"[{label}] encoder SK L=1 k=64 {what}: host submit {h / 1e3:.2f} ms, total {t / 1e3:.2f} ms", flush=True)
    layer = panther.nn.SKLinear(768, 768, 1, 64, device=dev, dtype=dt)
    xl = torch.randn(16384, 768, device=dev, dtype=dt, requires_grad=True)
    gl = torch.randn(16384, 768, device=dev, dtype=dt)
    params = [xl, *layer.parameters()]
    h, t = C.host_and_total_us(lambda: torch.autograd.grad(layer(xl), params, gl), torch.device(dev), 100)
    print(f"[{label}] SKLinear 768x768x16384 fwd+bwd: host submit {h:.1f} us, total {t:.1f} us", flush=True)
    print(f"[{label}] its kernels (us per call): " + ", ".join(
        f"{n.split('<')[0].split('(')[0][-28:]} {v:.1f}"
        for n, v in kernel_times(lambda: torch.autograd.grad(layer(xl), params, gl))[:8]), flush=True)
    sys.exit(0)

if os.environ.get("AB_WHAT", "attention") == "decode":
    import bench_models as BM  # noqa: E402

    d, H, nl = 768, 12, 12
    torch.manual_seed(0)
    with torch.no_grad():
        layers = [panther.nn.RandMultiHeadAttention(d, H, 256, iscausal=True, device=dev, dtype=dt).eval()
                  for _ in range(nl)]
        states = [m.prefill(torch.randn(1, 64, d, device=dev, dtype=dt))[1] for m in layers]
        x_t = torch.randn(1, 1, d, device=dev, dtype=dt)
        replay = BM._graphed(lambda: [m.step_(x_t, st) for m, st in zip(layers, states)], torch.device(dev))
        per_call = C.back_to_back_us(replay, 200, runs=5)
        print(f"[{label}] decode step, 12 layers, CUDA graph: {per_call[2]:.1f} us per call "
              f"(runs: {', '.join(f'{t:.1f}' for t in per_call)})", flush=True)
        eager = C.back_to_back_us(lambda: [m.step_(x_t, st) for m, st in zip(layers, states)], 100, runs=5)
        print(f"[{label}] decode step, 12 layers, eager (host-bound): {eager[2]:.1f} us per call", flush=True)
        print(f"[{label}] decode kernels (us per layer): " + ", ".join(
            f"{n.split('<')[0].split('(')[0][-24:]} {t / nl:.2f}" for n, t in kernel_times(replay)[:4]), flush=True)
    sys.exit(0)

torch.manual_seed(0)
for L in [int(s) for s in os.environ.get("PROBE_LENGTHS", "8192,16384").split(",")]:
    q, k, v = (torch.randn(1, 12, L, 64, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    W = torch.randn(256, 64, device=dev, dtype=dt)
    go = torch.randn(1, 12, L, 64, device=dev, dtype=dt)
    fb = lambda: torch.autograd.grad(op(q, k, v, W, "softmax", True, None), [q, k, v], go)  # noqa: E731
    sb = lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v], go)  # noqa: E731
    with torch.no_grad():
        f = median_ms({"op": lambda: op(q, k, v, W, "softmax", True, None),
                       "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)})
    b = median_ms({"op": fb, "sdpa": sb})
    print(f"[{label}] L={L} causal fwd: op {f['op']:.3f} ms sdpa {f['sdpa']:.3f} ms ({f['sdpa'] / f['op']:.2f}x) | "
          f"fwd+bwd: op {b['op']:.3f} ms sdpa {b['sdpa']:.3f} ms ({b['sdpa'] / b['op']:.2f}x)", flush=True)
    rows = kernel_times(fb, n=5)
    print(f"[{label}] L={L} kernels (us per fwd+bwd): " + ", ".join(f"{n.split('<')[0].split('(')[0][-28:]} {t:.0f}" for n, t in rows[:10]), flush=True)
