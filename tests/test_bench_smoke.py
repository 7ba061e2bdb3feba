"""The model-shape grid and the model benchmark run end to end (tiny CPU sizes, seconds).

Speed is never asserted here: these only keep the benchmark scripts from rotting (their
options, tables, target summaries and JSON rows).
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import DEVICES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "python")


def run_smoke(script: str, tmp_path, device: str, *extra: str) -> tuple:
    out_json = tmp_path / f"{script}.jsonl"
    out_md = tmp_path / f"{script}.md"
    cmd = [sys.executable, os.path.join(BENCH, script), "--device", device, "--smoke", "--json", str(out_json),
           "--markdown", str(out_md), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = [json.loads(line) for line in out_json.read_text().splitlines() if line.strip()]
    return proc.stdout, out_md.read_text(), rows


@pytest.mark.parametrize("device", DEVICES)
def test_linear_grid_smoke(tmp_path, device):
    stdout, md, rows = run_smoke("bench_linear_grid.py", tmp_path, device)
    assert "## Grid" in md and "## Small print" in md and "## Targets" in md
    assert "_(partial" not in md
    grid = [r for r in rows if r["kind"] == "grid"]
    small = [r for r in rows if r["kind"] == "small"]
    assert {r["dtype"] for r in grid} == {"bf16", "fp32"}
    assert len(small) == 3 and any("wall_fb_sk" in r for r in small)
    for r in rows:
        assert "error" not in r, r
        for key in ("fwd_nn", "fwd_sk", "fwd_2g", "fb_nn", "fb_sk", "fb_2g", "floor_fwd", "floor_fb"):
            assert r[key] > 0, (key, r)
        # accuracy columns are real measurements: errors of a low-precision layer are not zero
        assert 0 < r["err_sk"] < 0.1 and 0 < r["err_nn"] < 0.1, r
        assert 0 < r["gerr_sk"] < 0.1 and 0 < r["gerr_nn"] < 0.1, r
        if device == "cuda":
            assert r["mem_sk"] > 0 and r["mem_nn"] > 0, r
    assert "accuracy, every row" in stdout


@pytest.mark.parametrize("device", DEVICES)
def test_models_smoke(tmp_path, device):
    stdout, md, rows = run_smoke("bench_models.py", tmp_path, device)
    assert "## SKLinear in every Linear" in md and "## Long-context decoder training" in md
    assert "## Copy/recall task" in md and "## Targets" in md
    lin = [r for r in rows if r["part"] == "linear"]
    variants = {(r["model"], r["mode"], r["variant"]) for r in lin}
    for model in ("encoder", "decoder"):
        assert (model, "eager", "dense") in variants
        assert (model, "eager", "zero-cost Linear (bound)") in variants
        assert (model, "autocast", "dense") in variants
        if device == "cuda":  # the inference forward and the whole training step replayed from graphs
            assert {(model, "CUDA graph", v) for v in ("dense", "zero-cost Linear (bound)")} <= variants
    for r in lin:
        assert not r["error"], r
        assert r["infer_ms"] > 0 and r["train_ms"] > 0, r
        if device == "cuda" and "bound" not in r["variant"] and r["mode"] != "CUDA graph":
            assert r["peak_train_bytes"] > 0, r  # (graph replays have no memory column)
        elif r["mode"] == "CUDA graph":
            assert r["peak_train_bytes"] is None, r
    att = [r for r in rows if r["part"] == "attention"]
    assert {r["width"] for r in att} == {"hd64", "hd128"}
    for r in att:
        assert r["exact_train_ms"] > 0 and r["rand_train_ms"] > 0, r
        if device == "cuda":
            assert r["exact_peak_bytes"] > 0 and r["rand_peak_bytes"] > 0, r
    dec = [r for r in rows if r["part"] == "decode"]
    assert "## Decode step" in md and dec
    for r in dec:
        assert r["exact_step_ms"] > 0 and r["rand_step_ms"] > 0, r
        assert r["rand_layer_bytes"] == r["rand_layer_bytes_16_tokens"] > 0, r
    task = [r for r in rows if r["part"] == "copy_task"]
    assert {r["attention"] for r in task} == {"exact", "rand"}
    for r in task:
        assert r["final_train_loss"] > 0 and r["heldout_loss"] > 0, r


def test_zero_cost_linear_standin():
    """The bound's stand-in: right output shape, no parameters, gradient flows (as zeros) to the input."""
    import torch

    sys.path.insert(0, BENCH)
    try:
        import bench_models as bm
    finally:
        sys.path.remove(BENCH)
    torch.manual_seed(0)
    model = bm.Stack(1, 16, heads=2, ffn=32, causal=True, fused_qkv=True)
    stand = bm.zero_cost(model, (2, 8))
    assert not any(isinstance(m, torch.nn.Linear) for m in stand.modules())
    x = torch.randn(2, 8, 16, requires_grad=True)
    y = stand(x)
    assert y.shape == (2, 8, 16)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="ZeroCostLinear"):
        stand(torch.randn(3, 8, 16))


def test_failed_call_reports_oom_and_errors():
    """A variant that runs out of memory is reported as "OOM" (and others as their error), not raised."""
    import torch

    sys.path.insert(0, BENCH)
    try:
        import bench_models as bm
    finally:
        sys.path.remove(BENCH)

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def bad():
        raise RuntimeError("shape mismatch\nmore")

    cpu = torch.device("cpu")
    assert bm._try(oom, cpu) == "OOM"
    assert bm._try(bad, cpu) == "RuntimeError: shape mismatch"
    assert bm._try(lambda: None, cpu) is None


def _bench_module(name: str):
    sys.path.insert(0, BENCH)
    try:
        return __import__(name)
    finally:
        sys.path.remove(BENCH)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_smoke(tmp_path, device):
    stdout, md, rows = run_smoke("bench_attention.py", tmp_path, device)
    assert "## Targets" in md and "_(partial" not in md
    assert "exact module ms" in md and "module vs exact" in md
    modes = {"fwd", "fwd+bwd"} | ({"fwd graph"} if device == "cuda" else set())
    ops = {r["op"] for r in rows}
    assert ops == {"favor_attention", "RandMultiHeadAttention"}
    assert {r["mode"] for r in rows} == modes
    assert len(rows) == 2 * 2 * 2 * len(modes)  # (op, module) x 2 lengths x (causal or not) x modes
    for r in rows:
        assert r["baseline_ms"] > 0 and r["ours_ms"] > 0 and r["ratio"] > 0, r
        if r["op"] == "RandMultiHeadAttention":
            assert r["baseline"].startswith("exact module"), r
        if device == "cuda" and r["mode"] != "fwd graph":
            assert r["baseline_peak_bytes"] > 0 and r["ours_peak_bytes"] > 0, r


def _attention_row(L, causal, mode, exact, rmha, mem_exact=None, mem_rmha=None, width="12x64"):
    return {"width": width, "L": L, "causal": causal, "mode": mode, "exact": exact, "rmha": rmha,
            "module_speedup": exact / rmha if exact and rmha else None, "sdpa": None, "favor": None,
            "op_speedup": None, "mem_exact": mem_exact, "mem_rmha": mem_rmha,
            "module_mem_ratio": mem_rmha / mem_exact if mem_exact and mem_rmha else None, "op_mem_ratio": None}


def test_attention_targets_judge_the_exact_module():
    """The module targets compare RandMultiHeadAttention with the exact module at the stated lengths:
    a passing and a missing row each get their verdict, a length with no numbers is 'not measured'."""
    ba = _bench_module("bench_attention")
    rows = [
        _attention_row(16384, True, "fwd+bwd", exact=5.0, rmha=1.9, mem_exact=100, mem_rmha=140),  # 2.63x: pass
        _attention_row(16384, False, "fwd+bwd", exact=5.0, rmha=4.0, mem_exact=100, mem_rmha=200),  # mem 2x: miss
        _attention_row(1024, True, "fwd", exact=0.03, rmha=0.10),  # 0.30x: miss
        _attention_row(1024, True, "fwd graph", exact=0.03, rmha=0.033),  # 0.91x: pass
    ]
    got = {t: (m, ok) for t, m, ok in ba.targets(rows, True, True, "GPU X", {"12x64": [1024, 16384]})}
    def find(*words):
        hits = [k for k in got if all(w in k for w in words)]
        assert len(hits) == 1, (words, hits)
        return got[hits[0]]
    assert find("causal fwd+bwd L=16384: module >= 2.5x") == ("2.63x", True)
    assert find("non-causal fwd+bwd L=16384: module peak extra memory") == ("2.00x", False)
    assert find("[GPU X] causal fwd+bwd L=16384: module peak extra memory") == ("1.40x", True)
    assert find("[GPU X] causal fwd L=1024, eager") == ("0.30x", False)
    assert find("[GPU X] causal fwd L=1024, CUDA graph") == ("0.91x", True)
    assert find("non-causal fwd L=1024, eager")[1] is None  # the row did not run: not measured
    assert not any("L=8192" in k or "L=4096" in k for k in got)  # lengths that did not run: no target
    assert all("[GPU X]" in k for k in got)
