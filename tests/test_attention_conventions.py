"""RandMultiHeadAttention's conventions: unbiased random features, masks in every form, one
parameter layout, and nn.MultiheadAttention drop-in use (inside nn.Transformer* layers)."""
import copy
import math

import pytest
import torch
from torch import nn

from panther._reference import rand_multihead_attention_reference
from panther.nn import RandMultiHeadAttention, make_performer
from panther.nn.attention import _neg_threshold, orthogonal_gaussian_projection

F64 = torch.float64


def layer64(E=16, H=2, M=24, **kw):
    kw.setdefault("dtype", F64)
    return RandMultiHeadAttention(E, H, M, **kw)


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b.to(a.dtype), rtol=tol, atol=tol)


# ---------------------------------------------------------------- random features (unbiased)


def test_projection_rows_are_standard_normal():
    """Every row (whatever its place in its orthogonal block) is marginally N(0, I): per
    coordinate mean 0 and variance 1 over 4000 independent blocks, within 4 standard errors."""
    d, nb = 4, 4000
    w = orthogonal_gaussian_projection(d * nb, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    w = w.reshape(nb, d, d)  # (block, row in block, coordinate)
    z_mean = w.mean(0).abs() / (w.std(0) / math.sqrt(nb))
    assert z_mean.max() < 4, z_mean
    z_var = (w.var(0) - 1).abs() / math.sqrt(2 / (nb - 1))
    assert z_var.max() < 4, z_var
    # Rows within a block are orthogonal.
    gram = w @ w.transpose(1, 2)
    off = gram - torch.diag_embed(torch.diagonal(gram, dim1=1, dim2=2))
    assert off.abs().max() < 1e-10


@pytest.mark.parametrize("direction", [0, 3, "random"])
def test_positive_feature_estimator_is_unbiased(direction):
    """mean over features of exp(w.u - |u|^2 / 2) estimates 1 for a unit u: within 4 standard
    errors over 4000 independent blocks (Q without the sign correction gave 0.82 / 1.16)."""
    d, nb = 4, 4000
    w = orthogonal_gaussian_projection(d * nb, d, generator=torch.Generator().manual_seed(1), dtype=F64)
    if direction == "random":
        u = torch.randn(d, generator=torch.Generator().manual_seed(2), dtype=F64)
        u = u / u.norm()
    else:
        u = torch.eye(d, dtype=F64)[direction]
    est = torch.exp(w.reshape(nb, d, d) @ u - 0.5).mean(1)  # per block
    se = est.std() / math.sqrt(nb)
    assert abs(est.mean().item() - 1.0) < 4 * se.item(), (est.mean().item(), se.item())


def test_orthogonal_features_no_worse_than_iid():
    """At equal M, orthogonal features estimate the softmax kernel exp(x.y) no worse than i.i.d.
    Gaussian features (biased features were 3-4x worse here)."""
    d, M = 16, 2**14
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, d, generator=g, dtype=F64) * 0.25
    y = torch.randn(24, d, generator=g, dtype=F64) * 0.25
    exact = torch.exp(x @ y.T)

    def err(W):
        px = torch.exp(x @ W.T - 0.5 * (x * x).sum(-1, keepdim=True)) / M**0.5
        py = torch.exp(y @ W.T - 0.5 * (y * y).sum(-1, keepdim=True)) / M**0.5
        return ((px @ py.T - exact) / exact).square().mean().sqrt().item()

    orth = [err(orthogonal_gaussian_projection(M, d, generator=torch.Generator().manual_seed(s), dtype=F64))
            for s in range(4)]
    iid = [err(torch.randn(M, d, generator=torch.Generator().manual_seed(s), dtype=F64)) for s in range(4)]
    assert sum(orth) <= 1.25 * sum(iid), (orth, iid)


def test_projection_device_dtype_and_reproducible():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = orthogonal_gaussian_projection(10, 4, generator=g1, dtype=torch.float32)
    b = orthogonal_gaussian_projection(10, 4, generator=g2, dtype=torch.float32)
    assert a.dtype == torch.float32 and a.shape == (10, 4) and torch.equal(a, b)
    assert orthogonal_gaussian_projection(5, 3, device="meta").is_meta
    with pytest.raises(ValueError, match="orthogonal_gaussian_projection: dtype must be a floating-point"):
        orthogonal_gaussian_projection(4, 2, dtype=torch.int64)


@pytest.mark.cuda
def test_projection_drawn_on_cuda_generator():
    g = torch.Generator(device="cuda").manual_seed(0)
    d, nb = 4, 4000
    w = orthogonal_gaussian_projection(d * nb, d, generator=g, dtype=torch.float32)
    assert w.device.type == "cuda"
    w = w.double().reshape(nb, d, d)
    assert (w.mean(0).abs() / (w.std(0) / math.sqrt(nb))).max() < 4
    est = torch.exp(w @ torch.eye(d, dtype=F64, device=w.device)[0] - 0.5).mean(1)
    assert abs(est.mean().item() - 1) < 4 * est.std().item() / math.sqrt(nb)


# ---------------------------------------------------------------- masks


def test_neg_threshold_matches_finfo():
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert _neg_threshold(dt) == pytest.approx(torch.finfo(dt).min / 2, rel=1e-12)


def _mask_forms(padded, dtype):
    """Every way of saying "ignore these keys": (argument name, mask)."""
    keep = ~padded
    big = torch.zeros(padded.shape, dtype=dtype)
    return [
        ("key_padding_mask", padded),
        ("key_padding_mask", padded.long()),
        ("key_padding_mask", padded.to(torch.uint8)),
        ("key_padding_mask", big.masked_fill(padded, float("-inf"))),
        ("key_padding_mask", big.masked_fill(padded, torch.finfo(dtype).min)),
        ("key_padding_mask", big.masked_fill(padded, -1e9)),
        ("key_padding_mask", big.masked_fill(padded, -1e4)),  # exp(-1e4) = 0: ignored as well
        ("attention_mask", keep),
        ("attention_mask", keep.long()),
        ("attention_mask", keep.to(dtype)),
    ]


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_equal_removed_keys(kernel_fn, causal, device="cpu"):
    """For every mask form: the output with padded keys equals the output with those keys
    removed (causal: at the remaining positions), and the float64 reference."""
    torch.manual_seed(0)
    layer = layer64(kernel_fn=kernel_fn, device=device)
    B, L = 2, 10
    x = torch.randn(B, L, 16, dtype=F64, device=device)
    padded = torch.zeros(B, L, dtype=torch.bool)
    padded[0, [2, 7, 8]] = True
    padded[1, [0, 5]] = True
    for name, mask in _mask_forms(padded, F64):
        if kernel_fn == "relu" and mask.is_floating_point() and name == "key_padding_mask":
            if (mask > _neg_threshold(mask.dtype)).logical_and(mask != 0).any():
                with pytest.raises(ValueError, match="kernel_fn='relu'.*key_padding_mask"):
                    layer(x, x, x, **{name: mask.to(device)}, is_causal=causal)
                continue
        out = layer(x, x, x, **{name: mask.to(device)}, is_causal=causal)[0]
        for b in range(B):
            kept = (~padded[b]).nonzero().squeeze(1).to(device)
            xs = x[b:b + 1, kept]
            if causal:  # queries at the kept positions see the same keys
                alone = layer(xs, xs, xs, is_causal=True)[0]
                close(out[b:b + 1, kept], alone)
            else:
                alone = layer(x[b:b + 1], xs, xs)[0]
                close(out[b:b + 1], alone)
        ref = rand_multihead_attention_reference(layer, x, x, x, causal=causal, **{name: mask.to(device)})
        if causal:  # padded query rows differ in nothing that matters; compare the kept ones
            for b in range(B):
                kept = (~padded[b]).nonzero().squeeze(1).to(device)
                close(out[b, kept], ref[b, kept])
        else:
            close(out, ref)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_equal_removed_keys_cuda(causal):
    test_padded_keys_equal_removed_keys("softmax", causal, device="cuda")


@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_finite_additive_key_padding_mask_is_a_score_bias(mask_dtype, causal):
    """softmax kernel: a float key_padding_mask adds to the scores. Exact checks: a bias of log 2
    on a key equals duplicating that key (non-causal), and the float64 reference in general."""
    torch.manual_seed(1)
    layer = layer64()
    B, L = 2, 9
    x = torch.randn(B, L, 16, dtype=F64)
    bias = torch.randn(B, L, dtype=mask_dtype)
    bias[0, 3] = float("-inf")
    bias[1, 4] = torch.finfo(mask_dtype).min
    out = layer(x, x, x, key_padding_mask=bias, is_causal=causal)[0]
    ref = rand_multihead_attention_reference(layer, x, x, x, key_padding_mask=bias, causal=causal)
    close(out, ref, 1e-6 if mask_dtype == torch.float32 else 1e-9)
    if not causal:
        kb = torch.zeros(1, L, dtype=F64)
        kb[0, 2] = math.log(2.0)
        dup = torch.cat([x[:1], x[:1, 2:3]], 1)
        close(layer(x[:1], x[:1], x[:1], key_padding_mask=kb)[0], layer(x[:1], dup, dup)[0])
    # The bias shifts the output: it is not ignored.
    assert (out - layer(x, x, x, is_causal=causal)[0]).abs().max() > 1e-3


def test_finite_mask_under_compile_uses_exact_path():
    """When values cannot be inspected (torch.compile), the general path gives the same output."""
    torch.manual_seed(2)
    layer = layer64().eval()
    x = torch.randn(2, 8, 16, dtype=F64)
    m = torch.zeros(2, 8, dtype=F64)
    m[0, 5:] = float("-inf")
    m[1, 1] = -0.7
    eager = layer(x, x, x, key_padding_mask=m)[0]
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, x, x, key_padding_mask=m)[0]
    close(compiled, eager, 1e-9)
    m2 = torch.zeros(2, 8, dtype=F64).masked_fill(torch.rand(2, 8) > 0.6, float("-inf"))
    compiled2 = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, x, x, key_padding_mask=m2)[0]
    close(compiled2, layer(x, x, x, key_padding_mask=m2)[0], 1e-9)


def test_mask_value_errors():
    layer = layer64()
    relu = layer64(kernel_fn="relu")
    x = torch.randn(2, 5, 16, dtype=F64)
    with pytest.raises(ValueError, match="attention_mask is a keep-mask.*only bool or 0/1.*key_padding_mask"):
        layer(x, x, x, attention_mask=torch.full((2, 5), 0.5))
    with pytest.raises(ValueError, match="attention_mask is a keep-mask.*pass it as key_padding_mask"):
        layer(x, x, x, attention_mask=torch.zeros(2, 5).masked_fill(torch.eye(2, 5).bool(), float("-inf")))
    with pytest.raises(ValueError, match="attention_mask must be bool, integer or floating 0/1.*complex"):
        layer(x, x, x, attention_mask=torch.ones(2, 5, dtype=torch.complex64))
    with pytest.raises(ValueError, match="integer key_padding_mask must hold only 0.*and 1"):
        layer(x, x, x, key_padding_mask=torch.full((2, 5), 2))
    with pytest.raises(ValueError, match="key_padding_mask must be bool.*complex"):
        layer(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.complex64))
    with pytest.raises(ValueError, match="key_padding_mask .*NaN or \\+inf"):
        layer(x, x, x, key_padding_mask=torch.full((2, 5), float("nan")))
    with pytest.raises(ValueError, match="kernel_fn='relu', a float key_padding_mask may only hold 0"):
        relu(x, x, x, key_padding_mask=torch.full((2, 5), -1.0))
    # relu accepts the excluding float values
    m = torch.zeros(2, 5).masked_fill(torch.eye(2, 5).bool(), torch.finfo(torch.float32).min)
    close(relu(x, x, x, key_padding_mask=m)[0], relu(x, x, x, key_padding_mask=m < 0)[0])


def test_all_keys_masked_outputs_zero_context():
    layer = layer64(bias=False)
    x = torch.randn(1, 4, 16, dtype=F64)
    for m in (torch.ones(1, 4, dtype=torch.bool), torch.full((1, 4), float("-inf"), dtype=F64),
              torch.full((1, 4), torch.finfo(F64).min, dtype=F64)):
        out = layer(x, x, x, key_padding_mask=m)[0]
        assert torch.equal(out, torch.zeros_like(out))


# ---------------------------------------------------------------- one parameter layout


def _self_attention_consistent(layer, x, tol):
    with torch.no_grad():
        fused = layer(x, x, x)[0]
    grad_mode = layer(x, x, x)[0].detach()
    torch.testing.assert_close(fused, grad_mode, rtol=tol, atol=tol)


def test_layout_after_module_transforms_cpu():
    """no_grad self-attention (one fused GEMM) equals the grad-mode forward after every transform
    that gives parameters new storage."""
    torch.manual_seed(3)
    layer = RandMultiHeadAttention(32, 4, 16)
    x = torch.randn(2, 6, 32)
    other = RandMultiHeadAttention(32, 4, 16)
    other.load_state_dict(layer.state_dict(), assign=True)
    for m in (layer, copy.deepcopy(layer), other, layer.to(torch.float64).float()):
        _self_attention_consistent(m, x, 1e-5)
        names = ["Wq", "Wk", "Wv", "bq", "bk", "bv"]
        assert len({getattr(m, n).untyped_storage().data_ptr() for n in names}) == 6


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fresh_modules_no_grad_self_attention_cuda(dtype, tol, causal):
    """20 fresh modules moved to the GPU: no_grad self-attention works and equals the grad-mode
    forward (the allocator may put Wq, Wk, Wv back to back; nothing may depend on it)."""
    x = torch.randn(2, 64, 768, device="cuda", dtype=dtype)
    for _ in range(20):
        layer = RandMultiHeadAttention(768, 12, 256, iscausal=causal).to("cuda", dtype)
        _self_attention_consistent(layer, x, tol)


# ---------------------------------------------------------------- nn.MultiheadAttention drop-in


def test_batch_first_false_and_unbatched():
    torch.manual_seed(4)
    bf = layer64()
    sf = layer64(batch_first=False)
    sf.load_state_dict(bf.state_dict())
    x = torch.randn(3, 7, 16, dtype=F64)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    out_bf = bf(x, x, x, key_padding_mask=kpm)[0]
    out_sf = sf(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), key_padding_mask=kpm)[0]
    close(out_sf.transpose(0, 1), out_bf)
    close(out_bf, rand_multihead_attention_reference(bf, x, x, x, key_padding_mask=kpm))
    for m in (bf, sf):
        single = m(x[1], x[1], x[1], key_padding_mask=kpm[1])[0]
        close(single, out_bf[1])


def test_kdim_vdim_bias_kv_zero_attn_match_reference_and_mha_shapes():
    torch.manual_seed(5)
    for kw in (dict(kdim=6, vdim=10), dict(add_bias_kv=True), dict(add_zero_attn=True),
               dict(kdim=6, vdim=10, add_bias_kv=True, add_zero_attn=True, batch_first=False)):
        layer = layer64(**kw)
        bfirst = kw.pop("batch_first", True)
        layer = layer64(**kw, batch_first=bfirst)
        mha = nn.MultiheadAttention(16, 2, **kw, batch_first=bfirst, dtype=F64)
        q = torch.randn(3, 5, 16, dtype=F64)
        k = torch.randn(3, 8, kw.get("kdim", 16), dtype=F64)
        v = torch.randn(3, 8, kw.get("vdim", 16), dtype=F64)
        if not bfirst:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        kpm = torch.zeros(3, 8, dtype=torch.bool)
        kpm[0, 6:] = True
        out, w = layer(q, k, v, key_padding_mask=kpm, need_weights=True)
        ref, ref_w = rand_multihead_attention_reference(layer, q, k, v, key_padding_mask=kpm, return_weights=True)
        close(out, ref)
        close(w, ref_w.mean(1))
        mout, mw = mha(q, k, v, key_padding_mask=kpm, need_weights=True)
        assert out.shape == mout.shape and w.shape == mw.shape
    with pytest.raises(ValueError, match="add_bias_kv and add_zero_attn add a key"):
        layer64(add_zero_attn=True, iscausal=True)
    with pytest.raises(ValueError, match="add_bias_kv and add_zero_attn add a key"):
        x = torch.randn(1, 3, 16, dtype=F64)
        layer64(add_bias_kv=True)(x, x, x, is_causal=True)


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_need_weights_are_the_features_attention_matrix(kernel_fn, causal):
    """need_weights returns the matrix the output is made of: weights @ v equals the op's context."""
    torch.manual_seed(6)
    layer = layer64(kernel_fn=kernel_fn, bias=False)
    with torch.no_grad():
        layer.W0.copy_(torch.eye(16, dtype=F64))
    x = torch.randn(2, 7, 16, dtype=F64)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 2] = True
    out, w = layer(x, x, x, key_padding_mask=kpm, need_weights=True, average_attn_weights=False, is_causal=causal)
    assert w.shape == (2, 2, 7, 7)
    v = (x @ layer.Wv.T).view(2, 7, 2, 8).transpose(1, 2)
    close(out, (w @ v).transpose(1, 2).reshape(2, 7, 16))
    close(w.sum(-1), torch.ones(2, 2, 7, dtype=F64))
    assert torch.all(w[1, :, :, 2] == 0)
    if causal:
        assert torch.all(w.triu(1) == 0)
    _, wa = layer(x, x, x, key_padding_mask=kpm, need_weights=True, is_causal=causal)
    close(wa, w.mean(1))


def test_is_causal_and_causal_attn_mask_agree():
    torch.manual_seed(7)
    layer = layer64()
    x = torch.randn(2, 6, 16, dtype=F64)
    ref = rand_multihead_attention_reference(layer, x, x, x, causal=True)
    for kw in (dict(is_causal=True), dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(6, dtype=F64)),
               dict(attn_mask=torch.ones(6, 6, dtype=torch.bool).triu(1)),
               dict(attn_mask=torch.zeros(6, 6).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1),
                                                            torch.finfo(torch.float32).min))):
        close(layer(x, x, x, **kw)[0], ref)
    with pytest.raises(ValueError, match="attn_mask can only be None or a causal"):
        layer(x, x, x, attn_mask=torch.zeros(6, 6))


def _ref_sa(attn, x, kpm, causal, batch_first):
    return rand_multihead_attention_reference(attn, x, x, x, key_padding_mask=kpm, causal=causal)


def _ref_encoder_layer(layer, x, kpm, causal):
    """nn.TransformerEncoderLayer's math in float64 with the float64 attention reference."""
    bf = layer.self_attn.batch_first
    ff = lambda h: layer.linear2(torch.relu(layer.linear1(h)))  # noqa: E731
    if layer.norm_first:
        x = x + _ref_sa(layer.self_attn, layer.norm1(x), kpm, causal, bf)
        return x + ff(layer.norm2(x))
    x = layer.norm1(x + _ref_sa(layer.self_attn, x, kpm, causal, bf))
    return layer.norm2(x + ff(x))


def _ref_decoder_layer(layer, x, mem, causal, mem_kpm):
    ff = lambda h: layer.linear2(torch.relu(layer.linear1(h)))  # noqa: E731
    ca = lambda h: rand_multihead_attention_reference(layer.multihead_attn, h, mem, mem,  # noqa: E731
                                                      key_padding_mask=mem_kpm)
    if layer.norm_first:
        x = x + _ref_sa(layer.self_attn, layer.norm1(x), None, causal, None)
        x = x + ca(layer.norm2(x))
        return x + ff(layer.norm3(x))
    x = layer.norm1(x + _ref_sa(layer.self_attn, x, None, causal, None))
    x = layer.norm2(x + ca(x))
    return layer.norm3(x + ff(x))


def _swap_attention(module, M=32):
    for name, child in list(module.named_modules()):
        for attr in ("self_attn", "multihead_attn"):
            mha = getattr(child, attr, None)
            if isinstance(mha, nn.MultiheadAttention):
                setattr(child, attr, make_performer(mha, M))
    return module


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_inside_transformer_encoder_layer(batch_first, norm_first):
    torch.manual_seed(8)
    enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first,
                                     dtype=F64)
    enc.self_attn = RandMultiHeadAttention(16, 2, 32, batch_first=batch_first, dtype=F64)
    x = torch.randn(3, 7, 16, dtype=F64)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[2, 4:] = True
    xin = x if batch_first else x.transpose(0, 1)
    causal_mask = nn.Transformer.generate_square_subsequent_mask(7, dtype=F64)
    for mode in ("train", "eval"):
        enc.train(mode == "train")
        with torch.no_grad():  # eval + no_grad: where nn.MultiheadAttention takes the fused fast path
            out = enc(xin, src_key_padding_mask=kpm)
            out_c1 = enc(xin, src_mask=causal_mask, src_key_padding_mask=kpm)
            out_c2 = enc(xin, src_mask=causal_mask, is_causal=True, src_key_padding_mask=kpm)
        ref = _ref_encoder_layer(enc, xin, kpm, False)
        refc = _ref_encoder_layer(enc, xin, kpm, True)
        close(out, ref)
        close(out_c1, refc)
        close(out_c2, refc)
    # A stack of them, as users build it (the nested-tensor fast path is declined too).
    with pytest.warns(UserWarning, match="enable_nested_tensor"):
        stack = nn.TransformerEncoder(enc, num_layers=2)
    stack.eval()
    with torch.inference_mode():
        out = stack(xin, src_key_padding_mask=kpm)
    ref = _ref_encoder_layer(stack.layers[1], _ref_encoder_layer(stack.layers[0], xin, kpm, False), kpm, False)
    close(out, ref)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_inside_transformer_decoder_layer(batch_first, norm_first):
    torch.manual_seed(9)
    dec = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first,
                                     dtype=F64)
    _swap_attention(dec)
    assert isinstance(dec.multihead_attn, RandMultiHeadAttention)
    tgt = torch.randn(2, 6, 16, dtype=F64)
    mem = torch.randn(2, 9, 16, dtype=F64)  # memory of another length
    mem_kpm = torch.zeros(2, 9, dtype=torch.bool)
    mem_kpm[0, 7:] = True
    if not batch_first:
        tgt, mem = tgt.transpose(0, 1), mem.transpose(0, 1)
    mask = nn.Transformer.generate_square_subsequent_mask(6, dtype=F64)
    for mode in (True, False):
        dec.train(mode)
        with torch.no_grad():
            a = dec(tgt, mem, tgt_mask=mask, memory_key_padding_mask=mem_kpm)
            b = dec(tgt, mem, tgt_is_causal=True, tgt_mask=mask, memory_key_padding_mask=mem_kpm)
        ref = _ref_decoder_layer(dec, tgt, mem, True, mem_kpm)
        close(a, ref)
        close(b, ref)


@pytest.mark.parametrize("batch_first", [True, False])
def test_inside_nn_transformer(batch_first):
    torch.manual_seed(10)
    model = nn.Transformer(16, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, dropout=0.0,
                           batch_first=batch_first, dtype=F64)
    _swap_attention(model)
    src = torch.randn(2, 8, 16, dtype=F64)
    tgt = torch.randn(2, 5, 16, dtype=F64)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=F64)
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            out = model(src, tgt, tgt_mask=tgt_mask)
        mem = model.encoder.norm(_ref_encoder_layer(model.encoder.layers[0], src, None, False))
        ref = model.decoder.norm(_ref_decoder_layer(model.decoder.layers[0], tgt, mem, True, None))
        close(out, ref)
    # Training works: gradients reach every attention parameter.
    model.train()
    model(src, tgt, tgt_mask=tgt_mask).square().sum().backward()
    attn = model.decoder.layers[0].multihead_attn
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (attn.Wq, attn.Wk, attn.Wv, attn.W0))


def test_make_performer_keeps_layout_options():
    torch.manual_seed(11)
    mha = nn.MultiheadAttention(16, 2, kdim=6, vdim=10, add_bias_kv=True, batch_first=False, dtype=F64)
    perf = make_performer(mha, 32)
    assert (perf.batch_first, perf.kdim, perf.vdim) == (False, 6, 10)
    assert torch.equal(perf.bias_k, mha.bias_k) and torch.equal(perf.Wk, mha.k_proj_weight)
    q, k, v = torch.randn(5, 3, 16, dtype=F64), torch.randn(8, 3, 6, dtype=F64), torch.randn(8, 3, 10, dtype=F64)
    out = perf(q, k, v)[0]
    close(out, rand_multihead_attention_reference(perf, q, k, v))
    assert out.shape == mha(q, k, v)[0].shape
