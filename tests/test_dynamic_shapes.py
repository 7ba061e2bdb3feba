"""Dynamic shapes: torch.compile and torch.export keep batch and sequence length symbolic.

A model built on Panther's ops must not recompile for every new (batch, length) pair, and an
exported program with dynamic batch and sequence dims must give the eager output at other sizes.
"""

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.export import Dim

import panther
from panther.nn.attention import orthogonal_gaussian_projection

# 12 distinct (batch, length) pairs; sizes 0 and 1 are left out (dynamo specialises them).
PAIRS = [(2, 5), (3, 7), (4, 9), (2, 11), (5, 6), (3, 13), (4, 4), (6, 8), (2, 17), (3, 3),
         (5, 10), (7, 12)]


class TinyAttention(nn.Module):
    """q/k/v projections, favor_attention over the heads, output projection."""

    def __init__(self, E=8, H=2, M=6, kernel="softmax", causal=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.H, self.kernel, self.causal = H, kernel, causal
        self.qkv = nn.Linear(E, 3 * E)
        self.out = nn.Linear(E, E)
        self.register_buffer("W", orthogonal_gaussian_projection(M, E // H, generator=g))

    def forward(self, x, key_padding_mask=None):
        B, L, E = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.H, E // self.H).permute(2, 0, 3, 1, 4)
        y = panther.ops.favor_attention(q, k, v, self.W, self.kernel, self.causal, key_padding_mask)
        return self.out(y.transpose(1, 2).reshape(B, L, E))


def padding_mask(B, L):
    m = torch.zeros(B, L, dtype=torch.bool)
    m[0, -1] = True  # one padded key (never all of a row)
    return m


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_compile_favor_attention_compiles_at_most_twice(kernel, causal, masked):
    torch._dynamo.reset()
    model = TinyAttention(kernel=kernel, causal=causal)
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt)
    for B, L in PAIRS:
        x = torch.randn(B, L, 8)
        mask = padding_mask(B, L) if masked else None
        torch.testing.assert_close(compiled(x, mask), model(x, mask))
    assert cnt.frame_count <= 2, f"compiled {cnt.frame_count} times for {len(PAIRS)} shapes"


def test_compile_training_step_compiles_at_most_twice():
    torch._dynamo.reset()
    model = TinyAttention(causal=True)
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt)
    for B, L in PAIRS[:6]:
        x = torch.randn(B, L, 8, requires_grad=True)
        compiled(x).square().sum().backward()
        g = x.grad.clone()
        x.grad = None
        model(x).square().sum().backward()
        torch.testing.assert_close(g, x.grad)
    assert cnt.frame_count <= 2


def test_compile_rand_multihead_attention_compiles_at_most_twice():
    torch._dynamo.reset()
    model = panther.nn.RandMultiHeadAttention(8, 2, 6)
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt)
    for B, L in PAIRS:
        x = torch.randn(B, L, 8)
        torch.testing.assert_close(compiled(x, x, x)[0], model(x, x, x)[0])
    assert cnt.frame_count <= 2, f"compiled {cnt.frame_count} times for {len(PAIRS)} shapes"


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_export_with_dynamic_batch_and_sequence(causal, masked):
    model = TinyAttention(causal=causal).eval()
    batch, seq = Dim("batch"), Dim("seq")
    x = torch.randn(4, 16, 8)
    mask = padding_mask(4, 16) if masked else None
    shapes = {"x": {0: batch, 1: seq}, "key_padding_mask": {0: batch, 1: seq} if masked else None}
    ep = torch.export.export(model, (x, mask), dynamic_shapes=shapes)
    for B, L in [(2, 5), (3, 70), (6, 33)]:
        x = torch.randn(B, L, 8)
        mask = padding_mask(B, L) if masked else None
        torch.testing.assert_close(ep.module()(x, mask), model(x, mask))


def test_export_favor_attention_op_with_dynamic_dims():
    # The op alone, query length != key length (non-causal), every size dynamic but head_dim.
    class M(nn.Module):
        def forward(self, q, k, v, W):
            return torch.ops.panther.favor_attention(q, k, v, W, "softmax", False, None)

    def inputs(B, H, Lq, Lk, M=6):
        g = torch.Generator().manual_seed(B * 100 + Lq)
        return (torch.randn(B, H, Lq, 4, generator=g), torch.randn(B, H, Lk, 4, generator=g),
                torch.randn(B, H, Lk, 3, generator=g),
                orthogonal_gaussian_projection(M, 4, generator=g))

    b, h, lq, lk, m = Dim("b"), Dim("h"), Dim("lq"), Dim("lk"), Dim("m")
    shapes = {"q": {0: b, 1: h, 2: lq}, "k": {0: b, 1: h, 2: lk}, "v": {0: b, 1: h, 2: lk},
              "W": {0: m}}
    ep = torch.export.export(M(), inputs(4, 2, 16, 9), dynamic_shapes=shapes)
    for B, H, Lq, Lk, Mf in [(2, 3, 5, 7, 8), (3, 2, 20, 4, 5), (5, 4, 9, 9, 12)]:
        args = inputs(B, H, Lq, Lk, Mf)
        out = ep.module()(*args)
        assert out.shape == (B, H, Lq, 3)
        torch.testing.assert_close(out, M()(*args))


def test_saved_states_size_stays_symbolic():
    # _favor_attention_forward's second output (the states the fused CUDA backward reuses) has a
    # size computed from the shapes: its Meta kernel computes it on symbols, the same formula as
    # for concrete sizes (bf16 with head_dim and features multiples of 16: the fused shapes).
    fwd = torch.ops.panther._favor_attention_forward

    def f(q, k, v, W):
        out, saved = fwd(q, k, v, W, "softmax", True, None)
        return out, saved

    cnt = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=cnt, dynamic=True)
    sizes = set()
    for B, L in [(2, 5), (3, 70), (4, 130), (2, 200)]:
        q = torch.empty(B, 6, L, 16, device="meta", dtype=torch.bfloat16)
        v = torch.empty(B, 6, L, 8, device="meta", dtype=torch.bfloat16)
        W = torch.empty(16, 16, device="meta", dtype=torch.bfloat16)
        out, saved = compiled(q, q, v, W)
        ref_out, ref_saved = f(q, q, v, W)
        assert out.shape == ref_out.shape and out.stride() == ref_out.stride()
        assert saved.shape == ref_saved.shape and saved.numel() > 0
        sizes.add(saved.numel())
    assert len(sizes) == 4 and cnt.frame_count == 1


def test_saved_states_hold_key_maxima_only_for_causal_softmax():
    # The chunk key maxima (one fp32 per chunk of 64 keys and head) stabilise softmax features;
    # relu features need none, so relu's saved tensor has no room for them, and non-causal calls
    # keep no per-chunk maxima at all.
    fwd = torch.ops.panther._favor_attention_forward
    B, H, L = 2, 3, 200
    nk = (L + 63) // 64
    q = torch.empty(B, H, L, 16, device="meta", dtype=torch.bfloat16)
    v = torch.empty(B, H, L, 8, device="meta", dtype=torch.bfloat16)
    W = torch.empty(32, 16, device="meta", dtype=torch.bfloat16)
    size = {(kern, causal): fwd(q, q, v, W, kern, causal, None)[1].numel()
            for kern in ("softmax", "relu") for causal in (False, True)}
    assert size[("softmax", True)] - size[("relu", True)] == B * H * nk * 4
    assert size[("softmax", False)] == size[("relu", False)] > 0
