"""panther.convert: configs and precedence, SVD / activation-aware init bounds, report, unconvert,
errors before any change, save/load, TorchScript and torch.export of converted models."""

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

import panther
from panther.convert import sketch_factors_from_weight
from panther.nn import RandMultiHeadAttention, SKLinear


def _mlp(d_in=64, hidden=96, d_out=10):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out))


def _weff64(layer: SKLinear) -> torch.Tensor:
    """Effective (out, in) weight from the layer's own tensors, in float64."""
    L = layer.num_terms
    S1, U1, U2, S2 = (t.detach().double() for t in (layer.S1s, layer.U1s, layer.U2s, layer.S2s))
    return (torch.einsum("lik,lko->io", S1, U1) + torch.einsum("lik,lko->io", U2, S2)).T / (2 * L)


def _spectrum_matrix(m, n, kind, device="cpu", dtype=torch.float32):
    """(m, n) test matrices: flat (Gaussian), decaying (power law) and low rank."""
    r = min(m, n)
    Q1 = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64)).Q
    if kind == "gaussian":
        return torch.randn(m, n, dtype=dtype, device=device)
    s = torch.arange(1, r + 1, dtype=torch.float64)
    s = s ** -0.5 if kind == "slow" else (s ** -2.0 if kind == "fast" else (s <= 6).double())
    return (Q1 * s @ Q2.T).to(device=device, dtype=dtype)


# ---------------------------------------------------------------- SVD init: Eckart-Young bounds


@pytest.mark.parametrize("kind", ["gaussian", "slow", "fast"])
@pytest.mark.parametrize("L,k,method", [(1, 8, "exact"), (1, 8, "randomized"), (2, 6, "auto"),
                                        (3, 4, "randomized"), (1, 30, "auto")])
def test_svd_init_within_1_01_of_optimal_fp32(device, kind, L, k, method):
    W = _spectrum_matrix(150, 120, kind, device=device)
    lin = nn.Linear(120, 150, device=device)
    with torch.no_grad():
        lin.weight.copy_(W)
    sk = panther.convert(nn.Sequential(lin), panther.SketchConfig(num_terms=L, low_rank=k, svd=method))[0]
    assert isinstance(sk, SKLinear) and sk.S1s.dtype == torch.float32
    W64 = W.double()
    opt = torch.linalg.svdvals(W64)[2 * L * k:].norm()
    err = (_weff64(sk) - W64).norm()
    assert err <= 1.01 * opt + 1e-5 * W64.norm(), (float(err), float(opt))
    # The buffers hold orthonormal bases (not signs): U1_i has orthonormal rows, U2_i columns.
    U1 = sk.U1s.double()
    eye = torch.eye(k, dtype=torch.float64, device=device)
    assert torch.allclose(U1 @ U1.mT, eye.expand(L, k, k), atol=1e-5)
    U2 = sk.U2s.double()
    assert torch.allclose(U2.mT @ U2, eye.expand(L, k, k), atol=1e-5)


@pytest.mark.parametrize("L,k", [(1, 8), (2, 5)])
def test_svd_init_bf16_bound(device, L, k):
    W = _spectrum_matrix(96, 80, "slow", device=device).bfloat16()
    lin = nn.Linear(80, 96, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(W)
    sk = panther.convert(nn.Sequential(lin), panther.SketchConfig(num_terms=L, low_rank=k))[0]
    assert sk.S1s.dtype == torch.bfloat16
    W64 = W.double()
    opt = torch.linalg.svdvals(W64)[2 * L * k:].norm()
    u = 2.0 ** -8  # bf16 unit roundoff
    err = (_weff64(sk) - W64).norm()
    assert err <= 1.01 * opt + 2 * u * W64.norm(), (float(err), float(opt))


@pytest.mark.parametrize("d_in,d_out,L", [(48, 32, 1), (33, 40, 2), (20, 20, 1)])
def test_full_rank_reproduces_the_layer(d_in, d_out, L):
    lin = nn.Linear(d_in, d_out)
    sk = panther.convert(nn.Sequential(lin), panther.SketchConfig(num_terms=L, low_rank=1.0,
                                                                  skip_if_larger=False))[0]
    assert 2 * L * sk.low_rank >= min(d_in, d_out)
    x = torch.randn(7, d_in)
    torch.testing.assert_close(sk(x), lin(x), atol=2e-6, rtol=1e-5)
    assert panther.conversion_report(nn.Sequential(sk))[0]["weight_error"] < 1e-5


def test_same_shape_layers_are_batched_and_each_optimal(device):
    """Layers of one shape share one batched SVD; each still meets its own bound."""
    net = nn.Sequential(*[nn.Linear(40, 56, device=device) for _ in range(3)], nn.Linear(56, 40, device=device))
    for i, kind in enumerate(["gaussian", "slow", "fast"]):
        with torch.no_grad():
            net[i].weight.copy_(_spectrum_matrix(56, 40, kind, device=device))
    for method in ("exact", "randomized"):
        out = panther.convert(net, panther.SketchConfig(num_terms=2, low_rank=2, svd=method))
        for i in range(4):
            W64 = net[i].weight.detach().double()
            opt = torch.linalg.svdvals(W64)[8:].norm()
            assert (_weff64(out[i]) - W64).norm() <= 1.01 * opt + 1e-5 * W64.norm()
    full = panther.convert(net, panther.SketchConfig(low_rank=1.0, skip_if_larger=False))
    x = torch.randn(3, 40, device=device)
    for i in range(3):  # (a ModuleList in a Sequential: the layers are not chained)
        torch.testing.assert_close(full[i](x), net[i](x), atol=5e-5, rtol=1e-5)


def test_svd_init_far_better_than_sketch_init():
    """On a low-rank 256x256 weight at L=1, k=8 the unbiased random init is off by O(1); the SVD
    init of the same rank is exact to rounding."""
    lin = nn.Linear(256, 256)
    with torch.no_grad():
        lin.weight.copy_(_spectrum_matrix(256, 256, "lowrank"))
    x = torch.randn(32, 256)
    with torch.no_grad():
        ref = lin(x) - lin.bias
    errs = {}
    for init in ("svd", "sketch"):
        torch.manual_seed(1)
        sk = panther.convert(nn.Sequential(lin), panther.SketchConfig(low_rank=8, init=init))[0]
        with torch.no_grad():
            errs[init] = float((sk(x) - sk.bias - ref).norm() / ref.norm())
    assert errs["svd"] < 1e-5
    assert errs["sketch"] > 0.3


def test_factors_helper_matches_truncated_svd_float64():
    W = torch.randn(30, 20, dtype=torch.float64)
    f = sketch_factors_from_weight(W, 2, 3, svd="exact")
    Weff = (torch.einsum("lik,lko->io", f["S1s"], f["U1s"]) + torch.einsum("lik,lko->io", f["U2s"], f["S2s"])).T / 4
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(Weff, (U[:, :12] * S[:12]) @ Vh[:12])


# ---------------------------------------------------------------- calibration


def _anisotropic_data(d, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)
    return lambda n: torch.randn(n, d, generator=g) @ A.T + 0.3


def test_calibration_lowers_held_out_output_error(capsys):
    d = 64
    data = _anisotropic_data(d, 1)
    net = _mlp(d, 48, 16)
    cal = [data(64) for _ in range(6)]
    held_out = data(512)
    cfg = {"0": panther.SketchConfig(low_rank=4), "2": panther.SketchConfig(low_rank=4)}
    plain = panther.convert(net, cfg)
    aware = panther.convert(net, cfg, calibration=cal, verbose=True)
    assert "calibration" in capsys.readouterr().err
    with torch.no_grad():
        ref = net[0](held_out)
        e_plain = float((plain[0](held_out) - ref).norm() / ref.norm())
        e_aware = float((aware[0](held_out) - ref).norm() / ref.norm())
    assert e_aware < 0.9 * e_plain
    rows = {r["name"]: r for r in panther.conversion_report(aware)}
    assert rows["0"]["output_error"] is not None and rows["0"]["output_error"] < rows["0"]["weight_error"]
    # Buffers stay orthonormal with the whitened init too.
    U2 = aware[0].U2s.double()
    assert torch.allclose(U2.mT @ U2, torch.eye(4, dtype=torch.float64).expand(1, 4, 4), atol=1e-5)


def test_calibration_callable_and_tuple_batches():
    net = _mlp(32, 40, 8)
    cfg = panther.SketchConfig(low_rank=4)
    a = panther.convert(net, cfg, calibration=lambda m: m(torch.randn(50, 32)))
    b = panther.convert(net, cfg, calibration=[(torch.randn(50, 32),)])
    for m in (a, b):
        assert panther.conversion_report(m)[0]["output_error"] is not None


def test_calibration_that_misses_a_layer_fails_before_changes():
    net = _mlp(32, 40, 8)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match="calibration never reached"):
        panther.convert(net, panther.SketchConfig(low_rank=4), calibration=lambda m: None, inplace=True)
    assert all(isinstance(net[i], nn.Linear) for i in (0, 2, 4))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


# ---------------------------------------------------------------- configs and precedence


def test_single_config_converts_eligible_layers_and_deep_copies():
    net = _mlp()
    out = panther.convert(net, panther.SketchConfig(low_rank=8))
    assert out is not net
    assert isinstance(out[0], SKLinear) and isinstance(out[2], SKLinear)
    assert isinstance(out[4], nn.Linear)  # 96 -> 10 would not shrink: kept dense
    assert all(isinstance(net[i], nn.Linear) for i in (0, 2, 4))
    rows = panther.conversion_report(out)
    assert [r["name"] for r in rows if "skipped" in r] == ["4"]


def test_inplace_modifies_the_model():
    net = _mlp()
    out = panther.convert(net, panther.SketchConfig(low_rank=8), inplace=True)
    assert out is net and isinstance(net[0], SKLinear)


def test_dict_precedence_exact_then_regex_then_default():
    net = _mlp()
    cfg = {
        "_default": panther.SketchConfig(low_rank=3),
        "re:[02]": panther.SketchConfig(low_rank=5),
        "re:2": panther.SketchConfig(low_rank=7),  # later regex: never wins over the first
        "2": panther.SketchConfig(low_rank=9),  # exact name beats both
        "4": None,
    }
    out = panther.convert(net, cfg)
    assert out[0].low_rank == 5 and out[2].low_rank == 9 and isinstance(out[4], nn.Linear)
    cfg2 = {"_default": panther.SketchConfig(low_rank=3, skip_if_larger=False), "re:0": None}
    out2 = panther.convert(_mlp(), cfg2)
    assert isinstance(out2[0], nn.Linear) and out2[2].low_rank == 3 and out2[4].low_rank == 3


def test_filter_fn_narrows():
    out = panther.convert(_mlp(), panther.SketchConfig(low_rank=8), filter_fn=lambda m, n: n != "2")
    assert isinstance(out[0], SKLinear) and isinstance(out[2], nn.Linear)


def test_unknown_key_warns_with_near_names():
    net = nn.Sequential()
    net.add_module("encoder_fc1", nn.Linear(64, 64))
    with pytest.warns(UserWarning, match="encoder_fc1"):
        out = panther.convert(net, {"encoder_fc": panther.SketchConfig(low_rank=4),
                                    "_default": panther.SketchConfig(low_rank=4)})
    assert isinstance(out.encoder_fc1, SKLinear)
    with pytest.warns(UserWarning, match=r"'re:enc\.\*fc2'.*encoder_fc1"):
        panther.convert(net, {"re:enc.*fc2": panther.SketchConfig(low_rank=4)})


def test_low_rank_fraction_and_budget():
    net = _mlp(64, 256, 10)
    out = panther.convert(net, {"0": panther.SketchConfig(low_rank=0.5), "2": panther.SketchConfig(
        num_terms=2, low_rank=panther.Budget(0.25))})
    assert out[0].low_rank == math.ceil(0.5 * 64 / 2)
    dense = 256 * 256 + 256
    k = out[2].low_rank
    assert 4 * k * 512 + 256 <= 0.25 * dense < 4 * (k + 1) * 512 + 256
    with pytest.raises(ValueError, match="Budget"):
        panther.Budget(1.5)
    with pytest.raises(ValueError, match="low_rank"):
        panther.SketchConfig(low_rank=0)
    with pytest.raises(ValueError, match="low_rank"):
        panther.SketchConfig(low_rank=1.5)


def test_init_override_empty_does_no_svd(monkeypatch):
    import sys

    pc = sys.modules["panther.convert"]  # (the attribute panther.convert is the function)

    def boom(*a, **k):
        raise AssertionError("SVD work with init='empty'")

    monkeypatch.setattr(pc, "sketch_factors_from_weight", boom)
    out = panther.convert(_mlp(), panther.SketchConfig(low_rank=8), init="empty")
    assert isinstance(out[0], SKLinear)
    assert panther.conversion_report(out)[0]["init"] == "empty"


def test_sketch_init_is_the_unbiased_init():
    net = _mlp()
    out = panther.convert(net, panther.SketchConfig(low_rank=8, init="sketch"))
    U1 = out[0].U1s
    assert torch.allclose(U1.abs(), torch.full_like(U1, 1 / math.sqrt(8)))


# ---------------------------------------------------------------- errors before any change


def test_errors_before_anything_is_modified():
    net = _mlp(64, 96, 10)
    net.add_module("attn", nn.MultiheadAttention(16, 2, batch_first=True))
    snapshot = copy.deepcopy(net.state_dict())
    bad = [
        ({"0": panther.SketchConfig(low_rank=4), "2": panther.SketchConfig(low_rank=64, skip_if_larger=False)},
         ValueError, "rank 96"),
        ({"0": panther.SketchConfig(low_rank=4), "attn": panther.SketchConfig()}, TypeError, "MultiheadAttention"),
        ({"0": panther.PerformerConfig()}, TypeError, "PerformerConfig"),
        ({"1": panther.SketchConfig()}, TypeError, "ReLU"),
        ({"attn.out_proj": panther.SketchConfig(low_rank=2)}, ValueError, "out_proj|MultiheadAttention"),
        ({"0": "svd"}, TypeError, "SketchConfig"),
        ({"re:(": panther.SketchConfig()}, ValueError, "regex"),
    ]
    for cfg, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            panther.convert(net, cfg, inplace=True)
        assert isinstance(net[0], nn.Linear) and isinstance(net.attn, nn.MultiheadAttention)
    with pytest.raises(TypeError, match="nn.Module"):
        panther.convert(lambda x: x, panther.SketchConfig())
    with pytest.raises(ValueError, match="init"):
        panther.convert(net, panther.SketchConfig(), init="zeros")
    with pytest.raises(TypeError, match="config"):
        panther.convert(net, 3)
    for k, v in net.state_dict().items():
        assert torch.equal(v, snapshot[k])


def test_unsupported_attention_fails_before_changes():
    # A key every query sees (add_bias_kv) cannot be made causal: the error comes before any change.
    net = nn.Sequential(nn.Linear(16, 16))
    net.add_module("attn", nn.MultiheadAttention(16, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="attn"):
        panther.convert(net, {"0": panther.SketchConfig(low_rank=2), "attn": panther.PerformerConfig(causal=True)},
                        inplace=True)
    assert isinstance(net[0], nn.Linear)


@pytest.mark.parametrize("kw", [dict(add_bias_kv=True), dict(kdim=8, vdim=12), dict(add_zero_attn=True)])
def test_mha_variants_to_performer_and_back(kw):
    net = nn.Sequential()
    net.add_module("attn", nn.MultiheadAttention(16, 2, batch_first=True, **kw))
    out = panther.convert(net, {"attn": panther.PerformerConfig(num_random_features=8)})
    assert isinstance(out.attn, RandMultiHeadAttention)
    back = panther.unconvert(out).attn
    assert isinstance(back, nn.MultiheadAttention)
    for name, p in net.attn.named_parameters():
        torch.testing.assert_close(dict(back.named_parameters())[name], p)
    assert back.add_zero_attn == net.attn.add_zero_attn and back.batch_first


def test_mha_out_proj_never_converted_on_its_own():
    net = nn.Sequential(nn.Linear(16, 16))
    net.add_module("attn", nn.MultiheadAttention(16, 2))
    out = panther.convert(net, panther.SketchConfig(low_rank=2))
    assert isinstance(out[0], SKLinear)
    assert type(out.attn.out_proj) is not SKLinear


# ---------------------------------------------------------------- GPT-2 style Conv1D by structure


class Conv1D(nn.Module):
    """The shape of transformers' Conv1D (y = x @ W + b, W (nx, nf)), without importing it."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


def test_conv1d_detected_by_structure_and_reproduced_at_full_rank():
    net = nn.Sequential(Conv1D(24, 40))
    out = panther.convert(net, panther.SketchConfig(low_rank=1.0, skip_if_larger=False))
    assert isinstance(out[0], SKLinear) and (out[0].in_features, out[0].out_features) == (40, 24)
    x = torch.randn(3, 5, 40)
    torch.testing.assert_close(out[0](x), net[0](x), atol=2e-6, rtol=1e-5)
    row = panther.conversion_report(out)[0]
    assert row["old_type"] == "Conv1D" and row["before"] == 40 * 24 + 24


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_to_performer_and_back(batch_first):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first, dropout=0.0)
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(self.attn(x, x, x, need_weights=False)[0])

    net = Block().eval()
    out = panther.convert(net, {"attn": panther.PerformerConfig(num_random_features=64)})
    rand = [m for m in out.modules() if isinstance(m, RandMultiHeadAttention)]
    assert len(rand) == 1
    torch.testing.assert_close(torch.cat([rand[0].Wq, rand[0].Wk, rand[0].Wv]), net.attn.in_proj_weight)
    torch.testing.assert_close(rand[0].W0, net.attn.out_proj.weight)
    x = torch.randn(3, 6, 32)
    y = out(x)
    assert y.shape == x.shape
    native = batch_first or not getattr(rand[0], "batch_first", True)  # takes x's layout itself
    xb = x if native else x.transpose(0, 1)
    yb = rand[0](xb, xb, xb)[0]
    yb = out.fc(yb if native else yb.transpose(0, 1))
    torch.testing.assert_close(y, yb)
    back = panther.unconvert(out)
    assert isinstance(back.attn, nn.MultiheadAttention) and back.attn.batch_first == batch_first
    torch.testing.assert_close(back(x), net(x), atol=1e-6, rtol=1e-5)
    torch.jit.script(out)


# ---------------------------------------------------------------- report, to_linear, unconvert


def test_report_rows_and_table():
    out = panther.convert(_mlp(), panther.SketchConfig(low_rank=8))
    rows = panther.conversion_report(out)
    r0 = rows[0]
    assert r0["old_type"] == "Linear" and r0["new_type"] == "SKLinear"
    assert r0["before"] == 64 * 96 + 96 and r0["after"] == 2 * 8 * (64 + 96) + 96 and r0["rank"] == 16
    assert 0 < r0["weight_error"] < 1
    text = panther.conversion_report(out, as_text=True)
    assert "total" in text and "SKLinear" in text
    assert panther.conversion_report(nn.Linear(3, 3)) == []
    with pytest.raises(TypeError):
        panther.conversion_report("model")


def test_to_linear_and_unconvert():
    net = _mlp()
    out = panther.convert(net, panther.SketchConfig(low_rank=8))
    x = torch.randn(4, 64)
    lin = out[0].to_linear()
    assert type(lin) is nn.Linear
    torch.testing.assert_close(lin(x), out[0](x), atol=1e-5, rtol=1e-5)
    back = panther.unconvert(out)
    assert all(type(m) is nn.Linear for m in back if not isinstance(m, nn.ReLU))
    torch.testing.assert_close(back(x), out(x), atol=1e-5, rtol=1e-5)
    assert isinstance(out[0], SKLinear)  # not in place by default


def test_reset_parameters_returns_to_random_signs():
    out = panther.convert(_mlp(), panther.SketchConfig(low_rank=8))
    layer = out[0]
    assert not torch.allclose(layer.U1s.abs(), torch.full_like(layer.U1s, 1 / math.sqrt(8)))
    layer.reset_parameters()
    assert torch.allclose(layer.U1s.abs(), torch.full_like(layer.U1s, 1 / math.sqrt(8)))
    assert torch.allclose(layer.U2s.abs(), torch.full_like(layer.U2s, 1 / math.sqrt(8)))


# ---------------------------------------------------------------- save / load / script / export


def test_state_dict_into_empty_skeleton_and_torch_save(tmp_path):
    cfg = {"0": panther.SketchConfig(low_rank=8), "2": panther.SketchConfig(num_terms=2, low_rank=4)}
    net = _mlp()
    out = panther.convert(net, cfg)
    skeleton = panther.convert(_mlp(), cfg, init="empty")
    skeleton.load_state_dict(out.state_dict())
    x = torch.randn(5, 64)
    torch.testing.assert_close(skeleton(x), out(x))
    path = tmp_path / "m.pt"
    torch.save(out.state_dict(), path)
    sk2 = panther.convert(_mlp(), cfg, init="empty")
    sk2.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(sk2(x), out(x))
    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    whole = torch.load(buf, weights_only=False)
    torch.testing.assert_close(whole(x), out(x))
    assert panther.conversion_report(whole)[0]["weight_error"] == panther.conversion_report(out)[0]["weight_error"]


def test_safetensors_round_trip(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    cfg = panther.SketchConfig(low_rank=8)
    out = panther.convert(_mlp(), cfg)
    st.save_file(out.state_dict(), str(tmp_path / "m.safetensors"))
    skeleton = panther.convert(_mlp(), cfg, init="empty")
    skeleton.load_state_dict(st.load_file(str(tmp_path / "m.safetensors")))
    x = torch.randn(5, 64)
    torch.testing.assert_close(skeleton(x), out(x))


def test_torchscript_and_export_of_converted_model():
    out = panther.convert(_mlp(), panther.SketchConfig(low_rank=8)).eval()
    x = torch.randn(5, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(out)
    torch.testing.assert_close(scripted(x), out(x))
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.jit.load(buf)(x), out(x))
    ep = torch.export.export(out, (x,))
    torch.testing.assert_close(ep.module()(x), out(x))


def test_converted_model_trains():
    out = panther.convert(_mlp(), panther.SketchConfig(low_rank=8))
    loss = out(torch.randn(8, 64)).square().mean()
    loss.backward()
    assert out[0].S1s.grad is not None and out[0].U1s.grad is None
