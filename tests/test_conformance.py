"""The conformance suite: every check on every op of ``torch.ops.panther``.

The ops, their sample-input factories, references and exemptions live in ``tests/op_registry.py``;
this file has one ``test_<check>`` per name in ``op_registry.CHECKS``, each parametrized over
every registry entry and device, plus the meta-tests that keep the registry complete:

* ``test_every_op_is_registered``: each op of the namespace has an entry (and no entry is stale);
* ``test_every_entry_has_every_check``: each entry supplies what every check needs, or (private
  ops only) names the check in ``exempt`` with a reason; every check has its test here;
* ``test_public_schemas_are_frozen``: every public op's schema is in docs/compatibility.md's table
  and the live schema is backward compatible with it (only trailing arguments with defaults may
  be added).

Known bugs are ``xfail(strict=True)`` entries of the registry: the suite is green today and fails
as soon as a bug is fixed, so that the marker gets removed. ``cuda`` parameters run on a GPU
machine and are skipped elsewhere. Small sizes: the whole file runs in well under 3 minutes on
2 CPU cores.
"""

import io
import os
import re

import pytest
import torch
from torch import Tensor

import op_registry as reg
from op_registry import CHECKS, REGISTRY, OpEntry, Sample

ALL_DEVICES = ("cpu", "cuda")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny ops on a busy machine: OpenMP barriers cost more than the work.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cases(check: str, dtypes: bool = False):
    """pytest params (entry, device[, dtype]) for ``check``: every entry x every device, with the
    registry's exemptions as skips and its known bugs as strict xfails."""
    params = []
    for e in REGISTRY:
        for device in ALL_DEVICES:
            marks = [pytest.mark.cuda] if device == "cuda" else []
            if check in e.exempt:
                marks.append(pytest.mark.skip(reason=f"{e.name}: {e.exempt[check]}"))
            elif device not in e.devices:
                marks.append(pytest.mark.skip(reason=f"{e.name} has no {device} kernel"))
            if check in e.xfail:
                marks.append(pytest.mark.xfail(strict=True, reason=e.xfail[check]))
            for dt in (e.dtypes if dtypes else (None,)):
                values = (e, device) if dt is None else (e, device, dt)
                pid = "-".join([e.name, device] + ([str(dt).replace("torch.", "")] if dt else []))
                params.append(pytest.param(*values, marks=marks, id=pid))
    return params


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def detached(args):
    return tuple(a.detach() if isinstance(a, Tensor) else a for a in args)


def as_function(entry: OpEntry, sample: Sample):
    """(fn, inputs): ``fn(*inputs)`` calls the op with the sample's requires-grad tensors replaced."""
    positions = [i for i, a in enumerate(sample.args) if isinstance(a, Tensor) and a.requires_grad]

    def fn(*xs):
        args = list(sample.args)
        for i, x in zip(positions, xs):
            args[i] = x
        return entry.op(*args)

    return fn, [sample.args[i] for i in positions]


def outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_close_to_ref(out: Tensor, ref: Tensor, tol, what: str):
    rtol, atol = tol
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)}, reference {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    err = (out.double() - ref.double()).abs()
    bound = atol * max(1.0, ref.abs().max().item()) + rtol * ref.abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"{what}: max |out - ref| = {err.max().item():.3e}; at the worst entry err "
        f"{err.flatten()[worst].item():.3e} > bound {bound.flatten()[worst].item():.3e} (rtol={rtol}, atol={atol})")


def fixed_grad(out: Tensor, seed: int = 7) -> Tensor:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return g.to(out.device)


def grads(out: Tensor, inputs, grad_out: Tensor):
    return torch.autograd.grad(out, inputs, grad_out.to(out.dtype), allow_unused=True)


def to_meta(a):
    if isinstance(a, Tensor):
        return torch.empty_strided(a.size(), a.stride(), dtype=a.dtype, device="meta")
    if isinstance(a, (list, tuple)):
        return type(a)(to_meta(x) for x in a)
    return a


# ---------------------------------------------------------------------------------------------
# the checks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry,device,dtype", cases("reference", dtypes=True))
def test_reference(entry: OpEntry, device, dtype):
    """Values and gradients against the float64 reference evaluated on the same (rounded) values."""
    tol = entry.tol[dtype]
    for s in entry.samples(device, dtype):
        what = f"{entry.name}[{s.desc}, {dtype}, {device}]"
        out = entry.op(*s.args)
        assert out.dtype == dtype and out.device.type == device, f"{what}: output {out.dtype} on {out.device}"
        ref_args = tuple(a.detach().double().requires_grad_(a.requires_grad) if isinstance(a, Tensor)
                         and a.is_floating_point() else a for a in s.args)
        ref = entry.reference(*ref_args)
        assert_close_to_ref(out, ref, tol, what)
        fn, inputs = as_function(entry, s)
        if not inputs:
            continue
        g = fixed_grad(out)
        got = grads(out, inputs, g)
        _, ref_inputs = as_function(entry, Sample(s.desc, ref_args))
        want = torch.autograd.grad(ref, ref_inputs, g.double(), allow_unused=True)
        for i, (a, b, x) in enumerate(zip(got, want, inputs)):
            assert a is not None and a.dtype == x.dtype and a.shape == x.shape, f"{what}: grad {i}"
            assert_close_to_ref(a, b if b is not None else torch.zeros_like(a, dtype=torch.float64), tol,
                                f"{what} grad of requires-grad input {i}")


@pytest.mark.parametrize("entry,device", cases("gradcheck"))
def test_gradcheck(entry: OpEntry, device):
    checked = 0
    for s in entry.samples(device, torch.float64):
        fn, inputs = as_function(entry, s)
        if inputs:
            assert torch.autograd.gradcheck(fn, inputs, **entry.gradcheck_kwargs), s.desc
            checked += 1
    assert checked, f"{entry.name}: the factory gives no sample that requires grad"


@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered:UserWarning")
@pytest.mark.parametrize("entry,device", cases("gradgradcheck"))
def test_gradgradcheck(entry: OpEntry, device):
    checked = 0
    for s in entry.samples(device, torch.float64):
        fn, inputs = as_function(entry, s)
        if inputs and all(t.numel() for t in s.tensor_args() if t.dim() > 1):
            assert torch.autograd.gradgradcheck(fn, inputs, **entry.gradcheck_kwargs), s.desc
            checked += 1
    assert checked


@pytest.mark.parametrize("entry,device", cases("opcheck"))
def test_opcheck(entry: OpEntry, device):
    for dtype in entry.opcheck_dtypes:
        for s in entry.samples(device, dtype):
            torch.library.opcheck(entry.op, s.args)


@pytest.mark.parametrize("entry,device", cases("meta"))
def test_meta(entry: OpEntry, device):
    """The Meta kernel (what torch.compile/export trace with) agrees with the real kernel on
    shapes, dtypes and the strides of every dim of size > 1."""
    for dtype in entry.dtypes:
        for s in entry.samples(device, dtype):
            args = detached(s.args)
            real = outputs(entry.op(*args))
            fake = outputs(entry.op(*to_meta(args)))
            assert len(real) == len(fake)
            for i, (r, f) in enumerate(zip(real, fake)):
                what = f"{entry.name}[{s.desc}, {dtype}] output {i}"
                assert (r is None) == (f is None), what
                if r is None:
                    continue
                assert f.device.type == "meta", what
                assert f.shape == r.shape and f.dtype == r.dtype, f"{what}: meta {f.shape} {f.dtype}, real {r.shape} {r.dtype}"
                if r.numel():
                    sig = [d for d in range(r.dim()) if r.shape[d] > 1]
                    assert [f.stride(d) for d in sig] == [r.stride(d) for d in sig], \
                        f"{what}: meta strides {f.stride()}, real {r.stride()}"


def check_dynamic_sizes(entry: OpEntry, sample: Sample) -> None:
    """The first dynamic sample is the one traced: its varying dims must be >= 2 (0 and 1 are
    specialised by design) and differ from every fixed dim, because dynamo gives dims of equal
    size one symbol ("duck shaping"), so a guard on a fixed dim would pin the varying one."""
    varying, fixed = {}, set()
    for spec, a in zip(entry.dynamic_dims, sample.args):
        if not isinstance(a, Tensor):
            continue
        for d, n in enumerate(a.shape):
            if spec and d in spec:
                varying[f"{spec[d]}"] = n
            else:
                fixed.add(n)
    assert varying, f"{entry.name}: dynamic_dims names no dim"
    for name, n in varying.items():
        assert n >= 2 and n not in fixed, (
            f"{entry.name}: the first dynamic sample's {name}={n} must be >= 2 and differ from the fixed "
            f"sizes {sorted(fixed)} (choose other sizes in the factory)")


@pytest.mark.parametrize("entry,device", cases("compile_dynamic"))
def test_compile_dynamic(entry: OpEntry, device):
    """torch.compile(fullgraph=True, dynamic=True, backend="aot_eager") compiles ONCE for every
    size of ``dynamic_samples`` and matches eager, forward and backward."""
    from torch._dynamo.testing import CompileCounterWithBackend

    samples = entry.dynamic_samples(device)
    assert len(samples) >= 3
    check_dynamic_sizes(entry, samples[0])
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda *a: entry.op(*a), fullgraph=True, dynamic=True, backend=counter)
    for s in samples:
        _, inputs = as_function(entry, s)
        eager = entry.op(*s.args)
        got = compiled(*s.args)
        torch.testing.assert_close(got, eager)
        if inputs:
            g = fixed_grad(eager)
            for a, b in zip(grads(got, inputs, g), grads(eager, inputs, g)):
                torch.testing.assert_close(a, b)
    torch._dynamo.reset()
    assert counter.frame_count == 1, f"{entry.name}: compiled {counter.frame_count} times for {len(samples)} sizes"


@pytest.mark.parametrize("entry,device", cases("compile_inductor"))
def test_compile_inductor(entry: OpEntry, device, inductor_cache):
    s = next(s for s in entry.samples(device, torch.float32) if s.grad_inputs())
    _, inputs = as_function(entry, s)
    compiled = torch.compile(lambda *a: entry.op(*a), fullgraph=True, backend="inductor")
    eager = entry.op(*s.args)
    got = compiled(*s.args)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, eager, **tol)
    g = fixed_grad(eager)
    for a, b in zip(grads(got, inputs, g), grads(eager, inputs, g)):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("entry,device", cases("export_dynamic"))
def test_export_dynamic(entry: OpEntry, device):
    """torch.export of the op with its dynamic dims; the program (and its save/load round trip)
    runs at the other sizes."""
    samples = [Sample(s.desc, detached(s.args)) for s in entry.dynamic_samples(device)]
    dims = {}
    dynamic_shapes = tuple(
        None if spec is None else {d: dims.setdefault(name, torch.export.Dim(name)) for d, name in spec.items()}
        for spec in entry.dynamic_dims)
    ep = torch.export.export(entry.script_module(), samples[0].args, dynamic_shapes=dynamic_shapes)
    assert any(entry.qualname.replace("::", ".") in str(n.target) for n in ep.graph.nodes)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    for s in samples[1:]:
        want = entry.op(*s.args)
        torch.testing.assert_close(ep.module()(*s.args), want, rtol=0, atol=0)
        torch.testing.assert_close(loaded.module()(*s.args), want, rtol=0, atol=0)


@pytest.mark.parametrize("entry,device", cases("torchscript"))
def test_torchscript(entry: OpEntry, device):
    scripted = torch.jit.script(entry.script_module())
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    samples = entry.samples(device, torch.float32) + entry.dynamic_samples(device)
    for s in samples:
        args = detached(s.args)
        want = entry.op(*args)
        torch.testing.assert_close(scripted(*args), want, rtol=0, atol=0)
        torch.testing.assert_close(loaded(*args), want, rtol=0, atol=0)


@pytest.mark.parametrize("entry,device", cases("autocast"))
def test_autocast(entry: OpEntry, device):
    """Under autocast, float32 inputs run in the low-precision dtype (output in it, close to the
    reference on the inputs rounded to it, gradients back in float32); float64 is left alone."""
    lowp = entry.autocast_dtypes[device]
    tol = entry.tol.get(lowp, (2e-2, 2e-2))
    for s in entry.samples(device, torch.float32):
        what = f"{entry.name}[{s.desc}] under {device} autocast({lowp})"
        with torch.autocast(device, dtype=lowp):
            out = entry.op(*s.args)
        assert out.dtype == lowp, f"{what}: output dtype {out.dtype}"
        rounded = tuple(a.detach().to(lowp).double() if isinstance(a, Tensor) and a.is_floating_point() else a
                        for a in s.args)
        assert_close_to_ref(out, entry.reference(*rounded), tol, what)
        _, inputs = as_function(entry, s)
        if inputs:
            for x, gx in zip(inputs, grads(out, inputs, fixed_grad(out))):
                assert gx is not None and gx.dtype == x.dtype and bool(torch.isfinite(gx).all()), what
    for s in entry.samples(device, torch.float64)[:3]:
        args = detached(s.args)
        with torch.autocast(device, dtype=lowp):
            out = entry.op(*args)
        torch.testing.assert_close(out, entry.op(*args), rtol=0, atol=0)


@pytest.mark.parametrize("entry,device", cases("error_format"))
def test_error_format(entry: OpEntry, device):
    """A bad argument raises RuntimeError whose first line starts with ``panther::<op>: `` and
    names the argument (by its schema name or an accepted spelling)."""
    arg_names = reg.schema_arg_names(entry.name)
    for e in entry.error_inputs(device):
        assert e.argument in arg_names, f"{entry.name}: error case {e.desc!r} names {e.argument!r}, not in {arg_names}"
        with pytest.raises(RuntimeError) as info:
            entry.op(*e.args)
        first = str(info.value).strip().splitlines()[0]
        assert first.startswith(f"{entry.qualname}: "), f"{e.desc}: message does not name the op: {first!r}"
        spellings = (e.argument,) + entry.arg_spellings.get(e.argument, ())
        assert any(re.search(rf"\b{re.escape(n)}\b", first) for n in spellings), \
            f"{e.desc}: message does not name {spellings}: {first!r}"
        if e.match:
            assert re.search(e.match, first), f"{e.desc}: {first!r} does not match {e.match!r}"


# ---------------------------------------------------------------------------------------------
# meta-tests: the registry is complete and every op gets every check
# ---------------------------------------------------------------------------------------------

# What each check needs from an entry (fields that must not be None / empty).
NEEDS = {
    "reference": ("sample_inputs", "reference", "tol"),
    "gradcheck": ("sample_inputs",),
    "gradgradcheck": ("sample_inputs",),
    "opcheck": ("sample_inputs",),
    "meta": ("sample_inputs",),
    "compile_dynamic": ("dynamic_samples",),
    "compile_inductor": ("sample_inputs",),
    "export_dynamic": ("dynamic_samples", "dynamic_dims", "script_module"),
    "torchscript": ("sample_inputs", "dynamic_samples", "script_module"),
    "autocast": ("sample_inputs", "reference", "autocast_dtypes"),
    "error_format": ("error_inputs",),
}


def test_every_op_is_registered():
    ops = set(reg.namespace_ops())
    assert ops, "no op in torch.ops.panther: the library did not load"
    missing = sorted(ops - set(reg.BY_NAME))
    assert not missing, f"ops without a conformance entry (add one to tests/op_registry.py): {missing}"
    stale = sorted(set(reg.BY_NAME) - ops)
    assert not stale, f"registry entries for ops that no longer exist: {stale}"
    for e in REGISTRY:
        assert e.private == e.name.startswith("_"), \
            f"{e.name}: private=True exactly for ops with a leading underscore"


def test_every_entry_has_every_check():
    assert set(NEEDS) == set(CHECKS)
    for check in CHECKS:  # every check has its test, parametrized over every entry
        fn = globals().get(f"test_{check}")
        assert fn is not None, f"no test_{check} in the conformance suite"
        marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
        covered = {p.values[0].name for m in marks for p in m.args[1]}
        assert covered == set(reg.BY_NAME), f"test_{check} does not run on {set(reg.BY_NAME) - covered}"
    for e in REGISTRY:
        assert set(e.exempt) <= set(CHECKS) and set(e.xfail) <= set(CHECKS), e.name
        if not e.private:
            assert not e.exempt, f"{e.name} is public: it gets every check (known bugs go in xfail)"
        for check, why in {**e.exempt, **e.xfail}.items():
            assert why.strip(), f"{e.name}: {check} exempted/xfailed without a reason"
        for check, why in e.xfail.items():
            assert e.name in why, f"{e.name}: the xfail reason of {check} must name the op"
            assert check not in e.exempt, f"{e.name}: {check} both exempt and xfail"
        for check in CHECKS:
            if check in e.exempt:
                continue
            lacking = [f for f in NEEDS[check] if not getattr(e, f)]
            assert not lacking, f"{e.name} lacks {lacking} for the {check!r} check (or, if private, an exemption)"
        if "reference" not in e.exempt:
            assert set(e.dtypes) <= set(e.tol), f"{e.name}: tol for every dtype"
        if e.dynamic_dims is not None:
            assert len(e.dynamic_dims) == len(reg.schema_arg_names(e.name)), f"{e.name}: one dynamic_dims per argument"
        if e.autocast_dtypes is not None:
            assert set(e.devices) <= set(e.autocast_dtypes), f"{e.name}: an autocast dtype per device"


def test_factories_cover_the_axes():
    """The public factories give odd sizes, non-contiguous, empty, and differing requires-grad sets."""
    for e in REGISTRY:
        if e.private:
            continue
        samples = e.samples("cpu", torch.float32)
        tensors = [[a for a in s.args if isinstance(a, Tensor)] for s in samples]
        assert any(any(not t.is_contiguous() for t in ts) for ts in tensors), f"{e.name}: no non-contiguous sample"
        assert any(any(t.numel() == 0 for t in ts) for ts in tensors), f"{e.name}: no empty sample"
        assert any(any(d % 2 == 1 and d > 1 for t in ts for d in t.shape) for ts in tensors), f"{e.name}: no odd size"
        grad_sets = {tuple(t.requires_grad for t in ts) for ts in tensors}
        assert len(grad_sets) >= 3, f"{e.name}: fewer than 3 different requires-grad sets"
        assert any(not any(g) for g in grad_sets), f"{e.name}: no sample without grad"


COMPATIBILITY_DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "compatibility.md")


def frozen_schemas():
    """The public schemas of docs/compatibility.md's table: ``| `panther::op` | `schema` |`` rows."""
    with open(COMPATIBILITY_DOC) as f:
        rows = re.findall(r"^\| `panther::(\w+)` \| `(.+?)` \|\s*$", f.read(), re.M)
    return {name: torch._C.parse_schema("panther::" + schema) for name, schema in rows}


def test_public_schemas_are_frozen():
    frozen = frozen_schemas()
    assert frozen, f"no schema table found in {COMPATIBILITY_DOC}"
    public = {n for n in reg.namespace_ops() if not n.startswith("_")}
    missing = sorted(public - set(frozen))
    assert not missing, f"public ops missing from the schema table of docs/compatibility.md: {missing}"
    removed = sorted(set(frozen) - public)
    assert not removed, f"public ops are never removed (docs/compatibility.md), but these are gone: {removed}"
    for name in sorted(public):
        live = getattr(torch.ops.panther, name).default._schema
        assert live.is_backward_compatible_with(frozen[name]), (
            f"panther::{name}'s schema changed incompatibly: was {frozen[name]}, now {live}. Public schemas "
            f"are frozen (docs/compatibility.md): only trailing arguments with defaults may be added; "
            f"otherwise add a new op")
