"""Second derivatives of Panther's ops: gradgradcheck in float64.

``torch.autograd.grad(..., create_graph=True)`` followed by a second grad (gradient penalties,
Hessian-vector products, MAML) must give the exact second derivative of the op, for every
combination of inputs that need a gradient.
"""

import itertools

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import panther  # noqa: F401  (registers torch.ops.panther)
from panther.nn.attention import orthogonal_gaussian_projection

from conftest import DEVICES

sketched = torch.ops.panther.sketched_linear
favor = torch.ops.panther.favor_attention

SKETCH_NAMES = ("input", "S1s", "S2s", "U1s", "U2s", "bias")


def sketch_inputs(device, dtype=torch.float64, lead=(2, 3), L=2, k=2, d_in=4, d_out=3):
    g = torch.Generator().manual_seed(1)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return [mk(*lead, d_in), mk(L, d_in, k), mk(L, k, d_out), mk(L, k, d_out), mk(L, d_in, k),
            mk(d_out)]


def sketch_reference(x, S1s, S2s, U1s, U2s, bias):
    """The sketched linear map in plain differentiable torch ops (float64 reference)."""
    L = S1s.shape[0]
    y = sum(x @ S1s[i] @ U1s[i] + x @ U2s[i] @ S2s[i] for i in range(L)) / (2 * L)
    return y + bias if bias is not None else y


# Every non-empty subset of the six tensors (63 combinations).
SUBSETS = [s for r in range(1, 7) for s in itertools.combinations(range(6), r)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(SKETCH_NAMES[i] for i in s))
def test_sketched_linear_gradgradcheck(device, subset):
    ts = sketch_inputs(device)
    for i in subset:
        ts[i].requires_grad_()
    # fast_mode: the second derivative along random directions (any error shows, at a fraction
    # of the cost of the full Jacobian; the full check runs in the favor_attention tests).
    assert gradgradcheck(sketched, tuple(ts), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_sketched_linear_hessian_vector_product_matches_reference(device, with_bias):
    # The measured failure: grad with create_graph, then a second grad, off by 28-51%.
    ts = [t.requires_grad_() for t in sketch_inputs(device, lead=(5,), L=3, k=2, d_in=6, d_out=4)]
    if not with_bias:
        ts[5] = None
    args = [t for t in ts if t is not None]

    def second(fn):
        y = fn(*ts)
        first = torch.autograd.grad((y * y).sum(), args, create_graph=True)
        penalty = sum((f * f).sum() for f in first)
        return torch.autograd.grad(penalty, args)

    for a, b in zip(second(sketched), second(sketch_reference)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_sketched_linear_double_backward_low_precision_runs():
    ts = [t.requires_grad_() for t in sketch_inputs("cpu", dtype=torch.bfloat16)]
    y = sketched(*ts)
    first = torch.autograd.grad(y.float().square().sum(), ts, create_graph=True)
    second = torch.autograd.grad(sum(f.float().square().sum() for f in first), ts)
    ref_ts = [t.detach().double().requires_grad_() for t in ts]
    y = sketch_reference(*ref_ts)
    first = torch.autograd.grad(y.square().sum(), ref_ts, create_graph=True)
    ref = torch.autograd.grad(sum(f.square().sum() for f in first), ref_ts)
    for a, b in zip(second, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b, rtol=0.1, atol=0.1 * b.abs().max().item())


def test_sketched_linear_first_order_unchanged_by_create_graph():
    ts = [t.requires_grad_() for t in sketch_inputs("cpu")]
    y = sketched(*ts)
    g = torch.randn_like(y)
    plain = torch.autograd.grad(y, ts, g, retain_graph=True)
    graph = torch.autograd.grad(y, ts, g, create_graph=True)
    for a, b in zip(plain, graph):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # (the bias gradient, the sum of g, does not depend on the inputs)
    assert all(b.requires_grad for b in graph[:5])


# ---- favor_attention ----------------------------------------------------------------------------

FAVOR_NAMES = ("query", "key", "value", "projection")


def favor_inputs(B, H, Lq, Lk, D, Dv, M, device, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, Lk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, Lk, Dv, generator=g, dtype=torch.float64)
    W = orthogonal_gaussian_projection(M, D, generator=g, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.zeros(B, Lk, dtype=torch.bool)
        mask[0, 0] = True  # a padded key at the start (left padding)
        mask[-1, -1] = True
    return [t.to(device) for t in (q, k, v, W)], (mask.to(device) if mask is not None else None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_favor_attention_gradgradcheck(device, kernel, causal, masked):
    (q, k, v, W), mask = favor_inputs(2, 1, 5, 5, 3, 2, 4, device, masked)
    for t in (q, k, v, W):
        t.requires_grad_()
    fn = lambda q, k, v, W: favor(q, k, v, W, kernel, causal, mask)
    # The full Jacobian of the gradient for one case; random directions (fast_mode) elsewhere.
    full = (kernel, causal, masked) == ("softmax", True, True) and device == "cpu"
    assert gradgradcheck(fn, (q, k, v, W), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=not full)


@pytest.mark.parametrize("subset", [s for r in range(1, 4) for s in itertools.combinations(range(4), r)],
                         ids=lambda s: "+".join(FAVOR_NAMES[i] for i in s))
def test_favor_attention_gradgradcheck_subsets(subset):
    (q, k, v, W), mask = favor_inputs(1, 2, 4, 4, 2, 2, 3, "cpu", masked=True, seed=3)
    ts = [q, k, v, W]
    for i in subset:
        ts[i].requires_grad_()
    fn = lambda q, k, v, W: favor(q, k, v, W, "softmax", True, mask)
    assert gradgradcheck(fn, tuple(ts), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_favor_attention_gradgradcheck_several_chunks(kernel):
    # 70 positions: more than one 64-position chunk of the causal scan.
    (q, k, v, W), mask = favor_inputs(1, 1, 70, 70, 2, 1, 3, "cpu", masked=True, seed=5)
    for t in (q, k, v, W):
        t.requires_grad_()
    fn = lambda q, k, v, W: favor(q, k, v, W, kernel, True, mask)
    assert gradgradcheck(fn, (q, k, v, W), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_favor_attention_first_order_unchanged_by_create_graph(causal):
    (q, k, v, W), mask = favor_inputs(2, 2, 6, 6, 4, 3, 5, "cpu", masked=True)
    ts = [t.requires_grad_() for t in (q, k, v, W)]
    y = favor(*ts, "softmax", causal, mask)
    g = torch.randn_like(y)
    plain = torch.autograd.grad(y, ts, g, retain_graph=True)
    graph = torch.autograd.grad(y, ts, g, create_graph=True)
    for a, b in zip(plain, graph):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert graph[0].requires_grad


def test_favor_attention_no_key_double_backward_is_zero():
    # Every key padded: the output is 0, so are all its derivatives.
    (q, k, v, W), _ = favor_inputs(1, 1, 3, 3, 2, 2, 3, "cpu", masked=False)
    mask = torch.ones(1, 3, dtype=torch.bool)
    ts = [t.requires_grad_() for t in (q, k, v, W)]
    y = favor(*ts, "softmax", True, mask)
    first = torch.autograd.grad(y.sum(), ts, create_graph=True, allow_unused=True)
    assert all(f is None or not f.any() for f in first)
