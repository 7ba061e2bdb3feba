"""The op registry behind the conformance suite (``tests/test_conformance.py``).

Every operator in the ``torch.ops.panther`` namespace has ONE entry here:

* a public op (no leading underscore) registers an :class:`OpEntry` with its sample-input
  factory, its float64 reference (``panther._reference``), a few bad calls for the error-format
  check, the dims that may vary for ``torch.compile``/``torch.export``, and a tiny scriptable
  wrapper module. It then gets EVERY check of ``CHECKS``; it cannot opt out of one. A check
  that fails today because of a known bug is listed in ``xfail`` (run with
  ``pytest.mark.xfail(strict=True)``: when the bug is fixed the suite fails until the entry is
  removed).
* a private op (leading underscore: internal forward/backward halves, device-only kernels) also
  registers an entry, with ``private=True``; it gets the checks its factory supports and names
  every other check in ``exempt`` with the reason it does not apply.

``tests/test_conformance.py::test_every_op_is_registered`` fails when an op of the namespace has
no entry, and ``test_every_entry_has_every_check`` when an entry lacks what a check needs
(without an exemption).

Adding an op: write ``<op>_sample_inputs(device, dtype)``, ``<op>_dynamic_samples(device)``,
``<op>_error_inputs(device)`` and a ``<Op>Script`` module below, append an ``OpEntry`` to
``REGISTRY`` and run ``pytest tests/test_conformance.py -k <op>``. See docs/adding-an-op.md.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import panther  # noqa: F401  (loads torch.ops.panther)
from panther._reference import favor_attention_reference, sketched_linear_reference

HAS_CUDA = torch.cuda.is_available()

# Every check the suite runs; tests/test_conformance.py has one ``test_<check>`` per name.
CHECKS = (
    "reference",  # values and gradients vs the float64 reference, per dtype
    "gradcheck",  # torch.autograd.gradcheck in float64
    "gradgradcheck",  # double backward in float64
    "opcheck",  # torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch)
    "meta",  # Meta kernel: same shapes, dtypes and (significant) strides as the real kernel
    "compile_dynamic",  # torch.compile(fullgraph=True, dynamic=True, backend="aot_eager"): one compile across sizes
    "compile_inductor",  # one sample through the inductor backend, forward and backward
    "export_dynamic",  # torch.export with dynamic dims, save/load, run at another size
    "torchscript",  # torch.jit.script of a wrapper module, save/load, same output
    "autocast",  # CPU bf16 (CUDA fp16) autocast: output dtype and closeness; float64 untouched
    "error_format",  # a bad argument raises naming the op and the argument
)


def devices() -> Tuple[str, ...]:
    return ("cpu", "cuda") if HAS_CUDA else ("cpu",)


@dataclass
class Sample:
    """One call of an op: positional ``args`` (tensors already on their device/dtype, with
    ``requires_grad`` set on the inputs that need a gradient). ``desc`` names it in failures."""

    desc: str
    args: tuple

    def tensor_args(self) -> List[Tensor]:
        return [a for a in self.args if isinstance(a, Tensor)]

    def grad_inputs(self) -> List[Tensor]:
        return [a for a in self.args if isinstance(a, Tensor) and a.requires_grad]


@dataclass
class ErrorInput:
    """A bad call: ``args`` must raise ``RuntimeError`` naming the op and ``argument`` (a schema
    argument name, or one of its accepted spellings in ``OpEntry.arg_spellings``)."""

    desc: str
    args: tuple
    argument: str
    match: Optional[str] = None  # optional extra regex the message must match


@dataclass
class OpEntry:
    name: str  # op name in the panther namespace, e.g. "sketched_linear"
    # (device, dtype) -> samples: odd sizes, non-contiguous, empty, different requires_grad sets.
    sample_inputs: Optional[Callable[[str, torch.dtype], List[Sample]]] = None
    # float64 reference with the op's positional signature (panther._reference).
    reference: Optional[Callable[..., Tensor]] = None
    dtypes: Tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.bfloat16)
    devices: Tuple[str, ...] = field(default_factory=devices)
    # reference check tolerance per dtype: |out - ref| <= atol * max(1, max|ref|) + rtol * |ref|
    tol: Dict[torch.dtype, Tuple[float, float]] = field(default_factory=dict)
    gradcheck_kwargs: dict = field(default_factory=dict)
    # dtypes of the samples torch.library.opcheck runs on (it is the slowest check).
    opcheck_dtypes: Tuple[torch.dtype, ...] = (torch.float32,)
    # (device) -> >= 3 samples of one structure differing only in the dims of ``dynamic_dims``.
    dynamic_samples: Optional[Callable[[str], List[Sample]]] = None
    # per positional arg: {dim index: name} of the dims that vary (export's Dim); None = static.
    dynamic_dims: Optional[Tuple[Optional[Dict[int, str]], ...]] = None
    # (device) -> bad calls for the error-format check.
    error_inputs: Optional[Callable[[str], List[ErrorInput]]] = None
    # nn.Module class whose forward(*sample.args) calls the op (torch.jit.script-able).
    script_module: Optional[type] = None
    # autocast: low-precision dtype per device type, the op's output dtype under it.
    autocast_dtypes: Optional[Dict[str, torch.dtype]] = None
    # accepted spellings of schema arguments in error messages, e.g. {"kernel_fn": ("kernel",)}.
    arg_spellings: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    private: bool = False
    exempt: Dict[str, str] = field(default_factory=dict)  # check -> why it does not apply (private ops only)
    xfail: Dict[str, str] = field(default_factory=dict)  # check -> known bug (strict xfail)

    @property
    def op(self):
        return getattr(torch.ops.panther, self.name)

    @property
    def qualname(self) -> str:
        return f"panther::{self.name}"

    def samples(self, device: str, dtype: torch.dtype) -> List[Sample]:
        assert self.sample_inputs is not None
        return self.sample_inputs(device, dtype)


# ---------------------------------------------------------------------------------------------
# helpers for factories
# ---------------------------------------------------------------------------------------------

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _leaf(t: Tensor, device: str, dtype: torch.dtype, grad: bool) -> Tensor:
    """``t`` on device/dtype as a leaf, keeping its strides (non-contiguous stays so)."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=dtype, device=device)
    out.copy_(t)
    return out.requires_grad_(grad)


# ---------------------------------------------------------------------------------------------
# panther::sketched_linear
# ---------------------------------------------------------------------------------------------

SL_ARGS = ("input", "S1s", "S2s", "U1s", "U2s", "bias")


def _sl_args(batch, d_in, d_out, L, k, *, bias=True, layout="contiguous", grad="all", seed=0, device="cpu",
             dtype=torch.float32):
    g = _gen(seed)
    if layout == "transposed":  # input (N, d_in) as the transpose of a (d_in, N) tensor
        x = torch.randn(*batch[:-1], d_in, batch[-1], generator=g, dtype=torch.float64).transpose(-1, -2)
    else:
        x = torch.randn(*batch, d_in, generator=g, dtype=torch.float64)
    if layout == "weights":  # sketches stored transposed: every weight non-contiguous
        S1s = torch.randn(L, k, d_in, generator=g, dtype=torch.float64).transpose(1, 2)
        S2s = torch.randn(L, d_out, k, generator=g, dtype=torch.float64).transpose(1, 2)
        U1s = torch.randn(L, d_out, k, generator=g, dtype=torch.float64).transpose(1, 2)
        U2s = torch.randn(L, k, d_in, generator=g, dtype=torch.float64).transpose(1, 2)
        b = torch.randn(2 * d_out, generator=g, dtype=torch.float64)[::2] if bias else None
    else:
        S1s = torch.randn(L, d_in, k, generator=g, dtype=torch.float64)
        S2s = torch.randn(L, k, d_out, generator=g, dtype=torch.float64)
        U1s = torch.randn(L, k, d_out, generator=g, dtype=torch.float64)
        U2s = torch.randn(L, d_in, k, generator=g, dtype=torch.float64)
        b = torch.randn(d_out, generator=g, dtype=torch.float64) if bias else None
    mask = {"all": SL_ARGS, "none": (), "input": ("input",), "sketches": ("S1s", "S2s", "U1s", "U2s"),
            "input_U2s_bias": ("input", "U2s", "bias")}[grad]
    vals = (x, S1s, S2s, U1s, U2s, b)
    return tuple(None if t is None else _leaf(t, device, dtype, n in mask) for n, t in zip(SL_ARGS, vals))


def sketched_linear_sample_inputs(device: str, dtype: torch.dtype) -> List[Sample]:
    specs = [  # (desc, batch, d_in, d_out, L, k, options)
        ("2d", (5,), 7, 6, 2, 3, {}),
        ("1d_grad_input", (), 5, 4, 1, 2, {"grad": "input"}),
        ("3d_nobias_grad_sketches", (2, 3), 6, 5, 2, 3, {"bias": False, "grad": "sketches"}),
        ("transposed_input", (4,), 5, 3, 1, 3, {"layout": "transposed", "grad": "input_U2s_bias"}),
        ("strided_weights", (3,), 4, 5, 2, 2, {"layout": "weights"}),
        ("din1_dout1", (3,), 1, 1, 1, 2, {}),
        ("empty", (0,), 5, 4, 2, 3, {}),
        ("empty_3d_nobias", (2, 0), 4, 3, 1, 2, {"bias": False}),
        ("no_grad", (4,), 5, 3, 2, 2, {"grad": "none"}),
    ]
    return [Sample(d, _sl_args(b, di, do, L, k, device=device, dtype=dtype, seed=i, **o))
            for i, (d, b, di, do, L, k, o) in enumerate(specs)]


def sketched_linear_dynamic_samples(device: str) -> List[Sample]:
    # Both leading dims vary. The first sample is the one compiled: its batch/token sizes are
    # >= 2 and differ from d_in=6, d_out=4, L=2, k=5 (see test_conformance.check_dynamic_sizes).
    return [Sample(f"batch={b},tokens={n}", _sl_args((b, n), 6, 4, 2, 5, seed=n, device=device))
            for b, n in ((3, 7), (4, 9), (2, 13))]


def sketched_linear_error_inputs(device: str) -> List[ErrorInput]:
    x, S1s, S2s, U1s, U2s, b = (None if t is None else t.detach() for t in
                                _sl_args((4,), 7, 5, 2, 3, device=device, grad="none"))
    f64 = torch.float64
    return [
        ErrorInput("S2s wrong shape", (x, S1s, S2s[:, :2], U1s, U2s, b), "S2s", r"expected|must have shape"),
        ErrorInput("S1s 2-d", (x, S1s[0], S2s, U1s, U2s, b), "S1s"),
        ErrorInput("U1s wrong d_out", (x, S1s, S2s, U1s[..., :4], U2s, b), "U1s"),
        ErrorInput("U2s wrong terms", (x, S1s, S2s, U1s, U2s[:1], b), "U2s"),
        ErrorInput("bias wrong shape", (x, S1s, S2s, U1s, U2s, b[:4]), "bias"),
        ErrorInput("input wrong d_in", (x[:, :6], S1s, S2s, U1s, U2s, b), "input"),
        ErrorInput("input 0-d", (x[0, 0], S1s, S2s, U1s, U2s, b), "input"),
        ErrorInput("input int", (x.long(), S1s, S2s, U1s, U2s, b), "input"),
        ErrorInput("S1s dtype", (x, S1s.to(f64), S2s, U1s, U2s, b), "S1s", "dtype"),
        ErrorInput("bias dtype", (x, S1s, S2s, U1s, U2s, b.to(f64)), "bias", "dtype"),
        ErrorInput("S2s device", (x, S1s, S2s.to("meta"), U1s, U2s, b), "S2s", "device"),
    ]


class SketchedLinearScript(nn.Module):
    def forward(self, input: Tensor, S1s: Tensor, S2s: Tensor, U1s: Tensor, U2s: Tensor,
                bias: Optional[Tensor]) -> Tensor:
        return torch.ops.panther.sketched_linear(input, S1s, S2s, U1s, U2s, bias)


# ---------------------------------------------------------------------------------------------
# panther::favor_attention
# ---------------------------------------------------------------------------------------------

FA_TENSORS = ("query", "key", "value", "projection")


def _fa_args(B, H, Lq, Lk, D, Dv, M, kernel="softmax", causal=False, *, masked=False, noncontig=False,
             grad=FA_TENSORS, seed=0, device="cpu", dtype=torch.float32):
    g = _gen(seed)
    if noncontig:  # (B, L, H, D) storage seen as (B, H, L, D): a module's head split
        q = torch.randn(B, Lq, H, D, generator=g, dtype=torch.float64).transpose(1, 2)
        k = torch.randn(B, Lk, H, D, generator=g, dtype=torch.float64).transpose(1, 2)
        v = torch.randn(B, Lk, H, Dv, generator=g, dtype=torch.float64).transpose(1, 2)
    else:
        q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64)
        k = torch.randn(B, H, Lk, D, generator=g, dtype=torch.float64)
        v = torch.randn(B, H, Lk, Dv, generator=g, dtype=torch.float64)
    W = torch.randn(M, D, generator=g, dtype=torch.float64) * D ** -0.5
    tensors = [_leaf(t, device, dtype, n in grad) for n, t in zip(FA_TENSORS, (q, k, v, W))]
    mask = None
    if masked:
        mask = torch.rand(B, Lk, generator=g) < 0.3
        if B > 0 and Lk > 2:
            mask[0, :2] = True  # left padding
        mask = mask.to(device)
    return (*tensors, kernel, causal, mask)


def favor_attention_sample_inputs(device: str, dtype: torch.dtype) -> List[Sample]:
    specs = [  # (desc, (B, H, Lq, Lk, D, Dv, M), options)
        ("softmax_causal", (1, 2, 5, 5, 4, 3, 6), {"kernel": "softmax", "causal": True}),
        ("relu_causal_mask_noncontig", (2, 2, 5, 5, 3, 2, 5),
         {"kernel": "relu", "causal": True, "masked": True, "noncontig": True}),
        ("softmax_Lq_ne_Lk_mask_noncontig", (2, 1, 3, 6, 4, 3, 5),
         {"kernel": "softmax", "masked": True, "noncontig": True, "grad": ("query", "value")}),
        ("relu_full_grad_projection", (1, 1, 4, 3, 3, 2, 4), {"kernel": "relu", "grad": ("projection",)}),
        ("one_position", (1, 1, 1, 1, 2, 2, 3), {"kernel": "softmax", "causal": True}),
        ("empty_batch", (0, 2, 3, 3, 4, 3, 5), {"kernel": "softmax", "causal": True}),
        ("no_keys", (1, 2, 3, 0, 4, 3, 5), {"kernel": "relu"}),
        ("no_grad", (1, 2, 4, 4, 3, 3, 4), {"kernel": "softmax", "grad": ()}),
    ]
    return [Sample(d, _fa_args(*s, seed=i, device=device, dtype=dtype, **o)) for i, (d, s, o) in enumerate(specs)]


def favor_attention_dynamic_samples(device: str) -> List[Sample]:
    # Batch and sequence length vary (non-causal, Lq == Lk). The first sample is the one compiled:
    # B and L differ from H=2, D=4, Dv=3, M=6 (see test_conformance.check_dynamic_sizes).
    return [Sample(f"B={b},L={n}", _fa_args(b, 2, n, n, 4, 3, 6, "softmax", False, seed=n, device=device))
            for b, n in ((5, 9), (3, 13), (2, 21))]


def favor_attention_error_inputs(device: str) -> List[ErrorInput]:
    q, k, v, W, _, _, _ = _fa_args(2, 2, 10, 12, 4, 3, 6, device=device, grad=())
    f64 = torch.float64
    return [
        ErrorInput("unknown kernel", (q, k, v, W, "gelu", False, None), "kernel_fn", r"\"softmax\" or \"relu\""),
        ErrorInput("causal with Lq != Lk", (q, k, v, W, "softmax", True, None), "causal", "Lq=10 and Lk=12"),
        ErrorInput("mask shape", (q, k, v, W, "softmax", False, torch.zeros(2, 10, dtype=torch.bool, device=device)),
                   "key_padding_mask", r"\(2, 10\)"),
        ErrorInput("mask dtype", (q, k, v, W, "softmax", False, torch.zeros(2, 12, device=device)),
                   "key_padding_mask", "bool"),
        ErrorInput("projection head_dim", (q, k, v, W[:, :3], "softmax", False, None), "projection"),
        ErrorInput("key dtype", (q, k.to(f64), v, W, "softmax", False, None), "key", "dtype"),
        ErrorInput("value length", (q, k, v[:, :, :5], W, "softmax", False, None), "value"),
        ErrorInput("query 3-d", (q[0], k, v, W, "softmax", False, None), "query", "4-d"),
        ErrorInput("projection device", (q, k, v, W.to("meta"), "softmax", False, None), "projection", "device"),
    ]


class FavorAttentionScript(nn.Module):
    def forward(self, query: Tensor, key: Tensor, value: Tensor, projection: Tensor, kernel_fn: str,
                causal: bool, key_padding_mask: Optional[Tensor]) -> Tensor:
        return torch.ops.panther.favor_attention(query, key, value, projection, kernel_fn, causal, key_padding_mask)


# ---------------------------------------------------------------------------------------------
# private ops: the internal halves of the public ops
# ---------------------------------------------------------------------------------------------

def _detached(args):
    return tuple(a.detach() if isinstance(a, Tensor) else a for a in args)


def _sketched_linear_forward_sample_inputs(device, dtype):
    return [Sample(s.desc, _detached(s.args)) for s in sketched_linear_sample_inputs(device, dtype)[:5]]


def _sketched_linear_backward_sample_inputs(device, dtype):
    out = []
    for s in sketched_linear_sample_inputs(device, dtype)[:5]:
        args = _detached(s.args)
        y, saved = torch.ops.panther._sketched_linear_forward(*args)
        g = torch.randn(y.shape, generator=_gen(1), dtype=torch.float64).to(device=device, dtype=dtype)
        mask = [a is not None and a.requires_grad for a in s.args]
        out.append(Sample(s.desc, (g, args[0], saved, *args[1:5], mask)))
    return out


def _favor_attention_forward_sample_inputs(device, dtype):
    return [Sample(s.desc, _detached(s.args)) for s in favor_attention_sample_inputs(device, dtype)[:4]]


def _favor_attention_backward_sample_inputs(device, dtype):
    out = []
    for s in favor_attention_sample_inputs(device, dtype)[:4]:
        q, k, v, W, kernel, causal, mask = _detached(s.args)
        Lq, Dv = q.shape[2], v.shape[3]
        g = torch.randn(q.shape[0], q.shape[1], Lq, Dv, generator=_gen(1), dtype=torch.float64)
        g = g.to(device=device, dtype=dtype)
        out.append(Sample(s.desc, (g, q, k, v, W, kernel, causal, mask, [True, True, True, True], None)))
    return out


def _rand_mha_sample_inputs(device, dtype):
    out = []
    for i, (B, L, E, H, M, bias, causal, masked) in enumerate(
            [(2, 5, 6, 2, 5, True, True, False), (1, 4, 4, 1, 3, False, False, True)]):
        g = _gen(i)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        x = r(B, L, E)
        Ws = [r(E, E) * E ** -0.5 for _ in range(4)]
        bs = [r(E) if bias else None for _ in range(4)]
        mask = (torch.arange(L) >= L - 1).expand(B, L).to(device) if masked else None
        out.append(Sample(f"B={B},L={L},E={E},H={H}", (x, Ws[0], Ws[1], Ws[2], bs[0], bs[1], bs[2], Ws[3], bs[3],
                                                         r(M, E // H), H, "softmax", causal, mask)))
    return out


def _favor_decode_step_sample_inputs(device, dtype):
    """States from empty and after a few steps (made on CPU in float64 by the op itself), a
    non-contiguous state, no leading dims, an empty batch, the length counted."""
    out = []
    for i, (desc, lead, D, Dv, M, kernel, steps, strided) in enumerate([
            ("softmax, empty state", (2, 3), 4, 3, 5, "softmax", 0, False),
            ("softmax, after steps", (2, 3), 5, 3, 7, "softmax", 2, False),
            ("relu, strided state", (3,), 6, 4, 7, "relu", 2, True),
            ("no leading dims", (), 4, 3, 5, "softmax", 1, False),
            ("fused projection views", (2, 3), 4, 4, 5, "softmax", 1, False),
            ("empty batch", (0, 2), 4, 3, 5, "softmax", 0, False)]):
        g = _gen(i)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
        W = r(M, D)
        if strided:  # (M, ..., Dv+1) memory seen as (..., M, Dv+1)
            kv = torch.zeros(M, *lead, Dv + 1, dtype=torch.float64).movedim(0, -2)
        else:
            kv = torch.zeros(*lead, M, Dv + 1, dtype=torch.float64)
        vs = torch.zeros(*lead, Dv + 1, dtype=torch.float64)
        st = torch.full(lead, float("-inf") if kernel == "softmax" else 0.0, dtype=torch.float64)
        for _ in range(steps + 1):
            q, k, v = r(*lead, D), r(*lead, D), r(*lead, Dv)
            if _ < steps:
                torch.ops.panther._favor_decode_step_(q, k, v, W, kernel, kv, vs, st)
        t = lambda x: _leaf(x, device, dtype, False)
        out.append(Sample(desc, (t(q), t(k), t(v), t(W), kernel, t(kv), t(vs), t(st))))
        if steps > 0 and lead:  # the state's length counted by the step (the module's call)
            n = torch.tensor(steps, device=device)
            out.append(Sample(desc + ", counting length", (t(q), t(k), t(v), t(W), kernel, t(kv), t(vs), t(st), n)))
        if dtype == torch.float32 and steps > 0:
            # The module's call: bf16 query, key and value (views of one fused projection) on a
            # float32 state, the projection in bf16.
            lo = lambda x: _leaf(x, device, torch.bfloat16, False)
            qkv = torch.stack([q, k, v], 1) if D == Dv and q.dim() > 1 else None
            qkv_args = tuple(qkv.to(device, torch.bfloat16).unbind(1)) if qkv is not None else (lo(q), lo(k), lo(v))
            out.append(Sample(desc + ", bf16 inputs", (*qkv_args, lo(W), kernel, t(kv), t(vs), t(st))))
    return out


def _favor_decode_layer_sample_inputs(device, dtype):
    """The layer's decoding step: from an empty state and after steps, bias or not, an empty batch,
    the length counted; bf16 layers on a float32 state."""
    out = []
    for i, (desc, B, H, E, D, Dv, M, kernel, steps, bias) in enumerate([
            ("softmax, empty state", 2, 3, 10, 4, 5, 7, "softmax", 0, True),
            ("relu, after steps, no bias", 1, 2, 8, 4, 4, 5, "relu", 2, False),
            ("softmax, after steps", 2, 2, 8, 4, 3, 6, "softmax", 2, True),
            ("empty batch", 0, 2, 8, 4, 3, 5, "softmax", 0, True)]):
        g = _gen(i)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
        rows = (H * D, H * D, H * Dv)
        ws = [r(n, E) * E ** -0.5 for n in rows]
        bs = [r(n) if bias else None for n in rows]
        wo, W = r(E, H * Dv) * (H * Dv) ** -0.5, r(M, D)
        bo = r(E) if bias else None
        kv, vs = torch.zeros(B, H, M, Dv + 1, dtype=torch.float64), torch.zeros(B, H, Dv + 1, dtype=torch.float64)
        st = torch.full((B, H), float("-inf") if kernel == "softmax" else 0.0, dtype=torch.float64)
        for _ in range(steps):
            torch.ops.panther._favor_decode_layer_(r(B, E), *ws, *bs, W, kernel, wo, bo, kv, vs, st)
        x = r(B, E)
        t = lambda x: None if x is None else _leaf(x, device, dtype, False)
        layer = lambda c: (c(x), *map(c, ws), *map(c, bs), c(W), kernel, c(wo), c(bo))
        out.append(Sample(desc, (*layer(t), t(kv), t(vs), t(st))))
        if steps > 0:
            n = torch.tensor(steps, device=device)
            out.append(Sample(desc + ", counting length", (*layer(t), t(kv), t(vs), t(st), n)))
        if dtype == torch.float32:
            lo = lambda x: None if x is None else _leaf(x, device, torch.bfloat16, False)
            out.append(Sample(desc + ", bf16 layer", (*layer(lo), t(kv), t(vs), t(st))))
    return out


_INTERNAL = ("internal op: reached only through {public}, whose entry runs this check "
             "(the check needs the public op's semantics)")


def _private(name, public, factory, runs=("opcheck", "meta"), devices_=None, why=None,
             dtypes=(torch.float64, torch.float32), opcheck_dtypes=(torch.float32,)):
    exempt = {c: (why or _INTERNAL).format(public=public) for c in CHECKS if c not in runs}
    return OpEntry(name=name, sample_inputs=factory, private=True, exempt=exempt,
                   devices=devices_ or devices(), dtypes=dtypes, opcheck_dtypes=opcheck_dtypes)


# The low-precision sketched linear saves its intermediate split in two ([hi | lo]), another shape
# than in float32/64: its halves are also checked in bf16 and fp16.
_SKETCHED_PRIVATE_DTYPES = dict(dtypes=(torch.float64, torch.float32, torch.bfloat16, torch.float16),
                                opcheck_dtypes=(torch.float32, torch.bfloat16, torch.float16))
# The fused CUDA kernels of FAVOR+ take bf16 only: the attention halves are also checked in bf16.
_FAVOR_PRIVATE_DTYPES = dict(dtypes=(torch.float32, torch.bfloat16), opcheck_dtypes=(torch.float32, torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------


REGISTRY: List[OpEntry] = [
    OpEntry(
        name="sketched_linear",
        sample_inputs=sketched_linear_sample_inputs,
        reference=sketched_linear_reference,
        dtypes=(torch.float64, torch.float32, torch.bfloat16),
        tol={torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)},
        dynamic_samples=sketched_linear_dynamic_samples,
        dynamic_dims=({0: "batch", 1: "tokens"}, None, None, None, None, None),
        # bf16 too: the low-precision path keeps its own (split) intermediate.
        opcheck_dtypes=(torch.float32, torch.bfloat16),
        error_inputs=sketched_linear_error_inputs,
        script_module=SketchedLinearScript,
        autocast_dtypes={"cpu": torch.bfloat16, "cuda": torch.float16},
    ),
    OpEntry(
        name="favor_attention",
        sample_inputs=favor_attention_sample_inputs,
        reference=favor_attention_reference,
        dtypes=(torch.float64, torch.float32, torch.bfloat16),
        tol={torch.float64: (1e-9, 1e-10), torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2)},
        # The stabilisers are constants in the backward (exact up to O(1e-6) terms that finite
        # differences see for the key that sets the softmax stabiliser).
        gradcheck_kwargs={"atol": 1e-4, "rtol": 1e-3},
        dynamic_samples=favor_attention_dynamic_samples,
        dynamic_dims=({0: "batch", 2: "length"}, {0: "batch", 2: "length"}, {0: "batch", 2: "length"},
                      None, None, None, None),
        error_inputs=favor_attention_error_inputs,
        script_module=FavorAttentionScript,
        autocast_dtypes={"cpu": torch.bfloat16, "cuda": torch.float16},
        arg_spellings={"kernel_fn": ("kernel",)},  # the Python wrapper's (and the messages') spelling
    ),
    _private("_sketched_linear_forward", "sketched_linear", _sketched_linear_forward_sample_inputs,
             **_SKETCHED_PRIVATE_DTYPES),
    _private("_sketched_linear_backward", "sketched_linear", _sketched_linear_backward_sample_inputs,
             **_SKETCHED_PRIVATE_DTYPES),
    _private("_favor_attention_forward", "favor_attention", _favor_attention_forward_sample_inputs,
             devices_=("cuda",), **_FAVOR_PRIVATE_DTYPES),  # the fused CUDA forward; no CPU kernel
    _private("_favor_attention_backward", "favor_attention", _favor_attention_backward_sample_inputs,
             **_FAVOR_PRIVATE_DTYPES),
    # In place and inference only (no autograd kernel): the module's decoding tests
    # (tests/test_decode.py) compare it with the Python math and the causal forward.
    _private("_favor_decode_step_", "pr.nn.RandMultiHeadAttention.step_", _favor_decode_step_sample_inputs,
             why="in-place decoding step of {public}, inference only (no autograd, float32/float64 "
                 "state): tests/test_decode.py checks its values against the Python math"),
    _private("_favor_decode_layer_", "pr.nn.RandMultiHeadAttention.step_", _favor_decode_layer_sample_inputs,
             why="in-place decoding step of a whole layer of {public}, inference only (no autograd, float32/float64 "
                 "state): tests/test_decode.py checks its values against the step op and the projections"),
    _private("_rand_mha_self_attention", "pr.nn.RandMultiHeadAttention", _rand_mha_sample_inputs,
             why="CompositeImplicitAutograd: decomposes into aten ops and panther::favor_attention "
                 "(checked by its own entry); the module's tests cover {public}"),
]

BY_NAME: Dict[str, OpEntry] = {e.name: e for e in REGISTRY}


def namespace_ops() -> List[str]:
    """Every operator registered in the ``panther`` namespace (names without the prefix)."""
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("panther::"))


def schema_arg_names(name: str) -> Sequence[str]:
    return [a.name for a in getattr(torch.ops.panther, name).default._schema.arguments]
