"""Developer probe: profiler breakdown of SKLinear forward+backward on CUDA (bf16)."""
import torch
import panther as pr
from torch.profiler import profile, ProfilerActivity

dev, dt = "cuda", torch.bfloat16
for (N, d, L, k) in [(8192, 8192, 1, 16), (64, 8192, 1, 16)]:
    torch.manual_seed(0)
    sk = pr.nn.SKLinear(d, d, L, k, device=dev, dtype=dt)
    x = torch.randn(N, d, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(N, d, device=dev, dtype=dt)
    def fb():
        y = sk(x); y.backward(g)
    for _ in range(5):
        fb()
    torch.cuda.synchronize()
    # throughput timing: 20 back-to-back calls between two events
    for name, fn in [("fwd", lambda: sk(x)), ("fwd+bwd", fb)]:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(20):
            fn()
        e.record(); torch.cuda.synchronize()
        print(f"N={N} {name}: {s.elapsed_time(e)/20*1000:.1f} us/iter (back-to-back)")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fb()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
