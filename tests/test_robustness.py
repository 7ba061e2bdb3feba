"""Bad input, odd input and long runs: Panther must never corrupt a model.

* Bad input (dtype or device mismatch, wrong ranks and shapes, 0-d input, wrong masks, absurd
  sizes) raises a clear error naming the argument, before any huge allocation, and leaves the
  module's parameters, buffers and gradients untouched.
* NaN/inf in the input propagate exactly where the equivalent dense ``nn.Linear`` produces them.
* Numerical safety under autocast (bf16 / fp16 with GradScaler) and with large attention inputs.
* Memory: autograd keeps only the input and the small (tokens x 2Lk) intermediate; 10,000 training
  steps leave resident memory flat.
* Thread safety in inference and determinism under ``torch.use_deterministic_algorithms(True)``.

Attention parts run when ``pr.nn.RandMultiHeadAttention`` / ``torch.ops.panther.favor_attention``
exist and are skipped with the reason otherwise.
"""

from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from torch import nn

import panther as pr

pytestmark = pytest.mark.filterwarnings("ignore:.*sketch numbers:UserWarning")

HAS_ATTN = hasattr(pr.nn, "RandMultiHeadAttention")
HAS_FAVOR_OP = hasattr(torch.ops.panther, "favor_attention")
needs_attn = pytest.mark.skipif(
    not HAS_ATTN, reason="pr.nn.RandMultiHeadAttention is not in this build (attention issue not merged yet)"
)
needs_favor_op = pytest.mark.skipif(
    not HAS_FAVOR_OP, reason="torch.ops.panther.favor_attention is not in this build (attention issue not merged yet)"
)
op = torch.ops.panther.sketched_linear


@pytest.fixture
def one_thread():
    """Loops of tiny ops run in one intra-op thread: on a busy 2-core machine, OpenMP's barriers
    otherwise cost ~10x (nn.Linear alike); the numbers tested do not depend on it."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_unchanged(m: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = m.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} changed by a failed call"
    for n, p in m.named_parameters():
        assert p.grad is None, f"{n}.grad set by a failed call"


def _run(code: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---- bad input: clear errors naming the argument, state untouched ------------------------------


def test_dtype_mismatch_names_argument_and_remedy():
    layer = pr.nn.SKLinear(8, 6, 2, 3)
    before = _snapshot(layer)
    for dt in (torch.float64, torch.float16, torch.bfloat16):
        with pytest.raises(RuntimeError, match=r"S1s must have the input's dtype .*layer\.to\(dtype\)"):
            layer(torch.randn(4, 8, dtype=dt))
    with pytest.raises(RuntimeError, match="input must be float64, float32, float16 or bfloat16, got Long"):
        layer(torch.randint(0, 3, (4, 8)))
    # Operands of the op disagreeing among themselves are named too.
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="U2s must have the input's dtype"):
        op(x, layer.S1s, layer.S2s, layer.U1s, layer.U2s.double(), None)
    with pytest.raises(RuntimeError, match="bias must have the input's dtype"):
        op(x, layer.S1s, layer.S2s, layer.U1s, layer.U2s, layer.bias.double())
    _assert_unchanged(layer, before)


def test_device_mismatch_names_argument():
    """meta vs cpu stands in for cuda vs cpu on a machine without a GPU."""
    layer = pr.nn.SKLinear(8, 6, 2, 3)
    before = _snapshot(layer)
    with pytest.raises(RuntimeError, match="S1s must be on the input's device meta, got cpu"):
        layer(torch.randn(4, 8, device="meta"))
    meta_layer = pr.nn.SKLinear(8, 6, 2, 3, device="meta")
    with pytest.raises(RuntimeError, match="S1s must be on the input's device cpu, got meta"):
        meta_layer(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="U1s must be on the input's device cpu, got meta"):
        op(torch.randn(4, 8), layer.S1s, layer.S2s, layer.U1s.to("meta"), layer.U2s, None)
    _assert_unchanged(layer, before)


@pytest.mark.cuda
def test_device_mismatch_cuda():
    layer = pr.nn.SKLinear(8, 6, 2, 3)
    with pytest.raises(RuntimeError, match="must be on the input's device cuda"):
        layer(torch.randn(4, 8, device="cuda"))
    with pytest.raises(RuntimeError, match=r"must be on the input's device cpu, got cuda"):
        layer.cuda()(torch.randn(4, 8))


def test_wrong_ranks_and_shapes_name_the_tensor():
    layer = pr.nn.SKLinear(8, 6, 2, 3)
    S1, S2, U1, U2, b = layer.S1s, layer.S2s, layer.U1s, layer.U2s, layer.bias
    x = torch.randn(4, 8)
    cases = [
        ((x, S1[0], S2, U1, U2, b), r"S1s must be 3-d \(num_terms, d_in, low_rank\), got shape \(8, 3\)"),
        ((x, S1, S2[0], U1, U2, b), r"S2s must be 3-d \(num_terms, low_rank, d_out\), got shape \(3, 6\)"),
        ((x, S1, S2, U1[0], U2, b), r"U1s must have shape \(num_terms, low_rank, d_out\) = \(2, 3, 6\), got \(3, 6\)"),
        ((x, S1, S2, U1, U2.transpose(1, 2), b), r"U2s must have shape \(num_terms, d_in, low_rank\)"),
        ((x, S1, S2, U1, U2, b[None]), r"bias must have shape \(d_out,\) = \(6,\), got \(1, 6\)"),
        ((x[:, :7], S1, S2, U1, U2, b), r"input last dim must be d_in=8 \(from S1s\), got 7"),
        ((torch.tensor(1.0), S1, S2, U1, U2, b), "input must have at least 1 dimension"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)
    # The same checks run in the Meta kernel (torch.compile / export see the same errors).
    with pytest.raises(RuntimeError, match="S1s must be 3-d"):
        op(x.to("meta"), S1[0].to("meta"), S2.to("meta"), U1.to("meta"), U2.to("meta"), None)


def test_module_input_errors():
    layer = pr.nn.SKLinear(8, 6, 2, 3)
    before = _snapshot(layer)
    with pytest.raises(ValueError, match="SKLinear: input must have at least 1 dimension.*0-d"):
        layer(torch.tensor(1.0))
    with pytest.raises(ValueError, match="SKLinear: input last dim must be in_features=8, got 7"):
        layer(torch.randn(2, 7))
    _assert_unchanged(layer, before)
    for bad, name in [(0, "in_features"), (-1, "out_features"), (1.5, "num_terms"), (True, "low_rank")]:
        args = {"in_features": 8, "out_features": 6, "num_terms": 2, "low_rank": 3}
        args[name] = bad
        with pytest.raises(ValueError, match=f"SKLinear: {name} must be a positive integer"):
            pr.nn.SKLinear(**args)


def test_absurd_sizes_raise_before_allocating():
    """Runs in a child process whose address space is capped at ~2 GiB above what it already
    maps: an attempted allocation of the sizes below would fail there with an allocator error
    (not the ValueError asserted), instead of eating this machine's memory."""
    code = """
        import resource, warnings, psutil, torch, panther as pr
        warnings.simplefilter("ignore")
        vms = psutil.Process().memory_info().vms
        resource.setrlimit(resource.RLIMIT_AS, (vms + 2 * 2**30, resource.RLIM_INFINITY))
        for args in [(10**9, 10**9, 1, 16), (16, 16, 1, 10**12), (2**40, 2**40, 1, 1), (10**6, 10**6, 10**7, 10**7)]:
            try:
                pr.nn.SKLinear(*args)
                print("NO ERROR", args)
            except ValueError as e:
                print("ValueError:", e)
        # Meta-device construction (deferred initialisation, e.g. for FSDP) allocates nothing.
        m = pr.nn.SKLinear(10**6, 10**6, 1, 16, device="meta")
        print("META OK", tuple(m.S1s.shape))
    """
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 5, proc.stdout + proc.stderr[-2000:]
    assert lines[0].startswith("ValueError: SKLinear(in_features=1000000000, out_features=1000000000, num_terms=1, low_rank=16) needs")
    assert "GiB of memory on device cpu" in lines[0]
    assert "low_rank=1000000000000" in lines[1]
    assert lines[2].startswith("ValueError: SKLinear: initial dense weight (out_features, in_features)")
    assert "more elements than a tensor can hold" in lines[2]
    assert "num_terms=10000000" in lines[3] and lines[3].startswith("ValueError")
    assert lines[4] == "META OK (1, 1000000, 16)"


@needs_attn
def test_attention_mask_errors():
    attn = pr.nn.RandMultiHeadAttention(16, 2, 8)
    before = _snapshot(attn)
    x = torch.randn(2, 5, 16)
    for kw in ("key_padding_mask", "attention_mask"):
        for bad in (torch.zeros(2, 6, dtype=torch.bool), torch.zeros(3, 5, dtype=torch.bool), torch.zeros(2, 5, 5, 2)):
            with pytest.raises((ValueError, RuntimeError), match="mask"):
                attn(x, x, x, **{kw: bad})
    for bad_x in (torch.randn(2, 5, 15), torch.randn(5, 16, dtype=torch.float64).expand(2, 5, 16), torch.tensor(1.0)):
        with pytest.raises((ValueError, RuntimeError)):
            attn(bad_x, bad_x, bad_x)
    _assert_unchanged(attn, before)


@needs_favor_op
def test_favor_op_argument_errors():
    fa = torch.ops.panther.favor_attention
    q = torch.randn(2, 3, 5, 4)
    proj = torch.randn(8, 4)
    with pytest.raises(RuntimeError, match="key_padding_mask"):
        fa(q, q, q, proj, "softmax", False, torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="projection"):
        fa(q, q, q, torch.randn(8, 5), "softmax", False, None)
    with pytest.raises(RuntimeError, match="kernel"):
        fa(q, q, q, proj, "gaussian", False, None)
    with pytest.raises(RuntimeError, match="dtype"):
        fa(q, q.double(), q, proj, "softmax", False, None)
    with pytest.raises(RuntimeError):
        fa(q[0], q[0], q[0], proj, "softmax", False, None)  # 3-d, not (B, H, L, D)
    # A non-bool mask is either refused by name or read as "True = ignore", never misread.
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[:, 3:] = True
    want = fa(q, q, q, proj, "softmax", False, kpm)
    try:
        got = fa(q, q, q, proj, "softmax", False, kpm.float())
    except RuntimeError as e:
        assert "key_padding_mask" in str(e)
    else:
        torch.testing.assert_close(got, want)


# ---- odd input: NaN / inf propagate like the dense op ------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_inf_propagate_like_dense(dtype):
    layer = pr.nn.SKLinear(16, 8, 2, 3, dtype=dtype)
    dense = nn.Linear(16, 8, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
        dense.bias.copy_(layer.bias)
    x = torch.randn(6, 16, dtype=dtype)
    x[1, 3] = float("nan")
    x[3, 0] = float("inf")
    x[4, 5] = -float("inf")
    x = x.requires_grad_()
    y, yd = layer(x), dense(x)
    assert torch.equal(torch.isfinite(y), torch.isfinite(yd))
    assert bool(torch.isnan(y[1]).all())
    ok = torch.isfinite(yd).all(dim=1)
    assert ok.tolist() == [True, False, True, False, False, True]  # bad rows never leak into others
    torch.testing.assert_close(y[ok], yd[ok])
    y.sum().backward()  # no crash; the input gradient is finite wherever the dense one is
    gx = x.grad.clone()
    x.grad = None
    yd.sum().backward()
    assert torch.equal(torch.isfinite(gx), torch.isfinite(x.grad))


def test_failed_calls_leave_training_intact():
    """After a string of failing calls (forward and backward), a training step gives bitwise the
    same result as on an untouched copy."""
    torch.manual_seed(3)
    model = nn.Sequential(pr.nn.SKLinear(8, 16, 2, 3), nn.ReLU(), pr.nn.SKLinear(16, 4, 1, 2))
    twin = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt_twin = torch.optim.Adam(twin.parameters(), lr=1e-2)
    x, t = torch.randn(5, 8), torch.randn(5, 4)

    def step(m, o):
        o.zero_grad()
        loss = nn.functional.mse_loss(m(x), t)
        loss.backward()
        o.step()
        return loss.detach()

    step(model, opt), step(twin, opt_twin)  # optimizer state exists before the failures
    before = _snapshot(model)
    for bad in (x.double(), x[:, :7], torch.tensor(1.0), x.to("meta"), x.half()):
        with pytest.raises((RuntimeError, ValueError)):
            model(bad)
    y = model(x)
    with pytest.raises(RuntimeError):
        y.backward(torch.ones(5, 5))  # grad of the wrong shape
    with pytest.raises(RuntimeError):
        torch.autograd.grad(y.sum(), [torch.randn(2, requires_grad=True)])  # not in the graph
    for p in model.parameters():
        p.grad = None
    _assert_unchanged(model, before)
    for _ in range(3):
        assert torch.equal(step(model, opt), step(twin, opt_twin))
    for (n, p), q in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(p, q), n


def test_parameters_are_contiguous():
    """Regression: S1s/S2s came out of einsum as non-contiguous parameters, which FSDP2's
    fully_shard refuses ("FSDP does not support non-contiguous parameters")."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        layer = pr.nn.SKLinear(12, 7, 3, 2, dtype=dtype)
        for n, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            assert t.is_contiguous(), n
        lin = pr.nn.SKLinear.from_linear(nn.Linear(12, 7, dtype=dtype), 2, 2)
        assert all(p.is_contiguous() for p in lin.parameters())


# ---- numerical safety -------------------------------------------------------------------------


def _train_autocast(device: str, dtype: torch.dtype, scaler: torch.amp.GradScaler | None, steps: int = 12):
    torch.manual_seed(0)
    model = nn.Sequential(
        pr.nn.SKLinear(32, 64, 2, 8), nn.GELU(), pr.nn.SKLinear(64, 64, 2, 8), nn.GELU(), pr.nn.SKLinear(64, 10, 1, 4)
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    # Large-magnitude inputs: activations in the thousands stress fp16's range (max 65504).
    x = (torch.randn(64, 32, generator=g) * 100).to(device)
    y = torch.randint(0, 10, (64,), generator=g).to(device)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast(device, dtype=dtype):
            out = model(x)
            assert out.dtype == dtype
            loss = nn.functional.cross_entropy(out, y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        losses.append(loss.item())
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32, n  # master weights stay fp32
        assert torch.isfinite(p).all(), n
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    return losses


def test_autocast_bf16_cpu_trains_finite(one_thread):
    _train_autocast("cpu", torch.bfloat16, None)


def test_autocast_fp16_gradscaler_cpu_trains_finite(one_thread):
    scaler = torch.amp.GradScaler("cpu")
    _train_autocast("cpu", torch.float16, scaler)
    assert scaler.get_scale() > 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_gradscaler_cuda_trains_finite(dtype):
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    _train_autocast("cuda", dtype, scaler)


@needs_attn
def test_attention_large_inputs_finite():
    torch.manual_seed(0)
    for causal_kw in ({}, {"iscausal": True}):
        a = pr.nn.RandMultiHeadAttention(32, 4, 16, **causal_kw)
        for scale in (1.0, 30.0):
            x = torch.randn(2, 37, 32) * scale
            x.requires_grad_()
            out, _ = a(x, x, x)
            assert torch.isfinite(out).all(), (causal_kw, scale)
            out.square().mean().backward()
            assert torch.isfinite(x.grad).all(), (causal_kw, scale)


@needs_attn
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_64k_tokens_low_precision_finite_cuda(dtype, causal):
    torch.manual_seed(0)
    attn = pr.nn.RandMultiHeadAttention(256, 4, 64, iscausal=causal, device="cuda", dtype=dtype)
    x = (torch.randn(1, 65536, 256, device="cuda") * 4).to(dtype).requires_grad_()
    out, _ = attn(x, x, x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert torch.isfinite(x.grad).all()


# ---- memory -----------------------------------------------------------------------------------


SAVED_PAD_COLS = 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_autograd_saves_only_input_and_small_intermediate(dtype):
    """What one forward keeps for backward: the input, the (tokens x 2Lk) intermediate in the
    input's dtype (plus at most SAVED_PAD_COLS columns per token: the kernel
    appends a ones column, padded to 8, so the bias gradient comes out of the same GEMM) and the
    parameters/buffers themselves; nothing of size tokens x d_out or d_in x d_out."""
    L, k, d_in, d_out, N = 2, 4, 64, 48, 10
    layer = pr.nn.SKLinear(d_in, d_out, L, k, dtype=dtype)
    x = torch.randn(N, d_in, dtype=dtype, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    owned = {t.data_ptr() for t in list(layer.parameters()) + list(layer.buffers()) + [x]}
    fresh = [t for t in saved if t.data_ptr() not in owned]
    state_numel = sum(t.numel() for t in list(layer.parameters()) + list(layer.buffers()))
    small = N * (2 * L * k + SAVED_PAD_COLS)
    assert sum(t.numel() for t in fresh) <= small, [tuple(t.shape) for t in fresh]
    assert sum(t.numel() for t in saved) <= x.numel() + small + state_numel
    y.sum().backward()  # the saved tensors are enough for backward
    assert x.grad is not None and layer.S1s.grad is not None
    # Inference keeps nothing.
    saved.clear()
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    assert saved == []


@pytest.mark.slow
def test_resident_memory_flat_over_10000_steps(one_thread):
    psutil = pytest.importorskip("psutil")
    torch.manual_seed(0)
    model = nn.Sequential(pr.nn.SKLinear(16, 32, 1, 4), nn.ReLU(), pr.nn.SKLinear(32, 8, 1, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, t = torch.randn(4, 16), torch.randn(4, 8)
    proc = psutil.Process()

    def steps(n):
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), t)
            loss.backward()
            opt.step()

    steps(1000)  # warm-up: allocator caches, lazy initialisation
    gc.collect()
    rss0 = proc.memory_info().rss
    steps(9000)
    gc.collect()
    growth = proc.memory_info().rss - rss0
    assert growth < 20 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 9000 steps"
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- threads and determinism ------------------------------------------------------------------


def _inference_model() -> nn.Module:
    torch.manual_seed(0)
    mods = [pr.nn.SKLinear(32, 64, 2, 8), nn.ReLU()]
    if HAS_ATTN:
        mods.append(_SelfAttn(pr.nn.RandMultiHeadAttention(64, 4, 16)))
    mods.append(pr.nn.SKLinear(64, 16, 1, 4))
    return nn.Sequential(*mods).eval()


class _SelfAttn(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return self.attn(x, x, x)[0]


def test_thread_safety_inference():
    model = _inference_model()
    inputs = [torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(tid):
        try:
            barrier.wait()
            with torch.no_grad():
                for rep in range(10):
                    for i, x in enumerate(inputs):
                        results[(tid, rep * 100 + i)] = model(x)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(results) == 4 * 10 * len(inputs)
    for (tid, key), out in results.items():
        assert torch.equal(out, expected[key % 100]), (tid, key)


def _fwd_bwd(model: nn.Module, x: torch.Tensor):
    for p in model.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    return [out.detach()] + [x.grad] + [p.grad.clone() for p in model.parameters()]


def test_deterministic_algorithms_bitwise_repeatable_cpu():
    model = _inference_model().train()
    x = torch.randn(4, 11, 32)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a = _fwd_bwd(model, x)
        b = _fwd_bwd(model, x)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert len(a) == len(b) > 2
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), i


@pytest.mark.cuda
def test_deterministic_algorithms_bitwise_repeatable_cuda():
    """CUBLAS_WORKSPACE_CONFIG must be set before cuBLAS initialises, so this runs in a child
    process. Either every repeat is bitwise equal or the op raises PyTorch's standard
    "does not have a deterministic implementation" error."""
    code = """
        import warnings, torch, panther as pr
        from torch import nn
        warnings.simplefilter("ignore")
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(0)
        mods = [pr.nn.SKLinear(256, 512, 2, 16), nn.ReLU()]
        if hasattr(pr.nn, "RandMultiHeadAttention"):
            class SelfAttn(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.a = pr.nn.RandMultiHeadAttention(512, 8, 64, iscausal=True)
                def forward(self, x):
                    return self.a(x, x, x)[0]
            mods.append(SelfAttn())
        mods.append(pr.nn.SKLinear(512, 128, 1, 16))
        model = nn.Sequential(*mods).cuda()
        x0 = torch.randn(4, 300, 256, device="cuda")
        def run():
            for p in model.parameters():
                p.grad = None
            x = x0.clone().requires_grad_()
            out = model(x)
            out.square().sum().backward()
            return [out.detach(), x.grad] + [p.grad.clone() for p in model.parameters()]
        try:
            a, b = run(), run()
        except RuntimeError as e:
            assert "deterministic" in str(e), e
            print("RAISED", e)
        else:
            assert all(torch.equal(u, v) for u, v in zip(a, b))
            print("EQUAL")
    """
    proc = _run(code, env={"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] in ("EQUAL",) or proc.stdout.startswith("RAISED"), proc.stdout
