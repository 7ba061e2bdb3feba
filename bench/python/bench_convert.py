"""Conversion speed: panther.convert on a BERT-base-sized encoder's 72 Linear weights.

12 layers x (4 x 768x768 attention projections + 768->3072 + 3072->768), every Linear converted to
SKLinear(num_terms=1, low_rank=64) (rank 128) with the SVD init; the deep copy is included,
calibration is not. Rows:

  deepcopy only      the floor: copying the model (part of every conversion)
  svd="exact"        exact SVD (torch.linalg.svd) of every weight
  svd="auto"         the default: a randomized range finder (2r probes, 4 power iterations) where
                     the rank is at most a quarter of the layer's (all 72 weights here), exact otherwise
  init="empty"       a skeleton for load_state_dict (no SVD work)

For each SVD row, the weight error of every layer is compared with the Eckart-Young optimum (the
exact tail of singular values), on two kinds of weights: nn.Linear's random init (flat spectrum)
and a power-law spectrum (s_j ~ j^-0.5, as in trained layers). Targets: <= 20 s on a 2-core CPU,
<= 2 s on the GPU; weight error <= 1.01x optimal.

  .venv/bin/python bench/python/bench_convert.py --device cpu [--quick] [--markdown PATH]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import panther  # noqa: E402


class Layer(nn.Module):
    def __init__(self, d=768, ff=3072):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)


def encoder(layers: int, spectrum: str, device) -> nn.Module:
    m = nn.Sequential(*[Layer() for _ in range(layers)]).to(device)
    if spectrum == "powerlaw":
        with torch.no_grad():
            for lin in m.modules():
                if isinstance(lin, nn.Linear):
                    o, i = lin.weight.shape
                    r = min(o, i)
                    U = torch.linalg.qr(torch.randn(o, r, device=device)).Q
                    V = torch.linalg.qr(torch.randn(i, r, device=device)).Q
                    s = torch.arange(1, r + 1, device=device, dtype=torch.float32) ** -0.5
                    lin.weight.copy_((U * s) @ V.T)
    return m


def optimal_errors(model: nn.Module, rank: int) -> dict:
    out = {}
    for name, lin in model.named_modules():
        if isinstance(lin, nn.Linear):
            s = torch.linalg.svdvals(lin.weight.detach().double())
            out[name] = float(s[rank:].norm() / s.norm())
    return out


def timed(fn, device, reps):
    times = []
    result = None
    for _ in range(reps):
        common.synchronize(device)
        t0 = time.perf_counter()
        result = fn()
        common.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="one repetition, 4 layers for the error check")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--reps", type=int, default=None, help="repetitions per row (default 3, --quick 1)")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    device = common.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    common.disable_tf32()
    torch.manual_seed(0)
    reps = args.reps or (1 if args.quick else 3)
    target = 2.0 if device.type == "cuda" else 20.0
    cfg = panther.SketchConfig(num_terms=1, low_rank=64)
    rank = 128
    lines = [common.header("panther.convert: BERT-base-sized encoder, 72 Linear -> SKLinear(L=1, k=64)", device,
                           [f"layers={args.layers}, torch threads={torch.get_num_threads()}, "
                            f"median of {reps}; deep copy included, calibration excluded"])]
    lines.append("| weights | conversion | time (s) | x target | max err / optimal | mean err / optimal | target |")
    lines.append("|---|---|---:|---:|---:|---:|---|")
    print("\n".join(lines), flush=True)
    for spectrum in ("random init", "powerlaw"):
        model = encoder(args.layers, "powerlaw" if spectrum == "powerlaw" else "init", device)
        n_lin = sum(isinstance(m, nn.Linear) for m in model.modules())
        check_layers = 4 if args.quick else args.layers
        opt = optimal_errors(model[:check_layers], rank)
        rows = [
            ("deepcopy only", lambda: copy.deepcopy(model)),
            ('svd="exact"', lambda: panther.convert(model, panther.SketchConfig(num_terms=1, low_rank=64,
                                                                                svd="exact"))),
            ('svd="auto" (default)', lambda: panther.convert(model, cfg)),
            ('init="empty"', lambda: panther.convert(model, cfg, init="empty")),
        ]
        for label, fn in rows:
            t, res = timed(fn, device, reps)
            ratios = []
            methods = set()
            if isinstance(res, nn.Module) and label.startswith("svd"):
                for r in panther.conversion_report(res):
                    if r["name"].split(".")[0].isdigit() and int(r["name"].split(".")[0]) < check_layers:
                        ratios.append(r["weight_error"] / opt[r["name"]])
                        methods.add(r["svd"])
            mx = f"{max(ratios):.5f}" if ratios else "-"
            mean = f"{sum(ratios) / len(ratios):.5f}" if ratios else "-"
            ok = "PASS" if t <= target and (not ratios or max(ratios) <= 1.01) else "MISS"
            meth = f" [{'/'.join(sorted(methods))}]" if methods else ""
            lines.append(f"| {spectrum} ({n_lin} Linear) | {label}{meth} | {t:.2f} | {t / target:.2f} | {mx} | "
                         f"{mean} | <= {target:g} s{', <= 1.01x' if ratios else ''}: {ok} |")
            print(lines[-1], flush=True)
        del model
    common.write_markdown(args.markdown, "\n".join(lines))


if __name__ == "__main__":
    main()
