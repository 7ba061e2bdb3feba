"""Tests of the op ``panther::sketched_linear`` and the module ``pr.nn.SKLinear``.

Everything numeric is fed by ONE sample-input factory (``CASES`` x dtype x device, built by
``make_sample``): odd sizes (d_in/d_out of 1, 7, 33; k not a multiple of 16; L = 1..3), 1-D/2-D/3-D
inputs, non-contiguous inputs and sketches, empty inputs, with and without bias, and different
sets of arguments that require grad.

Accuracy rules, always against the float64 reference ``panther._reference`` evaluated on the very
same (already rounded) input values:

* float64 / float32 -- the rounding bound of the formula, elementwise:
  ``|ours - ref| <= 2 * K * u * mag`` where ``u`` is the unit roundoff of the dtype,
  ``K = d_in + d_out + 2*L*k + N + 8`` bounds the length of every dot product involved
  (forward and backward), and ``mag`` is the reference evaluated on the absolute values of all
  arguments (for gradients: reference gradients of ``|args|`` against ``|grad_out|``), i.e. the
  sum of the absolute values of all products that make up each entry (Higham's bound for a
  product of matrices). The factor 2 also covers the reference's own float64 rounding.
* float16 / bfloat16 -- judged against the error ``nn.Linear`` itself makes in that precision on
  the same data: ``F.linear(x, W, b)`` with ``W`` the equivalent dense weight rounded to that
  dtype. With ``nerr(a, ref) = max|a - ref| / max|ref|``, we require
  ``nerr(ours) <= 2 * nerr(F.linear) + u`` for the output, and for every gradient
  ``nerr(ours) <= 2 * max(nerr(F.linear grad_input), nerr(F.linear grad_weight)) + u``, with
  ``u = eps(dtype) / 2`` the unit roundoff: a result rounded once to the dtype is within ``u``.
  That is the acceptance rule. It is lenient at test sizes, so a second, elementwise check pins
  down "fp32 accumulation, no silent downcast": every entry of the output and of every gradient
  must be the float64 result up to one rounding of the ``(N, 2Lk)`` intermediate to the dtype
  and one rounding of the result,
  ``|ours - ref| <= u * |ref| + (2 * K * u_fp32 + 2 * u) * mag`` (the first term is the final
  rounding; the second the fp32 arithmetic and the rounded intermediate, whose error is at most
  ``u`` times the products it enters). Accumulating in fp16/bf16 breaks it.

The checks every op gets (opcheck, Meta vs real, torch.compile, torch.export, TorchScript of the
op, autocast, the error format) run in tests/test_conformance.py on the op's registry entry
(tests/op_registry.py); this file keeps what they cannot state.
"""

import io
import math
import warnings
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import panther as pr
from panther._reference import sketched_linear_dense_weight_reference, sketched_linear_reference

OP = torch.ops.panther.sketched_linear.default
FWD_OP = torch.ops.panther._sketched_linear_forward.default
BWD_OP = torch.ops.panther._sketched_linear_backward.default
ARG_NAMES = ("input", "S1s", "S2s", "U1s", "U2s", "bias")
LOWP = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ---------------------------------------------------------------------------------------------
# The sample-input factory
# ---------------------------------------------------------------------------------------------

# Which of (input, S1s, S2s, U1s, U2s, bias) require grad.
GRAD_MASKS = {
    "all": (True, True, True, True, True, True),
    "none": (False,) * 6,
    "input": (True, False, False, False, False, False),
    "S1s_bias": (False, True, False, False, False, True),
    "S2s_U2s": (False, False, True, False, True, False),
    "input_U1s": (True, False, False, True, False, False),
}


@dataclass(frozen=True)
class Case:
    name: str
    batch: Tuple[int, ...]  # leading dims of the input; () gives a 1-D input
    d_in: int
    d_out: int
    L: int
    k: int
    bias: bool = True
    layout: str = "contiguous"  # "transposed" | "strided" input, or "weights": strided sketches/bias
    grad: str = "all"  # key of GRAD_MASKS

    @property
    def N(self) -> int:
        return math.prod(self.batch)


CASES = [
    Case("2d", (5,), 7, 33, 1, 3),
    Case("1d", (), 33, 7, 2, 5),
    Case("3d_din1_k17", (2, 3), 1, 7, 3, 17),
    Case("3d_dout1_nobias", (3, 2), 7, 1, 2, 4, bias=False),
    Case("empty", (0,), 7, 5, 2, 3),
    Case("empty_3d_nobias", (2, 0), 5, 7, 1, 2, bias=False),
    Case("transposed", (6,), 7, 9, 2, 3, layout="transposed"),
    Case("transposed_3d", (2, 3), 9, 7, 1, 5, layout="transposed"),
    Case("strided", (2, 4), 9, 7, 1, 5, layout="strided"),
    Case("strided_weights", (4,), 8, 6, 2, 3, layout="weights"),
    Case("grad_input", (4,), 7, 5, 2, 3, grad="input"),
    Case("grad_S1s_bias", (3,), 7, 5, 3, 2, grad="S1s_bias"),
    Case("grad_S2s_U2s_nobias", (2, 2), 5, 7, 2, 3, bias=False, grad="S2s_U2s"),
    Case("grad_input_U1s", (4,), 6, 5, 1, 4, grad="input_U1s"),
    Case("grad_none", (4,), 7, 5, 2, 3, grad="none"),
]
CASE_IDS = [c.name for c in CASES]


@dataclass
class Sample:
    case: Case
    args: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]
    mask: Tuple[bool, ...]  # requires_grad of each argument (False for a missing bias)
    grad_out: torch.Tensor  # a fixed upstream gradient, same shape/dtype/device as the output

    @property
    def dtype(self) -> torch.dtype:
        return self.args[0].dtype


def make_sample(case: Case, dtype: torch.dtype = torch.float32, device="cpu") -> Sample:
    """Builds one sample: values drawn in float64 from a generator seeded by the case name,
    rounded to ``dtype``, moved to ``device``, then given the case's layout and requires_grad."""
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    L, k, d_in, d_out, batch = case.L, case.k, case.d_in, case.d_out, case.batch

    def cast(t):
        return t.to(device=device, dtype=dtype)

    def randn(*shape, scale=1.0):
        return cast(torch.randn(shape, generator=g, dtype=torch.float64) * scale)

    def signs(*shape):
        s = torch.randint(0, 2, shape, generator=g).to(torch.float64) * 2 - 1
        return cast(s / math.sqrt(k))

    if case.layout == "transposed" and batch:
        # (d_in, *batch) storage, viewed as (*batch, d_in): the feature dim is the slow one.
        x = randn(d_in, *batch).movedim(0, -1)
    elif case.layout == "strided":
        x = randn(*batch, 2 * d_in)[..., ::2]
    else:
        x = randn(*batch, d_in)
    if case.layout == "weights":
        S1s = randn(L, k, d_in, scale=d_in ** -0.5).transpose(1, 2)
        S2s = randn(L, d_out, k, scale=k ** -0.5).transpose(1, 2)
        U1s = signs(k, L, d_out).transpose(0, 1)
        U2s = signs(L, 2 * d_in, k)[:, ::2]
        b = randn(2 * d_out, scale=0.5)[::2]
    else:
        S1s = randn(L, d_in, k, scale=d_in ** -0.5)
        S2s = randn(L, k, d_out, scale=k ** -0.5)
        U1s = signs(L, k, d_out)
        U2s = signs(L, d_in, k)
        b = randn(d_out, scale=0.5)
    if not case.bias:
        b = None
    mask = tuple(m and t is not None for m, t in zip(GRAD_MASKS[case.grad], (x, S1s, S2s, U1s, U2s, b)))
    # detach() keeps the strides, so the leaves themselves are non-contiguous where intended.
    args = tuple(None if t is None else t.detach().requires_grad_(m) for t, m in zip((x, S1s, S2s, U1s, U2s, b), mask))
    grad_out = randn(*batch, d_out)
    if case.layout == "contiguous" and batch:
        assert args[0].is_contiguous()
    return Sample(case, args, mask, grad_out)


def sample_params(dtypes=ALL_DTYPES, cases=CASES):
    return [pytest.param(c, dt, id=f"{c.name}-{DTYPE_IDS[dt]}") for dt in dtypes for c in cases]


# ---------------------------------------------------------------------------------------------
# Reference evaluation and the accuracy rules
# ---------------------------------------------------------------------------------------------

def _f64(t, requires_grad=False, absolute=False):
    if t is None:
        return None
    t = t.detach().to("cpu", torch.float64)
    if absolute:
        t = t.abs()
    return t.requires_grad_(requires_grad)


def reference(sample: Sample, absolute: bool = False, grads: bool = True):
    """Float64 reference output and gradients (``None`` where an argument needs none) of a sample.
    ``absolute``: evaluated on the absolute values of all arguments and of ``grad_out``."""
    a = [_f64(t, m and grads, absolute) for t, m in zip(sample.args, sample.mask)]
    y = sketched_linear_reference(*a)
    out = [None] * 6
    want = [i for i, m in enumerate(sample.mask) if m and grads]
    if want:
        go = _f64(sample.grad_out, absolute=absolute)
        gs = torch.autograd.grad(y, [a[i] for i in want], go)
        for i, gi in zip(want, gs):
            out[i] = gi
    return y.detach(), out


def nerr(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    scale = ref.abs().max().item()
    err = (a.detach().to("cpu", torch.float64) - ref).abs().max().item()
    return err / scale if scale > 0 else err


def lowp_floor(dtype: torch.dtype) -> float:
    """The absolute floor of the fp16/bf16 rule: the unit roundoff (one rounding of the result)."""
    return torch.finfo(dtype).eps / 2


def rounding_bound(sample: Sample, mag: torch.Tensor) -> torch.Tensor:
    c = sample.case
    K = c.d_in + c.d_out + 2 * c.L * c.k + c.N + 8
    u = torch.finfo(sample.dtype).eps / 2
    return 2 * K * u * mag + torch.finfo(sample.dtype).tiny


def rounded_bound(sample: Sample, ref: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    c = sample.case
    K = c.d_in + c.d_out + 2 * c.L * c.k + c.N + 8
    u = torch.finfo(sample.dtype).eps / 2
    u32 = torch.finfo(torch.float32).eps / 2
    return u * ref.abs() + (2 * K * u32 + 2 * u) * mag + torch.finfo(sample.dtype).tiny


def assert_within_rounding(sample: Sample, ours: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, what: str):
    """float64/float32: ``rounding_bound``; fp16/bf16: ``rounded_bound`` (module docstring)."""
    assert ours.dtype == sample.dtype, f"{what}: dtype {ours.dtype}, expected {sample.dtype}"
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)}, expected {tuple(ref.shape)}"
    err = (ours.detach().to("cpu", torch.float64) - ref).abs()
    if sample.dtype in LOWP:
        bound = rounded_bound(sample, ref, mag)
    else:
        bound = rounding_bound(sample, mag)
    bad = err > bound
    assert not bad.any(), (
        f"{what} ({sample.case.name}, {sample.dtype}): {int(bad.sum())} entries beyond the rounding "
        f"bound; worst err {err.max().item():.3e} vs bound {bound.flatten()[err.flatten().argmax()].item():.3e}"
    )


def dense_linear_errors(sample: Sample):
    """nerr of F.linear (dense weight rounded to the sample's dtype) for output, grad_input, grad_weight,
    each against the float64 target (the sketched reference and its exact gradients)."""
    x, S1s, S2s, U1s, U2s, b = sample.args
    W64 = sketched_linear_dense_weight_reference(_f64(S1s), _f64(S2s), _f64(U1s), _f64(U2s))
    dev, dt = x.device, x.dtype
    xd = x.detach().requires_grad_()
    Wd = W64.to(device=dev, dtype=dt).requires_grad_()
    bd = None if b is None else b.detach()
    y = F.linear(xd, Wd, bd)
    y.backward(sample.grad_out)
    y_ref, _ = reference(sample, grads=False)
    x64, g64 = _f64(x), _f64(sample.grad_out)
    gx_ref = g64 @ W64
    gW_ref = g64.reshape(-1, W64.shape[0]).t() @ x64.reshape(-1, W64.shape[1])
    return nerr(y, y_ref), nerr(xd.grad, gx_ref), nerr(Wd.grad, gW_ref)


def run_op(sample: Sample, fn=None):
    """Output and gradients (by ``.grad`` of the leaves) of the op on a sample."""
    fn = fn or OP
    for t in sample.args:
        if t is not None:
            t.grad = None
    y = fn(*sample.args)
    grads = [None] * 6
    if any(sample.mask):
        assert y.requires_grad
        y.backward(sample.grad_out)
        grads = [None if t is None else t.grad for t in sample.args]
    else:
        assert not y.requires_grad
    return y, grads


# ---------------------------------------------------------------------------------------------
# Op: values and gradients against the float64 reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,dtype", sample_params())
def test_forward_matches_reference(case, dtype, device):
    s = make_sample(case, dtype, device)
    with torch.no_grad():
        y = OP(*s.args)
    y_ref, _ = reference(s, grads=False)
    assert y.dtype == dtype and y.device.type == torch.device(device).type
    assert y.shape == (*case.batch, case.d_out)
    if dtype in LOWP:
        lin_err, _, _ = dense_linear_errors(s)
        ours = nerr(y, y_ref)
        eps = lowp_floor(dtype)
        assert ours <= 2 * lin_err + eps, f"{case.name} {dtype}: nerr {ours:.3e} vs F.linear's {lin_err:.3e}"
    mag, _ = reference(s, absolute=True, grads=False)
    assert_within_rounding(s, y, y_ref, mag, "output")


@pytest.mark.parametrize("case,dtype", sample_params())
def test_backward_matches_reference(case, dtype, device):
    s = make_sample(case, dtype, device)
    y, grads = run_op(s)
    y_ref, g_ref = reference(s)
    if dtype in LOWP:
        lin_y, lin_gx, lin_gW = dense_linear_errors(s)
        eps = lowp_floor(dtype)
        assert nerr(y, y_ref) <= 2 * lin_y + eps
        tol = 2 * max(lin_gx, lin_gW) + eps
    _, g_mag = reference(s, absolute=True)
    for name, m, gr, gref, t in zip(ARG_NAMES, s.mask, grads, g_ref, s.args):
        if not m:
            # Arguments that do not require grad get none (and a missing bias has nothing).
            assert gr is None, f"{name} does not require grad but got one"
            continue
        assert gr is not None, f"{name} requires grad but got none"
        assert gr.shape == t.shape and gr.dtype == t.dtype and gr.device == t.device, name
        if dtype in LOWP:
            e = nerr(gr, gref)
            assert e <= tol, f"grad {name} ({case.name}, {dtype}): nerr {e:.3e} > {tol:.3e}"
        assert_within_rounding(s, gr, gref, g_mag[ARG_NAMES.index(name)], f"grad {name}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradcheck_float64(case):
    s = make_sample(case, torch.float64)
    if not any(s.mask):
        pytest.skip("no argument requires grad")
    # gradcheck differentiates with respect to exactly the arguments that require grad. The full
    # Jacobian for small cases; a random projection of it (fast_mode) for the larger ones.
    numel = sum(t.numel() for t, m in zip(s.args, s.mask) if m)
    assert torch.autograd.gradcheck(OP, s.args, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=numel > 150)


@pytest.mark.parametrize("which", range(6), ids=ARG_NAMES)
def test_backward_op_computes_only_requested_grads(which):
    """The backward op returns a gradient exactly where the output_mask asks for one."""
    s = make_sample(CASES[0], torch.float64)
    args = [t.detach() for t in s.args]
    y, saved = FWD_OP(*args)
    torch.testing.assert_close(y, OP(*args), rtol=0, atol=0)
    mask = [i == which for i in range(6)]
    grads = BWD_OP(s.grad_out, args[0], saved, *args[1:5], mask)
    _, g_ref = reference(make_sample(CASES[0], torch.float64))
    for i, gi in enumerate(grads):
        if i == which:
            torch.testing.assert_close(gi, g_ref[i], rtol=1e-10, atol=1e-12)
        else:
            assert gi is None, f"{ARG_NAMES[i]} not requested but returned"


# ---------------------------------------------------------------------------------------------
# Op-level errors
# ---------------------------------------------------------------------------------------------

def _good_args():
    return [t.detach() for t in make_sample(CASES[0], torch.float32).args]


@pytest.mark.parametrize(
    "index,bad,pattern",
    [
        (1, torch.zeros(1, 7, 4), r"S2s must have shape \(num_terms, low_rank, d_out\) = \(1, 4, 33\), got \(1, 3, 33\)"),
        (1, torch.zeros(7, 3), r"S1s must be 3-d"),
        (2, torch.zeros(1, 4, 33), r"S2s must have shape.*got \(1, 4, 33\)"),
        (3, torch.zeros(1, 3, 32), r"U1s must have shape.*got \(1, 3, 32\)"),
        (4, torch.zeros(2, 7, 3), r"U2s must have shape.*got \(2, 7, 3\)"),
        (5, torch.zeros(32), r"bias must have shape.*got \(32,\)"),
        (0, torch.zeros(5, 8), r"input last dim must be d_in=7.*got 8"),
        (0, torch.tensor(1.0), r"input must have at least 1 dimension"),
        (0, torch.zeros(5, 7, dtype=torch.int64), r"input must be float"),
        (1, torch.zeros(1, 7, 3, dtype=torch.float64), r"S1s must have the input's dtype"),
        (3, torch.zeros(1, 3, 33, dtype=torch.float16), r"U1s must have the input's dtype"),
        (5, torch.zeros(33, dtype=torch.bfloat16), r"bias must have the input's dtype"),
        (2, torch.zeros(1, 3, 33, device="meta"), r"S2s must be on the input's device"),
    ],
)
def test_op_errors_name_the_argument(index, bad, pattern):
    args = _good_args()
    args[index] = bad
    with pytest.raises(RuntimeError, match=r"panther::sketched_linear: " + pattern):
        OP(*args)


@pytest.mark.parametrize("what,pattern", [
    ("saved_rows", r"saved must have shape \(tokens, 2Lk \+ 8\) = \(4, 20\), got \(3, 20\)"),
    ("saved_cols", r"saved must have shape .* got \(4, 14\)"),
    ("saved_dtype", r"saved must have the input's dtype"),
    ("grad_transposed", r"grad_output must have the output's shape \(4, 5\), got \(5, 4\)"),
    ("grad_dtype", r"grad_output must have the input's dtype"),
    ("grad_device", r"grad_output must be on the input's device"),
])
def test_backward_op_checks_its_own_arguments(what, pattern):
    """The private backward op validates grad_output and saved (a transposed gradient of the
    same size would otherwise give gradients of the wrong rows)."""
    x, S1s, S2s, U1s, U2s, b = (torch.randn(4, 7), torch.randn(2, 7, 3), torch.randn(2, 3, 5),
                                torch.randn(2, 3, 5), torch.randn(2, 7, 3), torch.randn(5))
    _, saved = FWD_OP(x, S1s, S2s, U1s, U2s, b)
    g = torch.randn(4, 5)
    bad = {
        "saved_rows": dict(saved=saved[:3]),
        "saved_cols": dict(saved=torch.zeros(4, 14)),
        "saved_dtype": dict(saved=saved.double()),
        "grad_transposed": dict(g=g.t().contiguous()),
        "grad_dtype": dict(g=g.double()),
        "grad_device": dict(g=g.to("meta")),
    }[what]
    args = {"g": g, "saved": saved, **bad}
    with pytest.raises(RuntimeError, match=r"panther::_sketched_linear_backward: " + pattern):
        BWD_OP(args["g"], x, args["saved"], S1s, S2s, U1s, U2s, [True] * 6)
    assert all(t is not None for t in BWD_OP(g, x, saved, S1s, S2s, U1s, U2s, [True] * 6))


def test_op_error_leaves_no_partial_state():
    layer = quiet_layer(7, 5, 1, 2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="dtype"):
        layer(torch.randn(3, 7, dtype=torch.float64))
    for key, v in layer.state_dict().items():
        assert torch.equal(v, before[key]), key


# ---------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------

def quiet_layer(*args, **kwargs):
    """SKLinear without the "more numbers than dense" warning (small test layers trigger it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return pr.nn.SKLinear(*args, **kwargs)


def test_module_parameters_buffers_and_state_dict():
    with pytest.warns(UserWarning, match="more than the 32,768 weights"):
        layer = pr.nn.SKLinear(256, 128, 4, 32)  # positional, as the tutorials
    L, d_in, k, d_out = 4, 256, 32, 128
    params = dict(layer.named_parameters())
    buffers = dict(layer.named_buffers())
    assert set(params) == {"S1s", "S2s", "bias"}
    assert set(buffers) == {"U1s", "U2s"}
    assert params["S1s"].shape == (L, d_in, k)
    assert params["S2s"].shape == (L, k, d_out)
    assert params["bias"].shape == (d_out,)
    assert buffers["U1s"].shape == (L, k, d_out)
    assert buffers["U2s"].shape == (L, d_in, k)
    assert sorted(layer.state_dict().keys()) == sorted(["S1s", "S2s", "bias", "U1s", "U2s"])
    for name in ("U1s", "U2s"):
        u = buffers[name]
        assert not u.requires_grad
        assert torch.equal(u.abs(), torch.full_like(u, 1 / math.sqrt(k))), name
        frac = (u > 0).float().mean().item()
        assert 0.45 < frac < 0.55, f"{name}: fraction of + signs {frac}"
    assert layer.in_features == 256 and layer.out_features == 128
    assert layer.num_terms == 4 and layer.low_rank == 32
    assert "num_terms=4" in repr(layer) and "low_rank=32" in repr(layer)


def test_keyword_construction_as_tutorials():
    layer = pr.nn.SKLinear(784, 512, num_terms=3, low_rank=32)
    assert layer(torch.randn(2, 784)).shape == (2, 512)
    layer = pr.nn.SKLinear(in_features=64, out_features=48, num_terms=1, low_rank=8, bias=False)
    assert layer.bias is None and "bias" not in layer.state_dict()
    assert layer(torch.randn(3, 64)).shape == (3, 48)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=[DTYPE_IDS[d] for d in ALL_DTYPES])
def test_module_matches_reference_and_dense_weight(dtype):
    layer = quiet_layer(33, 7, 2, 5, dtype=dtype)
    assert all(t.dtype == dtype for t in layer.state_dict().values())
    x = torch.randn(4, 33, dtype=torch.float64).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    args = (x, layer.S1s, layer.S2s, layer.U1s, layer.U2s, layer.bias)
    ref = sketched_linear_reference(*args).detach()
    W = layer.dense_weight()
    assert W.shape == (7, 33)
    torch.testing.assert_close(
        W.to(torch.float64), sketched_linear_dense_weight_reference(*args[1:5]).detach(),
        rtol=torch.finfo(dtype).eps * 64, atol=torch.finfo(dtype).eps * 8,
    )
    if dtype in LOWP:
        lin = F.linear(x, sketched_linear_dense_weight_reference(*args[1:5]).to(dtype), layer.bias)
        assert nerr(y, ref) <= 2 * nerr(lin, ref) + lowp_floor(dtype)
    else:
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(y.to(torch.float64), ref, rtol=tol, atol=tol)
    # The functional form is the same op.
    assert torch.equal(pr.ops.sketched_linear(*args), y)
    assert torch.equal(pr.ops.sketched_linear(x, *args[1:5]), OP(x, *args[1:5], None))


def test_unbiased_mean_of_draws_approaches_W_init():
    d_out, d_in, L, k = 6, 10, 1, 2
    W = torch.randn(d_out, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    draws = torch.stack([
        quiet_layer(d_in, d_out, L, k, W_init=W, dtype=torch.float64, generator=g).dense_weight().detach()
        for _ in range(1600)
    ])
    errs = [((draws[:n].mean(0) - W).norm() / W.norm()).item() for n in (25, 100, 400, 1600)]
    # A single draw is a noisy estimate; the mean converges like 1/sqrt(draws).
    single = ((draws[0] - W).norm() / W.norm()).item()
    assert single > 0.3
    assert errs[0] > errs[1] > errs[2] > errs[3], errs
    assert errs[-1] < 0.1 and errs[-1] < errs[0] / 4, errs


def test_default_init_scale_matches_nn_linear():
    d_in, d_out = 256, 128
    lin = nn.Linear(d_in, d_out)
    g = torch.Generator().manual_seed(3)
    for L, k in [(4, 32), (2, 16), (1, 64), (1, 4)]:
        layer = quiet_layer(d_in, d_out, L, k, generator=g)
        ratio = layer.dense_weight().detach().std().item() / lin.weight.detach().std().item()
        # The effective weight is the sketched W plus sketch noise; together they must have
        # nn.Linear's scale (whatever L and k), so activations keep nn.Linear's scale too.
        assert 0.85 < ratio < 1.15, f"L={L} k={k}: std(dense_weight) / std(nn.Linear weight) = {ratio:.3f}"
        x = torch.randn(64, d_in)
        out_ratio = (layer(x) - layer.bias).std().item() / (lin(x) - lin.bias).std().item()
        assert 0.8 < out_ratio < 1.25, f"L={L} k={k}: output std ratio {out_ratio:.3f}"
        bound = 1 / math.sqrt(d_in)
        assert layer.bias.abs().max().item() <= bound
        assert layer.bias.abs().max().item() > 0.8 * bound  # uniform on the whole range
        assert abs(layer.bias.mean().item()) < 0.3 * bound


def test_W_init_in_linear_layout_is_honoured():
    d_in, d_out = 24, 16
    W = torch.randn(d_out, d_in, dtype=torch.float64)
    layer = quiet_layer(d_in, d_out, 8, 64, W_init=W, bias=False, dtype=torch.float64)
    x = torch.randn(50, d_in, dtype=torch.float64)
    rel = ((layer(x) - x @ W.t()).norm() / (x @ W.t()).norm()).item()
    assert rel < 0.25, rel
    # A transposed (d_in, d_out) matrix is refused rather than silently used.
    with pytest.raises(ValueError, match=r"W_init.*\(24, 16\)"):
        pr.nn.SKLinear(d_in, d_out, 8, 64, W_init=W.t())


def test_from_linear_copies_bias_and_approximates():
    lin = nn.Linear(20, 12).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        layer = pr.nn.SKLinear.from_linear(lin, num_terms=8, low_rank=64)
    assert layer.S1s.dtype == torch.float64
    assert torch.equal(layer.bias.detach(), lin.bias.detach())
    assert layer.bias.data_ptr() != lin.bias.data_ptr()
    x = torch.randn(40, 20, dtype=torch.float64)
    with torch.no_grad():
        rel = ((layer(x) - lin(x)).norm() / lin(x).norm()).item()
    assert rel < 0.25, rel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        nob = pr.nn.SKLinear.from_linear(nn.Linear(20, 12, bias=False), 1, 4)
    assert nob.bias is None
    with pytest.raises(TypeError, match="nn.Linear"):
        pr.nn.SKLinear.from_linear(layer, 1, 4)


def test_dtype_and_device_arguments():
    layer = quiet_layer(9, 5, 2, 3, dtype=torch.bfloat16, device="cpu")
    for name, t in layer.state_dict().items():
        assert t.dtype == torch.bfloat16 and t.device.type == "cpu", name
    assert layer(torch.randn(2, 9, dtype=torch.bfloat16)).dtype == torch.bfloat16
    meta = quiet_layer(9, 5, 2, 3, device="meta")
    assert all(t.is_meta for t in meta.state_dict().values())
    assert meta(torch.empty(2, 9, device="meta")).shape == (2, 5)


def test_generator_reproducibility_and_no_global_reseeding():
    def draw(**kw):
        return quiet_layer(12, 8, 2, 3, **kw).state_dict()

    a = draw(generator=torch.Generator().manual_seed(7))
    b = draw(generator=torch.Generator().manual_seed(7))
    c = draw(generator=torch.Generator().manual_seed(8))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["S1s"], c["S1s"]) and not torch.equal(a["U1s"], c["U1s"])

    # With a generator the global RNG is untouched.
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    draw(generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.rand(5), expected)

    # Without one, layers draw from the global generator: two layers differ, a seed reproduces one.
    torch.manual_seed(5)
    d1 = draw()
    d2 = draw()
    torch.manual_seed(5)
    d3 = draw()
    for key in d1:
        assert torch.equal(d1[key], d3[key]), key
    assert not torch.equal(d1["S1s"], d2["S1s"]) and not torch.equal(d1["U2s"], d2["U2s"])
    # Constructing a layer advances (never resets) the global generator.
    torch.manual_seed(5)
    draw()
    after = torch.rand(5)
    torch.manual_seed(5)
    assert not torch.equal(after, torch.rand(5))


@pytest.mark.parametrize(
    "d_in,d_out,L,k,warns",
    [(256, 128, 4, 32, True), (64, 64, 1, 16, False), (64, 64, 1, 17, True), (8192, 8192, 1, 16, False),
     (100, 100, 1, 25, False)],
)
def test_warning_when_sketch_is_larger_than_dense(d_in, d_out, L, k, warns):
    assert warns == (2 * L * k * (d_in + d_out) > d_in * d_out)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        if d_in * d_out > 10 ** 6:
            pr.nn.SKLinear(d_in, d_out, L, k, device="meta")
        else:
            pr.nn.SKLinear(d_in, d_out, L, k)
    ours = [w for w in rec if issubclass(w.category, UserWarning) and "SKLinear" in str(w.message)]
    assert len(ours) == (1 if warns else 0), [str(w.message) for w in rec]
    if warns:
        assert ours[0].filename == __file__  # points at the caller


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(in_features=0), r"in_features must be a positive integer, got 0"),
        (dict(out_features=-3), r"out_features must be a positive integer, got -3"),
        (dict(num_terms=0), r"num_terms must be a positive integer, got 0"),
        (dict(low_rank=-1), r"low_rank must be a positive integer, got -1"),
        (dict(low_rank=2.5), r"low_rank must be a positive integer, got 2.5"),
        (dict(W_init=torch.zeros(8, 5)), r"W_init must have shape \(out_features=5, in_features=8\).*got \(8, 5\)"),
        (dict(W_init=torch.zeros(5)), r"W_init.*got \(5,\)"),
    ],
)
def test_module_argument_errors(kwargs, pattern):
    full = dict(in_features=8, out_features=5, num_terms=1, low_rank=2)
    full.update(kwargs)
    with pytest.raises(ValueError, match="SKLinear: " + pattern):
        quiet_layer(**full)


def test_module_input_errors():
    layer = quiet_layer(512, 64, 1, 4)
    with pytest.raises(ValueError, match=r"SKLinear: input last dim must be in_features=512, got 511"):
        layer(torch.randn(3, 511))
    with pytest.raises(ValueError, match=r"SKLinear: input must have at least 1 dimension"):
        layer(torch.tensor(1.0))


def test_state_dict_round_trip_reproduces_outputs():
    a = quiet_layer(33, 7, 2, 5)
    b = quiet_layer(33, 7, 2, 5)
    x = torch.randn(3, 4, 33)
    assert not torch.equal(a(x), b(x))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    assert torch.equal(a(x), b(x))


def test_training_step_updates_only_parameters():
    layer = quiet_layer(16, 8, 2, 4)
    U1, U2 = layer.U1s.clone(), layer.U2s.clone()
    S1 = layer.S1s.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    loss = layer(torch.randn(10, 16)).pow(2).sum()
    loss.backward()
    assert layer.U1s.grad is None and layer.U2s.grad is None
    assert layer.S1s.grad is not None and layer.S2s.grad is not None and layer.bias.grad is not None
    opt.step()
    assert torch.equal(layer.U1s, U1) and torch.equal(layer.U2s, U2)
    assert not torch.equal(layer.S1s.detach(), S1)


# ---------------------------------------------------------------------------------------------
# TorchScript, torch.compile, torch.export
# ---------------------------------------------------------------------------------------------

def small_model(dtype=torch.float32):
    torch.manual_seed(11)
    return nn.Sequential(quiet_layer(16, 12, 2, 3, dtype=dtype), nn.ReLU(), quiet_layer(12, 5, 1, 2, dtype=dtype))


def _param_grads(model, x):
    model.zero_grad()
    x = x.detach().requires_grad_()
    y = model(x)
    y.pow(2).sum().backward()
    return y.detach(), x.grad, {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_torchscript_round_trip(tmp_path):
    model = small_model()
    x = torch.randn(4, 16)
    scripted = torch.jit.script(model)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    path = tmp_path / "model.pt"
    torch.jit.save(scripted, str(path))
    loaded_file = torch.jit.load(str(path))
    ref = model(x)
    for m in (scripted, loaded, loaded_file):
        torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    # Backward through the loaded TorchScript module matches eager.
    y0, gx0, g0 = _param_grads(model, x)
    y1, gx1, g1 = _param_grads(loaded, x)
    torch.testing.assert_close(gx1, gx0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n])
    # The module's own checks survive scripting.
    with pytest.raises(Exception, match="in_features=16, got 15"):
        loaded(torch.randn(4, 15))
    # The functional form scripts too.
    fn = torch.jit.script(pr.ops.sketched_linear)
    s = make_sample(CASES[0], torch.float32)
    args = [None if t is None else t.detach() for t in s.args]
    torch.testing.assert_close(fn(*args), OP(*args), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Autocast
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ac_dtype", LOWP, ids=["fp16", "bf16"])
def test_cpu_autocast_runs_in_low_precision(ac_dtype):
    layer = quiet_layer(33, 17, 2, 5)
    x = torch.randn(6, 33, requires_grad=True)
    y32 = layer(x)
    with torch.autocast("cpu", dtype=ac_dtype):
        y = layer(x)
        # nn.Linear's behaviour in the same context, as the yardstick.
        lin = F.linear(x, layer.dense_weight(), layer.bias)
    assert y.dtype == ac_dtype and lin.dtype == ac_dtype
    ref = sketched_linear_reference(x, layer.S1s, layer.S2s, layer.U1s, layer.U2s, layer.bias).detach()
    assert nerr(y, ref) <= 2 * nerr(lin, ref) + lowp_floor(ac_dtype)
    assert nerr(y, y32.detach().double()) <= 2 * torch.finfo(ac_dtype).eps
    # Backward flows to the fp32 leaves in fp32.
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert layer.S1s.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU; runs on the GPU machine via scripts/gpu/gpu_check.sh)
# ---------------------------------------------------------------------------------------------

CUDA_CASES = CASES + [
    Case("cuda_mid", (64,), 256, 192, 2, 17),
    Case("cuda_tokens", (4, 128), 512, 512, 1, 16),
    Case("cuda_wide_3d_nobias", (2, 33), 1000, 300, 3, 7, bias=False),
    Case("cuda_transposed_big", (200,), 384, 256, 2, 24, layout="transposed"),
    # more than 128 tokens. cuBLAS output GEMM: an odd d_out, or C = 2Lk > 64 (3-d batch).
    Case("cuda_many_odd_out", (150,), 96, 100, 2, 5),
    Case("cuda_tokens_3d", (4, 512), 192, 160, 1, 40),
    # fp16/bf16 register output kernel (cpp/linear/sketch_out.cuh: C = 2Lk <= 64, d_out % 8 == 0):
    # C = 64 with a row tail inside a 128-row tile and a last column block of 8 columns, no bias;
    # C = 16, 3-d and narrow; C = 32 with a transposed input
    Case("cuda_c64_nobias", (300,), 64, 520, 2, 16, bias=False),
    Case("cuda_c16_3d", (3, 70), 40, 24, 1, 8),
    Case("cuda_tokens_transposed", (2048,), 64, 96, 2, 8, layout="transposed"),
    # shapes the fused chain kernel takes with PANTHER_LINEAR_CHAIN=1 (TestCUDA runs them with and
    # without it; cpp/linear/sketch_chain.cuh: 2Lk of 64, 128 or 256, k, d_in and d_out multiples
    # of 8): a row tail of a 128-row block, d_in and d_out not multiples of 64; two terms of 32;
    # C = 256 with a transposed input and no bias; few row blocks (column groups)
    Case("cuda_chain_c128_3d", (4, 130), 200, 136, 1, 64),
    Case("cuda_chain_two_terms", (1000,), 768, 264, 2, 32),
    Case("cuda_chain_c256_transposed", (300,), 96, 264, 2, 64, bias=False, layout="transposed"),
    Case("cuda_chain_few_rows", (136,), 512, 1032, 1, 64),
    Case("cuda_chain_no_dx", (520,), 136, 200, 1, 64, grad="S1s_bias"),  # dT alone
    Case("cuda_chain_weights_strided", (520,), 136, 200, 1, 64, layout="weights"),  # cuBLAS path
]
CHAIN_CASES = [c for c in CUDA_CASES if c.name.startswith("cuda_chain") or c.name == "cuda_c64_nobias"]


@pytest.mark.cuda
class TestCUDA:
    """CUDA vs the float64 reference with the same rules as on CPU: fp32 without TF32, and
    fp16/bf16 with cuBLAS's reduced-precision split-K reductions off (the op promises fp32
    accumulation; the dense yardstick F.linear gets the same settings)."""

    @pytest.fixture(autouse=True)
    def _exact_cublas(self):
        m = torch.backends.cuda.matmul
        old = (m.allow_tf32, m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction)
        m.allow_tf32 = False
        m.allow_fp16_reduced_precision_reduction = False
        m.allow_bf16_reduced_precision_reduction = False
        yield
        m.allow_tf32, m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = old

    @pytest.mark.parametrize("case,dtype", sample_params((torch.float32, torch.float16, torch.bfloat16), CUDA_CASES))
    def test_forward_backward(self, case, dtype):
        test_backward_matches_reference(case, dtype, "cuda")
        test_forward_matches_reference(case, dtype, "cuda")

    @pytest.mark.parametrize("case,dtype", sample_params((torch.float16, torch.bfloat16), CHAIN_CASES))
    def test_forward_backward_chain_kernel(self, case, dtype, monkeypatch):
        """The same checks with the backward's dT and dx from the fused chain kernel."""
        monkeypatch.setenv("PANTHER_LINEAR_CHAIN", "1")
        test_backward_matches_reference(case, dtype, "cuda")

    @pytest.mark.parametrize("k", [16, 64], ids=["out_kernel", "two_gemm"])
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_forward_same_with_and_without_autograd(self, dtype, k):
        """The many-token forward keeps the intermediate only when a backward needs it; the
        output must not depend on that."""
        layer = pr.nn.SKLinear(256, 512, 1, k, device="cuda", dtype=dtype)
        x = torch.randn(3, 100, 256, device="cuda", dtype=dtype)
        with torch.no_grad():
            y0 = layer(x)
        y1 = layer(x.requires_grad_())
        assert y1.requires_grad
        torch.testing.assert_close(y1.detach(), y0, rtol=0, atol=0)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_chain_and_cublas_paths_agree(self, dtype, monkeypatch):
        """The backward through the fused chain kernel (PANTHER_LINEAR_CHAIN=1) and through the
        packed two-GEMM path (the default) round dT once and accumulate in fp32: the gradients
        agree to the dtype's rounding (and the forward, the same path in both, exactly)."""
        layer = pr.nn.SKLinear(768, 768, 1, 64, device="cuda", dtype=dtype)
        x = torch.randn(2, 1000, 768, device="cuda", dtype=dtype)
        go = torch.randn(2, 1000, 768, device="cuda", dtype=dtype)

        def run():
            xi = x.clone().requires_grad_()
            y = layer(xi)
            grads = torch.autograd.grad(y, [xi, layer.S1s, layer.S2s, layer.bias], go)
            return [y.detach(), *grads]

        packed = run()
        monkeypatch.setenv("PANTHER_LINEAR_CHAIN", "1")
        fused = run()
        eps = torch.finfo(dtype).eps
        for name, a, b in zip(["y", "dx", "dS1s", "dS2s", "dbias"], fused, packed):
            err = ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
            assert err <= 4 * eps, f"{name}: {err:.2e}"

    def test_module_and_autocast(self):
        layer = quiet_layer(64, 48, 2, 8, device="cuda")
        x = torch.randn(5, 64, device="cuda")
        ref = sketched_linear_reference(x, layer.S1s, layer.S2s, layer.U1s, layer.U2s, layer.bias).detach()
        torch.testing.assert_close(layer(x).double().cpu(), ref.cpu(), rtol=1e-5, atol=1e-5)
        with torch.autocast("cuda", dtype=torch.float16):
            y = layer(x)
            lin = F.linear(x, layer.dense_weight(), layer.bias)
        assert y.dtype == torch.float16
        assert nerr(y, ref.cpu()) <= 2 * nerr(lin, ref.cpu()) + lowp_floor(torch.float16)

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dense_weight_is_the_float64_weight_rounded_once(dtype):
    """dense_weight() sums in float64 and rounds once: a low-precision layer's dense weight is the
    float64 reference weight rounded to its dtype, entry for entry."""
    g = torch.Generator().manual_seed(5)
    layer = quiet_layer(48, 40, 3, 8, dtype=dtype, generator=g)
    want = sketched_linear_dense_weight_reference(layer.S1s, layer.S2s, layer.U1s, layer.U2s).to(dtype)
    got = layer.dense_weight()
    assert got.dtype == dtype and got.shape == (40, 48)
    assert torch.equal(got, want)


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "torchscript"])
def test_none_for_a_required_tensor_names_the_argument(scripted):
    args = [torch.randn(3, 4), torch.randn(2, 4, 2), torch.randn(2, 2, 5), torch.randn(2, 2, 5),
            torch.randn(2, 4, 2)]
    fn = torch.jit.script(pr.ops.sketched_linear) if scripted else pr.ops.sketched_linear
    # (TorchScript wraps the op's TypeError in its interpreter's RuntimeError.)
    err = RuntimeError if scripted else TypeError
    for i, name in enumerate(("input", "S1s", "S2s", "U1s", "U2s")):
        a = list(args)
        a[i] = None
        with pytest.raises(err, match=rf"sketched_linear: {name} must be a [tT]ensor, got None"):
            fn(*a)
    # The op itself (torch.ops) says the same.
    with pytest.raises(TypeError, match=r"panther::sketched_linear: U1s must be a tensor, got None"):
        OP(args[0], args[1], args[2], None, args[4], None)
    with pytest.raises(TypeError, match=r"input must be a Tensor, got list"):
        pr.ops.sketched_linear([1.0, 2.0, 3.0, 4.0], *args[1:])
