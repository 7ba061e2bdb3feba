#!/usr/bin/env python3
"""Turns panther_bench's JSON output (--benchmark_out=F --benchmark_out_format=json) into a
markdown table: each Panther op next to its dense baseline on the same case, with the speedup.

usage: results_to_markdown.py RESULTS.json OUT.md [TITLE]
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

PAIRS = {"sketched_linear": "at::linear", "favor_attention": "sdpa"}
TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}


def main() -> int:
    src, dst = sys.argv[1], sys.argv[2]
    title = sys.argv[3] if len(sys.argv) > 3 else "C++ microbenchmarks (panther_bench)"
    with open(src) as f:
        data = json.load(f)
    runs = {}
    for b in data.get("benchmarks", []):
        if b.get("run_type", "iteration") != "iteration":
            continue
        name = b["name"]
        for suffix in ("/manual_time", "/real_time"):
            name = name[: -len(suffix)] if name.endswith(suffix) else name
        op, _, case = name.partition("/")
        if b.get("error_occurred"):
            runs[(op, case)] = {"error": b.get("error_message", "error")}
        else:
            runs[(op, case)] = {
                "ms": b["real_time"] * TO_MS[b.get("time_unit", "ns")],
                "flops": b.get("FLOP/s"),
                "bytes": b.get("bytes/s"),
            }
    try:
        import torch
        import common

        head = common.header(title, torch.device("cuda" if torch.cuda.is_available() else "cpu"), [
            "Google Benchmark timing (mean over its iterations): CUDA cases time 10 back-to-back calls per device "
            "synchronisation (manual time); CPU cases wall-clock time.",
            "FLOP/s and bytes/s: the op's FLOPs and fewest bytes moved, over the measured time.",
        ])
    except Exception:  # noqa: BLE001 - the table matters more than the header
        ctx = data.get("context", {})
        head = f"# {title}\n\n- host: {ctx.get('host_name', '?')}, date {ctx.get('date', '?')}\n"

    def fmt(r):
        if r is None:
            return ["-", "-", "-"]
        if "error" in r:
            return [f"error: {r['error'][:80]}", "-", "-"]
        return [f"{r['ms']:.4g}", f"{(r['flops'] or 0) / 1e12:.3g}", f"{(r['bytes'] or 0) / 1e9:.4g}"]

    lines = ["| case | op | ms | TFLOP/s | GB/s | baseline | ms | TFLOP/s | GB/s | speedup |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (op, case), r in runs.items():
        if op not in PAIRS:
            continue
        base = runs.get((PAIRS[op], case))
        sp = "-"
        if base and "ms" in base and "ms" in r:
            sp = f"{base['ms'] / r['ms']:.2f}x"
        lines.append("| " + " | ".join([case, op] + fmt(r) + [PAIRS[op]] + fmt(base) + [sp]) + " |")
    for (op, case), r in runs.items():  # baselines with no Panther op next to them
        if op in PAIRS.values() and not any((k, case) in runs for k, v in PAIRS.items() if v == op):
            lines.append("| " + " | ".join([case, "-", "-", "-", "-", op] + fmt(r) + ["-"]) + " |")
    text = head + "\n" + "\n".join(lines) + "\n"
    with open(dst, "w") as f:
        f.write(text)
    print(f"wrote {dst} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
