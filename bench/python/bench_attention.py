#!/usr/bin/env python3
"""FAVOR+ attention (the op and pr.nn.RandMultiHeadAttention) vs exact attention, side by side.

Compared, per width (heads x head_dim), sequence length L, causal or not, and mode:

* ``torch.ops.panther.favor_attention(q, k, v, projection, "softmax", causal, None)``: the core op
  on per-head q, k, v (B, H, L, D) and a projection (M, D);
* ``F.scaled_dot_product_attention(q, k, v, is_causal=causal)``: exact attention, same shapes
  (PyTorch picks its fastest backend: flash / memory-efficient / math);
* ``pr.nn.RandMultiHeadAttention(E, H, M, kernel_fn="softmax", iscausal=causal)``: the module,
  forward(x, x, x) on x (B, L, E);
* the exact module, the module's baseline: what a user's model writes for exact attention, a
  fused qkv ``nn.Linear``, ``F.scaled_dot_product_attention(is_causal=causal)`` and an out
  ``nn.Linear`` (``bench_models.ExactAttention``, the block of the model benchmark);
* ``nn.MultiheadAttention(E, H, batch_first=True)`` with need_weights=False and, when causal, a
  boolean causal mask plus is_causal=True (for reference: it materialises the mask and is slower
  than the exact module).

Widths: 12 x 64 (E = 768, GPT-2 small / BERT-base; every length) and, on CUDA, 16 x 128 (E =
2048, LLaMA-like head_dim; fewer lengths). Batch 1, M = 256 random features; bf16 on CUDA, fp32
on CPU. The modules are timed in training mode (dropout 0, so the same math as eval; this keeps
nn.MultiheadAttention off its inference fast path, which materialises an explicit mask).

Modes: fwd = forward under torch.no_grad(); fwd+bwd = forward then torch.autograd.grad w.r.t. q,
k, v (core ops) or x and every parameter (modules) with a random output gradient; fwd graph
(CUDA, L <= 2048) = the forward under torch.no_grad() captured once in a CUDA graph and replayed
(what ``torch.compile(mode="reduce-overhead")`` does; nn.MultiheadAttention is left out).
Median of CUDA-event (CPU: perf_counter) timings after warm-up, the implementations of a row
measured round-robin (one call of each per round). A baseline is skipped at larger lengths once
it ran out of memory or exceeded the time budget (--max-ms) at a smaller one.

Peak extra memory (CUDA, fwd and fwd+bwd rows): the maximum allocated during one call minus what
was allocated before it (inputs, parameters and the output gradient already exist); "op mem /
SDPA" and "module mem / exact" are its ratios.

Floor of the FAVOR+ op (the "% of floor" column = floor / op time):
  FLOPs fwd = B H (8 L M D [+ 2 L C (M + D) when causal, chunk C = 64]): 2 L M D each for the
  query and key feature maps, for phi(K)^T V (the state) and for phi(Q) times the state; causal
  adds the masked in-chunk phi(Q) phi(K)^T and its product with V (the count behind the
  physical limits: 11 us at 4096, 43 us at 16384, 172 us at 65536 on H100 bf16, 12 x 64).
  fwd+bwd = 3x the forward's FLOPs. Bytes: read q, k, v and write out (fwd); fwd+bwd adds reading
  dout and q, k, v again and writing dq, dk, dv. floor = max(FLOPs / peak, bytes / bandwidth).

Targets (CUDA; the GPU is named in each): for 12 x 64, and restated for 16 x 128:
  peak extra memory of causal and non-causal fwd+bwd <= 1.5x SDPA's (op) and the exact module's
  (module) at 8k, 16k and 64k; module causal fwd+bwd >= 1.5x / 2.5x / 10x the exact module at
  8k / 16k / 64k; module fwd+bwd causal and non-causal not slower (>= 0.95x) than the exact module
  at 4k; module forward within 1.2x of the exact module at 1k and 2k, eager and from a CUDA graph.
  Also the op's earlier targets (12 x 64): causal fwd+bwd faster than SDPA from 8k (>= 1.5x at
  16k), the 1k forward against the anchor, op memory linear in L.

Machine-readable results (``--json P``): JSON Lines, one record per (width, L, causal, mode) for
the op (baseline SDPA) and one for the module (baseline the exact module), with the peak extra
memory of both sides, see common.ResultWriter; ``bench/compare.py OLD NEW`` compares two such
files row by row.

Usage: python bench/python/bench_attention.py [--device cpu|cuda] [--quick] [--smoke] [--lengths L,..]
       [--widths 12x64,16x128] [--csv P] [--png P] [--markdown P] [--json P] [--compare REV [--compare-runs N]]
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_models as BM  # noqa: E402
import common as C  # noqa: E402

import panther as pr  # noqa: E402

B, M = 1, 256
CHUNK = 64  # chunk size assumed by the FLOP count
ANCHOR_PANTHER_CAUSAL_1024_FWD_MS = 64.9
GRAPH_MAX_L = 2048  # longest length with "fwd graph" rows
NOT_SLOWER = 0.95

# Widths (heads, head_dim); the targets are stated for the first and restated for the others.
WIDTHS = {"12x64": (12, 64), "16x128": (16, 128)}
TARGET_WIDTH = "12x64"
CUDA_LENGTHS = {"12x64": [1024, 2048, 4096, 8192, 16384, 32768, 65536], "16x128": [1024, 4096, 8192, 16384, 65536]}
QUICK_LENGTHS = {"12x64": [1024, 2048, 4096, 8192, 16384, 65536], "16x128": [4096, 16384]}
CPU_LENGTHS = [1024, 2048, 4096, 8192]
SMOKE = dict(width="2x16", heads=2, head_dim=16, features=16, lengths=[32, 64])

IMPLS = ["mha", "exact", "rmha", "sdpa", "favor"]
NAMES = {"mha": "nn.MultiheadAttention", "exact": "exact module", "rmha": "RandMultiHeadAttention", "sdpa": "SDPA",
         "favor": "favor_attention op"}
GRAPH_IMPLS = ("exact", "rmha", "sdpa", "favor")

# Module targets by length (module causal fwd+bwd speedup over the exact module); the memory
# targets' lengths; the short lengths of the forward-latency target.
CAUSAL_SPEED_GOALS = {8192: 1.5, 16384: 2.5, 65536: 10.0}
MEMORY_LENGTHS = (8192, 16384, 65536)
MEMORY_GOAL = 1.5
EVEN_LENGTH = 4096
SHORT_LENGTHS = (1024, 2048)
SHORT_GOAL = 1.2


def favor_op_available() -> bool:
    return hasattr(torch.ops.panther, "favor_attention")


def kernel_argument(name: str = "softmax"):
    """The op's kernel argument in the type its schema declares (a string today; an int code if not)."""
    try:
        schema = torch.ops.panther.favor_attention.default._schema
        for a in schema.arguments:
            if a.name.startswith("kernel"):
                if str(a.type) == "int":
                    return {"softmax": 0, "relu": 1}[name]
                break
    except (AttributeError, RuntimeError):
        pass
    return name


def floor_ms(L: int, causal: bool, dtype: torch.dtype, hw: C.Hardware, backward: bool, heads: int, hd: int,
             features: int) -> float:
    flop = B * heads * (8.0 * L * features * hd + (2.0 * L * CHUNK * (features + hd) if causal else 0.0))
    es = torch.tensor([], dtype=dtype).element_size()
    tensor = B * heads * L * hd * es
    nbytes = 4 * tensor + features * hd * es  # q, k, v read, out written, projection read
    if backward:
        flop *= 3
        nbytes += 7 * tensor  # dout, q, k, v read again; dq, dk, dv written
    return hw.floor_ms(nbytes, flop, dtype)


class Case:
    """Inputs and callables for one (width, L, causal): each mode for each implementation."""

    def __init__(self, L: int, causal: bool, dtype: torch.dtype, device: torch.device, kernel_arg, heads: int,
                 hd: int, features: int):
        torch.manual_seed(0)
        self.L, self.causal, self.device = L, causal, device
        E = heads * hd
        mk = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
        self.q, self.k, self.v = mk(B, heads, L, hd), mk(B, heads, L, hd), mk(B, heads, L, hd)
        self.g_core = mk(B, heads, L, hd)
        self.x = mk(B, L, E)
        self.g_mod = mk(B, L, E)
        self.kernel_arg = kernel_arg
        self.rmha = None
        proj = None
        if hasattr(pr.nn, "RandMultiHeadAttention"):
            try:
                self.rmha = pr.nn.RandMultiHeadAttention(E, heads, features, kernel_fn="softmax", iscausal=causal,
                                                         device=device, dtype=dtype).train()
                proj = getattr(self.rmha, "projection_matrix", None)
            except Exception as e:  # noqa: BLE001 - reported in the table as an error
                if C.is_oom(e):
                    raise
                print(f"RandMultiHeadAttention(...) failed: {type(e).__name__}: {e}", file=sys.stderr)
        self.proj = proj.detach() if proj is not None else torch.randn(features, hd, device=device).to(dtype)
        self.exact = BM.ExactAttention(E, heads, causal=causal, fused_qkv=True, device=device, dtype=dtype).train()
        self.mha = nn.MultiheadAttention(E, heads, batch_first=True, device=device, dtype=dtype).train()
        self.mask = torch.ones(L, L, dtype=torch.bool, device=device).triu(1) if causal else None

    def _check(self, impl: str) -> None:
        if impl == "rmha" and self.rmha is None:
            raise RuntimeError("RandMultiHeadAttention could not be built")

    def _call(self, impl: str, q, k, v, x) -> Callable[[], torch.Tensor]:
        return {
            "favor": lambda: torch.ops.panther.favor_attention(q, k, v, self.proj, self.kernel_arg, self.causal, None),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=self.causal),
            "rmha": lambda: self.rmha(x, x, x)[0],
            "exact": lambda: self.exact(x),
            "mha": lambda: self.mha(x, x, x, need_weights=False, attn_mask=self.mask, is_causal=self.causal)[0],
        }[impl]

    def fwd(self, impl: str) -> Callable[[], object]:
        self._check(impl)
        f = self._call(impl, self.q, self.k, self.v, self.x)

        def run():
            with torch.no_grad():
                return f()
        return run

    def fwd_graph(self, impl: str) -> Callable[[], object]:
        """The forward captured in a CUDA graph; returns its replay."""
        return BM._graphed(self.fwd(impl), self.device)

    def fwdbwd(self, impl: str) -> Callable[[], object]:
        self._check(impl)
        if impl in ("favor", "sdpa"):
            qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (self.q, self.k, self.v))
            f = self._call(impl, qg, kg, vg, None)
            wrt, g = [qg, kg, vg], self.g_core
        else:
            xg = self.x.detach().clone().requires_grad_(True)
            mod = {"rmha": self.rmha, "exact": self.exact, "mha": self.mha}[impl]
            f = self._call(impl, None, None, None, xg)
            wrt, g = [xg] + [p for p in mod.parameters() if p.requires_grad], self.g_mod

        def run():
            return torch.autograd.grad(f(), wrt, g)
        return run

    def build(self, impl: str, mode: str) -> Callable[[], object]:
        return {"fwd": self.fwd, "fwd+bwd": self.fwdbwd, "fwd graph": self.fwd_graph}[mode](impl)


def _width(spec: str) -> Tuple[int, int]:
    try:
        h, d = (int(t) for t in spec.lower().split("x"))
    except ValueError:
        raise SystemExit(f"bench_attention: --widths entries are HEADSxHEAD_DIM (e.g. 12x64), got {spec!r}")
    return h, d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer lengths and repetitions (CPU: forward only)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds on a CPU): checks that the script runs")
    p.add_argument("--lengths", default=None, help="comma list of sequence lengths (every width)")
    p.add_argument("--widths", default=None,
                   help="comma list of HEADSxHEAD_DIM (default 12x64,16x128 on CUDA, 12x64 on CPU)")
    p.add_argument("--max-ms", type=float, default=None,
                   help="skip a baseline at larger lengths once one call took longer (default 250 CUDA, 30000 CPU)")
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

    if not favor_op_available():
        print("bench_attention: torch.ops.panther.favor_attention is not in this build of Panther "
              "(the attention op has not landed yet); nothing to benchmark.")
        return 0
    has_module = hasattr(pr.nn, "RandMultiHeadAttention")
    if not has_module:
        print("bench_attention: pr.nn.RandMultiHeadAttention is missing; timing the op only.", file=sys.stderr)

    device = C.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    C.disable_tf32()
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    features = SMOKE["features"] if args.smoke else M
    if args.smoke:
        widths = {SMOKE["width"]: (SMOKE["heads"], SMOKE["head_dim"])}
    elif args.widths:
        widths = {w.strip().lower(): _width(w) for w in args.widths.split(",") if w.strip()}
    else:
        widths = dict(WIDTHS) if cuda else {TARGET_WIDTH: WIDTHS[TARGET_WIDTH]}
    if args.lengths:
        given = [int(t) for t in args.lengths.split(",")]
        lengths = {w: given for w in widths}
    elif args.smoke:
        lengths = {w: SMOKE["lengths"] for w in widths}
    elif cuda:
        table_of = QUICK_LENGTHS if args.quick else CUDA_LENGTHS
        lengths = {w: table_of.get(w, table_of[TARGET_WIDTH]) for w in widths}
    else:
        lengths = {w: CPU_LENGTHS for w in widths}
    causals = [False, True] if (cuda or args.smoke) else [True]
    modes = ["fwd"] if (args.quick and not cuda) else ["fwd", "fwd+bwd"]
    if cuda:
        modes.append("fwd graph")
    max_ms = args.max_ms if args.max_ms is not None else (250.0 if cuda else 30000.0)
    if args.smoke:
        tk = dict(warmup=1, reps=3, min_reps=2, budget_s=0.05)
    elif cuda:
        tk = dict(warmup=3, reps=10 if args.quick else 25, min_reps=3, budget_s=0.2 if args.quick else 0.4)
    else:
        tk = dict(warmup=1, reps=5 if args.quick else 10, min_reps=3 if not args.quick else 2, budget_s=2.0 if args.quick else 5.0)
    hw = C.hardware(device, [dtype])
    kernel_arg = kernel_argument("softmax")
    gpu = C.device_name(device).split(" (")[0]

    impls = [i for i in IMPLS if has_module or i not in ("rmha", "exact", "mha")]
    notes = [
        hw.describe(),
        f"B={B}, widths {', '.join(f'{h} heads of {d} (embed {h * d})' for h, d in widths.values())}, "
        f"{features} random features, softmax kernel, {C.dtype_name(dtype)}.",
        "fwd: under torch.no_grad(); fwd+bwd: torch.autograd.grad w.r.t. q, k, v (ops) or x and all parameters "
        "(modules) with a random output gradient"
        + (f"; fwd graph: the forward captured once in a CUDA graph and replayed (L <= {GRAPH_MAX_L})" if cuda else "")
        + ". Median of " + ("CUDA-event" if cuda else "perf_counter")
        + " timings, the implementations of a row measured round-robin.",
        "exact module = fused qkv nn.Linear + F.scaled_dot_product_attention(is_causal) + out nn.Linear (what a "
        "model writes for exact attention); op vs SDPA = SDPA time / op time; module vs exact = exact module time / "
        "RandMultiHeadAttention time.",
        f"op floor = max(FLOPs / peak, bytes / bandwidth), FLOPs fwd = B H (8 L M D + causal 2 L C (M + D)), C = {CHUNK}; "
        "fwd+bwd 3x; bytes fwd = q, k, v read + out written; fwd+bwd adds dout + q, k, v re-read + dq, dk, dv written.",
        "peak extra mem: the maximum allocated during one call minus what was allocated before it (n/a on CPU and "
        "for graph replays); op mem / SDPA and module mem / exact are its ratios. nn.MultiheadAttention causal gets "
        "a bool (L, L) mask and is_causal=True; the modules run in training mode with dropout 0.",
    ]
    head = C.header("FAVOR+ attention vs exact attention", device, notes) + "\n"
    failures = 0
    skipped: Dict[tuple, str] = {}  # (width, impl, causal, mode) -> reason, carried to larger lengths
    rows: List[Dict] = []
    results = C.ResultWriter(args.json, "bench_attention", device)
    table = C.Table(["width", "L", "causal", "mode"] + [f"{NAMES[i]} ms" for i in impls]
                    + ["op vs SDPA", "module vs exact", "op floor ms", "op % of floor", "op mem / SDPA",
                       "module mem / exact", "peak extra mem " + " / ".join(NAMES[i] for i in impls)])
    for wname, (heads, hd) in widths.items():
        for L in lengths[wname]:
            for causal in causals:
                try:
                    case = Case(L, causal, dtype, device, kernel_arg, heads, hd, features)
                except RuntimeError as e:
                    if not C.is_oom(e):
                        raise
                    print(f"{wname} L={L} causal={causal}: inputs do not fit ({e})", file=sys.stderr)
                    C.free_cuda(device)
                    continue
                for mode in modes:
                    if mode == "fwd graph" and L > GRAPH_MAX_L and not args.smoke:
                        continue
                    r = run_row(case, wname, heads, hd, L, causal, mode, impls, skipped, max_ms, device, tk)
                    failures += r.pop("_failures")
                    r["floor"] = floor_ms(L, causal, dtype, hw, mode == "fwd+bwd", heads, hd, features)
                    rows.append(r)
                    add_results(results, r, features, C.dtype_name(dtype), has_module)
                    table.add(table_row(r, impls), raw={k: v for k, v in r.items()})
                    C.write_markdown(args.markdown, head + table.markdown() + C.PARTIAL)
                    print(f"done: {wname} L={L} causal={causal} {mode}", file=sys.stderr, flush=True)
                del case
                gc.collect()
                C.free_cuda(device)

    text = head + table.markdown()
    text += "\n## Targets\n\n" + C.targets_table(targets(rows, cuda, has_module, gpu, lengths))
    C.emit(text, args.markdown)
    if args.csv:
        table.write_csv(args.csv)
    if args.png and rows:
        labels = [f"{r['width']} {r['L']} {'c' if r['causal'] else 'nc'} {r['mode']}" for r in rows]
        C.write_png(args.png, f"Attention ({C.device_name(device)})", labels,
                    {NAMES[i]: [r.get(i) for r in rows] for i in impls})
    return 1 if failures else 0


def run_row(case: Case, wname: str, heads: int, hd: int, L: int, causal: bool, mode: str, impls: Sequence[str],
            skipped: Dict[tuple, str], max_ms: float, device: torch.device, tk: Dict) -> Dict:
    """Times one (width, L, causal, mode) row: one trial call of each implementation (drops what
    fails or runs out of memory), then the survivors round-robin, then each one's peak memory."""
    r: Dict = {"width": wname, "heads": heads, "head_dim": hd, "L": L, "causal": causal, "mode": mode,
               "_failures": 0}
    graph = mode == "fwd graph"

    def failed(impl: str, e: BaseException) -> None:
        r[impl], r[f"mem_{impl}"] = None, None
        if C.is_oom(e):
            r[f"note_{impl}"] = skipped[(wname, impl, causal, mode)] = "OOM"
        else:
            r[f"note_{impl}"] = "error"
            r["_failures"] += 1
            print(f"FAILED {NAMES[impl]} {wname} L={L} causal={causal} {mode}: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
        gc.collect()
        C.free_cuda(device)

    fns: Dict[str, Callable[[], object]] = {}
    for impl in impls:
        key = (wname, impl, causal, mode)
        if graph and impl not in GRAPH_IMPLS:
            r[impl], r[f"mem_{impl}"] = None, None
            continue
        if key in skipped:
            r[impl], r[f"mem_{impl}"] = None, None
            r[f"note_{impl}"] = skipped[key]
            continue
        try:
            fn = case.build(impl, mode)
            fn()
            fns[impl] = fn
        except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
            failed(impl, e)
    timings: Dict[str, C.Timing] = {}
    if fns:
        try:
            timings = C.time_fns(fns, device, **tk)
        except Exception:  # noqa: BLE001 - together they may not fit: one at a time
            gc.collect()
            C.free_cuda(device)
            for impl, fn in fns.items():
                try:
                    timings[impl] = C.time_fn(fn, device, **tk)
                except Exception as e:  # noqa: BLE001
                    failed(impl, e)
    for impl, t in timings.items():
        r[impl] = t.median_ms
        if t.median_ms > max_ms:
            skipped[(wname, impl, causal, mode)] = f"> {max_ms:.0f} ms at shorter L"
        r[f"mem_{impl}"] = None
        if not graph:  # a replay allocates nothing: its memory lives in the graph's pool
            try:
                r[f"mem_{impl}"] = C.peak_memory_bytes(fns[impl], device)
            except Exception:  # noqa: BLE001 - memory is a side number
                C.free_cuda(device)
    r["op_speedup"] = BM.ratio(r.get("sdpa"), r.get("favor"))
    r["module_speedup"] = BM.ratio(r.get("exact"), r.get("rmha"))
    r["op_mem_ratio"] = BM.ratio(r.get("mem_favor"), r.get("mem_sdpa"))
    r["module_mem_ratio"] = BM.ratio(r.get("mem_rmha"), r.get("mem_exact"))
    return r


def add_results(results: C.ResultWriter, r: Dict, features: int, dtype: str, has_module: bool) -> None:
    shape = f"B={B} H={r['heads']} L={r['L']} D={r['head_dim']} M={features}" + (" causal" if r["causal"] else "")
    results.add("favor_attention", shape, dtype, r["mode"], "SDPA", r.get("sdpa"), r.get("favor"),
                note=r.get("note_favor") or r.get("note_sdpa"), baseline_peak_bytes=r.get("mem_sdpa"),
                ours_peak_bytes=r.get("mem_favor"))
    if has_module:
        results.add("RandMultiHeadAttention", f"E={r['heads'] * r['head_dim']} " + shape, dtype, r["mode"],
                    "exact module (fused qkv + SDPA + out)", r.get("exact"), r.get("rmha"),
                    note=r.get("note_rmha") or r.get("note_exact"), baseline_peak_bytes=r.get("mem_exact"),
                    ours_peak_bytes=r.get("mem_rmha"))


def table_row(r: Dict, impls: Sequence[str]) -> List:
    def cell(i):
        return C.fmt_ms(r[i]) if r.get(i) is not None else (r.get(f"note_{i}") or "-")

    def mem_ratio(x):
        return f"{x:.2f}x" if x is not None else "-"

    return ([r["width"], r["L"], "yes" if r["causal"] else "no", r["mode"]] + [cell(i) for i in impls]
            + [C.fmt_ratio(r["op_speedup"]), C.fmt_ratio(r["module_speedup"]), C.fmt_ms(r["floor"]),
               C.fmt_pct(100 * r["floor"] / r["favor"]) if r.get("favor") else "-",
               mem_ratio(r["op_mem_ratio"]), mem_ratio(r["module_mem_ratio"]),
               " / ".join(C.fmt_bytes(r.get(f"mem_{i}")) for i in impls)])


def targets(rows: List[Dict], cuda: bool, has_module: bool, gpu: str = "",
            lengths: Optional[Dict[str, List[int]]] = None) -> List[tuple]:
    """(target, measured, verdict) rows; a target whose length ran but whose numbers are missing
    (an implementation failed or ran out of memory) is listed as not measured."""
    out: List[tuple] = []
    lengths = lengths or {}

    def get(width, L, causal, mode) -> Optional[Dict]:
        for r in rows:
            if r["width"] == width and r["L"] == L and r["causal"] == causal and r["mode"] == mode:
                return r
        return None

    if not cuda:
        for mode in ("fwd", "fwd+bwd"):
            a, b = get(TARGET_WIDTH, 1024, True, mode), get(TARGET_WIDTH, 8192, True, mode)
            if not (a and b):
                continue
            for impl in ("rmha", "favor"):
                if a.get(impl) and b.get(impl):
                    g = b[impl] / a[impl]
                    out.append((f"CPU causal {mode}: {NAMES[impl]} time 1k -> 8k grows <= 12x", f"{g:.1f}x", g <= 12))
            if b.get("rmha") and b.get("mha"):
                s = b["mha"] / b["rmha"]
                out.append((f"CPU causal {mode} L=8192: RandMultiHeadAttention beats nn.MultiheadAttention (causal mask)",
                            C.fmt_ratio(s), s > 1))
        return out

    def judge(label: str, value: Optional[float], ok: Callable[[float], bool], fmt=C.fmt_ratio) -> None:
        out.append((label, fmt(value) if value is not None else "not measured",
                    None if value is None else ok(value)))

    def mem_fmt(x: float) -> str:
        return f"{x:.2f}x"

    for width in lengths:
        ran = set(lengths[width])
        tag = f"{width}" + ("" if width == TARGET_WIDTH else ", restated") + f" [{gpu}]"
        for L in MEMORY_LENGTHS:
            if L not in ran:
                continue
            for causal in (True, False):
                r = get(width, L, causal, "fwd+bwd") or {}
                what = f"{'causal' if causal else 'non-causal'} fwd+bwd L={L}"
                judge(f"{tag} {what}: op peak extra memory <= {MEMORY_GOAL}x SDPA's", r.get("op_mem_ratio"),
                      lambda x: x <= MEMORY_GOAL, mem_fmt)
                if has_module:
                    judge(f"{tag} {what}: module peak extra memory <= {MEMORY_GOAL}x the exact module's",
                          r.get("module_mem_ratio"), lambda x: x <= MEMORY_GOAL, mem_fmt)
        if not has_module:
            continue
        for L, goal in CAUSAL_SPEED_GOALS.items():
            if L in ran:
                r = get(width, L, True, "fwd+bwd") or {}
                judge(f"{tag} causal fwd+bwd L={L}: module >= {goal:g}x the exact module", r.get("module_speedup"),
                      lambda x, g=goal: x >= g)
        if EVEN_LENGTH in ran:
            for causal in (True, False):
                r = get(width, EVEN_LENGTH, causal, "fwd+bwd") or {}
                judge(f"{tag} {'causal' if causal else 'non-causal'} fwd+bwd L={EVEN_LENGTH}: module not slower than "
                      f"the exact module (>= {NOT_SLOWER}x)", r.get("module_speedup"), lambda x: x >= NOT_SLOWER)
        for L in SHORT_LENGTHS:
            if L not in ran:
                continue
            for causal in (True, False):
                for mode, how in (("fwd", "eager"), ("fwd graph", "CUDA graph")):
                    r = get(width, L, causal, mode) or {}
                    judge(f"{tag} {'causal' if causal else 'non-causal'} fwd L={L}, {how}: module within "
                          f"{SHORT_GOAL}x of the exact module (>= {1 / SHORT_GOAL:.2f}x)", r.get("module_speedup"),
                          lambda x: x >= 1 / SHORT_GOAL)

    # The op's earlier targets (the first width only).
    for r in rows:
        if r["width"] == TARGET_WIDTH and r["causal"] and r["mode"] == "fwd+bwd" and r["L"] >= 8192:
            need = 1.5 if r["L"] == 16384 else 1.0
            label = ">= 1.5x faster than SDPA" if need > 1 else "faster than SDPA"
            s = r.get("op_speedup")
            judge(f"{TARGET_WIDTH} [{gpu}] causal fwd+bwd L={r['L']}: op {label}", s,
                  (lambda x: x >= need) if need > 1 else (lambda x: x > 1))
    r = get(TARGET_WIDTH, 1024, True, "fwd")
    if r:
        limit = ANCHOR_PANTHER_CAUSAL_1024_FWD_MS / 300
        for impl in ("rmha", "favor"):
            if r.get(impl):
                out.append((f"{TARGET_WIDTH} [{gpu}] causal fwd L=1024: {NAMES[impl]} >= 300x faster than anchor "
                            f"Panther's 64.9 ms (<= {limit * 1e3:.0f} us)",
                            f"{C.fmt_ms(r[impl])} ms = {ANCHOR_PANTHER_CAUSAL_1024_FWD_MS / r[impl]:.0f}x",
                            r[impl] <= limit))
    # peak memory linear in length: op fwd+bwd memory grows no faster than 1.25x the length ratio
    mem = [(r["L"], r.get("mem_favor")) for r in rows
           if r["width"] == TARGET_WIDTH and r["causal"] and r["mode"] == "fwd+bwd" and r.get("mem_favor")]
    if len(mem) >= 2:
        (l0, m0), (l1, m1) = mem[0], mem[-1]
        out.append((f"{TARGET_WIDTH} [{gpu}] causal fwd+bwd peak memory of the op linear in L ({l0} -> {l1}: "
                    f"<= 1.25 x {l1 // l0})", f"{m1 / m0:.1f}x", m1 / m0 <= 1.25 * l1 / l0))
    return out


if __name__ == "__main__":
    sys.exit(main())
