"""Developer probe: one causal bf16 favor_attention forward + backward (B=1, 12 x 64 heads,
M=256) for a kernel profiler (ncu) to catch. Usage: python scripts/probe_fused_once.py [L]"""
import sys
import torch
import panther  # noqa: F401  (loads the ops)

L = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
q, k, v = (torch.randn(1, 12, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
W = torch.randn(256, 64, device="cuda")
out = torch.ops.panther.favor_attention(q, k, v, W, "softmax", True, None)
torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
torch.cuda.synchronize()
print("ok", L)
