"""Developer probe: cuBLAS variants of the two skinny GEMMs of the sketched layer (bf16, 8192^2)."""
import torch
import torch.nn.functional as F

def t(fn, reps=50, warm=10):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2] * 1000

dev, dt = "cuda", torch.bfloat16
for (N, d, r) in [(8192, 8192, 32), (8192, 8192, 64), (64, 8192, 32), (4096, 4096, 256)]:
    x = torch.randn(N, d, device=dev, dtype=dt)
    A = torch.randn(d, r, device=dev, dtype=dt)
    T = torch.randn(N, 2 * r, device=dev, dtype=dt)
    B = torch.randn(2 * r, d, device=dev, dtype=dt)
    Bt = B.t().contiguous()
    b = torch.randn(d, device=dev, dtype=dt)
    res = {}
    res["copy_rw"] = t(lambda: x.clone())
    y = torch.empty_like(x)
    res["fill_w"] = t(lambda: y.fill_(1.0))
    res["g1_mm"] = t(lambda: torch.mm(x, A))
    res["g1_mm_f32"] = t(lambda: torch.mm(x, A, out_dtype=torch.float32))
    res["g1_tt"] = t(lambda: torch.mm(A.t(), x.t()))
    for s in (2, 4, 8, 16):
        if d % s == 0:
            xs = x.view(N, s, d // s).transpose(0, 1)
            As = A.view(s, d // s, r)
            res[f"g1_bmm{s}"] = t(lambda: torch.bmm(xs, As))
            try:
                res[f"g1_bmm{s}_f32"] = t(lambda: torch.bmm(xs, As, out_dtype=torch.float32))
            except Exception as e:
                res[f"g1_bmm{s}_f32"] = -1
            res[f"g1_bmm{s}+sum"] = t(lambda: torch.bmm(xs, As).sum(0))
    res["g2_mm"] = t(lambda: torch.mm(T, B))
    res["g2_addmm"] = t(lambda: torch.addmm(b, T, B))
    res["g2_linear"] = t(lambda: F.linear(T, Bt, b))
    res["g2_tt"] = t(lambda: torch.mm(Bt, T.t()))
    out = torch.empty(N, d, device=dev, dtype=dt)
    res["g2_addmm_out"] = t(lambda: torch.addmm(b, T, B, out=out))
    mb = N * d * 2 / 1e6
    print(f"N={N} d={d} r={r} x={mb:.0f}MB  " + " ".join(f"{k}={v:.1f}us" for k, v in res.items()), flush=True)
