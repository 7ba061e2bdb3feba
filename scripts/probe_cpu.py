"""Developer probe: where the host time of SKLinear forward+backward goes on CUDA (64 tokens)."""
import time
import torch
import panther as pr
from torch.profiler import profile, ProfilerActivity

dev, dt = "cuda", torch.bfloat16
N, d, L, k = 64, 8192, 1, 16
torch.manual_seed(0)
sk = pr.nn.SKLinear(d, d, L, k, device=dev, dtype=dt)
lin = torch.nn.Linear(d, d, device=dev, dtype=dt)
x = torch.randn(N, d, device=dev, dtype=dt, requires_grad=True)
g = torch.randn(N, d, device=dev, dtype=dt)

def host(fn, n=200):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6

for name, m in [("linear", lin), ("sk", sk)]:
    def fwd():
        return m(x)
    def fb():
        x.grad = None
        m(x).backward(g)
    with torch.no_grad():
        print(name, "fwd no_grad us", round(host(fwd), 1))
    print(name, "fwd grad us", round(host(fwd), 1))
    print(name, "fwd+bwd us", round(host(fb), 1))
    y = m(x)
    def bwd_only():
        torch.autograd.grad(y, [x], g, retain_graph=True)
    print(name, "autograd.grad(x) us", round(host(bwd_only), 1))

with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(10):
        x.grad = None
        sk(x).backward(g)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
