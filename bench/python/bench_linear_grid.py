#!/usr/bin/env python3
"""SKLinear vs nn.Linear at the shapes of real transformer layers: the model-shape grid.

Grid (every combination; each row is one layer, bias on, d_in -> d_out):
  (d_in, d_out) in {768x768, 768x3072, 3072x768, 1024x4096, 4096x1024, 4096x4096, 4096x11008,
  11008x4096}; tokens N in {4096, 16384, 65536}; (L, k) = (num_terms, low_rank) in {(1,32),
  (1,64), (2,64), (1,128)}; bf16 and fp16; fp32 (TF32 off) on a subset (768x768 and 4096x4096,
  16384 tokens, L=1 k=64).
Small print: every token count 1, 2, 4, ..., 65536 at 768->768 and 4096->4096 (L=1, k=64), to
  show where the speedup changes with the token count (a cliff between code paths), plus the
  eager wall time of one fwd+bwd call at 64 tokens.

Implementations, measured round-robin in one run (common.time_fns: one call of each per round;
the median of at least 3 rounds is reported):
  nn.Linear(d_in, d_out) holding SKLinear's equivalent dense weight (float64 sum, rounded once);
  pr.nn.SKLinear(d_in, d_out, L, k);
  two-GEMM: the same rank-2Lk map in plain PyTorch, ``torch.addmm(b, x @ A, B)`` with
  A = [S1_1..S1_L | U2_1..U2_L] (d_in, 2Lk) and B = [U1; S2] / (2L) (2Lk, d_out): what the
  vendor GEMM gives with nothing else.

What is timed
  fwd:      the forward under ``torch.no_grad()``.
  fwd+bwd:  x and every parameter require grad; forward, then ``torch.autograd.grad`` of the
            output with a fixed random output gradient w.r.t. x and the parameters.
  wall (small print, 64 tokens): host ``perf_counter`` around one fwd+bwd call followed by a
            device synchronisation (launch cost + GPU time), median, interleaved.

Floor of the SKLinear computation (the "% of floor" column is floor / SKLinear time), r = 2Lk,
e = bytes per element of the dtype:
  fwd     bytes = e (N d_in [read x] + N d_out [write y] + d_in r + r d_out + d_out [parameters]);
          FLOPs = 2 N r (d_in + d_out)  (x times the (d_in, r) factor, then the (r, d_out) one).
  fwd+bwd bytes = fwd bytes + e (N d_out [read dy] + N d_in [read x again] + N d_in [write dx]
          + d_in r + r d_out + d_out [parameters read again] + d_in r + r d_out + d_out [grads]);
          FLOPs = 3 x the forward's (dx and the weight gradients each cost one forward).
  The N x r intermediate is assumed to stay on chip (never written): the floor is what a fully
  fused kernel could reach. floor = max(bytes / bandwidth, FLOPs / peak rate); the rates used are
  printed with the table (common.hardware).

Accuracy (rel err = ||out - ref|| / ||ref||, computed in float64)
  fwd:  the first min(N, 4096) rows of the row's own forward output (same code path as timed),
        against panther._reference.sketched_linear_reference in float64 on the same parameters;
        nn.Linear against the same float64 reference (its weight is SKLinear's dense weight
        rounded once to the dtype, so its error is nn.Linear's own error on this problem).
  grad: the largest rel err over dx and every parameter gradient, against float64 autograd of the
        reference formula (SKLinear) and of x W^T + b in float64 (nn.Linear), at the row's N.

Peak memory: extra CUDA memory of one fwd+bwd call (torch.cuda.max_memory_allocated minus what
was allocated before the call: outputs, saved tensors, gradients, workspaces); n/a on CPU.

Usage:
  python bench/python/bench_linear_grid.py --device cuda                  # full grid, bf16+fp16+fp32 subset
  python bench/python/bench_linear_grid.py --device cuda --quick          # < 60 s subset (bf16)
  python bench/python/bench_linear_grid.py --device cpu --smoke           # tiny sizes, seconds
Options: --dtypes bf16,fp16,fp32  --shapes 768x768,4096x4096  --tokens 16384  --lk 1x64
         --no-small  --budget-s S  --json PATH  --markdown PATH  --csv PATH
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import panther as pr  # noqa: E402
from panther._reference import sketched_linear_reference  # noqa: E402

# ----------------------------------------------------------------------------- configurations

SHAPES = [(768, 768), (768, 3072), (3072, 768), (1024, 4096), (4096, 1024), (4096, 4096), (4096, 11008),
          (11008, 4096)]
TOKENS = [16384, 65536, 4096]  # 16384 first: most targets are stated there
LKS = [(1, 32), (1, 64), (2, 64), (1, 128)]
FP32_SHAPES, FP32_TOKENS, FP32_LKS = [(768, 768), (4096, 4096)], [16384], [(1, 64)]
SMALL_SHAPES, SMALL_LK, SMALL_TOKENS = [(768, 768), (4096, 4096)], (1, 64), [2 ** i for i in range(17)]
WALL_TOKENS = 64

QUICK = dict(shapes=[(768, 768), (768, 3072), (3072, 768), (4096, 4096), (4096, 11008)], tokens=[16384, 4096],
             lks=[(1, 64)], small_shapes=[(768, 768), (4096, 4096)], small_tokens=[64, 1024, 4096, 16384],
             dtypes=["bf16"])
SMOKE = dict(shapes=[(64, 64), (64, 192)], tokens=[128], lks=[(1, 4)], small_shapes=[(64, 64)],
             small_tokens=[32, 64, 128], small_lk=(1, 8), dtypes=["bf16", "fp32"], fp32_shapes=[(64, 64)],
             fp32_tokens=[128], fp32_lks=[(1, 4)], wall_tokens=64)

# Thresholds of the targets (ratios to nn.Linear in the same run).
NOT_SLOWER = 0.95
GPU_DOMINATES_MS = 0.05  # small print: a row counts for the cliff rule when both layers take >= this


def parse_pairs(s: Optional[str]) -> Optional[List[Tuple[int, int]]]:
    if not s:
        return None
    out = []
    for part in s.split(","):
        a, b = part.lower().split("x")
        out.append((int(a), int(b)))
    return out


def parse_ints(s: Optional[str]) -> Optional[List[int]]:
    return [int(t) for t in s.split(",")] if s else None


# ----------------------------------------------------------------------------- one row




def floors(d_in: int, d_out: int, N: int, L: int, k: int, dtype: torch.dtype, hw: C.Hardware) -> Tuple[float, float]:
    """(fwd, fwd+bwd) floors in ms of the SKLinear computation (model in the module docstring)."""
    e = torch.tensor([], dtype=dtype).element_size()
    r = 2 * L * k
    params = (d_in * r + r * d_out + d_out) * e
    fwd_bytes = (N * d_in + N * d_out) * e + params
    fwd_flop = 2.0 * N * r * (d_in + d_out)
    bwd_bytes = (N * d_out + 2 * N * d_in) * e + 2 * params
    return hw.floor_ms(fwd_bytes, fwd_flop, dtype), hw.floor_ms(fwd_bytes + bwd_bytes, 3 * fwd_flop, dtype)


def wall_times(fns: Dict[str, callable], device: torch.device, reps: int, warmup: int) -> Dict[str, float]:
    """Median host wall time (ms) of one call followed by a synchronisation, interleaved."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    C.synchronize(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            C.synchronize(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def max_rel_err(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    errs = [C.rel_err(o, r) for o, r in zip(outs, refs)]
    return float("nan") if any(e != e for e in errs) else max(errs)


def accuracy(sk, dense, x: torch.Tensor, gy: torch.Tensor, row: Dict) -> None:
    """Forward and gradient rel errors of SKLinear and nn.Linear against float64 (see docstring)."""
    R = min(x.shape[0], 4096)
    with torch.no_grad():
        ref = sketched_linear_reference(x[:R], sk.S1s, sk.S2s, sk.U1s, sk.U2s, sk.bias)
        row["err_sk"] = C.rel_err(sk(x)[:R], ref)
        row["err_nn"] = C.rel_err(dense(x)[:R], ref)
        del ref
    # Gradients: SKLinear vs float64 autograd of the reference formula.
    xg = x.detach().clone().requires_grad_(True)
    params = [sk.S1s, sk.S2s, sk.bias]
    got = torch.autograd.grad(sk(xg), [xg] + params, gy)
    leaves64 = [t.detach().double().requires_grad_(True) for t in [x] + params]
    y64 = sketched_linear_reference(leaves64[0], leaves64[1], leaves64[2], sk.U1s, sk.U2s, leaves64[3])
    ref = torch.autograd.grad(y64, leaves64, gy.double())
    row["gerr_sk"] = max_rel_err(got, ref)
    del got, ref, y64, leaves64
    # nn.Linear vs x W^T + b in float64 with its own (rounded) weight for dW, db; dx against the
    # sketch's exact dense weight (the problem both layers solve).
    got = torch.autograd.grad(dense(xg), [xg, dense.weight, dense.bias], gy)
    with torch.no_grad():
        gy64, x64 = gy.double(), x.double()
        W64 = copy.deepcopy(sk).double().dense_weight()
        ref = [gy64 @ W64, gy64.t() @ x64, gy64.sum(0)]
    row["gerr_nn"] = max_rel_err(got, ref)
    del got, ref, xg


def bench_row(kind: str, d_in: int, d_out: int, N: int, L: int, k: int, dtype: torch.dtype, device: torch.device,
              hw: C.Hardware, tk: Dict, wall: bool) -> Dict:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # small layers may hold more numbers than dense
        sk = pr.nn.SKLinear(d_in, d_out, L, k, dtype=dtype, device=device)
    dense = nn.Linear(d_in, d_out, bias=True, dtype=dtype, device=device)
    with torch.no_grad():
        dense.weight.copy_(copy.deepcopy(sk).double().dense_weight().to(dtype))
        dense.bias.copy_(sk.bias)
    A, B, b = C.two_gemm_operands(sk)
    x = torch.randn(N, d_in, dtype=dtype, device=device)
    gy = torch.randn(N, d_out, dtype=dtype, device=device)
    row: Dict = {"kind": kind, "d_in": d_in, "d_out": d_out, "tokens": N, "L": L, "k": k,
                 "dtype": C.dtype_name(dtype)}

    fwd_impls = {"nn": dense, "sk": sk, "2g": lambda t: torch.addmm(b, t @ A, B)}

    def fwd(f):
        def run():
            with torch.no_grad():
                return f(x)
        return run

    xg = x.detach().clone().requires_grad_(True)
    Ag, Bg, bg = (t.detach().clone().requires_grad_(True) for t in (A, B, b))
    train = {
        "nn": (lambda: dense(xg), [xg, dense.weight, dense.bias]),
        "sk": (lambda: sk(xg), [xg] + [p for p in sk.parameters() if p.requires_grad]),
        "2g": (lambda: torch.addmm(bg, xg @ Ag, Bg), [xg, Ag, Bg, bg]),
    }

    def fwdbwd(name):
        f, inputs = train[name]

        def run():
            return torch.autograd.grad(f(), inputs, gy)
        return run

    t = C.time_fns({n: fwd(f) for n, f in fwd_impls.items()}, device, **tk)
    for n in fwd_impls:
        row[f"fwd_{n}"] = t[n].median_ms
        row["reps_fwd"] = t[n].reps
    t = C.time_fns({n: fwdbwd(n) for n in train}, device, **tk)
    for n in train:
        row[f"fb_{n}"] = t[n].median_ms
        row["reps_fb"] = t[n].reps
    if wall:
        w = wall_times({"nn": fwdbwd("nn"), "sk": fwdbwd("sk")}, device, reps=max(tk["reps"], 5), warmup=tk["warmup"])
        row["wall_fb_nn"], row["wall_fb_sk"] = w["nn"], w["sk"]
    row["mem_sk"] = C.peak_memory_bytes(fwdbwd("sk"), device)
    row["mem_nn"] = C.peak_memory_bytes(fwdbwd("nn"), device)
    row["floor_fwd"], row["floor_fb"] = floors(d_in, d_out, N, L, k, dtype, hw)
    try:
        accuracy(sk, dense, x, gy, row)
    except Exception as e:  # noqa: BLE001 - the timings stay valid without the accuracy columns
        if not C.is_oom(e):
            raise
        row["acc_note"] = "accuracy: OOM"
    del sk, dense, x, gy, xg, A, B, b, Ag, Bg, bg, train, fwd_impls
    return row


# ----------------------------------------------------------------------------- formatting

COLUMNS = [
    "d_in x d_out", "tokens", "L, k", "dtype",
    "nn fwd ms", "SK fwd ms", "fwd speedup", "2-GEMM fwd ms", "fwd % floor",
    "nn fwd+bwd ms", "SK fwd+bwd ms", "fwd+bwd speedup", "2-GEMM fwd+bwd ms", "fwd+bwd % floor",
    "peak mem SK / nn", "rel err SK / nn", "grad rel err SK / nn",
]
SMALL_EXTRA = ["wall fwd+bwd SK / nn (us)"]


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def label(r: Dict) -> str:
    return f"{r['d_in']}x{r['d_out']} N={r['tokens']} L={r['L']} k={r['k']} {r['dtype']}"


def format_row(r: Dict, small: bool) -> List[str]:
    cells = [
        f"{r['d_in']}x{r['d_out']}", str(r["tokens"]), f"{r['L']}, {r['k']}", r["dtype"],
        C.fmt_ms(r["fwd_nn"]), C.fmt_ms(r["fwd_sk"]), C.fmt_ratio(ratio(r["fwd_nn"], r["fwd_sk"])),
        C.fmt_ms(r["fwd_2g"]), C.fmt_pct(100 * r["floor_fwd"] / r["fwd_sk"]),
        C.fmt_ms(r["fb_nn"]), C.fmt_ms(r["fb_sk"]), C.fmt_ratio(ratio(r["fb_nn"], r["fb_sk"])),
        C.fmt_ms(r["fb_2g"]), C.fmt_pct(100 * r["floor_fb"] / r["fb_sk"]),
        f"{C.fmt_bytes(r['mem_sk'])} / {C.fmt_bytes(r['mem_nn'])}",
        f"{C.fmt_err(r.get('err_sk'))} / {C.fmt_err(r.get('err_nn'))}",
        f"{C.fmt_err(r.get('gerr_sk'))} / {C.fmt_err(r.get('gerr_nn'))}",
    ]
    if small:
        cells.append(f"{r['wall_fb_sk'] * 1e3:.1f} / {r['wall_fb_nn'] * 1e3:.1f}" if "wall_fb_sk" in r else "-")
    return cells


def failed_cells(kind: str, d_in, d_out, N, L, k, dt: str, why: str, small: bool) -> List[str]:
    n = len(COLUMNS) + (1 if small else 0)
    return [f"{d_in}x{d_out}", str(N), f"{L}, {k}", dt, why] + ["-"] * (n - 5)


# ----------------------------------------------------------------------------- targets


def evaluate(rows: List[Dict], gpu: str, cliff_ms: float) -> List[tuple]:
    """The targets (ratios to nn.Linear in the same run) next to what this run measured."""
    out: List[tuple] = []
    grid = [r for r in rows if r["kind"] == "grid" and "fwd_sk" in r]
    small = [r for r in rows if r["kind"] == "small" and "fwd_sk" in r]

    def sp(r, mode):
        return r[f"{mode}_nn"] / r[f"{mode}_sk"]

    def verdict(name: str, sel: List[Dict], value, ok, fmt=C.fmt_ratio, worst_is="min"):
        if not sel:
            out.append((f"{name} [{gpu}]", "no row of this run", None))
            return
        fails = [r for r in sel if not ok(r)]
        worst = (min if worst_is == "min" else max)(sel, key=value)
        meas = f"{len(sel) - len(fails)}/{len(sel)} rows; worst {label(worst)}: {fmt(value(worst))}"
        out.append((f"{name} [{gpu}]", meas, not fails))

    for dt in ("bf16", "fp16"):
        g = [r for r in grid if r["dtype"] == dt]
        if not g:
            continue
        sel = [r for r in g if 2 * r["L"] * r["k"] <= min(r["d_in"], r["d_out"]) / 6 and r["tokens"] >= 16384]
        verdict(f"{dt}: 2Lk <= min(d_in,d_out)/6, >= 16384 tokens: fwd >= 1.5x nn.Linear", sel,
                lambda r: sp(r, "fwd"), lambda r: sp(r, "fwd") >= 1.5)
        verdict(f"{dt}: 2Lk <= min(d_in,d_out)/6, >= 16384 tokens: fwd+bwd >= 2.0x nn.Linear", sel,
                lambda r: sp(r, "fb"), lambda r: sp(r, "fb") >= 2.0)
        sel = [r for r in g if 2 * r["L"] * r["k"] <= min(r["d_in"], r["d_out"]) / 4 and r["tokens"] >= 4096]
        verdict(f"{dt}: 2Lk <= min(d_in,d_out)/4, >= 4096 tokens: fwd not slower (>= {NOT_SLOWER}x)", sel,
                lambda r: sp(r, "fwd"), lambda r: sp(r, "fwd") >= NOT_SLOWER)
        verdict(f"{dt}: 2Lk <= min(d_in,d_out)/4, >= 4096 tokens: fwd+bwd not slower (>= {NOT_SLOWER}x)", sel,
                lambda r: sp(r, "fb"), lambda r: sp(r, "fb") >= NOT_SLOWER)
        sel = [r for r in g if min(r["d_in"], r["d_out"]) >= 4096 and r["tokens"] >= 16384]
        verdict(f"{dt}: layers >= 4096 wide, >= 16384 tokens: fwd+bwd >= 4x nn.Linear", sel,
                lambda r: sp(r, "fb"), lambda r: sp(r, "fb") >= 4.0)
        verdict(f"{dt}: layers >= 4096 wide, >= 16384 tokens: fwd not slower than two-GEMM", sel,
                lambda r: r["fwd_2g"] / r["fwd_sk"], lambda r: r["fwd_2g"] / r["fwd_sk"] >= NOT_SLOWER)
        verdict(f"{dt}: layers >= 4096 wide, >= 16384 tokens: fwd+bwd not slower than two-GEMM", sel,
                lambda r: r["fb_2g"] / r["fb_sk"], lambda r: r["fb_2g"] / r["fb_sk"] >= NOT_SLOWER)
        sel = [r for r in g if r["tokens"] >= 16384]
        verdict(f"{dt}: every row at >= 16384 tokens: fwd within 2.5x of its floor", sel,
                lambda r: r["floor_fwd"] / r["fwd_sk"], lambda r: r["fwd_sk"] <= 2.5 * r["floor_fwd"],
                fmt=lambda v: C.fmt_pct(100 * v) + " of floor")
        verdict(f"{dt}: every row at >= 16384 tokens: fwd+bwd within 2.5x of its floor", sel,
                lambda r: r["floor_fb"] / r["fb_sk"], lambda r: r["fb_sk"] <= 2.5 * r["floor_fb"],
                fmt=lambda v: C.fmt_pct(100 * v) + " of floor")
    # Small print: no cliff where GPU work dominates; wall time at 64 tokens.
    for dt in ("bf16", "fp16"):
        s = [r for r in small if r["dtype"] == dt]
        shapes = sorted({(r["d_in"], r["d_out"]) for r in s})
        for shp in shapes:
            rs = sorted((r for r in s if (r["d_in"], r["d_out"]) == shp), key=lambda r: r["tokens"])
            lk = f"L={rs[0]['L']} k={rs[0]['k']}"
            span = f"{rs[0]['tokens']}..{rs[-1]['tokens']}"
            for mode, mname in (("fwd", "fwd"), ("fb", "fwd+bwd")):
                pairs = [(a, b) for a, b in zip(rs, rs[1:]) if b["tokens"] == 2 * a["tokens"]
                         and min(a[f"{mode}_sk"], a[f"{mode}_nn"], b[f"{mode}_sk"], b[f"{mode}_nn"]) >= cliff_ms]
                name = (f"{dt} {shp[0]}x{shp[1]} {lk}, tokens {span}: {mname} speedup drops <= 10% from N to 2N "
                        f"(pairs where every time >= {cliff_ms * 1e3:.0f} us)")
                if not pairs:
                    out.append((f"{name} [{gpu}]", "no pair of this run", None))
                    continue
                drops = [(sp(b, mode) / sp(a, mode), a, b) for a, b in pairs]
                worst = min(drops, key=lambda t: t[0])
                nfail = sum(1 for d in drops if d[0] < 0.9)
                out.append((f"{name} [{gpu}]",
                            f"{len(drops) - nfail}/{len(drops)} pairs; worst {worst[1]['tokens']} -> {worst[2]['tokens']}: "
                            f"{C.fmt_ratio(sp(worst[1], mode))} -> {C.fmt_ratio(sp(worst[2], mode))}",
                            nfail == 0))
            w = [r for r in rs if "wall_fb_sk" in r]
            for r in w:
                out.append((f"{dt} {shp[0]}x{shp[1]} {r['tokens']} tokens: eager fwd+bwd wall <= nn.Linear's + 20 us [{gpu}]",
                            f"{r['wall_fb_sk'] * 1e3:.1f} us vs {r['wall_fb_nn'] * 1e3:.1f} us",
                            r["wall_fb_sk"] <= r["wall_fb_nn"] + 0.020))
    # Accuracy: every row, every dtype.
    for dt in ("bf16", "fp16", "fp32"):
        sel = [r for r in rows if r["dtype"] == dt and "fwd_sk" in r and r.get("err_sk") is not None]
        if not sel:
            continue
        verdict(f"{dt}: accuracy, every row: fwd rel err <= 2x nn.Linear's", sel,
                lambda r: r["err_sk"] / r["err_nn"] if r["err_nn"] else float("inf"),
                lambda r: r["err_sk"] <= 2 * r["err_nn"], fmt=lambda v: f"{v:.2f}x nn.Linear's error", worst_is="max")
        verdict(f"{dt}: accuracy, every row: gradient rel err <= 2x nn.Linear's", sel,
                lambda r: r["gerr_sk"] / r["gerr_nn"] if r["gerr_nn"] else float("inf"),
                lambda r: r["gerr_sk"] <= 2 * r["gerr_nn"], fmt=lambda v: f"{v:.2f}x nn.Linear's error", worst_is="max")
    return out


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default=None, help="comma list of bf16,fp16,fp32 (fp32: the subset, TF32 off)")
    p.add_argument("--quick", action="store_true", help="a subset that runs in under a minute on an H100")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds on a CPU): checks that the script runs")
    p.add_argument("--shapes", default=None, help="restrict the grid, e.g. 768x768,4096x4096")
    p.add_argument("--tokens", default=None, help="restrict the grid's token counts, e.g. 16384")
    p.add_argument("--lk", default=None, help="restrict (L,k), e.g. 1x64,2x64")
    p.add_argument("--no-small", action="store_true", help="skip the small-print token sweep")
    p.add_argument("--no-grid", action="store_true", help="only the small-print token sweep")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting rows after this many seconds (default 540; --quick 50)")
    p.add_argument("--cliff-ms", type=float, default=GPU_DOMINATES_MS,
                   help="small print: a token pair counts for the no-cliff rule when all its times are >= this")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", default=None, help="write the rows as JSON lines")
    p.add_argument("--markdown", default=None)
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)

    device = C.pick_device(args.device)
    if args.threads or (args.smoke and device.type == "cpu"):
        # Smoke runs use one thread: on a CPU shared with other work, more threads only wait.
        torch.set_num_threads(args.threads or 1)
    C.disable_tf32()
    t_start = time.perf_counter()

    cfg = dict(shapes=SHAPES, tokens=TOKENS, lks=LKS, small_shapes=SMALL_SHAPES, small_tokens=SMALL_TOKENS,
               small_lk=SMALL_LK,
               dtypes=["bf16", "fp16", "fp32"] if device.type == "cuda" else ["fp32"], fp32_shapes=FP32_SHAPES,
               fp32_tokens=FP32_TOKENS, fp32_lks=FP32_LKS, wall_tokens=WALL_TOKENS)
    if args.smoke:
        cfg.update(SMOKE)
        tk = dict(warmup=1, reps=3, min_reps=3, budget_s=0.0)
        budget = args.budget_s if args.budget_s is not None else 60
    elif args.quick:
        cfg.update(QUICK)
        cfg.update(fp32_shapes=[(4096, 4096)])
        tk = dict(warmup=2, reps=7, min_reps=3, budget_s=0.15)
        budget = args.budget_s if args.budget_s is not None else 50
    else:
        tk = (dict(warmup=3, reps=15, min_reps=5, budget_s=0.4) if device.type == "cuda"
              else dict(warmup=1, reps=5, min_reps=3, budget_s=2.0))
        budget = args.budget_s if args.budget_s is not None else 540
    if args.dtypes:
        cfg["dtypes"] = args.dtypes.split(",")
    for name in cfg["dtypes"]:
        if name not in ("bf16", "fp16", "fp32"):
            p.error(f"--dtypes: unknown dtype {name!r} (expected bf16, fp16, fp32)")
    shapes_f, tokens_f, lks_f = parse_pairs(args.shapes), parse_ints(args.tokens), parse_pairs(args.lk)

    # The plan, in priority order: per dtype the grid, then the small print; fp32 (subset) last.
    plan: List[Tuple] = []
    for dn in sorted(cfg["dtypes"], key=lambda n: {"bf16": 0, "fp16": 1, "fp32": 2}[n]):
        if dn == "fp32":
            shapes, tokens, lks = cfg["fp32_shapes"], cfg["fp32_tokens"], cfg["fp32_lks"]
        else:
            shapes, tokens, lks = cfg["shapes"], cfg["tokens"], cfg["lks"]
        shapes = [s for s in shapes if shapes_f is None or s in shapes_f]
        tokens = [t for t in tokens if tokens_f is None or t in tokens_f]
        lks = [x for x in lks if lks_f is None or x in lks_f]
        if not args.no_grid:
            for N in tokens:
                for (d_in, d_out) in shapes:
                    for (L, k) in lks:
                        plan.append(("grid", d_in, d_out, N, L, k, dn))
        if not args.no_small and dn != "fp32":
            sL, sk_ = cfg["small_lk"]
            for (d_in, d_out) in cfg["small_shapes"]:
                if shapes_f is not None and (d_in, d_out) not in shapes_f:
                    continue
                for N in cfg["small_tokens"]:
                    plan.append(("small", d_in, d_out, N, sL, sk_, dn))

    if args.smoke:  # nominal floors: measuring the machine would take longer than the smoke run
        hw = C.Hardware(C.device_name(device), 10e9, {torch.float32: 100e9}, "nominal (smoke run, not measured)")
    else:
        hw = C.hardware(device, [C.DTYPES[n] for n in cfg["dtypes"]])
    gpu = C.device_name(device)
    notes = [
        hw.describe(),
        "fwd: forward under torch.no_grad(); fwd+bwd: torch.autograd.grad w.r.t. x and every parameter with a "
        "random output gradient. Median of " + ("CUDA-event" if device.type == "cuda" else "perf_counter")
        + f" timings, the three implementations measured round-robin (>= {tk['min_reps']} rounds).",
        "speedup = nn.Linear time / SKLinear time. 2-GEMM = torch.addmm(b, x @ A, B) with A (d_in, 2Lk), B (2Lk, d_out). "
        "% floor = floor / SKLinear time; floor = max(bytes / bandwidth, FLOPs / peak), bytes = x, y (fwd) + dy, x, dx "
        "(bwd) + parameters (+ their gradients), FLOPs = 2Nr(d_in + d_out) fwd, 3x that fwd+bwd, r = 2Lk.",
        "peak mem: extra CUDA memory of one fwd+bwd call (n/a on CPU). rel err: vs the float64 formula on the same "
        "parameters (nn.Linear holds SKLinear's dense weight rounded once); grad rel err: max over dx and the "
        "parameter gradients vs float64 autograd.",
        "fp32 runs with TF32 off. Small print: L=1, k=64, every token count; wall = host time of one eager "
        f"fwd+bwd call plus a synchronisation, at {cfg['wall_tokens']} tokens.",
        f"budget: rows stop starting after {budget:.0f} s.",
    ]
    head = C.header("SKLinear vs nn.Linear: model-shape grid", device, notes) + "\n"
    grid_table, small_table = C.Table(COLUMNS), C.Table(COLUMNS + SMALL_EXTRA)
    rows: List[Dict] = []
    failures = 0
    skipped: List[str] = []
    meta = {"bench": "linear_grid", "device": gpu, "commit": C.commit(), "torch": torch.__version__}

    def report(final: bool) -> str:
        text = head + "## Grid\n\n" + grid_table.markdown()
        if small_table.rows:
            text += "\n## Small print (token sweep)\n\n" + small_table.markdown()
        if skipped:
            text += f"\n_{len(skipped)} rows not run (time budget): first {skipped[0]}, last {skipped[-1]}_\n"
        if final:
            text += f"\n## Targets ({gpu})\n\n" + C.targets_table(evaluate(rows, gpu, args.cliff_ms))
        else:
            text += C.PARTIAL
        return text

    for item in plan:
        kind, d_in, d_out, N, L, k, dn = item
        desc = f"{kind} {d_in}x{d_out} N={N} L={L} k={k} {dn}"
        if time.perf_counter() - t_start > budget:
            skipped.append(desc)
            continue
        table = grid_table if kind == "grid" else small_table
        small = kind == "small"
        try:
            r = bench_row(kind, d_in, d_out, N, L, k, C.DTYPES[dn], device, hw, tk,
                          wall=small and N == cfg["wall_tokens"])
        except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
            oom = C.is_oom(e)
            why = "OOM" if oom else f"failed: {type(e).__name__}: {str(e)[:100]}"
            print(f"{desc}: {why}", file=sys.stderr, flush=True)
            table.add(failed_cells(kind, d_in, d_out, N, L, k, dn, why, small),
                      raw={"kind": kind, "d_in": d_in, "d_out": d_out, "tokens": N, "L": L, "k": k, "dtype": dn,
                           "error": why})
            rows.append({"kind": kind, "d_in": d_in, "d_out": d_out, "tokens": N, "L": L, "k": k, "dtype": dn,
                         "error": why})
            failures += 0 if oom else 1
        else:
            rows.append(r)
            table.add(format_row(r, small), raw=r)
            print(f"done: {desc} ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)
        gc.collect()
        C.free_cuda(device)
        C.write_markdown(args.markdown, report(False))

    text = report(True)
    C.emit(text, args.markdown)
    C.write_json_lines(args.json, rows, meta)
    if args.csv:
        t = C.Table(COLUMNS)
        t.raw = grid_table.raw + small_table.raw
        t.write_csv(args.csv)
    print(f"(total {time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
