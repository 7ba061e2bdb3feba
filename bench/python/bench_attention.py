#!/usr/bin/env python3
"""FAVOR+ attention (the op and pr.nn.RandMultiHeadAttention) vs exact attention, side by side.

Compared, per sequence length L, causal or not, forward and forward+backward:

* ``torch.ops.panther.favor_attention(q, k, v, projection, "softmax", causal, None)``: the core op
  on per-head q, k, v (B, H, L, D) and a projection (M, D);
* ``F.scaled_dot_product_attention(q, k, v, is_causal=causal)``: exact attention, same shapes
  (PyTorch picks its fastest backend: flash / memory-efficient / math);
* ``pr.nn.RandMultiHeadAttention(E, H, M, kernel_fn="softmax", iscausal=causal)``: the module,
  forward(x, x, x) on x (B, L, E);
* ``nn.MultiheadAttention(E, H, batch_first=True)`` with need_weights=False and, when causal, a
  boolean causal mask plus is_causal=True (what a user of nn.MultiheadAttention writes).

Batch 1, 12 heads of 64 (E = 768), M = 256 random features; bf16 on CUDA, fp32 on CPU. Both
modules are timed in training mode (dropout 0, so the same math as eval; this keeps
nn.MultiheadAttention off its inference fast path, which materialises an explicit mask).

What is timed: fwd = forward under torch.no_grad(); fwd+bwd = forward then torch.autograd.grad
w.r.t. q, k, v (core ops) or x and every parameter (modules) with a random output gradient.
Median of CUDA-event (CPU: perf_counter) timings after warm-up, the implementations of one row
measured round-robin (one call of each per round). A baseline is skipped at larger
lengths once it ran out of memory or exceeded the time budget (--max-ms) at a smaller one.

Floor of the FAVOR+ op (the "% of floor" column = floor / op time):
  FLOPs fwd = B H (8 L M D [+ 2 L C (M + D) when causal, chunk C = 64]): 2 L M D each for the
  query and key feature maps, for phi(K)^T V (the state) and for phi(Q) times the state; causal
  adds the masked in-chunk phi(Q) phi(K)^T and its product with V (the count behind the
  physical limits: 11 us at 4096, 43 us at 16384, 172 us at 65536 on H100 bf16).
  fwd+bwd = 3x the forward's FLOPs. Bytes: read q, k, v and write out (fwd); fwd+bwd adds reading
  dout and q, k, v again and writing dq, dk, dv. floor = max(FLOPs / peak, bytes / bandwidth).

Machine-readable results (``--json P``): JSON Lines, one record per (L, causal, mode) for the op
(baseline SDPA) and one for the module (baseline nn.MultiheadAttention), see common.ResultWriter;
``bench/compare.py OLD NEW`` compares two such files row by row.

Usage: python bench/python/bench_attention.py [--device cpu|cuda] [--quick] [--csv P] [--png P] [--markdown P] [--json P]
       [--compare REV [--compare-runs N]]
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import panther as pr  # noqa: E402

B, H, D, M = 1, 12, 64, 256
E = H * D
CHUNK = 64  # chunk size assumed by the FLOP count
ANCHOR_PANTHER_CAUSAL_1024_FWD_MS = 64.9

IMPLS = ["mha", "rmha", "sdpa", "favor"]
NAMES = {"mha": "nn.MultiheadAttention", "rmha": "RandMultiHeadAttention", "sdpa": "SDPA", "favor": "favor_attention op"}


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


def floor_ms(L: int, causal: bool, dtype: torch.dtype, hw: C.Hardware, backward: bool) -> float:
    flop = B * H * (8.0 * L * M * D + (2.0 * L * CHUNK * (M + D) if causal else 0.0))
    es = torch.tensor([], dtype=dtype).element_size()
    tensor = B * H * L * D * es
    nbytes = 4 * tensor + M * D * es  # q, k, v read, out written, projection read
    if backward:
        flop *= 3
        nbytes += 7 * tensor  # dout, q, k, v read again; dq, dk, dv written
    return hw.floor_ms(nbytes, flop, dtype)


class Case:
    """Inputs and callables for one (L, causal): fwd and fwd+bwd for each implementation."""

    def __init__(self, L: int, causal: bool, dtype: torch.dtype, device: torch.device, kernel_arg):
        torch.manual_seed(0)
        self.L, self.causal = L, causal
        mk = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
        self.q, self.k, self.v = mk(B, H, L, D), mk(B, H, L, D), mk(B, H, L, D)
        self.g_core = mk(B, H, L, D)
        self.x = mk(B, L, E)
        self.g_mod = mk(B, L, E)
        self.kernel_arg = kernel_arg
        self.rmha = None
        proj = None
        if hasattr(pr.nn, "RandMultiHeadAttention"):
            try:
                self.rmha = pr.nn.RandMultiHeadAttention(E, H, M, kernel_fn="softmax", iscausal=causal,
                                                         device=device, dtype=dtype).train()
                proj = getattr(self.rmha, "projection_matrix", None)
            except Exception as e:  # noqa: BLE001 - reported in the table as an error
                if C.is_oom(e):
                    raise
                print(f"RandMultiHeadAttention(...) failed: {type(e).__name__}: {e}", file=sys.stderr)
        self.proj = proj.detach() if proj is not None else torch.randn(M, D, device=device).to(dtype)
        self.mha = nn.MultiheadAttention(E, H, batch_first=True, device=device, dtype=dtype).train()
        self.mask = torch.ones(L, L, dtype=torch.bool, device=device).triu(1) if causal else None

    # ---- forward callables
    def _check(self, impl: str) -> None:
        if impl == "rmha" and self.rmha is None:
            raise RuntimeError("RandMultiHeadAttention could not be built")

    def fwd(self, impl: str) -> Callable[[], object]:
        self._check(impl)
        q, k, v, x = self.q, self.k, self.v, self.x
        f = {
            "favor": lambda: torch.ops.panther.favor_attention(q, k, v, self.proj, self.kernel_arg, self.causal, None),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=self.causal),
            "rmha": lambda: self.rmha(x, x, x)[0],
            "mha": lambda: self.mha(x, x, x, need_weights=False, attn_mask=self.mask, is_causal=self.causal)[0],
        }[impl]

        def run():
            with torch.no_grad():
                return f()
        return run

    def fwdbwd(self, impl: str) -> Callable[[], object]:
        self._check(impl)
        if impl in ("favor", "sdpa"):
            qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (self.q, self.k, self.v))
            if impl == "favor":
                f = lambda: torch.ops.panther.favor_attention(qg, kg, vg, self.proj, self.kernel_arg, self.causal, None)  # noqa: E731
            else:
                f = lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=self.causal)  # noqa: E731
            wrt, g = [qg, kg, vg], self.g_core
        else:
            xg = self.x.detach().clone().requires_grad_(True)
            mod = self.rmha if impl == "rmha" else self.mha
            if impl == "rmha":
                f = lambda: mod(xg, xg, xg)[0]  # noqa: E731
            else:
                f = lambda: mod(xg, xg, xg, need_weights=False, attn_mask=self.mask, is_causal=self.causal)[0]  # noqa: E731
            wrt, g = [xg] + [p for p in mod.parameters() if p.requires_grad], self.g_mod

        def run():
            return torch.autograd.grad(f(), wrt, g)
        return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer lengths and repetitions (CPU: forward only)")
    p.add_argument("--lengths", default=None, help="comma list of sequence lengths")
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
    if args.lengths:
        lengths = [int(s) for s in args.lengths.split(",")]
    elif cuda:
        lengths = [1024, 4096, 8192, 16384, 65536] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    else:
        lengths = [1024, 2048, 4096, 8192]
    causals = [False, True] if cuda else [True]
    modes = ["fwd"] if (args.quick and not cuda) else ["fwd", "fwd+bwd"]
    max_ms = args.max_ms if args.max_ms is not None else (250.0 if cuda else 30000.0)
    if cuda:
        tk = dict(warmup=3, reps=10 if args.quick else 25, min_reps=3, budget_s=0.2 if args.quick else 0.4)
    else:
        tk = dict(warmup=1, reps=5 if args.quick else 10, min_reps=3 if not args.quick else 2, budget_s=2.0 if args.quick else 5.0)
    hw = C.hardware(device, [dtype])
    kernel_arg = kernel_argument("softmax")

    impls = [i for i in IMPLS if has_module or i != "rmha"]
    notes = [
        hw.describe(),
        f"B={B}, {H} heads of {D} (embed {E}), {M} random features, softmax kernel, {C.dtype_name(dtype)}.",
        "fwd: under torch.no_grad(); fwd+bwd: torch.autograd.grad w.r.t. q, k, v (ops) or x and all parameters "
        "(modules) with a random output gradient. Median of " + ("CUDA-event" if cuda else "perf_counter")
        + " timings, the implementations of a row measured round-robin.",
        "op vs SDPA = SDPA time / op time; module vs MHA = nn.MultiheadAttention time / RandMultiHeadAttention time.",
        f"op floor = max(FLOPs / peak, bytes / bandwidth), FLOPs fwd = B H (8 L M D + causal 2 L C (M + D)), C = {CHUNK}; "
        "fwd+bwd 3x; bytes fwd = q, k, v read + out written; fwd+bwd adds dout + q, k, v re-read + dq, dk, dv written.",
        "peak mem: extra CUDA memory of one call (n/a on CPU). nn.MultiheadAttention causal gets a bool (L, L) mask "
        "and is_causal=True; both modules in training mode with dropout 0.",
    ]
    head = C.header("FAVOR+ attention vs exact attention", device, notes) + "\n"
    failures = 0
    skipped: Dict[tuple, str] = {}  # (impl, causal, mode) -> reason, carried to larger lengths
    rows: List[Dict] = []
    results = C.ResultWriter(args.json, "bench_attention", device)
    table = C.Table(["L", "causal", "mode"] + [f"{NAMES[i]} ms" for i in impls]
                    + ["op vs SDPA", "module vs MHA", "op floor ms", "op % of floor",
                       "peak mem " + " / ".join(NAMES[i] for i in impls)])
    for L in lengths:
        for causal in causals:
            try:
                case = Case(L, causal, dtype, device, kernel_arg)
            except RuntimeError as e:
                if not C.is_oom(e):
                    raise
                print(f"L={L} causal={causal}: inputs do not fit ({e})", file=sys.stderr)
                C.free_cuda(device)
                continue
            for mode in modes:
                r: Dict = {"L": L, "causal": causal, "mode": mode}

                def failed(impl: str, e: BaseException) -> None:
                    nonlocal failures
                    r[impl], r[f"mem_{impl}"] = None, None
                    if C.is_oom(e):
                        r[f"note_{impl}"] = skipped[(impl, causal, mode)] = "OOM"
                    else:
                        r[f"note_{impl}"] = "error"
                        failures += 1
                        print(f"FAILED {NAMES[impl]} L={L} causal={causal} {mode}: {type(e).__name__}: {e}",
                              file=sys.stderr, flush=True)
                    gc.collect()
                    C.free_cuda(device)

                # One trial call each (drops what fails or runs out of memory), then the survivors
                # are timed round-robin so they see the same machine state.
                fns: Dict[str, Callable[[], object]] = {}
                for impl in impls:
                    key = (impl, causal, mode)
                    if key in skipped:
                        r[impl], r[f"mem_{impl}"] = None, None
                        r[f"note_{impl}"] = skipped[key]
                        continue
                    try:
                        fn = case.fwd(impl) if mode == "fwd" else case.fwdbwd(impl)
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
                        skipped[(impl, causal, mode)] = f"> {max_ms:.0f} ms at shorter L"
                    try:
                        r[f"mem_{impl}"] = C.peak_memory_bytes(fns[impl], device)
                    except Exception:  # noqa: BLE001 - memory is a side number
                        r[f"mem_{impl}"] = None
                        C.free_cuda(device)
                del fns
                gc.collect()
                r["floor"] = floor_ms(L, causal, dtype, hw, backward=(mode == "fwd+bwd"))
                rows.append(r)
                shape = f"B={B} H={H} L={L} D={D} M={M}" + (" causal" if causal else "")
                results.add("favor_attention", shape, C.dtype_name(dtype), mode, "SDPA", r.get("sdpa"), r.get("favor"),
                            note=r.get("note_favor") or r.get("note_sdpa"))
                if has_module:
                    results.add("RandMultiHeadAttention", f"E={E} " + shape, C.dtype_name(dtype), mode,
                                "nn.MultiheadAttention", r.get("mha"), r.get("rmha"),
                                note=r.get("note_rmha") or r.get("note_mha"))

                def cell(i):
                    return C.fmt_ms(r[i]) if r.get(i) is not None else (r.get(f"note_{i}") or "-")

                def ratio(a, b):
                    return C.fmt_ratio(r[a] / r[b]) if r.get(a) and r.get(b) else "-"

                table.add([L, "yes" if causal else "no", mode] + [cell(i) for i in impls]
                          + [ratio("sdpa", "favor"), ratio("mha", "rmha") if has_module else "-",
                             C.fmt_ms(r["floor"]),
                             C.fmt_pct(100 * r["floor"] / r["favor"]) if r.get("favor") else "-",
                             " / ".join(C.fmt_bytes(r.get(f"mem_{i}")) for i in impls)],
                          raw={k: v for k, v in r.items()})
                C.write_markdown(args.markdown, head + table.markdown() + C.PARTIAL)
                print(f"done: L={L} causal={causal} {mode}", file=sys.stderr, flush=True)
            del case
            gc.collect()
            C.free_cuda(device)

    text = head + table.markdown()
    text += "\n## Targets\n\n" + C.targets_table(targets(rows, cuda, has_module))
    C.emit(text, args.markdown)
    if args.csv:
        table.write_csv(args.csv)
    if args.png and rows:
        labels = [f"{r['L']} {'c' if r['causal'] else 'nc'} {r['mode']}" for r in rows]
        C.write_png(args.png, f"Attention ({C.device_name(device)})", labels,
                    {NAMES[i]: [r.get(i) for r in rows] for i in impls})
    return 1 if failures else 0


def targets(rows: List[Dict], cuda: bool, has_module: bool) -> List[tuple]:
    out: List[tuple] = []

    def get(L, causal, mode) -> Optional[Dict]:
        for r in rows:
            if r["L"] == L and r["causal"] == causal and r["mode"] == mode:
                return r
        return None

    if cuda:
        for r in rows:
            if r["causal"] and r["mode"] == "fwd+bwd" and r["L"] >= 8192:
                need = 1.5 if r["L"] == 16384 else 1.0
                label = ">= 1.5x faster than SDPA" if need > 1 else "faster than SDPA"
                if r.get("favor") and r.get("sdpa"):
                    s = r["sdpa"] / r["favor"]
                    out.append((f"causal fwd+bwd L={r['L']}: op {label}", C.fmt_ratio(s), s >= need if need > 1 else s > 1))
                else:
                    out.append((f"causal fwd+bwd L={r['L']}: op {label}", "not measured", None))
        r = get(1024, True, "fwd")
        if r:
            limit = ANCHOR_PANTHER_CAUSAL_1024_FWD_MS / 300
            for impl in ("rmha", "favor"):
                if r.get(impl):
                    out.append((f"causal fwd L=1024: {NAMES[impl]} >= 300x faster than anchor Panther's 64.9 ms (<= {limit * 1e3:.0f} us)",
                                f"{C.fmt_ms(r[impl])} ms = {ANCHOR_PANTHER_CAUSAL_1024_FWD_MS / r[impl]:.0f}x", r[impl] <= limit))
        # peak memory linear in length: op fwd+bwd memory grows no faster than 1.25x the length ratio
        mem = [(r["L"], r.get("mem_favor")) for r in rows if r["causal"] and r["mode"] == "fwd+bwd" and r.get("mem_favor")]
        if len(mem) >= 2:
            (l0, m0), (l1, m1) = mem[0], mem[-1]
            out.append((f"causal fwd+bwd peak memory of the op linear in L ({l0} -> {l1}: <= 1.25 x {l1 // l0})",
                        f"{m1 / m0:.1f}x", m1 / m0 <= 1.25 * l1 / l0))
    else:
        for mode in ("fwd", "fwd+bwd"):
            a, b = get(1024, True, mode), get(8192, True, mode)
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


if __name__ == "__main__":
    sys.exit(main())
