"""A/B timing (developer tool for gpu_ab.sh, not part of the suite): causal favor_attention (bf16,
B=1, 12 x 64 heads, M=256) against SDPA at a few lengths, fwd and fwd+bwd, medians of CUDA-event
timings with the two measured round-robin (common.time_fns, as bench_attention.py); then GPU
time per kernel of the op's fwd+bwd. Run once per build (scripts/gpu/gpu_ab.sh runs it for two
builds of the same tree, A/B).
Usage: python3 scripts/gpu/ab_timing.py [LABEL]    env: PROBE_LENGTHS (default 8192,16384)"""
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

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
    fb()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fb()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 5) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    print(f"[{label}] L={L} kernels (us per fwd+bwd): " + ", ".join(f"{n.split('<')[0].split('(')[0][-28:]} {t:.0f}" for n, t in rows[:10]), flush=True)
