"""panther.convert on Hugging Face BertModel, GPT2Model and ViTModel built from small configs
(no downloads): sketched projections (regex keys), GPT-2 Conv1D, FAVOR+ as a registered attention
function (shapes, causality, padding), save/load into an empty skeleton, unconvert."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import panther  # noqa: E402
from panther import _hf_attention  # noqa: E402
from panther.nn import SKLinear  # noqa: E402

FULL = panther.SketchConfig(low_rank=1.0, skip_if_larger=False)


def _bert():
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=100, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(cfg).eval()


def _vit():
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, image_size=16, patch_size=4)
    return transformers.ViTModel(cfg).eval()


def _bert_inputs():
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask


def test_bert_full_rank_reproduces_and_half_rank_trains():
    bert = _bert()
    ids, mask = _bert_inputs()
    cfg = {"re:encoder\\.layer\\.\\d+\\..*(query|key|value|dense)": FULL, "pooler.dense": None}
    full = panther.convert(bert, cfg)
    n_sk = sum(isinstance(m, SKLinear) for m in full.modules())
    assert n_sk == 12
    ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    out = full(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    half_cfg = panther.SketchConfig(low_rank=0.5, skip_if_larger=False)
    half = panther.convert(bert, {"re:.*(query|key|value)": half_cfg, "_default": None}).train()
    assert sum(isinstance(m, SKLinear) for m in half.modules()) == 6
    half(input_ids=ids, attention_mask=mask).last_hidden_state.square().mean().backward()
    grads = [m.S1s.grad for m in half.modules() if isinstance(m, SKLinear)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bert_favor_padding_honoured_and_close_to_exact():
    bert = _bert()
    ids, mask = _bert_inputs()
    fav = panther.convert(bert, panther.PerformerConfig(num_random_features=256))
    assert fav.config._attn_implementation == "panther_favor"
    assert bert.config._attn_implementation != "panther_favor"  # the original is untouched
    out = fav(input_ids=ids, attention_mask=mask).last_hidden_state
    ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.shape == ref.shape
    assert float((out - ref).detach().norm() / ref.detach().norm()) < 0.05
    ids2 = ids.clone()
    ids2[1, 6:] = 7  # change only padded tokens
    out2 = fav(input_ids=ids2, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out2[1, :6], out[1, :6])
    torch.testing.assert_close(out2[0], out[0])
    # Without the mask the padded tokens are seen: the outputs change.
    out3 = fav(input_ids=ids2).last_hidden_state
    assert not torch.allclose(out3[1, :6], out[1, :6])
    assert any(n.endswith("panther_favor_projection") for n in fav.state_dict())
    rows = [r for r in panther.conversion_report(fav) if "panther_favor" in r["new_type"]]
    assert len(rows) == 2


def test_bert_save_load_into_empty_skeleton_and_unconvert(tmp_path):
    bert = _bert()
    ids, mask = _bert_inputs()
    cfg = {"re:.*attention\\.self": panther.PerformerConfig(num_random_features=32),
           "re:.*intermediate\\.dense": panther.SketchConfig(low_rank=4)}
    conv = panther.convert(bert, cfg)
    skeleton = panther.convert(_bert(), cfg, init="empty")
    skeleton.load_state_dict(conv.state_dict())
    torch.testing.assert_close(skeleton(input_ids=ids, attention_mask=mask).last_hidden_state,
                               conv(input_ids=ids, attention_mask=mask).last_hidden_state)
    st = pytest.importorskip("safetensors.torch")
    st.save_file(conv.state_dict(), str(tmp_path / "b.safetensors"))
    sk2 = panther.convert(_bert(), cfg, init="empty")
    sk2.load_state_dict(st.load_file(str(tmp_path / "b.safetensors")))
    torch.testing.assert_close(sk2(input_ids=ids).last_hidden_state, conv(input_ids=ids).last_hidden_state)
    back = panther.unconvert(conv)
    assert back.config._attn_implementation != "panther_favor"
    assert not any(isinstance(m, SKLinear) for m in back.modules())
    assert not any("panther_favor" in n for n in back.state_dict())


def test_gpt2_conv1d_full_rank_and_favor_is_causal():
    gpt = _gpt2()
    ids = torch.randint(0, 100, (2, 10))
    conv = panther.convert(gpt, {"re:h\\.\\d+\\.(attn|mlp)\\.c_.*": FULL})
    assert sum(isinstance(m, SKLinear) for m in conv.modules()) == 8
    torch.testing.assert_close(conv(ids).last_hidden_state, gpt(ids).last_hidden_state, atol=1e-5, rtol=1e-4)
    fav = panther.convert(gpt, {"re:h\\.\\d+\\.attn": panther.PerformerConfig(num_random_features=64),
                                "re:h\\.\\d+\\.mlp\\.c_fc": panther.SketchConfig(low_rank=0.5)})
    assert all(m.panther_favor_causal for m in fav.modules() if hasattr(m, "panther_favor_projection"))
    out = fav(ids).last_hidden_state
    ids2 = ids.clone()
    ids2[:, 6:] = 3  # change the future only
    out2 = fav(ids2).last_hidden_state
    torch.testing.assert_close(out2[:, :6], out[:, :6])
    assert not torch.allclose(out2[:, 6:], out[:, 6:])
    # Left padding: the real tokens' outputs do not depend on the padded ones.
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    ids3 = ids.clone()
    ids3[1, :3] = 9
    a = fav(ids, attention_mask=mask).last_hidden_state
    b = fav(ids3, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a[1, 3:], b[1, 3:])


def test_vit_regex_configs_and_favor_shapes():
    vit = _vit()
    px = torch.randn(2, 3, 16, 16)
    full = panther.convert(vit, {"re:layers\\.\\d+\\.mlp\\.fc\\d": FULL})
    torch.testing.assert_close(full(pixel_values=px).last_hidden_state, vit(pixel_values=px).last_hidden_state,
                               atol=1e-5, rtol=1e-4)
    fav = panther.convert(vit, {"re:layers\\.\\d+\\.attention": panther.PerformerConfig(num_random_features=64),
                                "re:layers\\.\\d+\\.attention\\.[qkv]_proj": panther.SketchConfig(low_rank=0.25)})
    out = fav(pixel_values=px).last_hidden_state
    assert out.shape == (2, 17, 32) and torch.isfinite(out).all()
    out.sum().backward()


def test_only_selected_attention_modules_use_favor():
    bert = _bert()
    ids, _ = _bert_inputs()
    one = panther.convert(bert, {"encoder.layer.1.attention.self": panther.PerformerConfig(num_random_features=16)})
    assert not hasattr(one.encoder.layer[0].attention.self, "panther_favor_projection")
    # Layer 0 keeps exact attention: its output equals the dense model's layer-0 output.
    h_ref = bert(input_ids=ids, output_hidden_states=True).hidden_states[1]
    h_one = one(input_ids=ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(h_one, h_ref, atol=1e-5, rtol=1e-4)


def test_mask_conversion_float_and_bool_and_rejects_other_masks():
    B, L = 2, 5
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, 3:] = False
    allowed = keep[:, None, None, :].expand(B, 1, L, L)
    fmin = torch.finfo(torch.float32).min
    additive = torch.where(allowed, torch.zeros(()), torch.tensor(fmin))
    for m in (allowed, additive):
        kpm = _hf_attention.key_padding_from_mask(m, B, L, L, causal=False)
        assert torch.equal(kpm, ~keep)
    causal = allowed & torch.ones(L, L, dtype=torch.bool).tril()
    assert torch.equal(_hf_attention.key_padding_from_mask(causal, B, L, L, causal=True), ~keep)
    assert _hf_attention.key_padding_from_mask(torch.ones(B, 1, L, L, dtype=torch.bool), B, L, L, False) is None
    with pytest.raises(ValueError, match="bias"):
        _hf_attention.key_padding_from_mask(additive + 0.5, B, L, L, causal=False)
    window = torch.ones(L, L, dtype=torch.bool).tril() & torch.ones(L, L, dtype=torch.bool).triu(-1)
    with pytest.raises(ValueError, match="not a padding mask"):
        _hf_attention.key_padding_from_mask(window.expand(B, 1, L, L), B, L, L, causal=True)
