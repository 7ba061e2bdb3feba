"""Deployment paths of Panther models: TorchScript in a fresh process, torch.export,
AOTInductor packages (compile, load back with only the op library), torch.compile(fullgraph=True).

The model is examples/export_torchscript.py's TinyTransformer: SKLinear feed-forward, plus
RandMultiHeadAttention when this build has ``pr.nn.RandMultiHeadAttention`` (tests of the
attention part skip otherwise).
"""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import panther as pr

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)
from export_torchscript import (  # noqa: E402
    TinyTransformer,
    build_model,
    example_input,
    has_attention,
    save_tensors,
    script_model,
)

needs_attention = pytest.mark.skipif(
    not has_attention(), reason="pr.nn.RandMultiHeadAttention is not in this build yet"
)


def run_fresh(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs ``code`` in a new Python process (nothing of this process's imports carried over)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def model_and_io():
    model = build_model(0)
    x = example_input()
    with torch.no_grad():
        y = model(x)
    return model, x, y


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory, model_and_io):
    model, x, y = model_and_io
    d = tmp_path_factory.mktemp("ts")
    script_model(model).save(str(d / "model.pt"))
    save_tensors(str(d / "io.pt"), input=x, output=y)
    return d


# ---------------------------------------------------------------- TorchScript

_RUN_SCRIPTED = """
    import sys
    import torch
    MODE, d = sys.argv[1], sys.argv[2]
    if MODE == "import":
        import panther
    elif MODE == "load_library":
        torch.ops.load_library(sys.argv[3])
        assert "panther" not in sys.modules
    m = torch.jit.load(d + "/model.pt")
    io = torch.jit.load(d + "/io.pt")
    with torch.no_grad():
        y = m(io.input)
    torch.save(y, d + "/out_" + MODE + ".pt")
    print("max abs diff", (y - io.output).abs().max().item())
"""


@pytest.mark.parametrize("mode", ["import", "load_library"])
def test_torchscript_loads_in_fresh_process(scripted_dir, model_and_io, mode):
    _, _, y = model_and_io
    r = run_fresh(_RUN_SCRIPTED, mode, str(scripted_dir), pr.library_path())
    assert r.returncode == 0, r.stderr[-3000:]
    y2 = torch.load(scripted_dir / f"out_{mode}.pt")
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)


def test_torchscript_without_op_library_fails_clearly(scripted_dir):
    # The op library is really needed at load time (so the two tests above test something).
    r = run_fresh(_RUN_SCRIPTED, "none", str(scripted_dir))
    assert r.returncode != 0
    assert "panther" in r.stderr


def test_scripted_model_calls_panther_ops(model_and_io):
    model, x, y = model_and_io
    scripted = script_model(model)
    code = scripted.ff1.code + scripted.ff2.code
    assert "panther.sketched_linear" in code
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), y, rtol=1e-6, atol=1e-6)


def test_scripted_model_trains(model_and_io):
    # Backward through the scripted model matches eager.
    model, x, _ = model_and_io
    scripted = script_model(model)
    model.zero_grad()
    model(x).square().sum().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    scripted(x).square().sum().backward()
    for n, p in scripted.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-4, atol=1e-5, msg=n)
    model.zero_grad()


@needs_attention
def test_scripted_model_has_attention(model_and_io):
    model, _, _ = model_and_io
    assert model.attn is not None
    assert "panther.favor_attention" in script_model(model).attn.code


# ---------------------------------------------------------------- torch.export / AOTInductor


def test_export_roundtrip(tmp_path, model_and_io):
    model, x, y = model_and_io
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("panther.sketched_linear" in t for t in targets), targets
    path = tmp_path / "model.pt2"
    torch.export.save(ep, str(path))
    loaded = torch.export.load(str(path))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), y, rtol=1e-5, atol=1e-5)


_RUN_AOTI = """
    import sys
    import torch
    MODE, d = sys.argv[1], sys.argv[2]
    if MODE == "import":
        import panther
    elif MODE == "load_library":
        torch.ops.load_library(sys.argv[3])
        assert "panther" not in sys.modules
    io = torch.jit.load(d + "/io.pt")
    compiled = torch._inductor.aoti_load_package(d + "/model.pt2")
    with torch.no_grad():
        y = compiled(io.input)
    torch.save(y, d + "/out_" + MODE + ".pt")
"""


@pytest.mark.slow
def test_aoti_package_round_trip(tmp_path, model_and_io, inductor_cache):
    """aoti_compile_and_package, then load the package in fresh processes: one that imports
    panther and one that only loads the op library (torch.ops.load_library(panther.library_path())).
    Loading happens in child processes so that a crash inside the AOTInductor runtime is reported
    as this test's failure (with the child's output) instead of ending the whole test run."""
    from export_aoti import export_and_compile

    model, x, y = model_and_io
    package = str(tmp_path / "model.pt2")
    with torch.no_grad():
        export_and_compile(model, x, package)
    save_tensors(str(tmp_path / "io.pt"), input=x, output=y)

    for mode in ("import", "load_library"):
        r = run_fresh(_RUN_AOTI, mode, str(tmp_path), pr.library_path())
        assert r.returncode == 0, f"{mode}: exit {r.returncode}\n{r.stderr[-3000:]}"
        out = torch.load(tmp_path / f"out_{mode}.pt")
        torch.testing.assert_close(out, y, rtol=1e-4, atol=1e-4)

    # Without the op library the package cannot run: the library really is a run-time dependency.
    r = run_fresh(_RUN_AOTI, "none", str(tmp_path))
    assert r.returncode != 0
    assert "panther" in r.stderr


# ---------------------------------------------------------------- torch.compile


def _compile_model(seed: int, use_attention=None):
    torch.manual_seed(seed)
    return TinyTransformer(use_attention=use_attention).eval()


@pytest.mark.slow
def test_compile_fullgraph_forward_backward_match_eager(inductor_cache):
    torch._dynamo.reset()
    model = _compile_model(3)
    x = example_input().requires_grad_()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    y = model(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *model.parameters()], g)
    yc = compiled(x)
    torch.testing.assert_close(yc, y, rtol=1e-4, atol=1e-5)
    grads_c = torch.autograd.grad(yc, [x, *model.parameters()], g)
    names = ["input"] + [n for n, _ in model.named_parameters()]
    for n, a, b in zip(names, grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=n)
    torch._dynamo.reset()


def test_compile_sklinear_dynamic_batch(inductor_cache):
    # fullgraph compile of a bare SKLinear with a dynamic leading dim (Meta kernel shapes).
    torch._dynamo.reset()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        layer = pr.nn.SKLinear(24, 10, num_terms=2, low_rank=3)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for n in (3, 7):
        x = torch.randn(n, 5, 24)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
