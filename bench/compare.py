#!/usr/bin/env python3
"""Compare two benchmark result files row by row: a slowdown shows in review.

    python bench/compare.py OLD.jsonl NEW.jsonl [--threshold 0.05] [--fail-on-regression]
    python bench/compare.py --rev REV [--runs 2] -- bench/python/bench_linear.py --device cuda --quick

OLD and NEW are the JSON Lines files the benchmarks write with ``--json PATH``
(``bench/python/common.py: ResultWriter``). Rows are matched on (bench, op, shape, dtype, mode,
baseline); for each, the table gives our time in both files, ``new/old`` (> 1 = slower), and
the baseline's ``new/old`` (the dense reference measured in the same runs: when it moved as
much as ours, the machine changed, not the code). A row is flagged SLOWER when ours got slower
by more than ``--threshold`` (default 0.05 = 5%), FAILED when it has a time in OLD and none in
NEW; with ``--normalize`` the ratio is divided by the baseline's first (for runs on different
machines or noisy CPUs). ``--fail-on-regression`` exits with 1 when any row is flagged.
Rows present in only one file are listed, not flagged. Times are only comparable on the same
device model: the header prints both files' device, torch and commit, and warns when they differ.

``--rev REV`` builds the git revision REV into a temporary directory (a ``git worktree`` and
``pip install --target``, with the caller's environment, e.g. ``PANTHER_WITH_CUDA=ON``) and runs
the given benchmark script (the current tree's, so both sides use the same harness) against that
build (OLD) and against the panther the current environment imports (NEW), interleaved
``--runs`` times (per-row median), then compares. The temporary directory is removed unless
``--keep``. ``--dry-run`` prints the commands only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

KEY = ("bench", "op", "shape", "dtype", "mode", "baseline")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path: str) -> List[dict]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"compare.py: {path}:{n} is not a JSON object ({e})") from None
            missing = [k for k in KEY + ("ours_ms",) if k not in rec]
            if missing:
                raise SystemExit(f"compare.py: {path}:{n} lacks {missing}; is it a benchmark --json file?")
            out.append(rec)
    return out


def key(rec: dict) -> Tuple[str, ...]:
    return tuple(str(rec[k]) for k in KEY)


def _num(v) -> Optional[float]:
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) or v <= 0 else v


def _ratio(new, old) -> Optional[float]:
    new, old = _num(new), _num(old)
    return new / old if new is not None and old is not None else None


def compare(old: Sequence[dict], new: Sequence[dict], threshold: float = 0.05, normalize: bool = False) -> List[dict]:
    """One dict per row of either file: key fields, old/new times, ratios and a flag
    ("SLOWER", "FAILED", "only in OLD", "only in NEW" or "")."""
    old_by = {key(r): r for r in old}
    new_by = {key(r): r for r in new}
    rows = []
    for k in list(old_by) + [k for k in new_by if k not in old_by]:
        o, n = old_by.get(k), new_by.get(k)
        row = dict(zip(KEY, k))
        row["old_ms"] = _num(o["ours_ms"]) if o else None
        row["new_ms"] = _num(n["ours_ms"]) if n else None
        row["ratio"] = _ratio(row["new_ms"], row["old_ms"])
        row["baseline_ratio"] = _ratio(n.get("baseline_ms") if n else None, o.get("baseline_ms") if o else None)
        judged = row["ratio"]
        if normalize and judged is not None and row["baseline_ratio"] is not None:
            judged = judged / row["baseline_ratio"]
        row["judged"] = judged
        if o is None:
            row["flag"] = "only in NEW"
        elif n is None:
            row["flag"] = "only in OLD"
        elif row["old_ms"] is not None and row["new_ms"] is None:
            row["flag"] = "FAILED"
        elif judged is not None and judged > 1 + threshold:
            row["flag"] = "SLOWER"
        else:
            row["flag"] = ""
        rows.append(row)
    return rows


def _env(records: Sequence[dict]) -> str:
    vals = {}
    for f in ("device", "torch", "commit"):
        seen = sorted({str(r.get(f)) for r in records if r.get(f) is not None})
        vals[f] = ", ".join(seen) if seen else "?"
    return f"device {vals['device']}; torch {vals['torch']}; commit {vals['commit']}"


def _ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}"


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def report(rows: Sequence[dict], old: Sequence[dict], new: Sequence[dict], old_name: str, new_name: str,
           threshold: float, normalize: bool) -> str:
    lines = [f"OLD: {old_name}: {_env(old)}", f"NEW: {new_name}: {_env(new)}"]
    devs = ({str(r.get("device")) for r in old}, {str(r.get("device")) for r in new})
    if devs[0] != devs[1]:
        lines.append("WARNING: the files come from different devices; times are not comparable "
                     "(--normalize divides by the baseline's change)")
    lines.append("")
    cols = ["bench", "op", "shape", "dtype", "mode", "old ms", "new ms", "new/old",
            "baseline new/old", "flag"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join([r["bench"], r["op"], r["shape"], r["dtype"], r["mode"], _ms(r["old_ms"]),
                                        _ms(r["new_ms"]), _x(r["ratio"]), _x(r["baseline_ratio"]), r["flag"]]) + " |")
    flagged = [r for r in rows if r["flag"] in ("SLOWER", "FAILED")]
    how = "ours new/old divided by the baseline's" if normalize else "ours new/old"
    lines.append("")
    lines.append(f"{len(flagged)} of {len(rows)} rows flagged ({how} > {1 + threshold:.3g}, or no time in NEW)")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- --rev


def median_records(runs: Sequence[Sequence[dict]]) -> List[dict]:
    """Merge repeated runs of one benchmark: per row, the median of ours_ms and baseline_ms over
    the runs that have a time (null if none), ratio recomputed."""
    merged: Dict[Tuple[str, ...], dict] = {}
    times: Dict[Tuple[str, ...], Dict[str, List[float]]] = {}
    for run in runs:
        for r in run:
            k = key(r)
            merged.setdefault(k, dict(r))
            t = times.setdefault(k, {"ours_ms": [], "baseline_ms": []})
            for f in t:
                v = _num(r.get(f))
                if v is not None:
                    t[f].append(v)
    out = []
    for k, r in merged.items():
        for f, vs in times[k].items():
            r[f] = statistics.median(vs) if vs else None
        r["ratio"] = r["baseline_ms"] / r["ours_ms"] if r["ours_ms"] and r["baseline_ms"] else None
        r["runs"] = len(times[k]["ours_ms"])
        out.append(r)
    return out


def run_rev(rev: str, bench_cmd: List[str], runs: int, workdir: str, dry_run: bool) -> Tuple[str, str]:
    """Build REV into workdir, run bench_cmd against it and against the current environment,
    interleaved; returns the paths of the merged OLD and NEW result files."""
    src, site = os.path.join(workdir, "src"), os.path.join(workdir, "site")
    steps = [
        ["git", "-C", ROOT, "worktree", "add", "--detach", src, rev],
        [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--target", site, src],
    ]
    for cmd in steps:
        print("+ " + " ".join(cmd), flush=True)
        if not dry_run:
            subprocess.run(cmd, check=True)
    results: Dict[str, List[List[dict]]] = {"old": [], "new": []}
    for i in range(runs):
        for side in ("old", "new"):
            out = os.path.join(workdir, f"{side}-{i}.jsonl")
            env = dict(os.environ)
            if side == "old":
                env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
                env["PANTHER_COMMIT"] = rev
            cmd = [sys.executable] + bench_cmd + ["--json", out]
            print(("+ PYTHONPATH=" + site + " " if side == "old" else "+ ") + " ".join(cmd), flush=True)
            if dry_run:
                continue
            subprocess.run(cmd, check=False, env=env, cwd=ROOT)
            if os.path.exists(out):
                results[side].append(read(out))
    paths = []
    for side in ("old", "new"):
        path = os.path.join(workdir, f"{side}.jsonl")
        if not dry_run:
            with open(path, "w") as f:
                for r in median_records(results[side]):
                    f.write(json.dumps(r) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_cmd: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, bench_cmd = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Files are JSON Lines written by the benchmarks' --json option.")
    p.add_argument("old", nargs="?", help="results of the reference run (JSON Lines)")
    p.add_argument("new", nargs="?", help="results of the run under review (JSON Lines)")
    p.add_argument("--threshold", type=float, default=0.05, help="flag rows slower by more than this (0.05 = 5%%)")
    p.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a row is flagged")
    p.add_argument("--normalize", action="store_true", help="judge ours new/old divided by the baseline's new/old")
    p.add_argument("--rev", default=None, help="build this git revision and run the benchmark given after -- on both")
    p.add_argument("--runs", type=int, default=1, help="--rev: interleaved runs per side (median per row)")
    p.add_argument("--keep", action="store_true", help="--rev: keep the temporary build directory")
    p.add_argument("--dry-run", action="store_true", help="--rev: print the commands only")
    args = p.parse_args(argv)
    if args.threshold < 0:
        p.error(f"--threshold must be >= 0, got {args.threshold}")

    if args.rev:
        if args.old or args.new or not bench_cmd:
            p.error("--rev REV takes no files; give the benchmark after --, e.g. "
                    "--rev main -- bench/python/bench_linear.py --quick")
        workdir = tempfile.mkdtemp(prefix="panther-compare-")
        try:
            old_path, new_path = run_rev(args.rev, bench_cmd, max(1, args.runs), workdir, args.dry_run)
            if args.dry_run:
                return 0
            old_name, new_name = f"{args.rev} ({old_path})", f"working tree ({new_path})"
            old, new = read(old_path), read(new_path)
        finally:
            if not args.keep:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", os.path.join(workdir, "src")],
                               capture_output=True)
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                print(f"kept {workdir}")
    else:
        if not (args.old and args.new) or bench_cmd:
            p.error("give two result files OLD NEW (or --rev REV -- BENCHMARK ARGS)")
        old, new = read(args.old), read(args.new)
        old_name, new_name = args.old, args.new

    rows = compare(old, new, args.threshold, args.normalize)
    print(report(rows, old, new, old_name, new_name, args.threshold, args.normalize), end="")
    flagged = any(r["flag"] in ("SLOWER", "FAILED") for r in rows)
    return 1 if (flagged and args.fail_on_regression) else 0


if __name__ == "__main__":
    sys.exit(main())
