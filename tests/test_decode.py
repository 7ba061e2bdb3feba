"""Autoregressive decoding with RandMultiHeadAttention: prefill + step / step_.

The outputs of a prefill of P positions followed by T steps must equal, position by position,
the causal forward over all P + T positions (float64; both the module's forward and the
independent float64 reference ``rand_multihead_attention_reference``). Inputs grow in scale
along the sequence, so the key stabiliser rises during the steps and the state is rescaled (a
wrong rescale or a misplaced eps changes the result by far more than the tolerance).
"""

import pytest
import torch

import panther as pr
from panther._reference import rand_multihead_attention_reference
from panther.nn import FavorDecodeState

E, H, M = 16, 2, 8
F64 = torch.float64


def make_layer(kernel_fn="softmax", batch_first=True, dtype=F64, device="cpu", **kw):
    layer = pr.nn.RandMultiHeadAttention(E, H, M, kernel_fn=kernel_fn, iscausal=True, batch_first=batch_first,
                                         dtype=dtype, generator=torch.Generator().manual_seed(1), **kw)
    return layer.to(device).eval()


def growing_input(B, L, dtype=F64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, E, generator=g, dtype=F64) * torch.linspace(0.3, 2.5, L, dtype=F64)[None, :, None]
    return x.to(device=device, dtype=dtype)


def decode(layer, x, P, mask=None):
    """Prefill x[:, :P], then step through the rest: outputs (B, L, E) and the states."""
    out, state = layer.prefill(x[:, :P], key_padding_mask=mask)
    outs, states = [out], [state]
    for t in range(P, x.shape[1]):
        o, state = layer.step(x[:, t:t + 1], state)
        outs.append(o)
        states.append(state)
    return torch.cat(outs, 1), states


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("P", [1, 5])
def test_prefill_then_steps_equal_full_causal_forward(kernel_fn, P):
    layer = make_layer(kernel_fn)
    B, L = 3, 12
    x = growing_input(B, L)
    got, states = decode(layer, x, P)
    full, _ = layer(x, x, x, is_causal=True)
    ref = rand_multihead_attention_reference(layer, x, x, x, causal=True)
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert int(states[-1].length) == L
    if kernel_fn == "softmax":  # the stabiliser rose during the steps: the rescale was exercised
        assert bool((states[-1].stabiliser > states[0].stabiliser).any())
    else:
        assert bool((states[-1].stabiliser == 0).all())


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_prefill_key_padding_mask(kernel_fn):
    layer = make_layer(kernel_fn)
    B, P, L = 3, 6, 10
    x = growing_input(B, L, seed=2)
    mask = torch.zeros(B, P, dtype=torch.bool)
    mask[0, 1] = mask[0, 4] = True
    mask[2, :] = True  # every prompt key of sequence 2 is padded: its state starts empty
    got, states = decode(layer, x, P, mask=mask)
    full_mask = torch.cat([mask, torch.zeros(B, L - P, dtype=torch.bool)], 1)
    ref = rand_multihead_attention_reference(layer, x, x, x, key_padding_mask=full_mask, causal=True)
    full, _ = layer(x, x, x, key_padding_mask=full_mask, is_causal=True)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-12)
    if kernel_fn == "softmax":
        assert bool(torch.isneginf(states[0].stabiliser[2]).all())
    # float 0 / -inf masks mean the same
    fmask = torch.zeros(B, P, dtype=F64).masked_fill(mask, float("-inf"))
    got_f, _ = decode(layer, x, P, mask=fmask)
    torch.testing.assert_close(got_f, got, rtol=0, atol=0)


def test_step_in_place_and_layouts():
    layer = make_layer()
    B, P, L = 2, 4, 8
    x = growing_input(B, L, seed=3)
    want, _ = decode(layer, x, P)
    # step_: same outputs, the same tensors updated
    with torch.no_grad():
        out, state = layer.prefill(x[:, :P])
        ptrs = [t.data_ptr() for t in state]
        outs = [out] + [layer.step_(x[:, t], state)[:, None] for t in range(P, L)]  # (B, E) inputs
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-12, atol=1e-13)
    assert [t.data_ptr() for t in state] == ptrs and int(state.length) == L
    assert state.numerator.shape == (B, H, M, E // H) and state.denominator.shape == (B, H, M)
    # batch_first=False: (seq, batch, E) in and out; unbatched prompts give a batch-1 state
    tb = make_layer(batch_first=False)
    tb.load_state_dict(layer.state_dict())
    xt = x.transpose(0, 1)
    out, state = tb.prefill(xt[:P])
    steps = []
    for t in range(P, L):
        o, state = tb.step(xt[t:t + 1], state)
        steps.append(o)
    torch.testing.assert_close(torch.cat([out] + steps, 0).transpose(0, 1), want, rtol=1e-12, atol=1e-13)
    out1, st1 = layer.prefill(x[1, :P])
    o1, _ = layer.step(x[1, P:P + 1], st1)
    assert out1.shape == (P, E) and o1.shape == (1, E)
    torch.testing.assert_close(o1[0], want[1, P], rtol=1e-12, atol=1e-13)


def test_state_memory_is_independent_of_context_length():
    layer = make_layer()
    sizes = []
    for L in (3, 200):
        _, state = layer.prefill(growing_input(2, L))
        _, state = layer.step(growing_input(2, 1), state)
        assert isinstance(state, FavorDecodeState)
        sizes.append([(tuple(t.shape), t.dtype) for t in state])
    assert sizes[0] == sizes[1]
    assert sizes[0][0] == ((2, H, M, E // H + 1), F64)


def test_low_precision_state_is_float32():
    layer = make_layer(dtype=torch.bfloat16)
    x = growing_input(1, 6, dtype=torch.bfloat16)
    out, state = layer.prefill(x[:, :5])
    o, state = layer.step(x[:, 5:], state)
    assert state.kv.dtype == torch.float32 and o.dtype == torch.bfloat16
    full, _ = layer(x, x, x)
    torch.testing.assert_close(o, full[:, 5:], rtol=2e-2, atol=2e-2)


def test_step_is_differentiable():
    layer = make_layer()
    x = growing_input(2, 6).requires_grad_()
    got, _ = decode(layer, x, 3)
    g = torch.randn_like(got)
    (gx,) = torch.autograd.grad((got * g).sum(), x)
    x2 = x.detach().clone().requires_grad_()
    full, _ = layer(x2, x2, x2)
    (gx2,) = torch.autograd.grad((full * g).sum(), x2)
    torch.testing.assert_close(gx, gx2, rtol=1e-9, atol=1e-11)


def test_step_in_place_compiles_without_graph_breaks():
    """torch.compile(step_, fullgraph=True) (what reduce-overhead decoding loops need) traces in
    one graph and updates the state as eager does."""
    layer = make_layer()
    x = growing_input(1, 9, seed=4)
    with torch.no_grad():
        _, st = layer.prefill(x[:, :6])
        _, ref = layer.prefill(x[:, :6])
        f = torch.compile(layer.step_, fullgraph=True, backend="eager")
        for t in range(6, 9):
            o = f(x[:, t:t + 1], st)
            o_ref, ref = layer.step(x[:, t:t + 1], ref)
            torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-13)
    for a, b in zip(st, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_errors():
    nc = pr.nn.RandMultiHeadAttention(E, H, M, dtype=F64)
    with pytest.raises(ValueError, match=r"prefill: decoding needs a causal layer"):
        nc.prefill(growing_input(1, 3))
    with pytest.raises(ValueError, match=r"step: decoding needs a causal layer"):
        nc.step(growing_input(1, 1), None)
    kd = pr.nn.RandMultiHeadAttention(E, H, M, iscausal=True, kdim=8, vdim=8)
    with pytest.raises(ValueError, match=r"kdim == vdim == embed_dim"):
        kd.prefill(torch.randn(1, 3, E))
    layer = make_layer()
    with pytest.raises(ValueError, match=r"prefill: x must be \(batch, P, embed_dim\)"):
        layer.prefill(torch.randn(1, 3, E + 1, dtype=F64))
    with pytest.raises(ValueError, match=r"at least one position"):
        layer.prefill(torch.randn(1, 0, E, dtype=F64))
    with pytest.raises(ValueError, match=r"score biases"):
        layer.prefill(growing_input(1, 3), key_padding_mask=torch.full((1, 3), 0.5, dtype=F64))
    _, state = layer.prefill(growing_input(2, 3))
    with pytest.raises(ValueError, match=r"step: x_t must be \(batch, 1, embed_dim\)"):
        layer.step(torch.randn(2, 2, E, dtype=F64), state)
    with pytest.raises(ValueError, match=r"state must hold kv \(3, 2, 8, 9\)"):
        layer.step(torch.randn(3, 1, E, dtype=F64), state)
    with pytest.raises(ValueError, match=r"state must be a FavorDecodeState"):
        layer.step_(torch.randn(2, 1, E, dtype=F64), (state.kv,))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_step_in_place_under_cuda_graph(kernel_fn):
    layer = make_layer(kernel_fn, dtype=torch.float32, device="cuda")
    B, P, L = 2, 16, 24
    x = growing_input(B, L, dtype=torch.float32, device="cuda")
    with torch.no_grad():
        _, ref_state = layer.prefill(x[:, :P])
        want = []
        for t in range(P, L):
            o, ref_state = layer.step(x[:, t:t + 1], ref_state)
            want.append(o)
        _, state = layer.prefill(x[:, :P])
        x_static = x[:, P:P + 1].clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        snapshot = [t.clone() for t in state]
        with torch.cuda.stream(s):  # warm-up outside the graph, then restore the state
            layer.step_(x_static, state)
        torch.cuda.current_stream().wait_stream(s)
        for t, v in zip(state, snapshot):
            t.copy_(v)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_static = layer.step_(x_static, state)
        got = []
        for t in range(P, L):
            x_static.copy_(x[:, t:t + 1])
            graph.replay()
            got.append(out_static.clone())
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), rtol=1e-5, atol=1e-5)
    assert int(state.length) == L
    full, _ = layer(x, x, x)
    torch.testing.assert_close(torch.cat(got, 1), full[:, P:], rtol=1e-4, atol=1e-4)
