"""The portable-kernel switch (panther.set_portable_kernels / PANTHER_PORTABLE_KERNELS).

CUDA binaries for Hopper (9.0) use Hopper-only bulk copies in the fused FAVOR+ kernels; binaries
for other GPUs use portable code. The switch makes a Hopper GPU run the portable path, so these
`cuda` tests check it there against the default path: the same results (the two paths differ
only in how rows are copied from shared to global memory). SKLinear's CUDA kernels have no
Hopper-only code; their test checks that the switch leaves them unchanged. On the CPU: the
switch's contract (its value, its errors, the environment variable).
"""

import os

import pytest
import torch

import panther
from panther.nn.attention import orthogonal_gaussian_projection

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture
def restore_switch():
    before = os.environ.get("PANTHER_PORTABLE_KERNELS")
    yield
    if before is None:
        os.environ.pop("PANTHER_PORTABLE_KERNELS", None)
    else:
        os.environ["PANTHER_PORTABLE_KERNELS"] = before


def test_switch_sets_and_reports(restore_switch):
    os.environ.pop("PANTHER_PORTABLE_KERNELS", None)
    assert panther.portable_kernels() is False
    assert panther.set_portable_kernels(True) is False
    assert os.environ["PANTHER_PORTABLE_KERNELS"] == "1"
    assert panther.portable_kernels() is True
    assert panther.set_portable_kernels(False) is True
    assert "PANTHER_PORTABLE_KERNELS" not in os.environ
    assert panther.portable_kernels() is False


@pytest.mark.parametrize("value, expected", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_switch_reads_the_environment(restore_switch, value, expected):
    os.environ["PANTHER_PORTABLE_KERNELS"] = value
    assert panther.portable_kernels() is expected


@pytest.mark.parametrize("bad", [1, "1", None])
def test_switch_rejects_non_bool(restore_switch, bad):
    with pytest.raises(TypeError, match=r"panther.set_portable_kernels: enabled must be a bool, got"):
        panther.set_portable_kernels(bad)


def test_cpu_ops_ignore_the_switch(restore_switch):
    g = torch.Generator().manual_seed(0)
    layer = panther.nn.SKLinear(32, 16, num_terms=1, low_rank=4, generator=g)
    x = torch.randn(5, 32, generator=g)
    panther.set_portable_kernels(False)
    a = layer(x)
    panther.set_portable_kernels(True)
    torch.testing.assert_close(layer(x), a, rtol=0, atol=0)


def _favor_run(q, k, v, W, kernel, causal, mask, g):
    xs = [t.clone().requires_grad_() for t in (q, k, v, W)]
    out = torch.ops.panther.favor_attention(*xs, kernel, causal, mask)
    out.backward(g)
    return out.detach(), [x.grad for x in xs]


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 2, 200, 200, 64, 64, 256), (2, 2, 150, 150, 16, 24, 48)],
                         ids=["d64m256", "generic"])
def test_cuda_favor_portable_matches_default(restore_switch, causal, shape):
    # bf16 takes the fused kernels; causal calls from autograd save features (save_features) and
    # the causal backward hands Wm / phi to back2 (save_back2_inputs): the bulk-copy sites.
    B, H, L, _, D, Dv, M = shape
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(B, H, L, D, generator=gen).to("cuda", torch.bfloat16)
    v = torch.randn(B, H, L, Dv, generator=gen).to("cuda", torch.bfloat16)
    W = orthogonal_gaussian_projection(M, D, generator=gen).to("cuda").to(torch.bfloat16).float()
    mask = (torch.rand(B, L, generator=gen) < 0.2).cuda()
    g = torch.randn(B, H, L, Dv, generator=gen).to("cuda", torch.bfloat16)
    panther.set_portable_kernels(False)
    out_a, grads_a = _favor_run(q, k, v, W, "softmax", causal, mask, g)
    panther.set_portable_kernels(True)
    out_b, grads_b = _favor_run(q, k, v, W, "softmax", causal, mask, g)
    assert torch.isfinite(out_b.float()).all()
    # Same arithmetic, only the copies differ: the forward is identical.
    assert torch.equal(out_a, out_b)
    # The projection's gradient is summed with atomics (order varies between runs).
    for ga, gb in zip(grads_a, grads_b):
        scale = ga.abs().max().item() + 1e-6
        assert (ga.double() - gb.double()).abs().max().item() / scale < 1e-2


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("tokens", [1, 16, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sklinear_portable_matches_default(restore_switch, tokens, dtype):
    gen = torch.Generator().manual_seed(0)
    layer = panther.nn.SKLinear(512, 256, num_terms=2, low_rank=16, generator=gen).to("cuda", dtype)
    x = torch.randn(tokens, 512, generator=gen).to("cuda", dtype)
    g = torch.randn(tokens, 256, generator=gen).to("cuda", dtype)

    def run():
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(g)
        return y.detach(), [xi.grad, layer.S1s.grad, layer.S2s.grad, layer.bias.grad]

    panther.set_portable_kernels(False)
    ya, ga = run()
    panther.set_portable_kernels(True)
    yb, gb = run()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(yb, ya, rtol=tol, atol=tol)
    for a, b in zip(ga, gb):
        scale = a.abs().max().item() + 1e-6
        assert (a.double() - b.double()).abs().max().item() / scale < tol
