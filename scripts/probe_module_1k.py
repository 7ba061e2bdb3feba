"""Developer probe: is RandMultiHeadAttention's causal forward at 1k tokens (bf16, 12 x 64 heads,
M=256) bound by host submission or by the GPU? Prints CPU submit time and total time per call for
the module, the op alone and the module's linears, plus a profiler table of one module call."""
import time
import torch
import panther as pr
from torch.profiler import profile, ProfilerActivity

dev, dt, L = "cuda", torch.bfloat16, 1024
m = pr.nn.RandMultiHeadAttention(768, 12, 256, iscausal=True, device=dev, dtype=dt).eval()
x = torch.randn(1, L, 768, device=dev, dtype=dt)
q = torch.randn(1, 12, L, 64, device=dev, dtype=dt)
W = m.projection_matrix


def measure(name, fn, n=40):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(f"{name:>10}: host submit {1e6 * (t1 - t0) / n:7.1f} us/call, total {1e6 * (t2 - t0) / n:7.1f} us/call")


with torch.no_grad():
    measure("module", lambda: m(x, x, x))
    measure("op", lambda: torch.ops.panther.favor_attention(q, q, q, W, "softmax", True, None))
    measure("4 linears", lambda: [torch.nn.functional.linear(x, m.Wq, m.bq) for _ in range(4)])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            m(x, x, x)
        torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=45))
