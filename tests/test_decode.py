"""Autoregressive decoding with RandMultiHeadAttention: prefill + step / step_.

The outputs of a prefill of P positions followed by T steps must equal, position by position,
the causal forward over all P + T positions (float64; both the module's forward and the
independent float64 reference ``rand_multihead_attention_reference``). Inputs grow in scale
along the sequence, so the key stabiliser rises during the steps and the state is rescaled (a
wrong rescale or a misplaced eps changes the result by far more than the tolerance).
"""

import re

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


def test_step_with_parametrized_weights():
    """A weight under torch.nn.utils.parametrize (not in the module's parameter dict) is read as
    the parametrization gives it, by the forward and by step_."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    layer, twin = make_layer(), make_layer()
    with torch.no_grad():
        twin.Wv.mul_(2)
        twin.b0.mul_(2)
    parametrize.register_parametrization(layer, "Wv", Double())
    parametrize.register_parametrization(layer, "b0", Double())
    x = growing_input(2, 7, seed=5)
    with torch.no_grad():
        full, _ = layer(x, x, x)
        torch.testing.assert_close(full, twin(x, x, x)[0], rtol=1e-12, atol=1e-13)
        out, state = layer.prefill(x[:, :4])
        steps = [layer.step_(x[:, t:t + 1], state) for t in range(4, 7)]
    torch.testing.assert_close(torch.cat([out] + steps, 1), full, rtol=1e-10, atol=1e-12)


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
    for bad_x in (torch.randn(2, 0, E, dtype=F64), torch.randn(E, dtype=F64), torch.randn(1, 2, 1, E, dtype=F64)):
        with pytest.raises(ValueError, match=r"step_: x_t must be \(batch, 1, embed_dim\)"):
            layer.step_(bad_x, state)
    with pytest.raises(TypeError, match=r"step_: x_t must be a Tensor, got list"):
        layer.step_([0.0] * E, state)
    with pytest.raises(ValueError, match=r"state must hold kv \(3, 2, 8, 9\)"):
        layer.step(torch.randn(3, 1, E, dtype=F64), state)
    with pytest.raises(ValueError, match=r"state must be a FavorDecodeState"):
        layer.step_(torch.randn(2, 1, E, dtype=F64), (state.kv,))
    for bad in (state.length.to(torch.int32), state.length.reshape(1)):
        with pytest.raises(ValueError, match=r"state.length must be a 0-d int64 tensor on cpu, got shape"):
            layer.step_(torch.randn(2, 1, E, dtype=F64), state._replace(length=bad))
    assert int(state.length) == 3  # nothing was consumed by the failed calls


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


# ------------------------------------------------------------------ the fused step op

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from panther import _favor_math as fm  # noqa: E402

STEP_OP = torch.ops.panther._favor_decode_step_


class OpLog(TorchDispatchMode):
    """Records the names of the ops dispatched under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def empty_state(lead, M, Dv, kernel_fn, dtype=F64, device="cpu"):
    r = torch.full(lead, float("-inf") if kernel_fn == "softmax" else 0.0, dtype=dtype, device=device)
    return (torch.zeros(*lead, M, Dv + 1, dtype=dtype, device=device),
            torch.zeros(*lead, Dv + 1, dtype=dtype, device=device), r)


def step_inputs(lead, D, Dv, t, seed, dtype=F64):
    """One position's q, k, v; their scale grows with t, so the key stabiliser rises."""
    g = torch.Generator().manual_seed(1000 * seed + t)
    s = 0.5 + 0.6 * t
    return (torch.randn(*lead, D, generator=g, dtype=F64).to(dtype) * s,
            torch.randn(*lead, D, generator=g, dtype=F64).to(dtype) * s,
            torch.randn(*lead, Dv, generator=g, dtype=F64).to(dtype))


STEP_SHAPES = [(lead, M, D, Dv) for lead in ((1,), (2, 3)) for M in (3, 256, 300) for D in (4, 64)
               for Dv in (3, 64)]


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("lead,M,D,Dv", STEP_SHAPES)
def test_step_op_equals_python_math(kernel_fn, lead, M, D, Dv):
    """The op (CPU, float64) updates the state and reads it out as decode_step's Python math, from
    an empty state on, step after step."""
    W = torch.randn(M, D, generator=torch.Generator().manual_seed(7), dtype=F64)
    state = empty_state(lead, M, Dv, kernel_fn)
    ref = tuple(t.clone() for t in state)
    for t in range(4):
        q, k, v = step_inputs(lead, D, Dv, t, seed=M + D + Dv)
        want, *ref = fm.decode_step(q, k, v, W, kernel_fn, *ref, inplace=False)
        ptrs = [s.data_ptr() for s in state]
        got = STEP_OP(q, k, v, W, kernel_fn, *state)
        assert [s.data_ptr() for s in state] == ptrs
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
        for s, r in zip(state, ref):
            torch.testing.assert_close(s, r, rtol=1e-12, atol=1e-13)
    if kernel_fn == "softmax":
        assert bool(torch.isfinite(state[2]).all())


def test_step_op_errors():
    lead, M, D, Dv = (2, 3), 5, 4, 3
    W = torch.randn(M, D, dtype=F64)
    q, k, v = step_inputs(lead, D, Dv, 0, seed=1)
    kv, vs, r = empty_state(lead, M, Dv, "softmax")
    ok = (q, k, v, W, "softmax", kv, vs, r)

    def call(**kw):
        names = ("query", "key", "value", "projection", "kernel_fn", "kv", "v_sum", "stabiliser")
        return STEP_OP(*[kw.get(n, a) for n, a in zip(names, ok)], **({"length": kw["length"]} if "length" in kw else {}))

    bad = [
        (dict(kernel_fn="gelu"), r"kernel must be \"softmax\" or \"relu\", got \"gelu\""),
        (dict(key=k[..., :3]), r"key must have the query's shape \(\.\.\., head_dim\) = \(2, 3, 4\), got \(2, 3, 3\)"),
        (dict(value=v[:1]), r"value must have the query's leading dims"),
        (dict(projection=W[:, :3]), r"projection must have shape \(num_random_features >= 1, head_dim=4\)"),
        (dict(kv=kv[..., :3]), r"kv must have shape \(\.\.\., num_random_features, value_dim \+ 1\) = \(2, 3, 5, 4\)"),
        (dict(v_sum=vs[0]), r"v_sum must have shape \(\.\.\., value_dim \+ 1\) = \(2, 3, 4\), got \(3, 4\)"),
        (dict(stabiliser=r[:, :1]), r"stabiliser must have the query's leading shape"),
        (dict(kv=kv.float()), r"kv must have dtype Double \(the decode state's for Double queries\), got Float"),
        (dict(query=q.half(), key=k.half(), value=v.half(), projection=W.half(), kv=kv.half(),
              v_sum=vs.half(), stabiliser=r.half()),
         r"kv must have dtype Float \(the decode state's for Half queries\), got Half"),
        (dict(query=q.int(), key=k.int(), value=v.int()), r"query must be float16, bfloat16, float32 or float64, got Int"),
        (dict(key=k.float()), r"key must have the query's dtype Double, got Float"),
        (dict(v_sum=vs.float()), r"v_sum must have the kv's dtype Double, got Float"),
        (dict(query=q.bfloat16(), key=k.bfloat16(), value=v.bfloat16(), kv=kv.float(), v_sum=vs.float(),
              stabiliser=r.float()), r"projection must have the query's dtype BFloat16 or the state's Float, got Double"),
        (dict(projection=W.to("meta")), r"projection must be on the query's device cpu, got meta"),
        (dict(query=q[0, 0, 0]), r"query must have at least 1 dimension|key must have the query's shape"),
        (dict(value=v.clone().requires_grad_()), r"value must not require grad .*torch.no_grad"),
        (dict(length=torch.tensor(3, dtype=torch.int32)), r"length must be int64 \(the positions the state holds\), got Int"),
        (dict(length=torch.tensor([3])), r"length must be a 0-d tensor, got shape \(1,\)"),
        (dict(length=torch.tensor(3, device="meta")), r"length must be on the query's device cpu, got meta"),
    ]
    for kw, match in bad:
        with pytest.raises(RuntimeError, match=r"^panther::_favor_decode_step_: " + match):
            call(**kw)
    with pytest.raises(TypeError, match=r"kv must be a tensor, got None"):
        call(kv=None)
    # requires_grad is fine without grad mode (nothing to record)
    with torch.no_grad():
        call(value=v.clone().requires_grad_())


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w_state", [True, False])
def test_step_op_low_precision_inputs(in_dtype, w_state):
    """bf16/fp16 query, key and value (views of one fused projection, as the module passes them)
    on a float32 state: the op computes in float32 and returns the query's dtype; it equals the
    float64 math on the same rounded inputs, to float32 accuracy in the state."""
    lead, M, D = (2, 3), 40, 8
    g = torch.Generator().manual_seed(3)
    W = torch.randn(M, D, generator=g, dtype=F64).to(torch.float32 if w_state else in_dtype)
    state = empty_state(lead, M, D, "softmax", dtype=torch.float32)
    ref = empty_state(lead, M, D, "softmax")
    for t in range(3):
        qkv = (torch.randn(lead[0], 3, lead[1], D, generator=g, dtype=F64) * (0.5 + 0.6 * t)).to(in_dtype)
        q, k, v = qkv.unbind(1)
        assert not q.is_contiguous()
        got = STEP_OP(q, k, v, W, "softmax", *state)
        want = STEP_OP(q.double(), k.double(), v.double(), W.double(), "softmax", *ref)
        assert got.dtype == in_dtype and got.shape == (*lead, D)
        tol = 1e-2 if in_dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        for s_, r_ in zip(state, ref):
            torch.testing.assert_close(s_.double(), r_, rtol=1e-5, atol=1e-6)


def test_step_op_meta_shapes():
    lead, M, D, Dv = (2, 3), 5, 4, 3
    args = [t.to("meta") for t in step_inputs(lead, D, Dv, 0, seed=1)]
    out = STEP_OP(*args, torch.empty(M, D, device="meta", dtype=F64), "relu",
                  *empty_state(lead, M, Dv, "relu", device="meta"))
    assert out.shape == (2, 3, Dv) and out.device.type == "meta" and out.dtype == F64


def test_step_in_place_on_cpu_keeps_python_math():
    """On CPU step_ runs the Python math (the op is for CUDA)."""
    layer = make_layer()
    x = growing_input(1, 4)
    with torch.no_grad():
        _, state = layer.prefill(x[:, :3])
        with OpLog() as log:
            layer.step_(x[:, 3:], state)
    assert "panther._favor_decode_step_" not in log.names
    assert "panther._favor_decode_layer_" not in log.names


def test_step_op_counts_length_when_given():
    """The op adds one to ``length`` (the positions the state holds) in place when it is given,
    and leaves the rest of the step as it is without it."""
    lead, M, D, Dv = (2, 3), 5, 4, 3
    W = torch.randn(M, D, dtype=F64)
    q, k, v = step_inputs(lead, D, Dv, 0, seed=3)
    counted, plain = empty_state(lead, M, Dv, "softmax"), empty_state(lead, M, Dv, "softmax")
    length = torch.tensor(9)
    ptr = length.data_ptr()
    a = STEP_OP(q, k, v, W, "softmax", *counted, length)
    b = STEP_OP(q, k, v, W, "softmax", *plain)
    assert int(length) == 10 and length.data_ptr() == ptr
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(counted, plain))


# ------------------------------------------------------------------ the whole layer's step op

LAYER_OP = torch.ops.panther._favor_decode_layer_


def layer_inputs(B, H, E_in, D, Dv, M, E_out, bias, seed, dtype=F64):
    """x, qkv = (w_q (H D, E_in), w_k, w_v (H Dv, E_in), b_q, b_k, b_v), the projection (M, D), w_out
    (E_out, H Dv), b_out."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    ws = [cast(r(n, E_in) * E_in ** -0.5) for n in (H * D, H * D, H * Dv)]
    bs = [cast(r(n)) if bias else None for n in (H * D, H * D, H * Dv)]
    wo = r(E_out, H * Dv) * (H * Dv) ** -0.5
    bo = r(E_out) if bias else None
    return cast(r(B, E_in)), (*ws, *bs), r(M, D), cast(wo), cast(bo)


def on(qkv, f):
    """f applied to each of the q/k/v weights and biases (None stays None)."""
    return tuple(None if t is None else f(t) for t in qkv)


def layer_reference(x, qkv, W, kernel_fn, wo, bo, kv, vs, r, H, length=None):
    """The layer's step composed of at::linear and the step op (CPU)."""
    B, D, Dv = x.shape[0], W.shape[1], kv.shape[-1] - 1
    lin = torch.nn.functional.linear
    q, k, v = (lin(x, qkv[i], qkv[3 + i]).view(B, H, n) for i, n in enumerate((D, D, Dv)))
    ctx = STEP_OP(q, k, v, W.to(kv.dtype), kernel_fn, kv, vs, r, length)
    return lin(ctx.reshape(B, H * Dv), wo, bo)


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B", [1, 3])
def test_layer_op_equals_composition(kernel_fn, bias, B):
    """The layer op (CPU) equals q/k/v projection, the step op and the output projection, step after
    step, in place, counting the length."""
    H, E_in, D, Dv, M, E_out = 3, 10, 4, 5, 7, 6
    ours, ref = empty_state((B, H), M, Dv, kernel_fn), empty_state((B, H), M, Dv, kernel_fn)
    n_ours, n_ref = torch.tensor(2), torch.tensor(2)
    for t in range(4):
        x, qkv, W, wo, bo = layer_inputs(B, H, E_in, D, Dv, M, E_out, bias, seed=t)
        x = x * 2.0 / (1 + t)  # shrinking inputs: the key stabiliser rises
        want = layer_reference(x, qkv, W, kernel_fn, wo, bo, *ref, H, n_ref)
        ptrs = [s.data_ptr() for s in ours]
        got = LAYER_OP(x, *qkv, W, kernel_fn, wo, bo, *ours, n_ours)
        assert [s.data_ptr() for s in ours] == ptrs and got.shape == (B, E_out)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for s, r in zip(ours, ref):
            torch.testing.assert_close(s, r, rtol=1e-12, atol=1e-12)
        assert int(n_ours) == int(n_ref) == 3 + t


def test_layer_op_errors():
    B, H, E_in, D, Dv, M, E_out = 2, 3, 10, 4, 5, 7, 6
    x, qkv, W, wo, bo = layer_inputs(B, H, E_in, D, Dv, M, E_out, True, seed=0)
    wq, wk, wv, bq, bk, bv = qkv
    state = empty_state((B, H), M, Dv, "softmax")
    ok = [x, *qkv, W, "softmax", wo, bo, *state]
    LAYER_OP(*ok)
    name = "panther::_favor_decode_layer_"
    bad = {
        0: (x[None], "x must be 2-d"),
        1: (wq[:-1], "w_q must have shape (num_heads * head_dim, embed_dim) = (12, 10), got (11, 10)"),
        2: (wk[:, :-1], "w_k must have shape (num_heads * head_dim, embed_dim) = (12, 10), got (12, 9)"),
        3: (wv[:-1], "w_v must have shape (num_heads * value_dim, embed_dim) = (15, 10), got (14, 10)"),
        4: (bq[:-1], "b_q must have shape [12]"),
        5: (bk[:-1], "b_k must have shape [12]"),
        6: (bv[:-1], "b_v must have shape [15]"),
        7: (W[:, :-1], "w_q must have shape"),  # head_dim from the projection: the weights disagree
        9: (wo[:, :-1], "w_out must have num_heads * value_dim = 15 columns"),
        10: (bo[:-1], "b_out must have shape [6]"),
        11: (state[0][:, :, :, :-1], "w_v must have shape"),  # value_dim from kv
        12: (state[1][..., :-1], "v_sum must have shape"),
        13: (state[2][:1], "stabiliser must have"),
    }
    for i, (arg, msg) in bad.items():
        args = list(ok)
        args[i] = arg
        with pytest.raises(RuntimeError, match=re.escape(f"{name}: {msg}")):
            LAYER_OP(*args)
    with pytest.raises(RuntimeError, match=f"{name}: w_out must have the x's dtype"):
        LAYER_OP(x, *qkv, W, "softmax", wo.float(), bo, *state)
    with pytest.raises(RuntimeError, match=f"{name}: w_k must have the x's dtype"):
        LAYER_OP(x, wq, wk.float(), wv, bq, bk, bv, W, "softmax", wo, bo, *state)
    with pytest.raises(RuntimeError, match=f"{name}: b_v must have the x's dtype"):
        LAYER_OP(x, wq, wk, wv, bq, bk, bv.float(), W, "softmax", wo, bo, *state)
    with pytest.raises(RuntimeError, match=f"{name}: kernel must be"):
        LAYER_OP(x, *qkv, W, "gelu", wo, bo, *state)
    with pytest.raises(RuntimeError, match=f"{name}: w_v must not require grad"):
        LAYER_OP(x, wq, wk, wv.clone().requires_grad_(), bq, bk, bv, W, "softmax", wo, bo, *state)
    with pytest.raises(RuntimeError, match=f"{name}: length must be int64"):
        LAYER_OP(*ok, torch.tensor(1.0))


def test_layer_op_meta_shapes():
    B, H, E_in, D, Dv, M, E_out = 2, 3, 10, 4, 5, 7, 6
    x, qkv, W, wo, bo = layer_inputs(B, H, E_in, D, Dv, M, E_out, True, seed=0)
    meta = lambda t: t.to("meta")  # noqa: E731
    state = empty_state((B, H), M, Dv, "relu", device="meta")
    out = LAYER_OP(meta(x), *on(qkv, meta), meta(W), "relu", meta(wo), meta(bo), *state)
    assert out.shape == (B, E_out) and out.device.type == "meta" and out.dtype == F64


# (B, H, E_in, D, Dv, M): the GPT-2-small head block; features not a multiple of the cluster; value_dim at
# the cluster kernel's limit; and shapes it does not take (value_dim 128, head_dim 160, 300 features: the
# projection kernels and the one-block step kernel instead).
LAYER_SHAPES = [(1, 12, 768, 64, 64, 256), (2, 3, 48, 16, 16, 40), (2, 2, 40, 33, 95, 100),
                (1, 2, 64, 16, 128, 64), (1, 2, 64, 160, 16, 64), (2, 2, 32, 16, 16, 300)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("shape", LAYER_SHAPES)
def test_layer_op_cuda_equals_cpu_math(shape, kernel_fn, dtype):
    """The layer op on CUDA (the cluster kernel where it takes the call) equals the CPU op on the same
    rounded inputs, from an empty state on; the length is counted; biases or not (or on k only), strided
    x."""
    B, H, E_in, D, Dv, M = shape
    sd = F64 if dtype == F64 else torch.float32
    # The cluster kernel (the first three shapes) projects q, k and v in float32 from bf16 x and
    # weights, where the other path rounds them to bf16: its reference is the float64 math of the
    # same bf16 inputs.
    exact = dtype == torch.bfloat16 and shape in LAYER_SHAPES[:3]
    rdt = F64 if exact else dtype
    ref = empty_state((B, H), M, Dv, kernel_fn, dtype=F64 if exact else sd)
    state = tuple(t.to("cuda", sd) for t in ref)
    n_ref, n = torch.tensor(0), torch.tensor(0, device="cuda")
    if dtype == torch.bfloat16:
        tol_out, tol_state = dict(rtol=2e-2, atol=2e-2), dict(rtol=1e-4, atol=2e-5)
    elif dtype == torch.float32:
        tol_out = tol_state = dict(rtol=1e-4, atol=2e-5)
    else:
        tol_out = tol_state = dict(rtol=1e-11, atol=1e-12)
    for t in range(4):
        x, qkv, W, wo, bo = layer_inputs(B, H, E_in, D, Dv, M, 2 * E_in, t % 2 == 0, seed=t, dtype=dtype)
        if t == 2:  # a bias on k only
            qkv = (*qkv[:3], None, torch.ones_like(qkv[1][:, 0]), None)
        x = x * 2.0 / (1 + t)
        up = lambda a: None if a is None else a.to(rdt)  # noqa: E731
        want = LAYER_OP(up(x), *on(qkv, up), W.to(dtype).to(rdt), kernel_fn, up(wo), up(bo), *ref, n_ref).to(dtype)
        xc = torch.cat([x, torch.zeros_like(x)], 1).cuda()[:, :E_in] if t == 1 else x.cuda()  # strided rows
        cu = lambda a: None if a is None else a.cuda()  # noqa: E731
        got = LAYER_OP(xc, *on(qkv, cu), cu(W.to(dtype)), kernel_fn, cu(wo), cu(bo), *state, n)
        assert got.dtype == dtype and got.shape == (B, 2 * E_in)
        torch.testing.assert_close(got.cpu(), want, **tol_out)
        for s, r in zip(state, ref):
            torch.testing.assert_close(s.cpu().to(r.dtype), r, **tol_state)
        assert int(n) == int(n_ref) == t + 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_layer_op_cuda_empty_batch_and_graph_capture():
    """An empty batch only counts the length; the GPT-2-small layer's step replayed from a CUDA graph equals
    eager calls."""
    H, E_in, D, Dv, M = 12, 768, 64, 64, 256
    x, qkv, W, wo, bo = layer_inputs(1, H, E_in, D, Dv, M, E_in, True, seed=3, dtype=torch.bfloat16)
    x, qkv, W, wo, bo = x.cuda(), on(qkv, lambda t: t.cuda()), W.to("cuda", torch.bfloat16), wo.cuda(), bo.cuda()
    n = torch.tensor(4, device="cuda")
    empty = empty_state((0, H), M, Dv, "softmax", dtype=torch.float32, device="cuda")
    assert LAYER_OP(x[:0], *qkv, W, "softmax", wo, bo, *empty, n).shape == (0, E_in) and int(n) == 5
    eager = empty_state((1, H), M, Dv, "softmax", dtype=torch.float32, device="cuda")
    graphed = tuple(t.clone() for t in eager)
    xs = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a copy of the state
        LAYER_OP(xs, *qkv, W, "softmax", wo, bo, *(t.clone() for t in graphed))
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = LAYER_OP(xs, *qkv, W, "softmax", wo, bo, *graphed, n)
    for t in range(3):
        xt = x * 2.0 / (1 + t)
        want = LAYER_OP(xt, *qkv, W, "softmax", wo, bo, *eager)
        xs.copy_(xt)
        g.replay()
        torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)  # (bf16; the output GEMM's choice)
    assert int(n) == 8
    for a, e in zip(graphed, eager):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("lead,M,D,Dv", STEP_SHAPES)
def test_step_op_cuda_equals_cpu_math(kernel_fn, lead, M, D, Dv, dtype):
    """The fused CUDA kernel equals the float64 math on the same (rounded) inputs."""
    W = torch.randn(M, D, generator=torch.Generator().manual_seed(7), dtype=F64).to(dtype).double()
    ref = empty_state(lead, M, Dv, kernel_fn)
    state = tuple(t.to("cuda", dtype) for t in ref)
    # fp32: pre-activations near -20 carry ~2e-6 absolute rounding into every feature
    tol = dict(rtol=1e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-12)
    length = torch.tensor(5, device="cuda")  # counted by the kernel (on even steps)
    for t in range(4):
        q, k, v = (x.to(dtype).double() for x in step_inputs(lead, D, Dv, t, seed=M + D + Dv))
        want = STEP_OP(q, k, v, W, kernel_fn, *ref)
        n = {"length": length} if t % 2 == 0 else {}
        got = STEP_OP(*(x.to("cuda", dtype) for x in (q, k, v, W)), kernel_fn, *state, **n)
        torch.testing.assert_close(got.double().cpu(), want, **tol)
        for s, r in zip(state, ref):
            torch.testing.assert_close(s.double().cpu(), r, **tol)
        assert int(length) == 5 + t // 2 + 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_step_op_cuda_low_precision_inputs(kernel_fn, in_dtype):
    """The fused kernel with bf16/fp16 inputs read in place from one fused projection (strided
    rows) and a float32 state equals the CPU math on the same inputs."""
    lead, M, D = (2, 3), 256, 64
    g = torch.Generator().manual_seed(5)
    for W in (torch.randn(M, D, generator=g), torch.randn(M, D, generator=g).to(in_dtype)):
        ref = empty_state(lead, M, D, kernel_fn, dtype=torch.float32)
        state = tuple(t.cuda() for t in ref)
        for t in range(4):
            qkv = (torch.randn(lead[0], 3, lead[1], D, generator=g) * (0.5 + 0.6 * t)).to(in_dtype)
            want = STEP_OP(*qkv.unbind(1), W, kernel_fn, *ref)
            got = STEP_OP(*qkv.cuda().unbind(1), W.cuda(), kernel_fn, *state)
            assert got.dtype == in_dtype
            torch.testing.assert_close(got.cpu().float(), want.float(), rtol=1e-2, atol=1e-2)
            for s, r in zip(state, ref):
                torch.testing.assert_close(s.cpu(), r, rtol=1e-4, atol=2e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_step_in_place_cuda_equals_full_causal_forward(kernel_fn, dtype):
    """prefill + step_ on CUDA runs the layer op, and equals the causal forward position by
    position."""
    layer = make_layer(kernel_fn, dtype=dtype, device="cuda")
    B, P, L = 3, 5, 14
    x = growing_input(B, L, dtype=dtype, device="cuda")
    with torch.no_grad():
        full, _ = layer(x, x, x)
        out, state = layer.prefill(x[:, :P])
        outs = [out]
        with OpLog() as log:
            for t in range(P, L):
                outs.append(layer.step_(x[:, t:t + 1], state))
        assert log.names.count("panther._favor_decode_layer_") == L - P
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=tol, atol=tol)
    assert int(state.length) == L
