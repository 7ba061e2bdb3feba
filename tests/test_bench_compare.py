"""bench/compare.py and the benchmarks' machine-readable result writer, on small synthetic files."""

import importlib.util
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


compare = _load("panther_bench_compare", "bench/compare.py")
common = _load("panther_bench_common", "bench/python/common.py")


def rec(op, shape, mode, ours, base, dtype="bf16", device="NVIDIA H100 80GB HBM3", commit="abc"):
    return {"bench": "bench_x", "op": op, "shape": shape, "dtype": dtype, "mode": mode, "baseline": "dense",
            "baseline_ms": base, "ours_ms": ours, "ratio": None if ours is None or base is None else base / ours,
            "device": device, "torch": "2.13.0", "commit": commit}


OLD = [
    rec("sk", "N=8", "fwd", 1.00, 10.0),
    rec("sk", "N=8", "fwd+bwd", 2.00, 20.0),
    rec("sk", "N=64", "fwd", 0.50, 1.0),
    rec("attn", "L=1k", "fwd", 4.00, 8.0),
    rec("attn", "L=2k", "fwd", 8.00, 16.0),
]
NEW = [
    rec("sk", "N=8", "fwd", 1.04, 10.0, commit="def"),  # +4%: within the 5% threshold
    rec("sk", "N=8", "fwd+bwd", 2.40, 20.0, commit="def"),  # +20%: flagged
    rec("sk", "N=64", "fwd", 0.40, 1.0, commit="def"),  # faster
    rec("attn", "L=1k", "fwd", None, 8.0, commit="def"),  # failed in NEW
    rec("attn", "L=4k", "fwd", 16.0, 32.0, commit="def"),  # new row
]


def write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture
def files(tmp_path):
    return write(tmp_path / "old.jsonl", OLD), write(tmp_path / "new.jsonl", NEW)


def test_ratios_and_flags():
    rows = {(r["op"], r["shape"], r["mode"]): r for r in compare.compare(OLD, NEW)}
    assert rows[("sk", "N=8", "fwd")]["ratio"] == pytest.approx(1.04)
    assert rows[("sk", "N=8", "fwd")]["flag"] == ""
    assert rows[("sk", "N=8", "fwd+bwd")]["ratio"] == pytest.approx(1.2)
    assert rows[("sk", "N=8", "fwd+bwd")]["flag"] == "SLOWER"
    assert rows[("sk", "N=8", "fwd+bwd")]["baseline_ratio"] == pytest.approx(1.0)
    assert rows[("sk", "N=64", "fwd")]["ratio"] == pytest.approx(0.8)
    assert rows[("sk", "N=64", "fwd")]["flag"] == ""
    assert rows[("attn", "L=1k", "fwd")]["flag"] == "FAILED"
    assert rows[("attn", "L=2k", "fwd")]["flag"] == "only in OLD"
    assert rows[("attn", "L=4k", "fwd")]["flag"] == "only in NEW"
    # A tighter threshold flags the +4% row too.
    tight = {(r["op"], r["shape"], r["mode"]): r["flag"] for r in compare.compare(OLD, NEW, threshold=0.03)}
    assert tight[("sk", "N=8", "fwd")] == "SLOWER"


def test_normalize_divides_by_the_baseline_change():
    old = [rec("sk", "N=8", "fwd", 1.0, 10.0)]
    new = [rec("sk", "N=8", "fwd", 1.5, 15.0)]  # the whole machine is 1.5x slower
    assert compare.compare(old, new)[0]["flag"] == "SLOWER"
    r = compare.compare(old, new, normalize=True)[0]
    assert r["judged"] == pytest.approx(1.0) and r["flag"] == ""


def test_cli_prints_table_and_exit_code(files, capsys):
    old, new = files
    assert compare.main([old, new]) == 0  # flags are printed, the exit code stays 0 by default
    out = capsys.readouterr().out
    assert "| bench_x | sk | N=8 | bf16 | fwd+bwd | 2 | 2.4 | 1.200 | 1.000 | SLOWER |" in out
    assert "2 of 6 rows flagged" in out
    assert "commit abc" in out and "commit def" in out
    assert compare.main([old, new, "--fail-on-regression"]) == 1
    assert compare.main([old, new, "--fail-on-regression", "--threshold", "0.25"]) == 1  # FAILED row stays
    capsys.readouterr()
    assert compare.main([old, old, "--fail-on-regression"]) == 0


def test_cli_warns_on_different_devices(tmp_path, capsys):
    old = write(tmp_path / "a.jsonl", [rec("sk", "N=8", "fwd", 1.0, 2.0)])
    new = write(tmp_path / "b.jsonl", [rec("sk", "N=8", "fwd", 1.0, 2.0, device="NVIDIA H200")])
    compare.main([old, new])
    assert "WARNING: the files come from different devices" in capsys.readouterr().out


def test_cli_rejects_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"op": "sk"}\n')
    with pytest.raises(SystemExit, match=r"lacks \['bench'"):
        compare.main([str(bad), str(bad)])
    bad.write_text("not json\n")
    with pytest.raises(SystemExit, match="not a JSON object"):
        compare.main([str(bad), str(bad)])
    with pytest.raises(SystemExit):
        compare.main([str(bad)])  # one file only: usage error


def test_median_of_runs():
    runs = [[rec("sk", "N=8", "fwd", 1.0, 10.0)], [rec("sk", "N=8", "fwd", 3.0, 14.0)],
            [rec("sk", "N=8", "fwd", 2.0, None)]]
    (m,) = compare.median_records(runs)
    assert m["ours_ms"] == 2.0 and m["baseline_ms"] == 12.0 and m["ratio"] == pytest.approx(6.0)
    assert m["runs"] == 3


def test_rev_dry_run_prints_the_plan(capsys):
    assert compare.main(["--rev", "HEAD~1", "--dry-run", "--runs", "2", "--", "bench/python/bench_linear.py",
                         "--quick"]) == 0
    out = capsys.readouterr().out
    assert "worktree add --detach" in out and "pip install --no-build-isolation" in out
    assert out.count("bench_linear.py --quick --json") == 4  # 2 runs x (old, new), interleaved


def test_result_writer_round_trip(tmp_path):
    path = str(tmp_path / "r" / "out.jsonl")
    w = common.ResultWriter(path, "bench_x", torch.device("cpu"))
    w.add("sk", "N=8", "fp32", "fwd", "nn.Linear", 2.0, 0.5, two_gemm_ms=0.7)
    w.add("sk", "N=8", "fp32", "fwd+bwd", "nn.Linear", None, 1.0, note="baseline OOM")
    recs = common.read_results(path)
    assert [r["mode"] for r in recs] == ["fwd", "fwd+bwd"]
    assert set(common.RESULT_FIELDS) <= set(recs[0])
    assert recs[0]["ratio"] == 4.0 and recs[0]["two_gemm_ms"] == 0.7 and recs[0]["torch"] == torch.__version__
    assert recs[1]["ratio"] is None and recs[1]["note"] == "baseline OOM"
    # compare.py reads what the writer wrote.
    assert compare.compare(recs, recs)[0]["ratio"] == 1.0
    # A new writer on the same path starts a fresh file.
    common.ResultWriter(path, "bench_x", torch.device("cpu"))
    assert common.read_results(path) == []


def test_strip_option():
    argv = ["--device", "cuda", "--compare", "main", "--quick", "--compare-runs=2", "--json", "x.jsonl"]
    assert common.strip_option(argv, "--compare", "--compare-runs", "--json") == ["--device", "cuda", "--quick"]


def test_compare_with_rev_runs_compare_py(monkeypatch):
    seen = {}

    class Done:
        returncode = 3

    def fake_run(cmd, cwd=None):
        seen["cmd"], seen["cwd"] = cmd, cwd
        return Done()

    monkeypatch.setattr(common.subprocess, "run", fake_run)
    script = os.path.join(ROOT, "bench", "python", "bench_linear.py")
    assert common.compare_with_rev("main", script, ["--quick"], runs=2) == 3
    cmd = seen["cmd"]
    assert cmd[1].endswith(os.path.join("bench", "compare.py")) and seen["cwd"] == ROOT
    assert cmd[2:] == ["--rev", "main", "--runs", "2", "--", os.path.join("bench", "python", "bench_linear.py"),
                       "--quick"]


def test_rev_flow_with_stubbed_build(monkeypatch, capsys):
    """--rev end to end with the build and the benchmark stubbed: OLD runs get the REV build on
    PYTHONPATH, the runs are merged per row (median) and compared."""
    calls = []

    def fake_run(cmd, check=False, env=None, cwd=None, capture_output=False):
        calls.append((cmd, env))
        if "--json" in cmd:
            old = env is not None and "panther-compare-" in env.get("PYTHONPATH", "")
            ours = 2.0 if old else 2.5 + 0.1 * len(calls)  # NEW is slower: flagged
            with open(cmd[cmd.index("--json") + 1], "w") as f:
                f.write(json.dumps(rec("sk", "N=8", "fwd", ours, 10.0)) + "\n")

        class Done:
            returncode = 0
        return Done()

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    rc = compare.main(["--rev", "main", "--runs", "2", "--fail-on-regression", "--", "bench/python/bench_linear.py"])
    out = capsys.readouterr().out
    assert rc == 1 and "SLOWER" in out
    bench_calls = [(c, e) for c, e in calls if "--json" in c]
    assert len(bench_calls) == 4
    olds = [e for c, e in bench_calls if e is not None and "panther-compare-" in e.get("PYTHONPATH", "")]
    assert len(olds) == 2 and all(e["PANTHER_COMMIT"] == "main" for e in olds)
    assert calls[0][0][:4] == ["git", "-C", compare.ROOT, "worktree"] and calls[-1][0][3:5] == ["worktree", "remove"]
