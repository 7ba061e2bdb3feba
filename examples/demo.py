"""Panther demo (`make demo`): a standard MLP against a sketched MLP, and SKLinear against nn.Linear.

1. The tutorials' comparison: StandardMLP and SketchedMLP (784 -> [512, 256, 128] -> 10, sketched
   with num_terms_schedule=[3, 3, 2], low_rank_schedule=[32, 16, 8]) trained with Adam on the
   tutorials' synthetic data set (5000 samples around 10 random class centres, 80/20 split,
   batch 64). Prints parameter counts, per-epoch training loss, test accuracy and training time.
2. A speed table of one SKLinear(4096, 4096, num_terms=1, low_rank=16) against nn.Linear(4096, 4096)
   on 2048 tokens in fp32: forward and forward+backward, median milliseconds and speed-up.
3. A PNG with the loss curves and the speed bars (default out/demo.png).

Runs on CUDA when available, on the CPU otherwise. Options: --epochs N, --out PATH, --fast (or
PANTHER_EXAMPLE_FAST=1: 320 samples, 2 epochs, a small speed table; used by the tests).
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.optim as optim  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import panther as pr  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ---- models and data set as in the tutorials (shared/seeds/000_*.txt) ---------------------------
class StandardMLP(nn.Module):
    def __init__(self, input_dim, hidden_dims, output_dim, dropout=0.1):
        super().__init__()
        layers = []
        current_dim = input_dim
        for hidden_dim in hidden_dims:
            layers.extend([nn.Linear(current_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout)])
            current_dim = hidden_dim
        layers.append(nn.Linear(current_dim, output_dim))
        self.network = nn.Sequential(*layers)

    def forward(self, x):
        return self.network(x)


class SketchedMLP(nn.Module):
    def __init__(self, input_dim, hidden_dims, output_dim, num_terms_schedule, low_rank_schedule, dropout=0.1):
        super().__init__()
        layers = []
        current_dim = input_dim
        for i, hidden_dim in enumerate(hidden_dims):
            layers.extend([
                pr.nn.SKLinear(current_dim, hidden_dim, num_terms=num_terms_schedule[i],
                               low_rank=low_rank_schedule[i]),
                nn.ReLU(),
                nn.Dropout(dropout),
            ])
            current_dim = hidden_dim
        layers.append(pr.nn.SKLinear(current_dim, output_dim, num_terms=num_terms_schedule[-1],
                                     low_rank=low_rank_schedule[-1]))
        self.network = nn.Sequential(*layers)

    def forward(self, x):
        return self.network(x)


def create_synthetic_dataset(n_samples=10000, input_dim=784, n_classes=10):
    """Samples around random class centres (noise 0.5), shuffled."""
    class_centers = torch.randn(n_classes, input_dim)
    per_class = n_samples // n_classes
    X = torch.cat([class_centers[c] + 0.5 * torch.randn(per_class, input_dim) for c in range(n_classes)])
    y = torch.cat([torch.full((per_class,), c) for c in range(n_classes)])
    perm = torch.randperm(len(X))
    return X[perm], y[perm]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_and_evaluate(model, train_loader, test_loader, num_epochs, device, lr=0.001):
    """Adam training as in the tutorial; returns per-epoch mean losses, test accuracy, seconds."""
    model = model.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(model.parameters(), lr=lr)
    losses = []
    sync(device)
    start = time.perf_counter()
    for epoch in range(num_epochs):
        model.train()
        total = 0.0
        for bx, by in train_loader:
            bx, by = bx.to(device), by.to(device)
            optimizer.zero_grad()
            loss = criterion(model(bx), by)
            loss.backward()
            optimizer.step()
            total += loss.item()
        losses.append(total / len(train_loader))
        print(f"  epoch {epoch + 1}/{num_epochs}: loss {losses[-1]:.4f}")
    sync(device)
    seconds = time.perf_counter() - start
    model.eval()
    correct = count = 0
    with torch.no_grad():
        for bx, by in test_loader:
            bx, by = bx.to(device), by.to(device)
            correct += (model(bx).argmax(dim=1) == by).sum().item()
            count += by.numel()
    return losses, correct / count, seconds


# ---- speed table --------------------------------------------------------------------------------
def median_ms(fn, device, reps, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def speed_table(tokens, d, num_terms, low_rank, device, reps):
    x = torch.randn(tokens, d, device=device)
    dense = nn.Linear(d, d, device=device)
    sketched = pr.nn.SKLinear.from_linear(dense, num_terms=num_terms, low_rank=low_rank)
    xg = x.clone().requires_grad_(True)

    def fwd(m):
        def run():
            with torch.no_grad():
                m(x)
        return run

    def fwd_bwd(m):
        def run():
            m(xg).sum().backward()
            m.zero_grad(set_to_none=True)
            xg.grad = None
        return run

    rows = []
    for label, make in (("forward", fwd), ("forward+backward", fwd_bwd)):
        t_dense = median_ms(make(dense), device, reps)
        t_sk = median_ms(make(sketched), device, reps)
        rows.append((label, t_dense, t_sk))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per model")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "demo.png", help="PNG path")
    parser.add_argument("--fast", action="store_true", help="tiny sizes (same as PANTHER_EXAMPLE_FAST=1)")
    args = parser.parse_args()
    fast = args.fast or os.environ.get("PANTHER_EXAMPLE_FAST") == "1"

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    n_samples = 320 if fast else 5000
    # CPU: ~10 s per epoch for both models on 2 idle cores; 3 epochs (the loss flattens after 2)
    # keep the demo near 1-2 minutes.
    epochs = args.epochs or (2 if fast else (10 if device.type == "cuda" else 3))
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        hw = f"CPU, {torch.get_num_threads()} threads"
    print(f"Panther {pr.__version__}, torch {torch.__version__}, device: {device} ({hw})")

    # 1. the tutorials' MLP comparison
    print(f"\nData: {n_samples} synthetic samples (784 features, 10 classes), 80/20 split, batch 64; "
          f"{epochs} epochs per model")
    X, y = create_synthetic_dataset(n_samples=n_samples, input_dim=784, n_classes=10)
    split = int(0.8 * len(X))
    train_loader = DataLoader(TensorDataset(X[:split], y[:split]), batch_size=64, shuffle=True)
    test_loader = DataLoader(TensorDataset(X[split:], y[split:]), batch_size=64, shuffle=False)
    models = {
        "nn.Linear MLP": StandardMLP(784, [512, 256, 128], 10),
        "SKLinear MLP": SketchedMLP(784, [512, 256, 128], 10,
                                    num_terms_schedule=[3, 3, 2], low_rank_schedule=[32, 16, 8]),
    }
    results = {}
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        print(f"\nTraining {name} ({params:,} parameters)")
        losses, acc, seconds = train_and_evaluate(model, train_loader, test_loader, epochs, device)
        results[name] = dict(params=params, losses=losses, acc=acc, seconds=seconds)

    print(f"\n{'model':<16}{'parameters':>12}{'final loss':>12}{'test acc':>10}{'train time':>12}")
    for name, r in results.items():
        print(f"{name:<16}{r['params']:>12,}{r['losses'][-1]:>12.4f}{r['acc']:>10.4f}{r['seconds']:>11.1f}s")
    std, sk = results["nn.Linear MLP"], results["SKLinear MLP"]
    print(f"Parameter reduction: {(1 - sk['params'] / std['params']) * 100:.1f}%")

    # 2. speed table
    if fast:
        tokens, d, reps = 256, 1024, 3
    else:
        tokens, d, reps = 2048, 4096, (20 if device.type == "cuda" else 3)
    L, k = 1, 16
    print(f"\nSpeed: SKLinear({d}, {d}, num_terms={L}, low_rank={k}) vs nn.Linear({d}, {d}), "
          f"{tokens} tokens, fp32, median of {reps} runs")
    rows = speed_table(tokens, d, L, k, device, reps)
    print(f"{'pass':<18}{'nn.Linear ms':>14}{'SKLinear ms':>14}{'speed-up':>10}")
    for label, t_dense, t_sk in rows:
        print(f"{label:<18}{t_dense:>14.2f}{t_sk:>14.2f}{t_dense / t_sk:>9.1f}x")

    # 3. the plot
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        # Floor at 1e-7 so that a loss that reaches 0.0 in fp32 stays on the log axis.
        ax1.plot(range(1, len(r["losses"]) + 1), [max(v, 1e-7) for v in r["losses"]], marker="o",
                 label=f"{name}: {r['params']:,} params, acc {r['acc']:.3f}, {r['seconds']:.1f} s")
    ax1.set_xticks(range(1, epochs + 1))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("mean training loss (cross-entropy, log)")
    ax1.set_yscale("log")
    ax1.set_title(f"Synthetic classification, {n_samples} samples")
    ax1.legend(fontsize=8)
    width = 0.38
    xs = range(len(rows))
    ax2.bar([i - width / 2 for i in xs], [r[1] for r in rows], width, label="nn.Linear")
    ax2.bar([i + width / 2 for i in xs], [r[2] for r in rows], width, label=f"SKLinear (L={L}, k={k})")
    for i, (_, t_dense, t_sk) in enumerate(rows):
        ax2.text(i + width / 2, t_sk, f"{t_dense / t_sk:.1f}x", ha="center", va="bottom")
    ax2.set_xticks(list(xs), [r[0] for r in rows])
    ax2.set_ylabel("median ms")
    ax2.set_title(f"{tokens} tokens, d={d}, fp32, {device.type}")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"\nPlot written to {args.out}")


if __name__ == "__main__":
    main()
