"""Convert a trained MLP to sketched layers in one call, at half its stored numbers, and keep its accuracy.

1. Trains a 64-256-256-10 MLP on scikit-learn's digits (shipped with scikit-learn, no download).
2. Converts both hidden layers with ``panther.convert`` at one rank chosen so that all Linear
   layers together (the 10-way head stays dense) store at most 50% of the dense model's numbers,
   counted as ``2Lk(d_in + d_out) + bias`` per sketched layer (factors and basis buffers):
   with the SVD init, the activation-aware SVD init (calibrated on training inputs) and the
   unbiased random ``"sketch"`` init.
3. Distils each converted model from the dense teacher for at most 2 epochs.
4. Prints a table (accuracy before/after, drop in points) and saves a plot (default
   out/convert_and_distill.png).

Options: --fast (fewer teacher epochs, for tests), --epochs N (teacher), --distill-epochs N (<= 2),
--budget F (default 0.5), --out PATH. CPU only; takes a few seconds.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import panther

REPO = Path(__file__).resolve().parent.parent


def load_digits(seed: int = 0):
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    X, y = _load(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    idx_tr, idx_te = train_test_split(torch.arange(len(y)).numpy(), test_size=0.25, random_state=seed,
                                      stratify=y.numpy())
    return X[idx_tr], y[idx_tr], X[idx_te], y[idx_te]


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


@torch.no_grad()
def accuracy(model: nn.Module, X, y) -> float:
    model.eval()
    return 100.0 * float((model(X).argmax(1) == y).float().mean())


def train(model, X, y, epochs, lr=2e-3, batch=128, teacher=None, T=4.0):
    """Cross-entropy training; with a teacher, distillation (KL on softened logits + CE)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            logits = model(X[idx])
            loss = F.cross_entropy(logits, y[idx])
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(X[idx])
                kd = F.kl_div(F.log_softmax(logits / T, 1), F.log_softmax(t / T, 1), log_target=True,
                              reduction="batchmean") * T * T
                loss = 0.5 * loss + 0.5 * kd
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


def dense_numbers(model: nn.Module) -> int:
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
               for m in model.modules() if isinstance(m, nn.Linear))


def pick_rank(budget: float, num_terms: int = 1) -> int:
    """Largest low_rank k for both hidden layers with all Linear layers at <= budget of dense."""
    dense = (64 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    k = 1
    while True:
        nxt = k + 1
        stored = 2 * num_terms * nxt * ((64 + 256) + (256 + 256)) + 256 + 256 + (256 * 10 + 10)
        if stored > budget * dense:
            return k
        k = nxt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fast", action="store_true", help="fewer teacher epochs (for tests)")
    ap.add_argument("--epochs", type=int, default=None, help="teacher epochs (default 40, --fast 10)")
    ap.add_argument("--distill-epochs", type=int, default=2, help="distillation epochs (<= 2)")
    ap.add_argument("--budget", type=float, default=0.5, help="stored numbers, fraction of dense")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "convert_and_distill.png")
    args = ap.parse_args(argv)
    epochs = args.epochs or (10 if args.fast else 40)
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.perf_counter()
    Xtr, ytr, Xte, yte = load_digits()
    teacher = train(mlp(), Xtr, ytr, epochs)
    acc_dense = accuracy(teacher, Xte, yte)
    k = pick_rank(args.budget)
    cfg = {"0": panther.SketchConfig(low_rank=k), "2": panther.SketchConfig(low_rank=k), "4": None}
    calib = [Xtr[i:i + 256] for i in range(0, len(Xtr), 256)]
    students = {
        "svd": panther.convert(teacher, cfg),
        "svd + calibration": panther.convert(teacher, cfg, calibration=calib),
        "sketch (unbiased random)": panther.convert(teacher, cfg, init="sketch"),
    }
    stored = sum(r["after"] for r in panther.conversion_report(students["svd"])) + (256 * 10 + 10)
    ratio = stored / dense_numbers(teacher)
    print(f"dense MLP 64-256-256-10 trained {epochs} epochs: test accuracy {acc_dense:.2f}%")
    print(f"hidden layers -> SKLinear(num_terms=1, low_rank={k}) (rank {2 * k}); all Linear layers "
          f"store {stored:,} of {dense_numbers(teacher):,} numbers = {ratio:.1%} (budget {args.budget:.0%})")
    print(panther.conversion_report(students["svd"], as_text=True))
    rows = []
    curves = {}
    for name, student in students.items():
        before = accuracy(student, Xte, yte)
        curve = [before]
        s = student
        for _ in range(min(args.distill_epochs, 2)):
            s = train(s, Xtr, ytr, 1, teacher=teacher)
            curve.append(accuracy(s, Xte, yte))
        rows.append((name, before, curve[-1]))
        curves[name] = curve
    print()
    head = f"{'init':<26} {'acc before':>10} {'drop':>7} {'after distill':>14} {'drop':>7}"
    print(head)
    print("-" * len(head))
    print(f"{'dense teacher':<26} {acc_dense:>9.2f}% {'':>7} {'':>14} {'':>7}")
    for name, before, after in rows:
        print(f"{name:<26} {before:>9.2f}% {acc_dense - before:>6.2f}p {after:>13.2f}% {acc_dense - after:>6.2f}p")
    print(f"(distillation: {min(args.distill_epochs, 2)} epochs; total time {time.perf_counter() - t0:.1f} s)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib not installed: no plot")
        return rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, curve in curves.items():
        ax.plot(range(len(curve)), curve, marker="o", label=name)
    ax.axhline(acc_dense, color="k", ls="--", lw=1, label="dense teacher")
    ax.set_xlabel("distillation epochs")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"digits MLP at {ratio:.0%} of its stored numbers (rank {2 * k})")
    ax.set_xticks(range(len(next(iter(curves.values())))))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"Plot written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
