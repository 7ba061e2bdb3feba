"""Kernel profile (developer tool, not part of the suite): GPU time per kernel, and host submit vs
total time, of the calls whose targets are missed: SKLinear bf16 forward at 8192 tokens,
SKLinear bf16 forward+backward at 64 tokens, causal favor_attention forward+backward at 16k
(bf16, 12 x 64 heads, M=256) and the RandMultiHeadAttention forward at 1k. ``decode``: the
kernels of one 12-layer decoding step (RandMultiHeadAttention.step_, eager and replayed from a
CUDA graph), the graph time of the fused step op alone, of the two projections alone, of the
layer op against the same step without it (q/k/v GEMM, step op, output GEMM), and exact
attention with a 64k KV cache. ``encoder``: the BERT-base-shaped encoder of
bench_models.py (dense, every Linear at L=1 k=64, the zero-cost-Linear bound): host submit
against wall time of a training step and of inference, and the kernels of each. ``shapes``: kernels of
SKLinear, nn.Linear and the plain two-GEMM fwd+bwd at transformer widths (PROBE_SHAPES, entries
d_in x d_out x tokens, default 768x768x4096,768x768x16384,4096x4096x16384; L=1 k=64), with the
latency of one call on an idle GPU and the host submit / total time of 200 back-to-back calls.
``host``: where the host time of one SKLinear and one plain two-GEMM fwd+bwd goes at
768x768x16384 (the CPU profiler's table), and host submit / total time of each GEMM those calls
make, alone, with cuBLAS and with cuBLASLt preferred. ``short``: the op's and the module's
forward at 1k-4k tokens (PROBE_LENGTHS) against SDPA and the exact module, eager and replayed from
a CUDA graph, with the op's kernels; fwd+bwd kernels at 4k.
Usage: python3 scripts/gpu/profile_kernels.py [linear] [attention] [module] [short] [shapes] [decode] [encoder] [host]
(default: linear attention module)"""
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import panther as pr

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench", "python"))
import common as C  # noqa: E402

dev, dt = "cuda", torch.bfloat16


def timing(name, fn, n=30):
    h, t = C.host_and_total_us(fn, torch.device(dev), n, warmup=5)
    print(f"{name}: host submit {h:8.1f} us/call, total {t:8.1f} us/call")


def latency(name, fn, n=30):
    """One call between two events on an idle GPU, as bench/python times it (median)."""
    for _ in range(5):
        fn()
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) * 1e3)
    ts.sort()
    print(f"{name}: single-call latency median {ts[len(ts) // 2]:8.1f} us, min {ts[0]:8.1f} us")


def kernels(name, fn, reps=5, top=12):
    rows = C.kernel_rows(fn, reps)
    total = sum(r[1] for r in rows)
    print(f"-- {name}: GPU kernel time per call {total:.1f} us, {sum(r[2] for r in rows):.0f} kernels")
    for k, t, c in rows[:top]:
        print(f"   {t:9.1f} us  x{c:<5.1f} {t / max(c, 1e-9):7.2f} us each  {k[:90]}")


def replay_time(name, fn, n=50):
    """Back-to-back replays of fn (e.g. a CUDA graph's replay) between two events, per call."""
    t = C.back_to_back_us(fn, n, warmup=5)[0]
    print(f"{name}: {t:8.1f} us per call (back to back)")


SECTIONS = sys.argv[1:] or ["linear", "attention", "module"]
torch.manual_seed(0)

if "linear" in SECTIONS:
    sk = pr.nn.SKLinear(8192, 8192, 1, 16, device=dev, dtype=dt)
    lin = torch.nn.Linear(8192, 8192, device=dev, dtype=dt)
    x = torch.randn(8192, 8192, device=dev, dtype=dt)
    with torch.no_grad():
        kernels("SKLinear fwd N=8192", lambda: sk(x))
        latency("SKLinear fwd N=8192", lambda: sk(x))
        kernels("nn.Linear fwd N=8192", lambda: lin(x))
    x64 = torch.randn(64, 8192, device=dev, dtype=dt, requires_grad=True)
    g64 = torch.randn(64, 8192, device=dev, dtype=dt)
    sk_params = [x64] + list(sk.parameters())
    lin_params = [x64] + list(lin.parameters())
    fb_sk = lambda: torch.autograd.grad(sk(x64), sk_params, g64)  # noqa: E731
    fb_lin = lambda: torch.autograd.grad(lin(x64), lin_params, g64)  # noqa: E731
    timing("SKLinear fwd+bwd N=64", fb_sk)
    timing("nn.Linear fwd+bwd N=64", fb_lin)
    latency("SKLinear fwd+bwd N=64", fb_sk)
    latency("nn.Linear fwd+bwd N=64", fb_lin)
    with torch.no_grad():
        latency("SKLinear fwd N=64", lambda: sk(x64))
        latency("nn.Linear fwd N=64", lambda: lin(x64))
        kernels("SKLinear fwd N=64", lambda: sk(x64))
    kernels("SKLinear fwd+bwd N=64", fb_sk)

if "shapes" in SECTIONS:
    spec = os.environ.get("PROBE_SHAPES", "768x768x4096,768x768x16384,4096x4096x16384")
    for item in spec.split(","):
        d_in, d_out, n = (int(t) for t in item.split("x"))
        sk = pr.nn.SKLinear(d_in, d_out, 1, 64, device=dev, dtype=dt)
        lin = torch.nn.Linear(d_in, d_out, device=dev, dtype=dt)
        A = torch.randn(d_in, 128, device=dev, dtype=dt, requires_grad=True)
        B = torch.randn(128, d_out, device=dev, dtype=dt, requires_grad=True)
        b = torch.zeros(d_out, device=dev, dtype=dt, requires_grad=True)
        x = torch.randn(n, d_in, device=dev, dtype=dt, requires_grad=True)
        g = torch.randn(n, d_out, device=dev, dtype=dt)
        cases = {
            "SKLinear": (lambda: sk(x), [x, *sk.parameters()]),
            "nn.Linear": (lambda: lin(x), [x, *lin.parameters()]),
            "two-GEMM": (lambda: torch.addmm(b, x @ A, B), [x, A, B, b]),
        }
        for name, (f, params) in cases.items():
            fb = lambda f=f, params=params: torch.autograd.grad(f(), params, g)  # noqa: E731
            with torch.no_grad():
                latency(f"{name} fwd {item}", f)
                timing(f"{name} fwd {item}", f, n=200)
            latency(f"{name} fwd+bwd {item}", fb)
            timing(f"{name} fwd+bwd {item}", fb, n=200)
            kernels(f"{name} fwd+bwd {item}", fb)

if "host" in SECTIONS:
    n, d_in, d_out, r = 16384, 768, 768, 128
    sk = pr.nn.SKLinear(d_in, d_out, 1, 64, device=dev, dtype=dt)
    A = torch.randn(d_in, r, device=dev, dtype=dt, requires_grad=True)
    B = torch.randn(r, d_out, device=dev, dtype=dt, requires_grad=True)
    b = torch.zeros(d_out, device=dev, dtype=dt, requires_grad=True)
    x = torch.randn(n, d_in, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(n, d_out, device=dev, dtype=dt)
    for name, f, params in (("SKLinear", lambda: sk(x), [x, *sk.parameters()]),
                            ("two-GEMM", lambda: torch.addmm(b, x @ A, B), [x, A, B, b])):
        fb = lambda f=f, params=params: torch.autograd.grad(f(), params, g)  # noqa: E731
        timing(f"{name} fwd+bwd", fb, n=100)
        fb()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fb()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    T = torch.randn(n, r, device=dev, dtype=dt)
    W = torch.randn(d_out, d_in, device=dev, dtype=dt)
    Ts = torch.randn(n, r + 8, device=dev, dtype=dt)[:, :r]
    gemms = {
        "x A (N x d_in x 2Lk)": lambda: x.detach() @ A.detach(),
        "T B + b (addmm, N x 2Lk x d_out)": lambda: torch.addmm(b.detach(), T, B.detach()),
        "T B (mm)": lambda: T @ B.detach(),
        "g B^T (N x d_out x 2Lk)": lambda: g @ B.detach().t(),
        "gT A^T (N x 2Lk x d_in)": lambda: T @ A.detach().t(),
        "x^T gT (d_in x N x 2Lk)": lambda: x.detach().t() @ T,
        "Ts^T g, ld 2Lk+8 (2Lk x N x d_out)": lambda: Ts.t() @ g,
        "x^T g (nn.Linear dW, d_in x N x d_out)": lambda: x.detach().t() @ g,
        "g W (nn.Linear dx)": lambda: g @ W,
        "g.sum(0) (nn.Linear db)": lambda: g.sum(0),
    }
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        with torch.no_grad():
            for name, f in gemms.items():
                timing(f"[{lib}] {name}", f, n=200)
    torch.backends.cuda.preferred_blas_library("cublas")

op = torch.ops.panther.favor_attention
if "attention" in SECTIONS:
    for L in [int(s) for s in os.environ.get("PROBE_LENGTHS", "16384").split(",")]:
        q, k, v = (torch.randn(1, 12, L, 64, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
        W = torch.randn(256, 64, device=dev, dtype=dt)
        go = torch.randn(1, 12, L, 64, device=dev, dtype=dt)
        kernels(f"favor causal fwd+bwd {L}", lambda: torch.autograd.grad(op(q, k, v, W, "softmax", True, None), [q, k, v], go))

if "module" in SECTIONS:
    m = pr.nn.RandMultiHeadAttention(768, 12, 256, iscausal=True, device=dev, dtype=dt)
    x1 = torch.randn(1, 1024, 768, device=dev, dtype=dt)
    with torch.no_grad():
        timing("module causal fwd 1k", lambda: m(x1, x1, x1))
        q1 = torch.randn(1, 12, 1024, 64, device=dev, dtype=dt)
        timing("op causal fwd 1k", lambda: op(q1, q1, q1, m.projection_matrix, "softmax", True, None))
        timing("1 linear 1k", lambda: F.linear(x1, m.Wq, m.bq))
        latency("module causal fwd 1k", lambda: m(x1, x1, x1))
        latency("op causal fwd 1k", lambda: op(q1, q1, q1, m.projection_matrix, "softmax", True, None))
        latency("SDPA causal fwd 1k", lambda: F.scaled_dot_product_attention(q1, q1, q1, is_causal=True))
        latency("empty (events only)", lambda: None)
        kernels("module causal fwd 1k", lambda: m(x1, x1, x1))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                m(x1, x1, x1)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=16, max_name_column_width=50))

    # The module at 1k as bench_attention.py times it: round-robin with the other implementations
    # (no synchronisation between them), and alone.
    mha = torch.nn.MultiheadAttention(768, 12, batch_first=True, device=dev, dtype=dt)
    mask = torch.ones(1024, 1024, dtype=torch.bool, device=dev).triu(1)
    fns = {
        "mha": lambda: mha(x1, x1, x1, need_weights=False, attn_mask=mask, is_causal=True)[0],
        "rmha": lambda: m(x1, x1, x1)[0],
        "sdpa": lambda: F.scaled_dot_product_attention(q1, q1, q1, is_causal=True),
        "favor": lambda: op(q1, q1, q1, m.projection_matrix, "softmax", True, None),
    }
    with torch.no_grad():
        for names in (["mha", "rmha", "sdpa", "favor"], ["rmha", "mha", "sdpa", "favor"], ["rmha"], ["sdpa", "rmha"]):
            t = C.time_fns({k: fns[k] for k in names}, torch.device(dev), warmup=3, reps=25, min_reps=3, budget_s=0.4)
            print("round-robin", names, {k: round(v.median_ms * 1e3, 1) for k, v in t.items()}, "us")

if "short" in SECTIONS:
    # Short and medium sequences (PROBE_LENGTHS, default 1024,2048,4096): the op's and the
    # module's forward against SDPA and the exact module (fused qkv Linear, SDPA, out Linear),
    # eager (host submit vs total) and replayed from a CUDA graph, and the op's kernels.
    sys.path.insert(0, "bench/python")
    import bench_models as BM  # noqa: E402

    for L in [int(s) for s in os.environ.get("PROBE_LENGTHS", "1024,2048,4096").split(",")]:
        for causal in (True, False):
            tag = f"{'causal' if causal else 'full'} {L}"
            q, k, v = (torch.randn(1, 12, L, 64, device=dev, dtype=dt) for _ in range(3))
            m = pr.nn.RandMultiHeadAttention(768, 12, 256, iscausal=causal, device=dev, dtype=dt)
            exact = BM.ExactAttention(768, 12, causal=causal, fused_qkv=True, device=dev, dtype=dt)
            x = torch.randn(1, L, 768, device=dev, dtype=dt)
            P = m.projection_matrix
            fns = {
                "favor op fwd": lambda: op(q, k, v, P, "softmax", causal, None),
                "SDPA fwd": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                "RandMHA fwd": lambda: m(x, x, x)[0],
                "exact module fwd": lambda: exact(x),
            }
            with torch.no_grad():
                kernels(f"favor op fwd {tag}", fns["favor op fwd"])
                for name, f in fns.items():
                    timing(f"{name} {tag} eager", f)
                    try:
                        replay_time(f"{name} {tag} CUDA graph", BM._graphed(f, torch.device(dev)))
                    except Exception as e:  # noqa: BLE001 (a capture failure is a finding)
                        print(f"{name} {tag} CUDA graph: capture failed: {type(e).__name__}: {str(e)[:200]}")
            if L == 4096:
                qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
                go = torch.randn_like(q)
                fb = lambda: torch.autograd.grad(op(qg, kg, vg, P, "softmax", causal, None), [qg, kg, vg], go)  # noqa: E731
                fbs = lambda: torch.autograd.grad(F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal),  # noqa: E731
                                                  [qg, kg, vg], go)
                kernels(f"favor op fwd+bwd {tag}", fb, top=16)
                timing(f"favor op fwd+bwd {tag} eager", fb)
                timing(f"SDPA fwd+bwd {tag} eager", fbs)

if "decode" in SECTIONS or "encoder" in SECTIONS:
    sys.path.insert(0, "bench/python")
    import bench_models as BM  # noqa: E402

if "decode" in SECTIONS:
    d, H, nl = 768, 12, 12
    layers, states = [], []
    with torch.no_grad():
        prompt = torch.randn(1, 64, d, device=dev, dtype=dt)
        for _ in range(nl):
            layer = pr.nn.RandMultiHeadAttention(d, H, 256, iscausal=True, device=dev, dtype=dt).eval()
            layers.append(layer)
            states.append(layer.prefill(prompt)[1])
        x_t = torch.randn(1, 1, d, device=dev, dtype=dt)
        step = lambda: [m.step_(x_t, st) for m, st in zip(layers, states)]  # noqa: E731
        kernels("decode step, 12 layers, eager", step, top=16)
        timing("decode step, 12 layers, eager", step)
        graphed = BM._graphed(step, torch.device(dev))
        replay_time("decode step, 12 layers, CUDA graph", graphed)
        kernels("decode step, 12 layers, CUDA graph replay", graphed, top=16)
        m0, st0 = layers[0], states[0]
        qkv = (m0.Wq, m0.Wk, m0.Wv, m0.bq, m0.bk, m0.bv)
        Wqkv, bqkv = torch.cat(qkv[:3]), torch.cat(qkv[3:])
        x = x_t[:, 0]
        q, k, v = F.linear(x, Wqkv, bqkv).view(1, 3, H, d // H).unbind(1)
        P = m0.projection_matrix
        step_op = lambda: [torch.ops.panther._favor_decode_step_(  # noqa: E731
            q, k, v, P, m0.kernel_fn, st0.kv, st0.v_sum, st0.stabiliser) for _ in range(nl)]
        replay_time("12 fused step ops alone, CUDA graph", BM._graphed(step_op, torch.device(dev)))
        def unfused():  # the layer's step without the layer kernel: q/k/v GEMM, step op, output GEMM
            outs = []
            for _ in range(nl):
                q3 = F.linear(x, Wqkv, bqkv).view(1, 3, H, d // H).unbind(1)
                ctx = torch.ops.panther._favor_decode_step_(*q3, P, m0.kernel_fn, st0.kv, st0.v_sum,
                                                            st0.stabiliser, st0.length)
                outs.append(F.linear(ctx.reshape(1, d), m0.W0, m0.b0))
            return outs

        layer_op = lambda: [torch.ops.panther._favor_decode_layer_(  # noqa: E731
            x, *qkv, P, m0.kernel_fn, m0.W0, m0.b0, st0.kv, st0.v_sum, st0.stabiliser, st0.length)
            for _ in range(nl)]
        for name, f in (("12 x (q/k/v GEMM + step op + output GEMM)", unfused),
                        ("12 layer ops (cluster kernel + output kernel)", layer_op)):
            replay_time(f"{name}, CUDA graph", BM._graphed(f, torch.device(dev)))
            kernels(f"{name}, CUDA graph replay", BM._graphed(f, torch.device(dev)), top=6)
        os.environ["PANTHER_PORTABLE_KERNELS"] = "1"  # the output kernel as a plain launch
        replay_time("12 layer ops, no programmatic dependent launch, CUDA graph",
                    BM._graphed(layer_op, torch.device(dev)))
        del os.environ["PANTHER_PORTABLE_KERNELS"]
        proj = lambda: [F.linear(F.linear(x, Wqkv, bqkv)[:, :d], m0.W0, m0.b0) for _ in range(nl)]  # noqa: E731
        replay_time("12 x (q/k/v + output projection) alone, CUDA graph", BM._graphed(proj, torch.device(dev)))
        length = lambda: [st0.length.add_(1) for _ in range(nl)]  # noqa: E731
        replay_time("12 length increments alone, CUDA graph", BM._graphed(length, torch.device(dev)))
        exact = [BM.KVCacheAttention(d, H, 65537, dev, dt) for _ in range(nl)]
        exact_step = lambda: [m.step(x_t) for m in exact]  # noqa: E731
        kernels("exact attention step, 64k KV cache, eager", exact_step)
        replay_time("exact attention step, 64k KV cache, CUDA graph", BM._graphed(exact_step, torch.device(dev)))
        del exact

if "encoder" in SECTIONS:
    spec = BM.ENCODER
    B, S, d = spec["batch"], spec["seq"], spec["d"]
    torch.manual_seed(0)
    kw = dict(heads=spec["heads"], ffn=spec["ffn"], causal=spec["causal"], fused_qkv=spec["fused_qkv"], device=dev)
    x = torch.randn(B, S, d, device=dev, dtype=dt)
    gy = torch.randn(B, S, d, device=dev, dtype=dt)
    base = BM.Stack(spec["layers"], d, dtype=dt, **kw)
    variants = [BM.Variant("dense", base, x, gy), BM.Variant("SK L=1 k=64", BM.sketched(base, 1, 64), x, gy),
                BM.Variant("zero-cost Linear (bound)", BM.zero_cost(base, (B, S)), x, gy)]
    for var in variants:
        timing(f"encoder {var.name} train step", var.train_step, n=10)
        timing(f"encoder {var.name} inference", var.infer, n=10)
    for var in variants[:2]:
        kernels(f"encoder {var.name} train step", var.train_step, reps=3, top=20)
        kernels(f"encoder {var.name} inference", var.infer, reps=3, top=10)
