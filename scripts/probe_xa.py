"""Developer probe (not part of the suite): GPU time of SKLinear's many-token bf16 forward kernels
for each tiling of sketch_xa.cuh (PANTHER_XA_CFG, a temporary switch), against cuBLAS's x @ A."""
import os

import torch
from torch.profiler import ProfilerActivity, profile

import panther as pr

dev, dt = "cuda", torch.bfloat16
torch.manual_seed(0)
sk = pr.nn.SKLinear(8192, 8192, 1, 16, device=dev, dtype=dt)
x = torch.randn(8192, 8192, device=dev, dtype=dt)
A = torch.randn(8192, 32, device=dev, dtype=dt)


def gpu_times(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return {e.key[:60]: e.device_time_total / reps for e in prof.key_averages() if e.device_time_total > 0}


def events(fn, reps=20):
    for _ in range(3):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps * 1e3


At = A.t().contiguous()
f32 = torch.float32
variants = {
    "x @ A -> bf16": lambda: torch.mm(x, A),
    "x @ A -> fp32": lambda: torch.mm(x, A, out_dtype=f32),
    "A^T @ x^T -> fp32": lambda: torch.mm(A.t(), x.t(), out_dtype=f32),
    "x @ At^T -> fp32": lambda: torch.mm(x, At.t(), out_dtype=f32),
    "At @ x^T -> fp32": lambda: torch.mm(At, x.t(), out_dtype=f32),
}
for name, fn in variants.items():
    try:
        print(f"cuBLAS {name}:", {k: round(v, 1) for k, v in gpu_times(fn).items()})
    except Exception as e:  # noqa: BLE001
        print(f"cuBLAS {name}: {type(e).__name__}: {e}")
with torch.no_grad():
    for cfg in ["0", "1", "6", "7"]:
        os.environ["PANTHER_XA_CFG"] = cfg
        t = gpu_times(lambda: sk(x))
        xa = sum(v for k, v in t.items() if "xa_saved" in k)
        print(f"cfg {cfg}: xa kernel {xa:6.1f} us ({128 * 2**20 / xa / 1e6:.2f} TB/s), "
              f"forward back-to-back {events(lambda: sk(x)):6.1f} us")
