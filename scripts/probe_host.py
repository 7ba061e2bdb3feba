"""Developer probe: host (CPU) cost per call of the ATen GEMM variants the sketched layer uses, at a
size where the GPU work is negligible (64 tokens), to see which calls dominate launch overhead."""
import time
import torch
import torch.nn.functional as F

def host(fn, n=300):
    for _ in range(30):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6

dev, dt = "cuda", torch.bfloat16
N, d, r = 64, 8192, 32
x = torch.randn(N, d, device=dev, dtype=dt)
A = torch.randn(d, r, device=dev, dtype=dt)
T = torch.randn(N, 2 * r, device=dev, dtype=dt)
B = torch.randn(2 * r, d, device=dev, dtype=dt)
b = torch.randn(d, device=dev, dtype=dt)
W = torch.randn(d, d, device=dev, dtype=dt)
small = torch.randn(64, 64, device=dev, dtype=dt)
for name, fn in [
    ("empty", lambda: torch.empty(N, r, device=dev, dtype=dt)),
    ("add small", lambda: small + small),
    ("mm x@A", lambda: torch.mm(x, A)),
    ("mm x@A out fp32", lambda: torch.mm(x, A, out_dtype=torch.float32)),
    ("addmm b+T@B", lambda: torch.addmm(b, T, B)),
    ("mm T@B", lambda: torch.mm(T, B)),
    ("F.linear dense", lambda: F.linear(x, W, b)),
    ("mm x^T@T fp32", lambda: torch.mm(x.t(), T, out_dtype=torch.float32)),
]:
    print(f"{name:20s} {host(fn):7.1f} us/call", flush=True)
