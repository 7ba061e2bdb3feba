#!/usr/bin/env python3
"""SKLinear vs nn.Linear (and the plain-PyTorch two-GEMM form), side by side in one run.

For each configuration (tokens N, d_in = d_out = d, num_terms L, low_rank k) and dtype:

* nn.Linear(d, d) and pr.nn.SKLinear(d, d, L, k), both with bias.
* two-GEMM: the sketched layer written in plain PyTorch, ``torch.addmm(b, x @ A, B)`` with
  ``A = [S1_1..S1_L | U2_1..U2_L]`` (d, 2Lk) and ``B = [U1; S2] / (2L)`` (2Lk, d): what the math
  allows with the vendor GEMM and nothing else.

What is timed
  fwd:      the forward under ``torch.no_grad()`` (inference).
  fwd+bwd:  training step of one layer: x requires grad (the layer sits inside a network), all
            parameters require grad; forward, then ``torch.autograd.grad`` of the output with a
            fixed random output gradient w.r.t. x and every parameter (no accumulation into .grad).
  Median of CUDA-event (or perf_counter on CPU) timings after warm-up, the three implementations
  measured round-robin (one call of each per round); see common.py.

Floors (the "% of floor" columns are floor / measured time)
  fwd bytes:     read x (N d_in) + write y (N d_out) + read A, B, bias; FLOPs 2 N r (d_in + d_out), r = 2Lk.
  fwd+bwd bytes: fwd + read dy (N d_out) + read x again (N d_in) + write dx (N d_in)
                 + read A, B and write dA, dB, db; FLOPs 3x the forward's.
  floor = max(bytes / bandwidth, FLOPs / peak rate); the rates used are printed.

Accuracy
  Relative error ||y - y64|| / ||y64|| against the float64 formula (panther._reference) on the
  same parameters, for SKLinear and for nn.Linear holding the equivalent dense weight
  (``SKLinear.dense_weight()`` computed in float64, rounded once to the dtype).

Machine-readable results (``--json P``): JSON Lines, one record per (config, dtype, mode) with
SKLinear's and nn.Linear's median times (see common.ResultWriter); ``bench/compare.py OLD NEW``
compares two such files row by row.

Usage: python bench/python/bench_linear.py [--device cpu|cuda] [--quick] [--csv P] [--png P] [--markdown P] [--json P]
       [--compare REV [--compare-runs N]]
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import panther as pr  # noqa: E402

try:
    from panther._reference import sketched_linear_reference as _ref_formula
except ImportError:  # pragma: no cover - older trees
    _ref_formula = None


@dataclass(frozen=True)
class Config:
    tokens: int
    d: int
    L: int
    k: int

    def __str__(self) -> str:
        return f"N={self.tokens} d={self.d} L={self.L} k={self.k}"


CUDA_CONFIGS = [Config(8192, 8192, 1, 16), Config(4096, 4096, 2, 64), Config(64, 8192, 1, 16)]
CPU_CONFIGS = [Config(2048, 4096, 1, 16)]


def reference64(x: torch.Tensor, sk: "pr.nn.SKLinear") -> torch.Tensor:
    args = (sk.S1s, sk.S2s, sk.U1s, sk.U2s, sk.bias)
    if _ref_formula is not None:
        with torch.no_grad():
            return _ref_formula(x, *args)
    # The formula, in float64: y = 1/(2L) sum_i (x S1_i U1_i + x U2_i S2_i) + b
    x64 = x.double()
    L = sk.num_terms
    with torch.no_grad():
        y = sum((x64 @ sk.S1s[i].double()) @ sk.U1s[i].double() + (x64 @ sk.U2s[i].double()) @ sk.S2s[i].double()
                for i in range(L)) / (2 * L)
        if sk.bias is not None:
            y = y + sk.bias.double()
    return y




def floors(cfg: Config, dtype: torch.dtype, hw: C.Hardware) -> Tuple[float, float]:
    es = torch.tensor([], dtype=dtype).element_size()
    N, d, r = cfg.tokens, cfg.d, 2 * cfg.L * cfg.k
    params = (d * r + r * d + d) * es
    fwd_bytes = (N * d + N * d) * es + params
    fwd_flop = 2.0 * N * r * (d + d)
    bwd_bytes = (N * d + N * d + N * d) * es + 2 * params  # dy, x again, dx; params read + grads written
    return hw.floor_ms(fwd_bytes, fwd_flop, dtype), hw.floor_ms(fwd_bytes + bwd_bytes, 3 * fwd_flop, dtype)


def bench_one(cfg: Config, dtype: torch.dtype, device: torch.device, hw: C.Hardware, tk: Dict) -> Dict:
    torch.manual_seed(0)
    N, d = cfg.tokens, cfg.d
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # small-d configs may hold more numbers than dense
        sk = pr.nn.SKLinear(d, d, cfg.L, cfg.k, dtype=dtype, device=device)
    # nn.Linear holding the equivalent dense weight (float64, rounded once to dtype).
    dense = nn.Linear(d, d, bias=True, dtype=dtype, device=device)
    with torch.no_grad():
        dense.weight.copy_(copy.deepcopy(sk).double().dense_weight().to(dtype))
        dense.bias.copy_(sk.bias)
    A, B, b = C.two_gemm_operands(sk)

    x = torch.randn(N, d, dtype=dtype, device=device)
    gy = torch.randn(N, d, dtype=dtype, device=device)
    row: Dict = {"config": str(cfg), "dtype": C.dtype_name(dtype)}

    # ---- accuracy vs float64 (fresh random input)
    with torch.no_grad():
        xa = torch.randn(N, d, dtype=dtype, device=device)
        ref = reference64(xa, sk)
        row["err_sk"] = C.rel_err(sk(xa), ref)
        row["err_nn"] = C.rel_err(dense(xa), ref)
        del ref, xa

    # ---- forward (inference)
    def fwd(f):
        def run():
            with torch.no_grad():
                return f(x)
        return run

    impls = {
        "nn": dense,
        "sk": sk,
        "2g": lambda t: torch.addmm(b, t @ A, B),
    }
    # ---- forward + backward (training step of one layer)
    xg = x.detach().clone().requires_grad_(True)
    Ag, Bg, bg = (t.detach().clone().requires_grad_(True) for t in (A, B, b))
    train_inputs = {
        "nn": [xg, dense.weight, dense.bias],
        "sk": [xg] + [p for p in sk.parameters() if p.requires_grad],
        "2g": [xg, Ag, Bg, bg],
    }
    train_fns = {
        "nn": lambda: dense(xg),
        "sk": lambda: sk(xg),
        "2g": lambda: torch.addmm(bg, xg @ Ag, Bg),
    }

    def fwdbwd(name):
        def run():
            y = train_fns[name]()
            return torch.autograd.grad(y, train_inputs[name], gy)
        return run

    kw = dict(warmup=tk["warmup"], reps=tk["reps"], min_reps=tk["min_reps"], budget_s=tk["budget_s"])
    # Round-robin over the three implementations, so they see the same machine state.
    t = C.time_fns({name: fwd(f) for name, f in impls.items()}, device, **kw)
    for name in impls:
        row[f"fwd_{name}"] = t[name].median_ms
    t = C.time_fns({name: fwdbwd(name) for name in impls}, device, **kw)
    for name in impls:
        row[f"fb_{name}"] = t[name].median_ms
    row["mem_sk"] = C.peak_memory_bytes(fwdbwd("sk"), device)
    row["mem_nn"] = C.peak_memory_bytes(fwdbwd("nn"), device)
    row["floor_fwd"], row["floor_fb"] = floors(cfg, dtype, hw)
    del sk, dense, x, gy, xg, A, B, b, Ag, Bg, bg
    gc.collect()
    C.free_cuda(device)
    return row


COLUMNS = [
    "config", "dtype",
    "nn.Linear fwd ms", "SKLinear fwd ms", "speedup", "two-GEMM fwd ms", "floor fwd ms", "% of floor",
    "nn.Linear fwd+bwd ms", "SKLinear fwd+bwd ms", "speedup", "two-GEMM fwd+bwd ms", "floor fwd+bwd ms", "% of floor",
    "peak mem fwd+bwd SK / nn", "rel err SK", "rel err nn.Linear",
]


def format_row(r: Dict) -> List[str]:
    return [
        r["config"], r["dtype"],
        C.fmt_ms(r["fwd_nn"]), C.fmt_ms(r["fwd_sk"]), C.fmt_ratio(r["fwd_nn"] / r["fwd_sk"]),
        C.fmt_ms(r["fwd_2g"]), C.fmt_ms(r["floor_fwd"]), C.fmt_pct(100 * r["floor_fwd"] / r["fwd_sk"]),
        C.fmt_ms(r["fb_nn"]), C.fmt_ms(r["fb_sk"]), C.fmt_ratio(r["fb_nn"] / r["fb_sk"]),
        C.fmt_ms(r["fb_2g"]), C.fmt_ms(r["floor_fb"]), C.fmt_pct(100 * r["floor_fb"] / r["fb_sk"]),
        f"{C.fmt_bytes(r['mem_sk'])} / {C.fmt_bytes(r['mem_nn'])}",
        C.fmt_err(r["err_sk"]), C.fmt_err(r["err_nn"]),
    ]


def targets(rows: List[Dict], device: torch.device) -> List[tuple]:
    """The performance targets next to what this run measured (PASS/MISS; never asserted)."""
    out = []

    def find(cfg: Config, dt: str) -> Optional[Dict]:
        for r in rows:
            if r["config"] == str(cfg) and r["dtype"] == dt:
                return r
        return None

    def ratio(r, mode):
        return r[f"{mode}_nn"] / r[f"{mode}_sk"]

    if device.type == "cpu":
        r = find(CPU_CONFIGS[0], "fp32")
        if r:
            out.append((f"CPU fp32 {CPU_CONFIGS[0]}: fwd >= 10x nn.Linear", C.fmt_ratio(ratio(r, "fwd")), ratio(r, "fwd") >= 10))
            out.append((f"CPU fp32 {CPU_CONFIGS[0]}: fwd+bwd >= 6x nn.Linear", C.fmt_ratio(ratio(r, "fb")), ratio(r, "fb") >= 6))
    else:
        big, small = CUDA_CONFIGS[0], CUDA_CONFIGS[2]
        r = find(big, "bf16")
        if r:
            out.append((f"bf16 {big}: fwd within 1.25x of the HBM floor ({C.fmt_ms(r['floor_fwd'])} ms)",
                        f"{C.fmt_ms(r['fwd_sk'])} ms = {r['fwd_sk'] / r['floor_fwd']:.2f}x floor",
                        r["fwd_sk"] <= 1.25 * r["floor_fwd"]))
            out.append((f"bf16 {big}: fwd >= 13x nn.Linear", C.fmt_ratio(ratio(r, "fwd")), ratio(r, "fwd") >= 13))
            out.append((f"bf16 {big}: fwd+bwd >= 9x nn.Linear", C.fmt_ratio(ratio(r, "fb")), ratio(r, "fb") >= 9))
        r = find(big, "fp32")
        if r:
            out.append((f"fp32 (no TF32) {big}: fwd >= 50x nn.Linear", C.fmt_ratio(ratio(r, "fwd")), ratio(r, "fwd") >= 50))
        r = find(big, "fp16")
        if r:
            out.append((f"fp16 {big}: fwd >= 8x faster than anchor Panther's 1.04 ms (<= 0.130 ms)",
                        f"{C.fmt_ms(r['fwd_sk'])} ms = {1.04 / r['fwd_sk']:.1f}x", r["fwd_sk"] <= 1.04 / 8))
        for dt in ("fp32", "fp16", "bf16"):
            r = find(small, dt)
            if r:
                out.append((f"{dt} {small}: fwd not slower than nn.Linear", C.fmt_ratio(ratio(r, "fwd")), ratio(r, "fwd") >= 1))
                out.append((f"{dt} {small}: fwd+bwd not slower than nn.Linear", C.fmt_ratio(ratio(r, "fb")), ratio(r, "fb") >= 1))
    # Accuracy: fp32 within fp32 rounding (rel err <= 1e-5); fp16/bf16 within 2x nn.Linear's own error.
    for r in rows:
        if r["dtype"] == "fp32":
            out.append((f"accuracy fp32 {r['config']}: rel err <= 1e-5", C.fmt_err(r["err_sk"]), r["err_sk"] <= 1e-5))
        elif r["dtype"] in ("fp16", "bf16"):
            out.append((f"accuracy {r['dtype']} {r['config']}: rel err <= 2x nn.Linear's ({C.fmt_err(r['err_nn'])})",
                        C.fmt_err(r["err_sk"]), r["err_sk"] <= 2 * r["err_nn"]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (and on CUDA, bf16 + fp32 only)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,fp16,bf16 (default: fp32 on CPU, all on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--csv", default=None)
    p.add_argument("--png", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--json", default=None, help="machine-readable results (JSON Lines) for bench/compare.py")
    p.add_argument("--compare", default=None, metavar="REV",
                   help="build git revision REV in a temporary worktree, run this benchmark on it and on the "
                        "current build, and print bench/compare.py's per-row table")
    p.add_argument("--compare-runs", type=int, default=1, help="--compare: interleaved runs per side")
    args = p.parse_args(argv)
    if args.compare:
        rest = C.strip_option(sys.argv[1:] if argv is None else argv, "--compare", "--compare-runs", "--json")
        return C.compare_with_rev(args.compare, __file__, rest, args.compare_runs)

    device = C.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    C.disable_tf32()
    if device.type == "cuda":
        configs = CUDA_CONFIGS
        dnames = args.dtypes.split(",") if args.dtypes else (["bf16", "fp32"] if args.quick else ["fp32", "fp16", "bf16"])
        tk = dict(warmup=3, reps=10 if args.quick else 30, min_reps=3, budget_s=0.25 if args.quick else 0.6)
    else:
        configs = CPU_CONFIGS
        dnames = args.dtypes.split(",") if args.dtypes else ["fp32"]
        tk = dict(warmup=1 if args.quick else 2, reps=5 if args.quick else 15, min_reps=3, budget_s=2.0 if args.quick else 6.0)
    dtypes = [C.DTYPES[n] for n in dnames]
    hw = C.hardware(device, dtypes)

    notes = [
        hw.describe(),
        "fwd: forward under torch.no_grad(); fwd+bwd: x and all parameters require grad, "
        "torch.autograd.grad with a random output gradient. Median of "
        + ("CUDA-event" if device.type == "cuda" else "perf_counter") + " timings after warm-up, implementations measured round-robin.",
        "speedup = nn.Linear time / SKLinear time; % of floor = floor / SKLinear time. "
        "Floor = max(bytes / bandwidth, FLOPs / peak): fwd bytes = x read + y written + params; "
        "fwd+bwd adds dy read, x re-read, dx written, params re-read + grads written; FLOPs: fwd 2Nr(d_in+d_out), r = 2Lk, fwd+bwd 3x.",
        "two-GEMM = torch.addmm(b, x @ A, B) in plain PyTorch. "
        "peak mem: extra CUDA memory of one fwd+bwd call (n/a on CPU). "
        "rel err: vs the float64 formula on the same parameters; nn.Linear holds the equivalent dense weight.",
        "fp32 runs with TF32 off.",
    ]
    head = C.header("SKLinear vs nn.Linear", device, notes) + "\n"
    rows: List[Dict] = []
    failures = 0
    table = C.Table(COLUMNS)
    results = C.ResultWriter(args.json, "bench_linear", device)
    for cfg in configs:
        for dt in dtypes:
            try:
                r = bench_one(cfg, dt, device, hw, tk)
            except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
                gc.collect()
                C.free_cuda(device)
                why = "out of memory" if C.is_oom(e) else f"{type(e).__name__}: {e}"
                print(f"FAILED {cfg} {C.dtype_name(dt)}: {why}", file=sys.stderr, flush=True)
                table.add([str(cfg), C.dtype_name(dt), f"failed: {why[:120]}"] + ["-"] * (len(COLUMNS) - 3),
                          raw={"config": str(cfg), "dtype": C.dtype_name(dt), "error": why})
                failures += 1
                for mode in ("fwd", "fwd+bwd"):
                    results.add("SKLinear", str(cfg), C.dtype_name(dt), mode, "nn.Linear", None, None, note=why[:200])
                continue
            rows.append(r)
            for mode, key in (("fwd", "fwd"), ("fwd+bwd", "fb")):
                results.add("SKLinear", str(cfg), C.dtype_name(dt), mode, "nn.Linear", r[f"{key}_nn"], r[f"{key}_sk"],
                            two_gemm_ms=r[f"{key}_2g"])
            table.add(format_row(r), raw=r)
            C.write_markdown(args.markdown, head + table.markdown() + C.PARTIAL)
            print(f"done: {cfg} {C.dtype_name(dt)}", file=sys.stderr, flush=True)

    text = head + table.markdown()
    text += "\n## Targets\n\n" + C.targets_table(targets(rows, device))
    C.emit(text, args.markdown)
    if args.csv:
        table.write_csv(args.csv)
    if args.png and rows:
        labels = [f"{r['config']} {r['dtype']}" for r in rows]
        C.write_png(args.png, f"SKLinear vs nn.Linear ({C.device_name(device)})", labels, {
            "nn.Linear fwd": [r["fwd_nn"] for r in rows],
            "SKLinear fwd": [r["fwd_sk"] for r in rows],
            "nn.Linear fwd+bwd": [r["fb_nn"] for r in rows],
            "SKLinear fwd+bwd": [r["fb_sk"] for r in rows],
        })
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
