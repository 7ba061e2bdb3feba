"""Tests of pr.nn.RandMultiHeadAttention and pr.nn.make_performer."""
import io

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import panther as pr
from panther._reference import favor_attention_reference, softmax_attention_reference
from panther.nn import RandMultiHeadAttention, make_performer


def small_layer(**kw):
    args = dict(embed_dim=32, num_heads=4, num_random_features=16)
    args.update(kw)
    return RandMultiHeadAttention(**args)


def manual_forward(layer, q_in, k_in, v_in, causal=False, kpm=None):
    """The layer's math written out with the float64 reference."""
    B, Lq, E = q_in.shape
    Lk = k_in.shape[1]
    H, hd = layer.num_heads, layer.head_dim
    split = lambda x, L: x.view(B, L, H, hd).transpose(1, 2)
    q = split(F.linear(q_in, layer.Wq, layer.bq), Lq)
    k = split(F.linear(k_in, layer.Wk, layer.bk), Lk)
    v = split(F.linear(v_in, layer.Wv, layer.bv), Lk)
    o = favor_attention_reference(q, k, v, layer.projection_matrix, layer.kernel_fn, causal, kpm)
    o = o.to(q_in.dtype).transpose(1, 2).reshape(B, Lq, E)
    return F.linear(o, layer.W0, layer.b0)


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("iscausal", [False, True])
def test_shapes_and_math(kernel_fn, iscausal):
    torch.manual_seed(0)
    layer = small_layer(kernel_fn=kernel_fn, iscausal=iscausal, dtype=torch.float64)
    x = torch.randn(3, 70, 32, dtype=torch.float64)
    out, w = layer(x, x, x)
    assert out.shape == (3, 70, 32) and w is None
    torch.testing.assert_close(out, manual_forward(layer, x, x, x, causal=iscausal), rtol=1e-9, atol=1e-10)


def test_cross_attention_lengths_differ():
    layer = small_layer(dtype=torch.float64)
    q = torch.randn(2, 7, 32, dtype=torch.float64)
    kv = torch.randn(2, 11, 32, dtype=torch.float64)
    out, _ = layer(q, kv, kv, need_weights=True)
    assert out.shape == (2, 7, 32)
    torch.testing.assert_close(out, manual_forward(layer, q, kv, kv), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("bias", [True, False])
def test_inference_fused_projection_separate_parameters(bias):
    """Inference on shared inputs (query is key is value) runs one native call that projects with
    one GEMM over the per-call concatenation of Wq, Wk, Wv: same values as three projections,
    whatever the parameters' storage (separate tensors; back to back, or views of one buffer, is
    never assumed), reading live parameter memory (in-place edits, even through .data, are seen)."""
    torch.manual_seed(3)
    layer = small_layer(bias=bias, dtype=torch.float64)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    y = torch.randn(2, 7, 32, dtype=torch.float64)

    def check():
        with torch.no_grad():
            for args in ((x, x, x), (y, x, x)):
                out = layer(*args)[0]
                torch.testing.assert_close(out, manual_forward(layer, *args), rtol=1e-9, atol=1e-10)
                torch.testing.assert_close(out, layer(args[0], args[1], args[2].clone())[0],
                                           rtol=1e-12, atol=1e-12)

    names = ["Wq", "Wk", "Wv"] + (["bq", "bk", "bv"] if bias else [])
    storages = {getattr(layer, n).untyped_storage().data_ptr() for n in names}
    assert len(storages) == len(names)  # one storage per parameter
    check()
    layer.to(torch.float32).to(torch.float64)
    check()
    layer.Wk.data.mul_(2.0)  # bypasses the version counter: nothing may be cached
    check()
    # Separate storages that happen to lie back to back in memory (as the CUDA caching allocator
    # or a loaded checkpoint may place them): each storage is read within its own bounds.
    flat = np.concatenate([layer.Wq.detach().numpy(), layer.Wk.detach().numpy(), layer.Wv.detach().numpy()])
    for i, n in enumerate(("Wq", "Wk", "Wv")):
        setattr(layer, n, nn.Parameter(torch.from_numpy(flat[32 * i:32 * (i + 1)])))
    assert layer.Wk.data_ptr() == layer.Wq.data_ptr() + 32 * 32 * 8
    assert layer.Wq.untyped_storage().nbytes() == 32 * 32 * 8
    check()
    # Parameters that are views of one buffer, adjacent or not, give the same answer.
    with torch.no_grad():
        buf = torch.cat([layer.Wq, layer.Wv, layer.Wk])
    layer.Wq = nn.Parameter(buf[:32])
    layer.Wk = nn.Parameter(buf[64:])
    layer.Wv = nn.Parameter(buf[32:64])
    check()
    # Training takes three projections; gradients reach each parameter.
    out = layer(x, x, x)[0]
    grads = torch.autograd.grad(out.square().sum(), [layer.Wq, layer.Wk, layer.Wv])
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_op_matches_module_math(bias, causal):
    """panther::_rand_mha_self_attention (the module's eager inference path) equals the layer's
    math (one fused GEMM under no_grad, three otherwise), with a padding mask, and, being a
    composition of differentiable ops, gives the same gradients as the Python forward."""
    torch.manual_seed(5)
    layer = small_layer(bias=bias, iscausal=causal, dtype=torch.float64)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, :3] = True
    op = torch.ops.panther._rand_mha_self_attention

    def call(mask=None):
        return op(x, layer.Wq, layer.Wk, layer.Wv, layer.bq, layer.bk, layer.bv, layer.W0, layer.b0,
                  layer.projection_matrix, layer.num_heads, layer.kernel_fn, causal, mask)

    with torch.no_grad():
        for mask in (None, kpm):
            torch.testing.assert_close(call(mask), manual_forward(layer, x, x, x, causal=causal, kpm=mask),
                                       rtol=1e-9, atol=1e-10)
    params = [layer.Wq, layer.Wk, layer.Wv, layer.W0]
    ref = torch.autograd.grad(layer(x, x, x, key_padding_mask=kpm)[0].square().sum(), params)
    got = torch.autograd.grad(call(kpm).square().sum(), params)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    layer.Wv = nn.Parameter(layer.Wv.detach().clone())  # a replaced parameter is read as well
    with torch.no_grad():
        torch.testing.assert_close(call(), manual_forward(layer, x, x, x, causal=causal),
                                   rtol=1e-9, atol=1e-10)
    args = (x, layer.Wq, layer.Wk, layer.Wv, layer.bq, layer.bk, layer.bv, layer.W0, layer.b0,
            layer.projection_matrix, layer.num_heads, layer.kernel_fn, causal, kpm)
    torch.library.opcheck(op.default, args)


def test_self_attention_op_errors_use_the_op_format():
    """panther::_rand_mha_self_attention words its argument errors as every op does:
    ``panther::<op>: <argument> must ..., got ...`` (a None tensor is a TypeError)."""
    layer = small_layer(dtype=torch.float64)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    op = torch.ops.panther._rand_mha_self_attention

    def call(x, num_heads=layer.num_heads, bq=layer.bq):
        return op(x, layer.Wq, layer.Wk, layer.Wv, bq, layer.bk, layer.bv, layer.W0, layer.b0,
                  layer.projection_matrix, num_heads, layer.kernel_fn, False, None)

    with pytest.raises(RuntimeError, match=r"^panther::_rand_mha_self_attention: x must be 3-d "
                                           r"\(batch, seq, embed_dim\), got shape \(9, 32\)"):
        call(x[0])
    with pytest.raises(RuntimeError, match=r"^panther::_rand_mha_self_attention: num_heads must "
                                           r"divide embed_dim=32, got 5"):
        call(x, num_heads=5)
    with pytest.raises(RuntimeError, match=r"^panther::_rand_mha_self_attention: bq, bk and bv must "
                                           r"all be given or all be None"):
        call(x, bq=None)
    with pytest.raises(TypeError, match=r"^panther::_rand_mha_self_attention: x must be a tensor, got None"):
        call(None)


def test_mask_conventions_agree():
    torch.manual_seed(1)
    layer = small_layer(dtype=torch.float64)
    x = torch.randn(3, 12, 32, dtype=torch.float64)
    attend = torch.ones(3, 12)
    attend[0, 9:] = 0
    attend[2, :3] = 0
    kpm = attend == 0
    expected = manual_forward(layer, x, x, x, kpm=kpm)
    for mask in (attend, attend.long(), attend.bool(), attend.to(torch.float16)):
        torch.testing.assert_close(layer(x, x, x, attention_mask=mask)[0], expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer(x, x, x, key_padding_mask=kpm)[0], expected, rtol=1e-9, atol=1e-10)
    float_kpm = torch.zeros(3, 12, dtype=torch.float64).masked_fill(kpm, float("-inf"))
    torch.testing.assert_close(layer(x, x, x, key_padding_mask=float_kpm)[0], expected, rtol=1e-9, atol=1e-10)
    # Both conventions at once: a key is used only if neither masks it.
    extra = torch.zeros(3, 12, dtype=torch.bool)
    extra[1, 5] = True
    both = layer(x, x, x, attention_mask=attend, key_padding_mask=extra)[0]
    torch.testing.assert_close(both, manual_forward(layer, x, x, x, kpm=kpm | extra), rtol=1e-9, atol=1e-10)
    # Masked keys do not matter.
    x2 = x.clone()
    x2[0, 9:] = 1e3
    out_q = layer(x, x2, x2, attention_mask=attend)[0]
    torch.testing.assert_close(out_q, expected, rtol=1e-9, atol=1e-9)


def test_causal_masks():
    torch.manual_seed(2)
    layer = small_layer(dtype=torch.float64)
    causal_layer = small_layer(dtype=torch.float64, iscausal=True)
    causal_layer.load_state_dict(layer.state_dict())
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    expected = manual_forward(layer, x, x, x, causal=True)
    bool_mask = torch.ones(9, 9, dtype=torch.bool).triu(1)
    float_mask = torch.zeros(9, 9, dtype=torch.float64).masked_fill(bool_mask, float("-inf"))
    for out in (layer(x, x, x, is_causal=True)[0], layer(x, x, x, attn_mask=bool_mask)[0],
                layer(x, x, x, attn_mask=float_mask, is_causal=True)[0], causal_layer(x, x, x)[0],
                layer(x, x, x, attn_mask=nn.Transformer.generate_square_subsequent_mask(9, dtype=torch.float64))[0]):
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="attn_mask can only be None or a causal"):
        layer(x, x, x, attn_mask=torch.rand(9, 9) > 0.5)
    with pytest.raises(ValueError, match="attn_mask can only be None or a causal"):
        layer(x, x, x, attn_mask=torch.zeros(9, 9))
    with pytest.raises(ValueError, match=r"attn_mask can only be None or a causal \(L, L\) mask"):
        layer(x, x, x, attn_mask=torch.ones(2, 9, 9, dtype=torch.bool).triu(1))
    with pytest.raises(ValueError, match="causal attention needs equal query and key lengths, got 9 and 5"):
        layer(x, x[:, :5], x[:, :5], is_causal=True)


def test_forward_errors():
    layer = small_layer()
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="last dim of query, key and value must be embed_dim=32"):
        layer(torch.randn(2, 5, 31), x, x)
    with pytest.raises(ValueError, match="must be 3-d"):
        layer(x[0], x, x)
    with pytest.raises(ValueError, match="same key_len"):
        layer(x, x, x[:, :4])
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch=2, key_len=5\)"):
        layer(x, x, x, attention_mask=torch.ones(2, 4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(embed_dim=30, num_heads=4, num_random_features=8), "embed_dim must be divisible by num_heads"),
        (dict(embed_dim=32, num_heads=4, num_random_features=8, kernel_fn="gelu"), "kernel_fn must be 'softmax' or 'relu'"),
        (dict(embed_dim=32, num_heads=4, num_random_features=8, dropout=1.0), r"dropout must be a number in \[0, 1\)"),
        (dict(embed_dim=32, num_heads=4, num_random_features=8, dropout=-0.1), r"dropout must be a number in \[0, 1\)"),
        (dict(embed_dim=32, num_heads=4, num_random_features=0), "num_random_features must be a positive integer"),
        (dict(embed_dim=32, num_heads=4, num_random_features=8.0), "num_random_features must be a positive integer"),
        (dict(embed_dim=32, num_heads=True, num_random_features=8), "num_heads must be a positive integer"),
        (dict(embed_dim=32, num_heads=4, num_random_features=8, iscausal=1), "iscausal must be a bool"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match="RandMultiHeadAttention: " + match):
        RandMultiHeadAttention(**kwargs)


def test_parameter_names_and_projection():
    layer = RandMultiHeadAttention(64, 2, 80)
    names = set(layer.state_dict())
    assert names == {"Wq", "Wk", "Wv", "W0", "bq", "bk", "bv", "b0", "projection_matrix"}
    P = layer.projection_matrix
    assert P.shape == (80, 32) and not P.requires_grad
    assert "projection_matrix" in dict(layer.named_buffers())
    # Rows inside each block of head_dim rows are orthogonal; norms are chi-distributed (not all equal).
    for blk in (P[:32], P[32:64], P[64:]):
        G = blk.double() @ blk.double().T
        off = G - torch.diag(torch.diagonal(G))
        assert off.abs().max() < 1e-4 * G.diagonal().max()
    assert P.norm(dim=1).std() > 0.1
    nb = RandMultiHeadAttention(64, 2, 8, bias=False)
    assert nb.bq is None and set(nb.state_dict()) == {"Wq", "Wk", "Wv", "W0", "projection_matrix"}
    x = torch.randn(2, 5, 64)
    assert nb(x, x, x)[0].shape == (2, 5, 64)


def test_reproducible_and_no_reseeding():
    torch.manual_seed(0)
    a = small_layer()
    b = small_layer()
    state_after = torch.get_rng_state()
    torch.manual_seed(0)
    a2 = small_layer()
    for key, t in a.state_dict().items():
        assert torch.equal(t, a2.state_dict()[key]), key
    assert not torch.equal(a.projection_matrix, b.projection_matrix)
    assert not torch.equal(a.Wq, b.Wq)
    assert torch.initial_seed() == 0
    torch.manual_seed(42)
    assert not torch.equal(state_after, torch.get_rng_state())
    # An explicit generator is used instead of the global one (which is left alone).
    torch.manual_seed(5)
    before = torch.get_rng_state()
    c = small_layer(generator=torch.Generator().manual_seed(7))
    d = small_layer(generator=torch.Generator().manual_seed(7))
    assert torch.equal(before, torch.get_rng_state())
    assert torch.equal(c.projection_matrix, d.projection_matrix) and torch.equal(c.Wq, d.Wq)
    # redraw_projection draws new features, reproducibly from a generator.
    old = c.projection_matrix.clone()
    c.redraw_projection(torch.Generator().manual_seed(9))
    d.redraw_projection(torch.Generator().manual_seed(9))
    assert not torch.equal(old, c.projection_matrix)
    assert torch.equal(c.projection_matrix, d.projection_matrix)
    c.redraw_projection()
    assert not torch.equal(c.projection_matrix, d.projection_matrix)


def test_dropout_only_in_training():
    torch.manual_seed(3)
    layer = small_layer(dropout=0.5)
    plain = small_layer(dropout=0.0)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 10, 32)
    layer.train()
    o1, o2 = layer(x, x, x)[0], layer(x, x, x)[0]
    assert not torch.allclose(o1, o2)
    layer.eval()
    plain.eval()
    e1, e2 = layer(x, x, x)[0], layer(x, x, x)[0]
    assert torch.equal(e1, e2)
    torch.testing.assert_close(e1, plain(x, x, x)[0])


def test_torchscript_round_trip():
    torch.manual_seed(4)
    layer = small_layer(iscausal=True).eval()
    scripted = torch.jit.script(layer)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x = torch.randn(2, 70, 32)
    mask = torch.ones(2, 70)
    mask[1, 60:] = 0
    torch.testing.assert_close(loaded(x, x, x)[0], layer(x, x, x)[0])
    torch.testing.assert_close(loaded(x, x, x, mask)[0], layer(x, x, x, attention_mask=mask)[0])
    torch.testing.assert_close(scripted(x, x, x, key_padding_mask=mask == 0)[0],
                               layer(x, x, x, attention_mask=mask)[0])


def test_compile_fullgraph_forward_and_backward():
    torch.manual_seed(5)
    layer = small_layer(iscausal=True).eval()
    x = torch.randn(2, 70, 32)
    mask = torch.ones(2, 70)
    mask[0, 50:] = 0

    def run(fn):
        xi = x.clone().requires_grad_()
        out = fn(xi, xi, xi, attention_mask=mask)[0]
        out.square().sum().backward()
        grads = [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad()
        return out.detach(), xi.grad, grads

    eager = run(layer)
    # aot_eager: dynamo (fullgraph) + AOT autograd through the op's Meta and backward kernels, in
    # seconds; inductor gives the same result (checked by hand, ~45 s to compile on this CPU).
    compiled = run(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled[2], eager[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_export():
    torch.manual_seed(6)
    layer = small_layer().eval()
    x = torch.randn(2, 12, 32)
    mask = torch.ones(2, 12)
    mask[1, 8:] = 0
    ep = torch.export.export(layer, (x, x, x), {"attention_mask": mask})
    torch.testing.assert_close(ep.module()(x, x, x, attention_mask=mask)[0], layer(x, x, x, attention_mask=mask)[0])


def test_low_precision_module():
    torch.manual_seed(7)
    layer = small_layer(iscausal=True)
    x = torch.randn(2, 40, 32)
    ref = layer(x, x, x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, x, x)[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
    bf = small_layer(dtype=torch.bfloat16)
    assert bf(x.bfloat16(), x.bfloat16(), x.bfloat16())[0].dtype == torch.bfloat16


def test_make_performer():
    torch.manual_seed(8)
    E, H = 32, 2
    mha = nn.MultiheadAttention(E, H, batch_first=True, dropout=0.1).eval()
    perf = make_performer(mha, num_random_features=16)
    assert isinstance(perf, RandMultiHeadAttention) and not perf.training
    assert perf.dropout == 0.1 and perf.kernel_fn == "softmax" and not perf.causal
    torch.testing.assert_close(torch.cat([perf.Wq, perf.Wk, perf.Wv]), mha.in_proj_weight)
    torch.testing.assert_close(torch.cat([perf.bq, perf.bk, perf.bv]), mha.in_proj_bias)
    torch.testing.assert_close(perf.W0, mha.out_proj.weight)
    torch.testing.assert_close(perf.b0, mha.out_proj.bias)
    assert perf.Wq.data_ptr() != mha.in_proj_weight.data_ptr()  # copied, not shared
    # With many features it approaches the exact attention of the converted layer.
    x = torch.randn(2, 24, E) * 0.5
    exact = mha(x, x, x, need_weights=False)[0]
    errs = []
    for M in (8, 2048):
        p = make_performer(mha, num_random_features=M, generator=torch.Generator().manual_seed(M))
        errs.append(((p(x, x, x)[0] - exact).norm() / exact.norm()).item())
    assert errs[1] < errs[0] and errs[1] < 0.15, errs
    causal = make_performer(mha, 16, kernel_fn="relu", iscausal=True)
    assert causal.causal and causal.kernel_fn == "relu"
    with pytest.raises(TypeError, match="make_performer: mha must be an nn.MultiheadAttention"):
        make_performer(nn.Linear(4, 4), 8)


# ---- the tutorial (000_*.txt), at small sizes --------------------------------------------------
class TransformerBlock(nn.Module):
    def __init__(self, d_model, n_heads, d_ff, num_random_features=256, num_terms=2, low_rank=16):
        super().__init__()
        self.attention = RandMultiHeadAttention(
            embed_dim=d_model, num_heads=n_heads, num_random_features=num_random_features,
            dropout=0.1, kernel_fn="softmax",
        )
        self.norm1 = nn.LayerNorm(d_model)
        self.feed_forward = nn.Sequential(
            pr.nn.SKLinear(d_model, d_ff, num_terms=num_terms * 2, low_rank=low_rank * 2),
            nn.ReLU(),
            nn.Dropout(0.1),
            pr.nn.SKLinear(d_ff, d_model, num_terms=num_terms, low_rank=low_rank),
        )
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x, mask=None):
        attn_out, _ = self.attention(x, x, x, attention_mask=mask)
        x = self.norm1(x + self.dropout(attn_out))
        ff_out = self.feed_forward(x)
        x = self.norm2(x + self.dropout(ff_out))
        return x


class DocumentClassifier(nn.Module):
    def __init__(self, vocab_size, embed_dim=128, hidden_dims=[64, 32], num_classes=10, max_seq_len=512):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.pos_encoding = nn.Parameter(torch.randn(max_seq_len, embed_dim))
        self.encoder = TransformerBlock(d_model=embed_dim, n_heads=8, d_ff=embed_dim * 4, num_terms=2, low_rank=8)
        layers = []
        current = embed_dim
        for h in hidden_dims:
            layers.extend([pr.nn.SKLinear(current, h, num_terms=2, low_rank=8), nn.ReLU(), nn.Dropout(0.3)])
            current = h
        layers.append(pr.nn.SKLinear(current, num_classes, num_terms=2, low_rank=4))
        self.classifier = nn.Sequential(*layers)

    def forward(self, input_ids, attention_mask=None):
        seq_len = input_ids.size(1)
        embeddings = self.embedding(input_ids) + self.pos_encoding[:seq_len]
        encoded = self.encoder(embeddings, attention_mask)
        if attention_mask is not None:
            masked = encoded * attention_mask.unsqueeze(-1)
            pooled = masked.sum(dim=1) / attention_mask.sum(dim=1, keepdim=True)
        else:
            pooled = encoded.mean(dim=1)
        return self.classifier(pooled)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tutorial_attention_block_and_classifier():
    torch.manual_seed(9)
    layer = RandMultiHeadAttention(embed_dim=64, num_heads=8, num_random_features=32, dropout=0.1,
                                   kernel_fn="softmax", iscausal=False)
    x = torch.randn(4, 30, 64)
    output, _ = layer(x, x, x)
    assert output.shape == (4, 30, 64)
    block = TransformerBlock(64, 8, 128, num_random_features=32)
    mask = torch.ones(4, 30)
    mask[1, 20:] = 0
    mask[3, 5:] = 0
    assert block(x, mask).shape == (4, 30, 64)
    model = DocumentClassifier(vocab_size=100, embed_dim=64, num_classes=5, max_seq_len=64)
    ids = torch.randint(0, 100, (4, 30))
    for m in (mask, mask.long(), None):
        logits = model(ids, m)
        assert logits.shape == (4, 5) and torch.isfinite(logits).all()
    loss = F.cross_entropy(model(ids, mask), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.encoder.attention.Wq.grad is not None
    # Padded tokens do not change the unpadded documents' logits (eval: no dropout).
    model.eval()
    ids2 = ids.clone()
    ids2[1, 20:] = (ids2[1, 20:] + 1) % 100
    torch.testing.assert_close(model(ids2, mask)[1], model(ids, mask)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_module_cuda_bf16_matches_cpu():
    torch.manual_seed(10)
    layer = small_layer(iscausal=True)
    x = torch.randn(2, 300, 32)
    ref = layer(x, x, x)[0]
    layer_cuda = layer.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer_cuda(x.cuda(), x.cuda(), x.cuda())[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().cpu(), ref, rtol=5e-2, atol=5e-2)
    out.float().sum().backward()


class _SelfAttention(nn.Module):
    """x -> layer(x, x, x)[0]: one tensor in, one out (what make_graphed_callables takes)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x, x, x)[0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("iscausal", [False, True])
def test_module_cuda_graph_capture_forward_and_training_step(iscausal):
    """The module's CUDA path (bf16, head_dim 64: the fused kernels) is captured whole by a CUDA
    graph: no host synchronisation, no allocation outside the graph's pool. A replay on new
    inputs equals eager, for the forward under no_grad and for forward + backward through
    torch.cuda.make_graphed_callables (output, input gradient and every parameter gradient)."""
    torch.manual_seed(21)
    E, H, M, L = 256, 4, 256, 320  # head_dim 64; 320 = 5 chunks of 64
    dev, dt = torch.device("cuda"), torch.bfloat16
    model = _SelfAttention(RandMultiHeadAttention(E, H, M, iscausal=iscausal, device=dev, dtype=dt))
    x_static = torch.randn(2, L, E, device=dev, dtype=dt)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            model(x_static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out_static = model(x_static)
    x_new = torch.randn_like(x_static)
    x_static.copy_(x_new)
    graph.replay()
    with torch.no_grad():
        ref = model(x_new)
    torch.testing.assert_close(out_static, ref, rtol=1e-2, atol=1e-2)

    g_out = torch.randn_like(x_static)

    def step(fn):
        xi = x_new.clone().requires_grad_()
        out = fn(xi)
        out.backward(g_out)
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return out.detach(), xi.grad, grads

    want = step(model)  # eager, before make_graphed_callables replaces the module's forward
    graphed = torch.cuda.make_graphed_callables(model, (torch.randn_like(x_static).requires_grad_(),))
    model.zero_grad(set_to_none=True)
    got = step(graphed)
    torch.testing.assert_close(got[0], want[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got[1], want[1], rtol=1e-2, atol=1e-2)
    assert len(got[2]) == len(want[2]) > 0
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_module_compile_reduce_overhead_matches_eager():
    """torch.compile(mode="reduce-overhead") (inductor, then CUDA graphs) runs the module's
    forward with no graph break and gives eager's output on later calls with new inputs."""
    pytest.importorskip("triton")
    torch.manual_seed(22)
    dev, dt = torch.device("cuda"), torch.bfloat16
    model = _SelfAttention(RandMultiHeadAttention(256, 4, 256, iscausal=True, device=dev, dtype=dt)).eval()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):  # the first calls record; later ones replay the graph
            x = torch.randn(2, 320, 256, device=dev, dtype=dt)
            got = compiled(x).clone()
            torch.testing.assert_close(got, model(x), rtol=2e-2, atol=2e-2)
