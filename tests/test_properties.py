"""Property tests (hypothesis) of Panther's ops against their float64 references.

For random shapes (including 1 and 0), dtypes, memory layouts (transposed, sliced, broadcast
inputs; non-contiguous parameters) and options, the op's output and gradients are compared with
``panther._reference`` (plain PyTorch, float64, term by term):

* float64: tight (rounding of a different summation order only);
* float32 / bfloat16 / float16: within a bound built like dense GEMM's own error,
  ``c * eps * (reduction length) * (|x| |A| |B|)`` elementwise (plus one rounding of the output in
  low precision), so a kernel that rounds an intermediate to low precision or drops a term fails.

Hypothesis runs derandomized (the same examples every run) so CI is stable; ``deadline=None``
because the first call of an op pays one-off dispatcher set-up.
The ``favor_attention`` properties run once ``torch.ops.panther.favor_attention`` and its
reference exist, and are skipped with the reason otherwise.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import panther  # noqa: F401  (loads torch.ops.panther)

from conftest import DEVICES

try:
    from panther._reference import sketched_linear_reference
except ImportError:  # the reference module is not installed yet: the same formula, term by term

    def sketched_linear_reference(input, S1s, S2s, U1s, U2s, bias=None):
        x = input.to(torch.float64)
        L = S1s.shape[0]
        out = sum(
            (x @ S1s[i].double()) @ U1s[i].double() + (x @ U2s[i].double()) @ S2s[i].double() for i in range(L)
        ) / (2 * L)
        return out + bias.double() if bias is not None else out


try:
    from panther._reference import favor_attention_reference
except ImportError:
    favor_attention_reference = None

HAS_FAVOR_OP = hasattr(torch.ops.panther, "favor_attention")
FAVOR_SKIP = (
    "torch.ops.panther.favor_attention is not in this build (attention issue not merged yet)"
    if not HAS_FAVOR_OP
    else "panther._reference.favor_attention_reference is missing"
)

# PANTHER_FUZZ_EXAMPLES=N: N random (not derandomized) examples per property, for a deeper hunt.
_FUZZ = int(os.environ.get("PANTHER_FUZZ_EXAMPLES", "0"))
PROPS = settings(
    deadline=None,
    max_examples=_FUZZ or 30,
    derandomize=not _FUZZ,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

EPS = {
    torch.float64: torch.finfo(torch.float64).eps,
    torch.float32: torch.finfo(torch.float32).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float16: torch.finfo(torch.float16).eps,
}


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """``t`` in another memory layout (for "broadcast": its first row repeated with stride 0), as a new leaf."""
    if how == "transposed":  # last dim not unit-stride
        v = t.movedim(-1, 0).contiguous().movedim(0, -1)
    elif how == "sliced":  # every other element of a wider buffer
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        v = wide[..., ::2]
    elif how == "broadcast" and t.dim() >= 2 and t.shape[0] > 1:  # stride 0 on the first dim
        v = t[:1].expand_as(t)
    else:
        v = t
    return v.detach().requires_grad_(t.requires_grad)


# ---- sketched_linear ---------------------------------------------------------------------------


@st.composite
def sketched_cases(draw):
    return dict(
        dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16])),
        L=draw(st.integers(1, 3)),
        k=draw(st.integers(1, 9)),
        d_in=draw(st.sampled_from([1, 2, 3, 5, 8, 13, 16, 24])),
        d_out=draw(st.sampled_from([1, 2, 4, 7, 16, 17])),
        lead=tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 5]), min_size=0, max_size=2))),
        x_layout=draw(st.sampled_from(["contiguous", "transposed", "sliced", "broadcast"])),
        p_layout=draw(st.sampled_from(["contiguous", "transposed"])),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _sketched_operands(c, device):
    g = torch.Generator().manual_seed(c["seed"])
    L, k, d_in, d_out, dt = c["L"], c["k"], c["d_in"], c["d_out"], c["dtype"]

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dt)

    x = make(*c["lead"], d_in)
    ops = [make(L, d_in, k), make(L, k, d_out), make(L, k, d_out, scale=k**-0.5), make(L, d_in, k, scale=k**-0.5)]
    b = make(d_out) if c["bias"] else None
    x = _layout(x.requires_grad_(), c["x_layout"])
    ops = [_layout(t.requires_grad_(), c["p_layout"]) for t in ops]
    b = b.requires_grad_() if b is not None else None
    return x, ops, b


def _abs_bound(fn, args, grad_out=None):
    """Elementwise |x||A||B|-style bound of a multilinear ``fn``: fn of the absolute values (float64),
    and, with ``grad_out``, the matching bound of every gradient."""
    a = [t.detach().abs().double().requires_grad_() if t is not None else None for t in args]
    out = fn(*a)
    if grad_out is None:
        return out.detach(), None
    grads = torch.autograd.grad(out, [t for t in a if t is not None], grad_out.abs().double(), allow_unused=True)
    return out.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
@PROPS
@given(c=sketched_cases())
def test_sketched_linear_matches_reference(device, c):
    x, (S1s, S2s, U1s, U2s), b = _sketched_operands(c, device)
    dt = c["dtype"]
    y = torch.ops.panther.sketched_linear(x, S1s, S2s, U1s, U2s, b)
    assert y.dtype == dt and y.shape == (*c["lead"], c["d_out"]) and y.device == x.device

    args = [x, S1s, S2s, U1s, U2s, b]
    ref = sketched_linear_reference(*args)
    G = torch.randn(ref.shape, generator=torch.Generator().manual_seed(c["seed"] + 1), dtype=torch.float64)
    G = G.to(device=device, dtype=dt)
    bound, gbounds = _abs_bound(sketched_linear_reference, args, G)

    # Reduction lengths: d_in then 2Lk forward; tokens, d_out and 2Lk in backward.
    n_tok = max(1, x.numel() // c["d_in"])
    K = c["d_in"] + 2 * c["L"] * c["k"]
    Kb = K + n_tok + c["d_out"]
    eps32 = EPS[torch.float32] if dt != torch.float64 else EPS[torch.float64]
    lowp = EPS[dt] if dt in (torch.float16, torch.bfloat16) else 0.0
    # Rounding to the output dtype near underflow costs up to one subnormal step, whatever the scale.
    sub = torch.finfo(dt).smallest_normal * torch.finfo(dt).eps
    tol = 4 * eps32 * K * bound + lowp * (ref.abs() + bound) + sub
    err = (y.double() - ref.detach()).abs()
    assert bool((err <= tol).all()), f"forward: max err {err.max().item() if err.numel() else 0:.3g} for {c}"
    if not torch.isfinite(ref).all():  # fp16 range exceeded by the draw: values are checked above
        return

    # Gradients of every operand against autograd through the reference.
    wrt = [t for t in args if t is not None]
    got = torch.autograd.grad(y, wrt, G)
    want = torch.autograd.grad(ref, wrt, G.double())
    names = ["input", "S1s", "S2s", "U1s", "U2s", "bias"]
    for name, g, w, gb in zip(names, got, want, gbounds):
        assert g.dtype == dt and g.shape == w.shape, name
        gtol = 4 * eps32 * Kb * gb + lowp * (w.abs() + gb) * 2 + sub
        gerr = (g.double() - w.double()).abs()
        assert bool((gerr <= gtol).all()), f"grad {name}: max err {gerr.max().item():.3g} for {c}"


@PROPS
@given(
    lead=st.lists(st.sampled_from([0, 1, 3]), min_size=1, max_size=3).filter(lambda s: 0 in s),
    d_in=st.integers(1, 9),
    d_out=st.integers(1, 9),
    bias=st.booleans(),
)
def test_sketched_linear_empty_tokens(lead, d_in, d_out, bias):
    """Zero tokens: an empty output of the right shape, and zero (not missing) parameter gradients
    (bias gradient zero too), like nn.Linear."""
    S1s = torch.randn(2, d_in, 3, requires_grad=True)
    S2s = torch.randn(2, 3, d_out, requires_grad=True)
    U1s, U2s = torch.randn(2, 3, d_out), torch.randn(2, d_in, 3)
    b = torch.randn(d_out, requires_grad=True) if bias else None
    x = torch.randn(*lead, d_in, requires_grad=True)
    y = torch.ops.panther.sketched_linear(x, S1s, S2s, U1s, U2s, b)
    assert y.shape == (*lead, d_out)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in [S1s, S2s] + ([b] if bias else []):
        assert p.grad is not None and p.grad.shape == p.shape and bool((p.grad == 0).all())


# ---- favor_attention ---------------------------------------------------------------------------


@st.composite
def favor_cases(draw):
    L = draw(st.sampled_from([1, 2, 3, 5, 7, 16, 17, 33, 64, 65, 129]))
    return dict(
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        B=draw(st.integers(1, 2)),
        H=draw(st.integers(1, 3)),
        L=L,
        D=draw(st.sampled_from([1, 2, 4, 8, 13, 16])),
        M=draw(st.sampled_from([1, 2, 8, 15, 32])),
        kernel=draw(st.sampled_from(["softmax", "relu"])),
        causal=draw(st.booleans()),
        mask=draw(st.sampled_from(["none", "right_padding", "random"])),
        layout=draw(st.sampled_from(["contiguous", "bthd"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _favor_operands(c, device):
    g = torch.Generator().manual_seed(c["seed"])
    B, H, L, D, M, dt = c["B"], c["H"], c["L"], c["D"], c["M"], c["dtype"]

    def qkv():
        if c["layout"] == "bthd":  # as a module produces them: (B, L, H, D) viewed as (B, H, L, D)
            t = torch.randn(B, L, H, D, generator=g, dtype=torch.float64).transpose(1, 2)
        else:
            t = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
        return t.to(device=device, dtype=dt).detach().requires_grad_()

    q, k, v = qkv(), qkv(), qkv()
    proj = torch.randn(M, D, generator=g, dtype=torch.float64).to(device=device, dtype=dt)
    mask = None
    if c["mask"] != "none":
        if c["mask"] == "right_padding" or c["causal"]:
            # Key 0 always kept, so every (causal) query sees at least one key.
            lengths = torch.randint(1, L + 1, (B,), generator=g)
            mask = torch.arange(L)[None, :] >= lengths[:, None]
        else:
            mask = torch.rand(B, L, generator=g) < 0.4
            mask[:, torch.randint(0, L, (1,), generator=g)] = False  # at least one key kept
        mask = mask.to(device)
    return q, k, v, proj, mask


@pytest.mark.skipif(not (HAS_FAVOR_OP and favor_attention_reference is not None), reason=FAVOR_SKIP)
@pytest.mark.parametrize("device", DEVICES)
@PROPS
@given(c=favor_cases())
def test_favor_attention_matches_reference(device, c):
    q, k, v, proj, mask = _favor_operands(c, device)
    out = torch.ops.panther.favor_attention(q, k, v, proj, c["kernel"], c["causal"], mask)
    assert out.shape == v.shape and out.dtype == c["dtype"]
    ref = favor_attention_reference(q, k, v, proj, c["kernel"], c["causal"], mask)
    assert torch.isfinite(out).all()
    # The output is a weighted mean of value rows: judge errors against max|v|.
    vmax = v.detach().abs().max().double()
    tol = (1e-9 if c["dtype"] == torch.float64 else 2e-4) * (1 + c["M"] / 32)
    torch.testing.assert_close(out.double(), ref.detach().double(), rtol=tol, atol=tol * vmax, msg=str(c))

    G = torch.randn(ref.shape, generator=torch.Generator().manual_seed(c["seed"] + 1), dtype=torch.float64)
    got = torch.autograd.grad(out, [q, k, v], G.to(out))
    want = torch.autograd.grad(ref, [q, k, v], G.to(ref))
    # Per-tensor scale, floored by the largest gradient: a gradient that is exactly 0 in exact
    # arithmetic (d/dk with a single key; d/dq with M = 1, where phi(q) cancels between numerator
    # and denominator) comes out as the rounding noise of two cancelling terms, which grows like
    # 1/phi(q) for queries with small features -- conditioning, not a kernel error.
    top = max(w.abs().max().double() for w in want)
    for name, a, b in zip("qkv", got, want):
        scale = torch.maximum(b.abs().max().double(), 0.05 * top) + 1e-300
        torch.testing.assert_close(a.double(), b.double(), rtol=10 * tol, atol=10 * tol * scale, msg=f"grad {name}: {c}")


# ---------------------------------------------------------------- modules


@st.composite
def mha_module_cases(draw):
    causal = draw(st.booleans())
    kernel = draw(st.sampled_from(["softmax", "relu"]))
    masks = ["none", "kpm_bool", "kpm_int", "kpm_neginf", "kpm_finfo_min", "am_bool", "am_int", "am_float"]
    if kernel == "softmax":
        masks.append("kpm_bias")
    extra = "none" if causal else draw(st.sampled_from(["none", "bias_kv", "zero_attn", "both"]))
    Lq = draw(st.integers(1, 7))
    return dict(
        seed=draw(st.integers(0, 2**16)),
        H=draw(st.integers(1, 3)),
        hd=draw(st.sampled_from([1, 2, 4])),
        M=draw(st.integers(1, 24)),
        B=draw(st.integers(1, 3)),
        Lq=Lq,
        Lk=Lq if causal else draw(st.integers(1, 7)),
        kdim=draw(st.sampled_from([None, 3])),
        vdim=draw(st.sampled_from([None, 5])),
        dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16])),
        kernel=kernel,
        causal=causal,
        causal_via=draw(st.sampled_from(["iscausal", "is_causal", "attn_mask_bool", "attn_mask_float"])),
        batch_first=draw(st.booleans()),
        unbatched=draw(st.booleans()),
        bias=draw(st.booleans()),
        mask=draw(st.sampled_from(masks)),
        extra=extra,
        need_weights=draw(st.booleans()),
        average=draw(st.booleans()),
    )


@PROPS
@given(c=mha_module_cases())
def test_rand_mha_module_matches_reference_and_mha_conventions(c):
    """RandMultiHeadAttention against its float64 reference (every mask form, causal flag, layout,
    kdim/vdim, appended keys, need_weights), and nn.MultiheadAttention's shapes and dtypes."""
    from panther._reference import rand_multihead_attention_reference
    from panther.nn import RandMultiHeadAttention

    torch.manual_seed(c["seed"])
    g = torch.Generator().manual_seed(c["seed"])
    E, dt = c["H"] * c["hd"], c["dtype"]
    B = 1 if c["unbatched"] else c["B"]
    kw = dict(batch_first=c["batch_first"], kdim=c["kdim"], vdim=c["vdim"], bias=c["bias"],
              add_bias_kv=c["extra"] in ("bias_kv", "both"), add_zero_attn=c["extra"] in ("zero_attn", "both"))
    layer = RandMultiHeadAttention(E, c["H"], c["M"], kernel_fn=c["kernel"], dtype=dt, generator=g,
                                   iscausal=c["causal"] and c["causal_via"] == "iscausal", **kw)
    kdim, vdim = c["kdim"] or E, c["vdim"] or E
    Lq, Lk = c["Lq"], c["Lk"]
    q = torch.randn(B, Lq, E, generator=g, dtype=torch.float64).to(dt)
    k = torch.randn(B, Lk, kdim, generator=g, dtype=torch.float64).to(dt)
    v = torch.randn(B, Lk, vdim, generator=g, dtype=torch.float64).to(dt)
    padded = torch.rand(B, Lk, generator=g) < 0.3
    padded[:, 0] = False  # every (causal) query sees a key
    fwd, ref_kw = {}, {}
    m = c["mask"]
    if m.startswith("kpm"):
        if m == "kpm_bool":
            mask = padded
        elif m == "kpm_int":
            mask = padded.long()
        elif m == "kpm_bias":
            mask = torch.randn(B, Lk, generator=g).to(dt).masked_fill(padded, float("-inf"))
        else:
            fill = float("-inf") if m == "kpm_neginf" else torch.finfo(dt).min
            mask = torch.zeros(B, Lk, dtype=dt).masked_fill(padded, fill)
        fwd["key_padding_mask"] = ref_kw["key_padding_mask"] = mask
    elif m.startswith("am"):
        keep = ~padded
        mask = keep if m == "am_bool" else keep.long() if m == "am_int" else keep.to(dt)
        fwd["attention_mask"] = ref_kw["attention_mask"] = mask
    if c["causal"]:
        if c["causal_via"] == "is_causal":
            fwd["is_causal"] = True
        elif c["causal_via"] == "attn_mask_bool":
            fwd["attn_mask"] = torch.ones(Lq, Lq, dtype=torch.bool).triu(1)
        elif c["causal_via"] == "attn_mask_float":
            fwd["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(Lq, dtype=dt)
    if c["unbatched"]:
        q, k, v = q[0], k[0], v[0]
        for d in (fwd, ref_kw):
            for name in ("key_padding_mask", "attention_mask"):
                if name in d:
                    d[name] = d[name][0]
    elif not c["batch_first"]:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    out, w = layer(q, k, v, **fwd, need_weights=c["need_weights"], average_attn_weights=c["average"])
    ref, ref_w = rand_multihead_attention_reference(layer, q, k, v, causal=c["causal"], return_weights=True,
                                                    **ref_kw)
    assert out.dtype == dt and out.shape == ref.shape
    assert torch.isfinite(out).all()
    tol = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 5e-2}[dt] * (1 + c["M"] / 32)
    scale = ref.abs().max().item() + 1e-3
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * scale, msg=str(c))
    if c["need_weights"]:
        want = ref_w.mean(-3) if c["average"] else ref_w
        torch.testing.assert_close(w.double(), want, rtol=tol, atol=tol, msg=str(c))
    else:
        assert w is None
    # nn.MultiheadAttention with the same arguments gives the same shapes and dtypes.
    mha = torch.nn.MultiheadAttention(E, c["H"], dtype=dt, **kw)
    mha_kw = {n: val for n, val in fwd.items() if n != "attention_mask"}
    if "attention_mask" in fwd:
        mha_kw["key_padding_mask"] = fwd["attention_mask"] == 0
    if mha_kw.get("is_causal") and "attn_mask" not in mha_kw:
        mha_kw["attn_mask"] = torch.ones(Lq, Lq, dtype=torch.bool).triu(1)
    if c["mask"] == "kpm_int":  # nn.MultiheadAttention takes bool or float masks
        mha_kw["key_padding_mask"] = mha_kw["key_padding_mask"].bool()
    mout, mw = mha(q, k, v, **mha_kw, need_weights=c["need_weights"], average_attn_weights=c["average"])
    assert mout.shape == out.shape and mout.dtype == out.dtype
    assert (mw is None) == (w is None) and (w is None or w.shape == mw.shape)


@st.composite
def sklinear_module_cases(draw):
    return dict(
        seed=draw(st.integers(0, 2**16)),
        d_in=draw(st.integers(1, 12)),
        d_out=draw(st.integers(1, 12)),
        L=draw(st.integers(1, 3)),
        k=draw(st.integers(1, 5)),
        lead=draw(st.lists(st.integers(0, 3), min_size=0, max_size=3)),
        dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16])),
        bias=draw(st.booleans()),
        layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
    )


@PROPS
@given(c=sklinear_module_cases())
def test_sklinear_module_matches_reference_and_linear_conventions(c):
    """SKLinear against the float64 reference of its own parameters, and nn.Linear's conventions:
    any leading dims, output shape and dtype, and its dense weight as an nn.Linear."""
    import warnings

    from panther.nn import SKLinear

    g = torch.Generator().manual_seed(c["seed"])
    dt = c["dtype"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sketches larger than the dense layer
        layer = SKLinear(c["d_in"], c["d_out"], c["L"], c["k"], bias=c["bias"], dtype=dt, generator=g)
    x = torch.randn(*c["lead"], c["d_in"], generator=g, dtype=torch.float64).to(dt)
    x = _layout(x, c["layout"]) if x.dim() >= 1 and c["layout"] != "contiguous" else x
    out = layer(x)
    dense = torch.nn.Linear(c["d_in"], c["d_out"], bias=c["bias"], dtype=dt)
    assert out.shape == dense(x).shape and out.dtype == dt
    ref = sketched_linear_reference(x, layer.S1s, layer.S2s, layer.U1s, layer.U2s, layer.bias)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 4e-2}[dt]
    scale = ref.abs().max().item() + 1e-3 if ref.numel() else 1.0
    torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=tol * scale, msg=str(c))
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
        if c["bias"]:
            dense.bias.copy_(layer.bias)
    torch.testing.assert_close(dense(x).double(), ref.detach(), rtol=4 * tol, atol=4 * tol * scale, msg=str(c))
