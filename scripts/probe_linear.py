"""Developer probe: times SKLinear's CUDA path and its pieces against nn.Linear and the plain
two-GEMM on the issue's headline shape, to see where the time goes (not part of the test suite)."""
import sys
import torch
import panther as pr

def t(fn, reps=20, warm=5, rounds=5):
    """Median over rounds of the mean time of `reps` back-to-back calls (ms)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(rounds):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            fn()
        e.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / reps)
    ts.sort()
    return ts[len(ts) // 2]

torch.backends.cuda.matmul.allow_tf32 = False
dev = "cuda"
for (N, d, L, k) in [(8192, 8192, 1, 16), (4096, 4096, 2, 64), (64, 8192, 1, 16)]:
    for dt in [torch.float32, torch.float16, torch.bfloat16]:
        torch.manual_seed(0)
        lin = torch.nn.Linear(d, d, device=dev, dtype=dt)
        sk = pr.nn.SKLinear(d, d, L, k, W_init=lin.weight, device=dev, dtype=dt)
        x = torch.randn(N, d, device=dev, dtype=dt)
        A = torch.cat([sk.S1s.permute(1, 0, 2).reshape(d, -1), sk.U2s.permute(1, 0, 2).reshape(d, -1)], 1).detach()
        B = (torch.cat([sk.U1s.reshape(-1, d), sk.S2s.reshape(-1, d)], 0) / (2 * L)).detach()
        b = sk.bias.detach()
        with torch.no_grad():
            r = {}
            r["linear"] = t(lambda: lin(x))
            r["sk"] = t(lambda: sk(x))
            r["twogemm"] = t(lambda: torch.addmm(b, x @ A, B))
            if dt != torch.float32:
                r["mm_f32out"] = t(lambda: torch.mm(x, A, out_dtype=torch.float32))
                T = x @ A
                r["mm_lowp"] = t(lambda: torch.mm(x, A))
                TT = torch.cat([T, T], 1)
                BB = torch.cat([B, B], 0)
                r["addmm_k2"] = t(lambda: torch.addmm(b, T, B))
                r["addmm_k4"] = t(lambda: torch.addmm(b, TT, BB))
            # accuracy vs fp64
            W = (torch.einsum('lik,lko->io', sk.S1s.double(), sk.U1s.double()) + torch.einsum('lik,lko->io', sk.U2s.double(), sk.S2s.double())).t() / (2 * L)
            ref = x.double() @ W.t() + b.double()
            e_sk = ((sk(x).double() - ref).norm() / ref.norm()).item()
            e_lin = ((torch.nn.functional.linear(x, W.to(dt), b).double() - ref).norm() / ref.norm()).item()
        xg = x.clone().requires_grad_()
        gy = torch.randn_like(x)
        def fb(m):
            xg.grad = None
            y = m(xg); y.backward(gy)
        r["linear_fb"] = t(lambda: fb(lin), reps=5, warm=2)
        r["sk_fb"] = t(lambda: fb(sk), reps=5, warm=2)
        print(f"N={N} d={d} L={L} k={k} {str(dt):15s} " + " ".join(f"{kk}={v:.4f}" for kk, v in r.items())
              + f" | relerr sk={e_sk:.2e} lin={e_lin:.2e}", flush=True)
