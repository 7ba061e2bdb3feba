"""nn.Module conventions of every Panther module (SKLinear, RandMultiHeadAttention): every
parameter and buffer follows every module transform, reset_parameters, meta-device
construction, safetensors round trips, size checks against the process's real memory limit,
and argument checks (operator.index integers, floating dtypes, None tensors)."""
import copy
import io
import time

import numpy as np
import pytest
import torch

import panther._checks as checks
from panther.nn import RandMultiHeadAttention, SKLinear


def make_sk(**kw):
    return SKLinear(12, 10, 2, 3, **kw)


def make_attn(**kw):
    return RandMultiHeadAttention(16, 2, 8, **kw)


def run_sk(m, dtype=None):
    x = torch.randn(3, 12, dtype=dtype or m.S1s.dtype)
    return m(x)


def run_attn(m, dtype=None):
    x = torch.randn(2, 5, 16, dtype=dtype or m.Wq.dtype)
    return m(x, x, x)[0]


MODULES = [pytest.param(make_sk, run_sk, id="SKLinear"), pytest.param(make_attn, run_attn, id="RandMHA")]


def tensors(m):
    return dict(list(m.named_parameters()) + list(m.named_buffers()))


@pytest.mark.parametrize("make,run", MODULES)
def test_share_memory_after_deepcopy_and_assign(make, run):
    """share_memory() reaches every parameter and buffer after deepcopy and load_state_dict(assign=True)."""
    m = make()
    clone = copy.deepcopy(m)
    assigned = make()
    assigned.load_state_dict(copy.deepcopy(m.state_dict()), assign=True)
    for mod in (m, clone, assigned):
        mod.share_memory()
        not_shared = [n for n, t in tensors(mod).items() if not t.is_shared()]
        assert not not_shared, not_shared
    torch.manual_seed(0)
    a = run(m)
    torch.manual_seed(0)
    b = run(assigned)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("make,run", MODULES)
def test_dtype_transforms_reach_every_tensor(make, run):
    m = make()
    names = set(tensors(m))
    for fn, dt in ((lambda t: t.to(torch.float64), torch.float64), (lambda t: t.half(), torch.float16),
                   (lambda t: t.bfloat16(), torch.bfloat16), (lambda t: t.float(), torch.float32)):
        m = fn(m)
        assert set(tensors(m)) == names
        wrong = {n: t.dtype for n, t in tensors(m).items() if t.dtype != dt}
        assert not wrong, wrong
        out = run(m)
        assert out.dtype == dt and bool(out.isfinite().all())


@pytest.mark.parametrize("make,run", MODULES)
def test_meta_construction_to_empty_reset_parameters(make, run):
    """Deferred initialisation: build on meta (nothing allocated), to_empty, reset_parameters."""
    m = make(device="meta")
    assert all(t.is_meta for t in tensors(m).values())
    m = m.to_empty(device="cpu")
    m.reset_parameters()
    assert all(not t.is_meta for t in tensors(m).values())
    out = run(m)
    assert bool(out.isfinite().all()) and out.abs().sum() > 0
    # Same statistics as a directly built module: reset_parameters is the constructor's init.
    ref = make()
    for n, t in tensors(ref).items():
        got = tensors(m)[n]
        assert got.shape == t.shape and got.dtype == t.dtype
        if t.numel() > 20 and t.std() > 0:
            assert 0.5 < (got.std() / t.std()).item() < 2.0, n


@pytest.mark.parametrize("make,run", MODULES)
def test_reset_parameters_in_place_and_reproducible(make, run):
    m = make()
    before = {n: (t, t.detach().clone()) for n, t in tensors(m).items()}
    m.reset_parameters(generator=torch.Generator().manual_seed(5))
    after = tensors(m)
    for n, (obj, old) in before.items():
        assert after[n] is obj  # same tensor objects (optimizers keep them)
    assert any(not torch.equal(old, after[n]) for n, (_, old) in before.items())
    snap = {n: t.detach().clone() for n, t in after.items()}
    m.reset_parameters(generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(snap[n], t) for n, t in tensors(m).items())


@pytest.mark.parametrize("make,run", MODULES)
def test_safetensors_round_trip(make, run, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    m = make()
    path = str(tmp_path / "m.safetensors")
    st.save_model(m, path)
    fresh = make()
    missing, unexpected = st.load_model(fresh, path)
    assert not missing and not unexpected
    for n, t in tensors(m).items():
        assert torch.equal(t, tensors(fresh)[n]), n
    torch.manual_seed(1)
    a = run(m)
    torch.manual_seed(1)
    torch.testing.assert_close(run(fresh), a, rtol=0, atol=0)


@pytest.mark.parametrize("make,run", MODULES)
def test_state_dict_torch_save_round_trip(make, run):
    m = make()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = make()
    fresh.load_state_dict(torch.load(buf))
    torch.manual_seed(2)
    a = run(m)
    torch.manual_seed(2)
    torch.testing.assert_close(run(fresh), a, rtol=0, atol=0)


# ---------------------------------------------------------------- sizes


def test_huge_attention_raises_quickly_before_allocating():
    t = time.perf_counter()
    with pytest.raises(ValueError, match=r"RandMultiHeadAttention\(embed_dim=16, num_heads=4, "
                                         r"num_random_features=1000000000000.*GiB of memory on device cpu"):
        RandMultiHeadAttention(16, 4, 10**12)
    with pytest.raises(ValueError, match="more elements than a tensor can hold"):
        RandMultiHeadAttention(2**32, 1, 8, kdim=2**32)
    assert time.perf_counter() - t < 2.0
    # Meta-device construction allocates nothing, so it is not limited.
    assert RandMultiHeadAttention(16, 4, 10**9, device="meta").projection_matrix.shape == (10**9, 4)


def test_fit_check_uses_the_cgroup_limit(monkeypatch):
    """A process limited by its cgroup (containers, CI) gets the error at that limit, not at the
    machine's physical memory."""
    monkeypatch.setattr(checks, "_cgroup_memory_limit", lambda: 64 * 2**20)
    assert checks.memory_limit_bytes("cpu") <= 64 * 2**20
    with pytest.raises(ValueError, match=r"GiB of memory on device cpu"):
        RandMultiHeadAttention(1024, 8, 2**18)  # ~0.3 GiB of features and draws
    with pytest.raises(ValueError, match=r"SKLinear\(in_features=4096.*GiB of memory on device cpu"):
        SKLinear(4096, 4096, 4, 512)
    monkeypatch.setattr(checks, "_cgroup_memory_limit", lambda: None)
    RandMultiHeadAttention(64, 8, 256)


def test_cgroup_files_are_parsed(tmp_path, monkeypatch):
    (tmp_path / "max").write_text("max\n")
    (tmp_path / "v2").write_text("1073741824\n")
    (tmp_path / "v1").write_text(str(2**63 - 4096) + "\n")  # cgroup v1's "unlimited"
    assert checks._read_int(str(tmp_path / "max")) is None
    assert checks._read_int(str(tmp_path / "v2")) == 2**30
    assert checks._read_int(str(tmp_path / "v1")) is None
    assert checks._read_int(str(tmp_path / "absent")) is None


@pytest.mark.cuda
def test_fit_check_uses_free_device_memory():
    free, total = torch.cuda.mem_get_info()
    limit = checks.memory_limit_bytes("cuda")
    assert limit <= total
    with pytest.raises(ValueError, match="GiB of memory on device cuda"):
        RandMultiHeadAttention(16, 4, 10**12, device="cuda")


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize("integral", [np.int64(4), np.int32(4), torch.tensor(4), 4])
def test_integral_arguments_accepted(integral):
    a = RandMultiHeadAttention(16, integral, integral * 2)
    assert type(a.num_heads) is int and a.num_heads == 4
    s = SKLinear(8, 6, integral, integral)
    assert type(s.num_terms) is int and type(s.low_rank) is int
    assert s.S1s.shape == (4, 8, 4)


@pytest.mark.parametrize("bad", [8.0, True, torch.tensor(2.0), "8", None])
def test_non_integral_arguments_rejected(bad):
    with pytest.raises(ValueError, match="RandMultiHeadAttention: num_random_features must be a positive integer"):
        RandMultiHeadAttention(16, 2, bad)
    with pytest.raises(ValueError, match="SKLinear: low_rank must be a positive integer"):
        SKLinear(8, 6, 1, bad)


@pytest.mark.parametrize("make,run", MODULES)
@pytest.mark.parametrize("bad,exc", [(torch.int32, ValueError), (torch.bool, ValueError),
                                     (torch.complex64, ValueError), ("float32", TypeError), (32, TypeError)])
def test_non_floating_dtype_rejected(make, run, bad, exc):
    with pytest.raises(exc, match="dtype must be"):
        make(dtype=bad)


def test_none_tensors_named():
    attn = make_attn()
    x = torch.randn(1, 3, 16)
    with pytest.raises(TypeError, match="RandMultiHeadAttention: query must be a Tensor, got None"):
        attn(None, x, x)
    with pytest.raises(TypeError, match="RandMultiHeadAttention: value must be a Tensor, got None"):
        attn(x, x, None)
    with pytest.raises(TypeError, match="RandMultiHeadAttention: key_padding_mask must be a Tensor or None, got list"):
        attn(x, x, x, key_padding_mask=[[0, 0, 1]])
    with pytest.raises(TypeError, match="SKLinear: input must be a Tensor, got None"):
        make_sk()(None)


@pytest.mark.parametrize("make,run,op", [pytest.param(make_sk, run_sk, "sketched_linear", id="SKLinear"),
                                          pytest.param(make_attn, run_attn, "_rand_mha_self_attention",
                                                       id="RandMHA")])
def test_eager_forward_calls_the_op_entry_not_the_packet(make, run, op, monkeypatch):
    """An eager forward calls its op through the default overload's C++ entry
    (panther.nn._tensors.panther_op), not through the torch.ops packet, whose overload resolution
    runs in Python on every call: with the packet replaced by one that raises, the forward still
    runs and gives the same result."""
    torch.manual_seed(0)
    m = make(dtype=torch.float64)
    torch.manual_seed(1)
    want = run(m)

    def packet(*args, **kwargs):
        raise AssertionError(f"torch.ops.panther.{op} called on the eager path")

    monkeypatch.setattr(torch.ops.panther, op, packet)
    torch.manual_seed(1)
    torch.testing.assert_close(run(m), want, rtol=0, atol=0)


def test_sketch_weights_under_parametrize_prune_and_functional_call():
    """SKLinear reads its sketches from the module's parameter dicts on the fast path; weights
    that live elsewhere (a parametrization, pruning's recomputed attribute, functional_call's
    swapped tensors) are the ones the layer uses."""
    from torch.nn.utils import parametrize, prune

    torch.manual_seed(0)
    x = torch.randn(4, 12, dtype=torch.float64)

    def twin(m, **replace):  # a plain layer with the same (or replaced) tensors
        t = make_sk(dtype=torch.float64)
        with torch.no_grad():
            for name, value in tensors(t).items():
                value.copy_(replace.get(name, getattr(m, name)))
        return t

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    m = make_sk(dtype=torch.float64)
    plain = twin(m)
    parametrize.register_parametrization(m, "S1s", Double())
    want = twin(m, S1s=2 * plain.S1s)(x)
    torch.testing.assert_close(m(x), want)
    assert not torch.allclose(plain(x), want)

    m = make_sk(dtype=torch.float64)
    prune.random_unstructured(m, "S2s", amount=0.5)
    torch.testing.assert_close(m(x), twin(m, S2s=m.S2s_orig * m.S2s_mask)(x))

    m = make_sk(dtype=torch.float64)
    other = torch.randn_like(m.S2s)
    got = torch.func.functional_call(m, {"S2s": other}, (x,))
    torch.testing.assert_close(got, twin(m, S2s=other)(x))
