"""Tests of the native op panther::favor_attention (FAVOR+ random-feature attention).

Exactly against the float64 reference that uses the same projection (panther._reference), and
statistically against exact softmax attention; causality, padding invariance, gradients
(gradcheck and against autograd through the reference), low precision and large inputs. The
checks every op gets (opcheck, Meta vs real, torch.compile, torch.export, autocast, the error
format) run in tests/test_conformance.py on the op's registry entry (tests/op_registry.py).
"""
import itertools
import os

import pytest
import torch

import panther
from panther._reference import favor_attention_reference, softmax_attention_reference
from panther.nn.attention import orthogonal_gaussian_projection

op = torch.ops.panther.favor_attention
KERNELS = ("softmax", "relu")
# Whether causal fused calls keep their features for the backward (off unless set).
FEATURES_SAVED = os.environ.get("PANTHER_FAVOR_SAVE_FEATURES") == "1"

# (B, H, Lq, Lk, D, Dv, M). The CPU chunk is 64 positions: 70 and 130 are not multiples of it.
SIZES = [
    (2, 2, 70, 70, 8, 5, 16),
    (1, 3, 130, 130, 16, 8, 32),
    (1, 1, 1, 1, 4, 4, 7),
    (2, 1, 64, 64, 6, 3, 9),
    (0, 2, 5, 5, 4, 4, 8),  # empty batch
]
NONCAUSAL_EXTRA = [(2, 2, 33, 70, 8, 5, 16), (1, 2, 90, 7, 4, 6, 12)]  # Lq != Lk


def make_inputs(B, H, Lq, Lk, D, Dv, M, dtype=torch.float64, scale=1.0, seed=0, noncontig=False,
                masked=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if noncontig:
        # (B, L, H, D) storage seen as (B, H, L, D): the layout a module's head split produces.
        q = (torch.randn(B, Lq, H, D, generator=g, dtype=torch.float64) * scale).transpose(1, 2)
        k = (torch.randn(B, Lk, H, D, generator=g, dtype=torch.float64) * scale).transpose(1, 2)
        v = torch.randn(B, Lk, H, Dv, generator=g, dtype=torch.float64).transpose(1, 2)
    else:
        q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64) * scale
        k = torch.randn(B, H, Lk, D, generator=g, dtype=torch.float64) * scale
        v = torch.randn(B, H, Lk, Dv, generator=g, dtype=torch.float64)
    W = orthogonal_gaussian_projection(M, D, generator=g, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.rand(B, Lk, generator=g) < 0.3
        if B > 0 and Lk > 3:
            mask[0, :2] = True  # leading padded keys (left padding)
    conv = lambda t: t.to(device=device, dtype=dtype)
    return conv(q), conv(k), conv(v), W.to(device), (mask.to(device) if mask is not None else None)


def all_cases():
    for size, kernel, causal, masked in itertools.product(SIZES, KERNELS, (False, True), (False, True)):
        yield size, kernel, causal, masked
    for size, kernel, masked in itertools.product(NONCAUSAL_EXTRA, KERNELS, (False, True)):
        yield size, kernel, False, masked


CASES = list(all_cases())


def case_id(c):
    size, kernel, causal, masked = c
    return f"{'x'.join(map(str, size))}-{kernel}-{'causal' if causal else 'full'}-{'mask' if masked else 'nomask'}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_matches_float64_reference(case):
    size, kernel, causal, masked = case
    noncontig = masked or size[2] == 1  # half the cases use (B, L, H, D)-strided inputs
    q, k, v, W, mask = make_inputs(*size, noncontig=noncontig, masked=masked)
    out = op(q, k, v, W, kernel, causal, mask)
    ref = favor_attention_reference(q, k, v, W, kernel, causal, mask)
    assert out.shape == ref.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    # float32 against the same reference: features and states in fp32.
    out32 = op(q.float(), k.float(), v.float(), W.float(), kernel, causal, mask)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=1e-4, atol=1e-4)


def test_default_arguments_and_wrapper():
    q, k, v, W, _ = make_inputs(1, 2, 10, 10, 4, 4, 8)
    ref = favor_attention_reference(q, k, v, W)
    torch.testing.assert_close(op(q, k, v, W), ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(panther.ops.favor_attention(q, k, v, W), ref, rtol=1e-9, atol=1e-10)
    scripted = torch.jit.script(panther.ops.favor_attention)
    torch.testing.assert_close(scripted(q, k, v, W, "relu", True, None),
                               favor_attention_reference(q, k, v, W, "relu", True), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_no_valid_key_gives_zero(causal):
    q, k, v, W, _ = make_inputs(2, 2, 9, 9, 4, 3, 8)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0] = True            # batch 0: every key padded
    mask[1, :4] = True        # batch 1, causal: queries 0..3 see nothing
    out = op(q, k, v, W, "softmax", causal, mask)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all()
    if causal:
        assert (out[1, :, :4] == 0).all()
    torch.testing.assert_close(out, favor_attention_reference(q, k, v, W, "softmax", causal, mask),
                               rtol=1e-9, atol=1e-10)


def _devices():
    return ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_output_is_laid_out_heads_last(device, dtype, causal):
    """Every backend returns (B, H, Lq, Dv) with (B, Lq, H, Dv) memory, so that merging the heads
    is a view; Meta must agree with the real kernels (torch.compile relies on its strides)."""
    q, k, v, W, _ = make_inputs(2, 3, 70, 70, 16, 16, 32, dtype=dtype)
    q, k, v, W = (t.to(device) for t in (q, k, v, W))
    out = op(q, k, v, W.to(dtype), "softmax", causal, None)
    assert out.shape == (2, 3, 70, 16)
    assert out.stride() == (70 * 3 * 16, 16, 3 * 16, 1)
    assert out.transpose(1, 2).is_contiguous()


def test_zero_length_keys():
    q, _, _, W, _ = make_inputs(2, 2, 5, 5, 4, 3, 8)
    k = torch.randn(2, 2, 0, 4, dtype=torch.float64)
    v = torch.randn(2, 2, 0, 3, dtype=torch.float64)
    out = op(q, k, v, W)
    assert out.shape == (2, 2, 5, 3) and (out == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_statistical_error_decreases_with_features(causal):
    # Positive random features estimate exp(q.k / sqrt(D)) without bias: the error against exact
    # softmax attention falls as M grows (averaged over independent projections, seeded).
    B, H, L, D = 1, 4, 96, 16
    g = torch.Generator().manual_seed(1234)
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64) * 0.6
    k = torch.randn(B, H, L, D, generator=g, dtype=torch.float64) * 0.6
    v = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    exact = softmax_attention_reference(q, k, v, causal)
    errs = []
    for M in (8, 32, 128, 512):
        e = 0.0
        for _ in range(6):
            W = orthogonal_gaussian_projection(M, D, generator=g, dtype=torch.float64)
            out = op(q.float(), k.float(), v.float(), W.float(), "softmax", causal).double()
            e += ((out - exact).norm() / exact.norm()).item()
        errs.append(e / 6)
    for a, b in zip(errs, errs[1:]):
        assert b < a, errs
    assert errs[-1] < 0.35 * errs[0], errs
    assert errs[-1] < 0.3, errs


@pytest.mark.parametrize("kernel", KERNELS)
def test_causality(kernel):
    B, H, L, D, Dv, M = 2, 2, 150, 8, 4, 16
    q, k, v, W, _ = make_inputs(B, H, L, L, D, Dv, M, dtype=torch.float32)
    out = op(q, k, v, W, kernel, True)
    for t in (1, 40, 64, 100, 149):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        # Later tokens change, one of them to a key that would dominate any max over the future.
        q2[:, :, t:] = torch.randn_like(q2[:, :, t:])
        k2[:, :, t:] = torch.randn_like(k2[:, :, t:]) * 3
        k2[:, :, -1] = 12 * W[0] / W[0].norm() * D ** 0.25
        v2[:, :, t:] = torch.randn_like(v2[:, :, t:]) * 100
        out2 = op(q2, k2, v2, W, kernel, True)
        torch.testing.assert_close(out2[:, :, :t], out[:, :, :t], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(out2[:, :, t:], out[:, :, t:])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_padding_invariance(kernel, causal):
    B, H, L, D, Dv, M = 2, 2, 100, 8, 4, 16
    q, k, v, W, mask = make_inputs(B, H, L, L, D, Dv, M, dtype=torch.float32, masked=True)
    out = op(q, k, v, W, kernel, causal, mask)
    k2, v2 = k.clone(), v.clone()
    pm = mask[:, None, :, None].expand_as(k2)
    k2 = torch.where(pm, torch.randn_like(k2) * 20, k2)
    v2 = torch.where(mask[:, None, :, None].expand_as(v2), torch.randn_like(v2) * 1e4, v2)
    out2 = op(q, k2, v2, W, kernel, causal, mask)
    torch.testing.assert_close(out2, out, rtol=1e-6, atol=1e-6)
    # Dropping the padded keys entirely gives the same non-causal result.
    if not causal:
        keep = ~mask[1]
        out_b1 = op(q[1:2], k[1:2, :, keep], v[1:2, :, keep], W, kernel, False)
        torch.testing.assert_close(out[1:2], out_b1, rtol=1e-5, atol=1e-6)


GRAD_CASES = [
    ((1, 2, 11, 11, 4, 3, 6), kernel, causal, masked)
    for kernel, causal, masked in itertools.product(KERNELS, (False, True), (False, True))
] + [((1, 1, 5, 9, 3, 2, 4), "softmax", False, True), ((1, 1, 70, 70, 3, 2, 4), "softmax", True, True)]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[case_id(c) for c in GRAD_CASES])
def test_gradcheck(case):
    size, kernel, causal, masked = case
    q, k, v, W, mask = make_inputs(*size, masked=masked, seed=3)
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v, W))
    fn = lambda q, k, v, W: op(q, k, v, W, kernel, causal, mask)
    # The stabilisers are constants in the backward: exact up to O(eps = 1e-6) terms, which
    # finite differences see for the key that sets the softmax stabiliser; hence atol 1e-4 there.
    atol = 1e-4 if kernel == "softmax" else 1e-6
    assert torch.autograd.gradcheck(fn, inputs, atol=atol, rtol=1e-3, fast_mode=True)


@pytest.mark.parametrize("case", [c for c in CASES if c[0][0] == 2 or c[0][2] == 130][:12],
                         ids=case_id)
def test_gradients_match_reference_autograd(case):
    # The reference treats stabilisers as constants too, so gradients agree to rounding.
    size, kernel, causal, masked = case
    q, k, v, W, mask = make_inputs(*size, masked=masked, seed=5, noncontig=True)
    a = [t.clone().requires_grad_() for t in (q, k, v, W)]
    b = [t.clone().requires_grad_() for t in (q, k, v, W)]
    g = torch.randn(size[0], size[1], size[2], size[5], dtype=torch.float64)
    torch.autograd.backward(op(*a, kernel, causal, mask), g)
    torch.autograd.backward(favor_attention_reference(*b, kernel, causal, mask), g)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-7, atol=1e-9)


def test_only_requested_gradients():
    q, k, v, W, _ = make_inputs(1, 2, 20, 20, 4, 3, 6)
    v = v.clone().requires_grad_()
    op(q, k, v, W, "softmax", True).sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()


OPCHECK_CASES = [
    ((1, 2, 70, 70, 4, 3, 6), "softmax", True, True, torch.float32),
    ((2, 1, 13, 30, 4, 3, 6), "softmax", False, True, torch.float64),
    ((1, 2, 20, 20, 4, 3, 6), "relu", True, False, torch.float32),
    ((1, 2, 20, 9, 4, 3, 6), "relu", False, False, torch.float32),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: f"{c[1]}-{c[2]}-{c[3]}-{c[4]}")
def test_opcheck_with_keyword_arguments(case):
    # (Positional calls: tests/test_conformance.py::test_opcheck.) Sizes above the CPU chunk of
    # 64 positions and float64 here.
    size, kernel, causal, masked, dtype = case
    q, k, v, W, mask = make_inputs(*size, dtype=dtype, masked=masked, noncontig=True)
    torch.library.opcheck(op, (q, k, v, W.to(dtype)),
                          {"kernel_fn": kernel, "causal": causal, "key_padding_mask": mask})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision(dtype, kernel, causal):
    # Computed in fp32 and rounded once: against the reference on the rounded inputs the error is
    # a few units in the last place of the output dtype.
    q, k, v, W, mask = make_inputs(2, 2, 100, 100, 16, 8, 32, dtype=dtype, masked=True)
    out = op(q, k, v, W.float(), kernel, causal, mask)
    assert out.dtype == dtype
    ref = favor_attention_reference(q, k, v, W.float(), kernel, causal, mask)
    ulp = torch.finfo(dtype).eps
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * ulp * ref.abs().max().item(), err
    # backward runs in fp32 as well and returns the input dtype
    qs = [t.clone().requires_grad_() for t in (q, k, v)]
    op(*qs, W.float(), kernel, causal, mask).float().square().sum().backward()
    for t in qs:
        assert t.grad.dtype == dtype and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_large_inputs_stay_finite(dtype, kernel, causal):
    q, k, v, W, mask = make_inputs(2, 2, 100, 100, 64, 16, 64, dtype=dtype, scale=30.0, masked=True)
    qs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = op(*qs, W.to(dtype), kernel, causal, mask)
    assert torch.isfinite(out).all()
    # Outputs are convex combinations of values: bounded by the largest |v|.
    assert out.abs().max() <= v.abs().max() * 1.01
    out.float().sum().backward()
    for t in qs:
        assert torch.isfinite(t.grad).all()


def test_errors_name_op_argument_expected_and_got():
    q, k, v, W, _ = make_inputs(2, 2, 10, 12, 4, 3, 6)
    with pytest.raises(RuntimeError, match=r"favor_attention: kernel must be \"softmax\" or \"relu\", got \"gelu\""):
        op(q, k, v, W, "gelu")
    with pytest.raises(RuntimeError, match=r"causal=True needs equal query and key lengths, got Lq=10 and Lk=12"):
        op(q, k, v, W, "softmax", True)
    with pytest.raises(RuntimeError, match=r"key_padding_mask must have shape \(batch=2, Lk=12\), got \(2, 10\)"):
        op(q, k, v, W, "softmax", False, torch.zeros(2, 10, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"key_padding_mask must be bool .* got Float"):
        op(q, k, v, W, "softmax", False, torch.zeros(2, 12))
    with pytest.raises(RuntimeError, match=r"projection must have shape \(num_random_features >= 1, head_dim=4\), got \(6, 5\)"):
        op(q, k, v, torch.randn(6, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"key must have the query's dtype Double, got Float"):
        op(q, k.float(), v, W)
    with pytest.raises(RuntimeError, match=r"value must have shape \(batch=2, heads=2, Lk=12, value_dim\)"):
        op(q, k, v[:, :, :5], W)
    with pytest.raises(RuntimeError, match=r"query must be 4-d \(batch, heads, Lq, head_dim\), got shape \(2, 10, 4\)"):
        op(q[0], k, v, W)
    with pytest.raises(RuntimeError, match=r"projection must be on the query's device cpu, got meta"):
        op(q, k, v, W.to("meta"))
    with pytest.raises(RuntimeError, match=r"key_padding_mask must be on the query's device cpu, got meta"):
        op(q, k, v, W, "softmax", False, torch.zeros(2, 12, dtype=torch.bool, device="meta"))
    # Shape checks run under FakeTensor/meta too.
    with pytest.raises(RuntimeError, match=r"causal=True needs equal query and key lengths"):
        op(q.to("meta"), k.to("meta"), v.to("meta"), W.to("meta"), "softmax", True)


cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@needs_gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_matches_cpu(kernel, causal, dtype):
    # CUDA uses a different chunk size (128) and its own state scan; same math.
    q, k, v, W, mask = make_inputs(2, 3, 300, 300, 16, 8, 32, dtype=dtype, masked=True)
    # bf16 takes the fused kernels, which round the projection to bf16: give both sides that
    # projection, or relu's kink turns the rounding of pre-activations near 0 into O(1)
    # differences of single gradient entries (the rounding itself is tested in the emulator).
    W = W.to(torch.bfloat16).float() if dtype == torch.bfloat16 else W.float()
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    b = [t.cuda().requires_grad_() for t in (q, k, v)]
    oa = op(*a, W, kernel, causal, mask)
    ob = op(*b, W.cuda(), kernel, causal, mask.cuda())
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(ob.cpu().double(), oa.double(), rtol=tol, atol=tol)
    g = torch.randn(oa.shape, generator=torch.Generator().manual_seed(1), dtype=oa.dtype)
    oa.backward(g)
    ob.backward(g.cuda())
    for x, y in zip(a, b):
        torch.testing.assert_close(y.grad.cpu().double(), x.grad.double(), rtol=tol * 5, atol=tol * 5)


@cuda
@needs_gpu
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_fused_backward_in_several_launches(causal):
    # The fused kernels take the chunks of each row in launches of about four waves of blocks.
    # Causal: backward launches of whole groups of 16 chunks, forward launches of four times as
    # many (the forward keeps the scan's state before every group; the backward, last launch
    # first, recomputes its chunks' states from it and carries the reverse scan between
    # launches). Non-causal: the backward sums the chunks' gradient states into that many slots
    # per row. 128 rows of 80 chunks make that 2 causal forward launches (64 and 16 chunks per
    # row) and 5 backward launches on a 132-SM GPU (5 slots), and 16 non-causal back1 launches.
    # Same gradients as the CPU's ATen backward, the same bits on a second call and from the
    # backward that recomputes the forward's states.
    B, H, L = 4, 32, 5120
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    slots = -(-4 * sms // (B * H))
    per_launch = 4 * max(16, slots // 16 * 16) if causal else slots
    assert per_launch < L // 64, "the test needs more chunks than one launch takes"
    q, k, v, W, mask = make_inputs(B, H, L, L, 16, 8, 32, dtype=torch.bfloat16, masked=True)
    W = W.to(torch.bfloat16).float()
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    b = [t.cuda().requires_grad_() for t in (q, k, v)]
    oa = op(*a, W, "softmax", causal, mask)
    ob = op(*b, W.cuda(), "softmax", causal, mask.cuda())
    torch.testing.assert_close(ob.cpu().double(), oa.double(), rtol=2e-2, atol=2e-2)
    g = torch.randn(oa.shape, generator=torch.Generator().manual_seed(1), dtype=oa.dtype)
    oa.backward(g)
    ob.backward(g.cuda(), retain_graph=True)
    first = [t.grad.clone() for t in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(y.grad.cpu().double(), x.grad.double(), rtol=0.1, atol=0.1)
    for t in b:
        t.grad = None
    ob.backward(g.cuda())
    for t, f in zip(b, first):
        assert torch.equal(t.grad, f)
    # The private backward without the forward's states (recomputing them) agrees.
    bwd = torch.ops.panther._favor_attention_backward
    got = bwd(g.cuda(), *[t.detach() for t in b], W.cuda(), "softmax", causal, mask.cuda(), [True] * 3 + [False])
    for x, f in zip(got[:3], first):
        if causal and FEATURES_SAVED:
            torch.testing.assert_close(x, f, rtol=5e-3, atol=5e-3 * f.abs().max().item())
        else:
            assert torch.equal(x, f)


@cuda
@needs_gpu
def test_cuda_opcheck_and_large_inputs():
    q, k, v, W, mask = make_inputs(2, 2, 200, 200, 64, 16, 64, dtype=torch.bfloat16, scale=30.0,
                                   masked=True, device="cuda")
    for causal in (False, True):
        out = op(q, k, v, W.float(), "softmax", causal, mask)
        assert torch.isfinite(out).all()
    q, k, v, W, mask = make_inputs(1, 2, 150, 150, 8, 5, 16, dtype=torch.float32, masked=True, device="cuda")
    torch.library.opcheck(op, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), W.float(),
                               "softmax", True, mask))


@cuda
@needs_gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dv", [16, 80])
def test_cuda_fused_backward_reuses_forward_states(kernel, causal, dv):
    # For fused bf16 calls, autograd's forward is _favor_attention_forward, which also returns
    # what the backward would otherwise recompute: the total state (non-causal) or the scan's
    # state every 16 chunks (causal) and the stabilisers. The same gradients as the backward that
    # recomputes, dq, dk, dv bit for bit (dW is summed with float atomics, so only to rounding).
    # With PANTHER_FAVOR_SAVE_FEATURES=1, causal calls also keep the features and A' (and for
    # value dims up to 64 the fp32 y / den and den): g . num is den (g . y / den), equal to fp32
    # rounding, so the gradients agree to a bf16 rounding at most (Dv 80 keeps no y). A second
    # backward gives the same bits (the saved tensor is not overwritten).
    q, k, v, W, mask = make_inputs(2, 2, 300, 300, 32, dv, 64, dtype=torch.bfloat16, masked=True,
                                   device="cuda")
    W = W.to(torch.bfloat16).float()
    fwd = torch.ops.panther._favor_attention_forward
    bwd = torch.ops.panther._favor_attention_backward
    out, saved = fwd(q, k, v, W, kernel, causal, mask)
    assert saved.dtype == torch.uint8 and saved.numel() > 0
    assert torch.equal(out, op(q, k, v, W, kernel, causal, mask))
    g = torch.randn_like(out)
    ref = bwd(g, q, k, v, W, kernel, causal, mask, [True] * 4)
    before = saved.clone()
    first = None
    for _ in range(2):
        got = bwd(g, q, k, v, W, kernel, causal, mask, [True] * 4, saved)
        for a, b in zip(got[:3], ref[:3]):
            if causal and FEATURES_SAVED:
                scale = b.abs().max().item()
                torch.testing.assert_close(a, b, rtol=5e-3, atol=5e-3 * scale)
            else:
                assert torch.equal(a, b)
        dw_tol = 5e-3 if causal and FEATURES_SAVED else 1e-4
        torch.testing.assert_close(got[3], ref[3], rtol=dw_tol, atol=dw_tol * ref[3].abs().max().item())
        if first is not None:
            for a, b in zip(got[:3], first[:3]):
                assert torch.equal(a, b)
        first = got
    assert torch.equal(saved, before)
    # Through autograd (retain_graph: the second backward reads the same saved states).
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    o = op(*x, W, kernel, causal, mask)
    assert torch.equal(o, out)
    for _ in range(2):
        for t in x:
            t.grad = None
        o.backward(g, retain_graph=True)
        for t, b in zip(x, first[:3]):
            assert torch.equal(t.grad, b)
    # The Meta kernel's size of the saved tensor matches (compile/export trace with it).
    torch.library.opcheck(fwd, (q, k, v, W, kernel, causal, mask))


@cuda
@needs_gpu
def test_cuda_compile_keeps_forward_states(inductor_cache):
    # torch.compile traces the autograd kernel with fake CUDA tensors: its forward graph calls
    # _favor_attention_forward (whose Meta kernel gives the saved tensor's size) and the compiled
    # gradients equal eager ones.
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm)

    q, k, v, W, mask = make_inputs(1, 2, 200, 200, 32, 16, 64, dtype=torch.bfloat16, masked=True,
                                   device="cuda")
    W = W.to(torch.bfloat16).float()
    g = torch.randn(1, 2, 200, 16, device="cuda", dtype=torch.bfloat16)

    def run(fn):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*x)
        out.backward(g)
        return out, [t.grad for t in x]

    def f(a, b, c):
        return op(a, b, c, W, "softmax", True, mask)

    eager = run(f)
    compiled = run(torch.compile(f, fullgraph=True,
                                 backend=aot_autograd(fw_compiler=capture, bw_compiler=capture)))
    assert any("_favor_attention_forward" in gr for gr in graphs)
    assert torch.equal(compiled[0], eager[0])
    for a, b in zip(compiled[1], eager[1]):
        assert torch.equal(a, b)
    # Calls the fused kernels do not take (fp32) keep nothing: the plain op is traced.
    graphs.clear()
    q, k, v = (t.float() for t in (q, k, v))
    g = g.float()
    compiled = run(torch.compile(f, fullgraph=True,
                                 backend=aot_autograd(fw_compiler=capture, bw_compiler=capture)))
    assert graphs and not any("_favor_attention_forward" in gr for gr in graphs)
    torch.testing.assert_close(compiled[0], run(f)[0])


@cuda
@needs_gpu
def test_cuda_saved_states_only_for_fused_shapes():
    # Shapes the fused kernels do not take (head_dim 8) and fp32 keep nothing: the internal op
    # returns an empty saved tensor and autograd's backward recomputes as before.
    fwd = torch.ops.panther._favor_attention_forward
    q, k, v, W, mask = make_inputs(1, 2, 100, 100, 8, 8, 16, dtype=torch.bfloat16, device="cuda")
    assert fwd(q, k, v, W.float(), "softmax", True, mask)[1].numel() == 0
    q, k, v, W, mask = make_inputs(1, 2, 100, 100, 16, 8, 16, dtype=torch.float32, device="cuda")
    assert fwd(q, k, v, W, "softmax", True, mask)[1].numel() == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("jump_at", [40, 64, 130])
def test_running_max_rescaling(dtype, jump_at):
    # Large-norm keys first (their exponents are hundreds below zero), then ordinary keys: the
    # running max jumps by hundreds mid-chunk (40, 130) or at a chunk start (64); the per-chunk
    # states are rescaled without overflow or NaN and match the reference.
    q, k, v, W, _ = make_inputs(1, 2, 200, 200, 8, 4, 16)
    k[:, :, :jump_at] = 40 * torch.nn.functional.normalize(k[:, :, :jump_at], dim=-1)
    out = op(q.to(dtype), k.to(dtype), v.to(dtype), W.to(dtype), "softmax", True)
    ref = favor_attention_reference(q, k, v, W, "softmax", True)
    assert torch.isfinite(out).all()
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    # The jump really happened: the key exponents before it are far below those after it.
    kp = k * 8 ** -0.25
    a = (kp @ W.T - 0.5 * kp.square().sum(-1, keepdim=True)).amax(-1)
    assert a[..., :jump_at].max() < a[..., jump_at:].max() - 100


# The fused bf16 kernels (cpp/attention/favor_*.cuh) take bf16 calls whose head_dim and feature
# count are multiples of 16. They round the projection to bf16 for the tensor cores, so they are
# compared with the CPU op (fp32 compute) given the same bf16-rounded projection.
FUSED_SIZES = [
    (2, 3, 300, 300, 64, 64, 64),  # ragged last chunk (300 = 4 * 64 + 44)
    (1, 2, 64, 64, 32, 16, 32),    # exactly one chunk
    (1, 2, 1, 1, 16, 8, 16),       # one token
    (2, 2, 150, 150, 16, 24, 48),  # value dim != head dim
    (1, 2, 200, 200, 64, 64, 256),  # softmax: the compile-time shape (kShapeD64M256); relu: generic
]


@cuda
@needs_gpu
@pytest.mark.parametrize("size", FUSED_SIZES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("noncontig", [False, True])
def test_cuda_fused_bf16_matches_cpu(size, kernel, causal, noncontig):
    q, k, v, W, mask = make_inputs(*size, dtype=torch.bfloat16, masked=True, noncontig=noncontig)
    Wr = W.to(torch.bfloat16).float()
    a = [t.clone().requires_grad_() for t in (q, k, v)] + [Wr.clone().requires_grad_()]
    b = [t.cuda().requires_grad_() for t in (q, k, v)] + [Wr.cuda().requires_grad_()]
    if noncontig and size[2] > 1 and size[1] > 1:  # the strided layout survives the copy
        assert not b[0].is_contiguous()
    oa = op(*a, kernel, causal, mask)
    ob = op(*b, kernel, causal, mask.cuda())
    assert ob.dtype == torch.bfloat16 and ob.shape == oa.shape
    torch.testing.assert_close(ob.cpu().double(), oa.double(), rtol=2e-2, atol=2e-2)
    g = torch.randn(oa.shape, generator=torch.Generator().manual_seed(1), dtype=oa.dtype)
    oa.backward(g)
    ob.backward(g.cuda())
    # relu: d phi / d u jumps at u = 0, and pre-activations within bf16 rounding of 0 can land on
    # either side in the two implementations; one flipped entry moves a gradient by a few percent.
    gtol = 3e-2 if kernel == "softmax" else 8e-2
    for x, y in zip(a, b):
        scale = x.grad.abs().max().item() + 1e-6
        err = (y.grad.cpu().double() - x.grad.double()).abs().max().item() / scale
        assert err < gtol, (err, x.shape)


@cuda
@needs_gpu
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_fused_noncausal_lengths_and_fp16(causal):
    # Lq != Lk (non-causal) through the fused path; fp16 keeps the fp32 ATen path on CUDA.
    Lq, Lk = (200, 200) if causal else (70, 333)
    q, k, v, W, mask = make_inputs(2, 2, Lq, Lk, 32, 32, 64, dtype=torch.float32, masked=True)
    ref = op(q, k, v, W.float(), "softmax", causal, mask).double()
    for dt, tol in ((torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        out = op(q.to(dt).cuda(), k.to(dt).cuda(), v.to(dt).cuda(), W.float().cuda(), "softmax",
                 causal, mask.cuda())
        assert out.dtype == dt
        torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol)


@cuda
@needs_gpu
@pytest.mark.parametrize("jump_at", [40, 64, 130])
def test_cuda_fused_running_max_jump(jump_at):
    # The running-max rescaling of the fused kernels: keys whose exponents are hundreds below the
    # later ones come first (see test_running_max_rescaling).
    q, k, v, W, _ = make_inputs(1, 2, 200, 200, 16, 16, 32)
    k[:, :, :jump_at] = 40 * torch.nn.functional.normalize(k[:, :, :jump_at], dim=-1)
    Wr = W.to(torch.bfloat16).double()
    bf = [t.to(torch.bfloat16) for t in (q, k, v)]
    out = op(*[t.cuda() for t in bf], Wr.float().cuda(), "softmax", True)
    ref = favor_attention_reference(*[t.double() for t in bf], Wr, "softmax", True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu().double(), ref, rtol=3e-2, atol=3e-2)


@cuda
@needs_gpu
def test_cuda_fused_projection_grad_is_flagged_nondeterministic():
    # The fused backward sums the projection gradient with atomics: under deterministic
    # algorithms it raises PyTorch's standard error; q/k/v gradients alone are fine.
    q, k, v, W, _ = make_inputs(1, 2, 100, 100, 16, 16, 32, dtype=torch.bfloat16, device="cuda")
    q.requires_grad_()
    Wg = W.float().cuda().requires_grad_()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = op(q, k, v, W.float().cuda(), "softmax", True)
        out.sum().backward()  # no projection gradient: allowed
        with pytest.raises(RuntimeError, match="deterministic"):
            op(q, k, v, Wg, "softmax", True).sum().backward()
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "torchscript"])
def test_none_for_a_required_tensor_names_the_argument(scripted):
    q, k, v, W, _ = make_inputs(1, 2, 5, 5, 4, 3, 6)
    fn = torch.jit.script(panther.ops.favor_attention) if scripted else panther.ops.favor_attention
    # (TorchScript wraps the op's TypeError in its interpreter's RuntimeError.)
    err = RuntimeError if scripted else TypeError
    for i, name in enumerate(("query", "key", "value", "projection")):
        args = [q, k, v, W]
        args[i] = None
        with pytest.raises(err, match=rf"favor_attention: {name} must be a [tT]ensor, got None"):
            fn(*args)
    # The op itself (torch.ops) says the same.
    with pytest.raises(TypeError, match=r"panther::favor_attention: value must be a tensor, got None"):
        op(q, k, None, W)
    with pytest.raises(TypeError, match=r"projection must be a Tensor, got ndarray"):
        panther.ops.favor_attention(q, k, v, W.numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.uint8, torch.int32])
def test_key_padding_mask_must_be_bool(dtype):
    # The op takes bool masks only (the module converts the other forms); never silently ignored.
    q, k, v, W, _ = make_inputs(1, 2, 5, 5, 4, 3, 6)
    mask = torch.zeros(1, 5, dtype=dtype)
    for f in (op, panther.ops.favor_attention):
        with pytest.raises(RuntimeError, match=r"favor_attention: key_padding_mask must be bool"):
            f(q, k, v, W, "softmax", False, mask)
    with pytest.raises(RuntimeError, match=r"key_padding_mask must be bool"):
        op(q.to("meta"), k.to("meta"), v.to("meta"), W.to("meta"), "softmax", False, mask.to("meta"))


@pytest.mark.parametrize("bad,pattern", [
    ("transposed", r"grad_output must have the output's shape \(batch, heads, Lq, value_dim\) = \(2, 3, 10, 5\), got \(2, 10, 3, 5\)"),
    ("short", r"grad_output must have the output's shape .* got \(2, 3, 9, 5\)"),
    ("int", r"grad_output must be float64, float32, float16 or bfloat16"),
    ("device", r"grad_output must be on the query's device"),
])
def test_backward_op_checks_grad_output(bad, pattern):
    """The private backward validates grad_output: one of the output's size but another shape
    would otherwise be reshaped (or, on CUDA, indexed by the expected strides)."""
    q, k, v = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 5)
    W = torch.randn(6, 4)
    g = torch.randn(2, 3, 10, 5)
    g_bad = {"transposed": g.transpose(1, 2).contiguous(), "short": g[:, :, :9],
             "int": g.long(), "device": g.to("meta")}[bad]
    bwd = torch.ops.panther._favor_attention_backward
    with pytest.raises(RuntimeError, match=r"panther::_favor_attention_backward: " + pattern):
        bwd(g_bad, q, k, v, W, "softmax", True, None, [True] * 4)
    assert all(t is not None for t in bwd(g, q, k, v, W, "softmax", True, None, [True] * 4))
