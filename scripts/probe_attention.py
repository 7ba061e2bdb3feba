"""Developer probe: profiler breakdown (GPU time per kernel) of causal favor_attention, bf16."""
import sys
import torch
import panther as pr
from torch.profiler import profile, ProfilerActivity

L = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
dev, dt = "cuda", torch.bfloat16
B, H, D, M = 1, 12, 64, 256
q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
W = torch.randn(M, D, device=dev)
g = torch.randn(B, H, L, D, device=dev, dtype=dt)
for causal in (True,):
    def fb():
        out = torch.ops.panther.favor_attention(q, k, v, W, "softmax", causal, None)
        torch.autograd.grad(out, (q, k, v), g)
    for _ in range(2):
        fb()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fb()
        torch.cuda.synchronize()
    print(f"L={L} causal={causal}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=50))
