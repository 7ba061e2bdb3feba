"""Tutorial 003, "Mixed Precision Training" as a runnable script.

Source: shared/seeds/003_bf3f5784e51f22f7.txt (tutorial "Neural Networks with Sketching").
Tutorial blocks, copied verbatim in tutorial order: 1 ("From Standard to Sketched"), 11 ("Mixed Precision Training").
Earlier blocks are included because this block uses their imports, classes or functions.
The page escapes the docstring quotes and one line-continuation backslash with extra
backslashes; here they are ordinary Python (the only edits to tutorial text).
The added section trains SketchedMLP for one epoch on 256 random samples. On a machine without
CUDA, torch.cuda.amp.autocast and GradScaler warn and disable themselves (plain fp32 training).
"""

# ==== tutorial 003, block 1: "From Standard to Sketched" (verbatim) ==========
import torch
import torch.nn as nn
import torch.optim as optim
import panther as pr
from torch.utils.data import DataLoader, TensorDataset

# Standard neural network
class StandardMLP(nn.Module):
    def __init__(self, input_dim, hidden_dims, output_dim, dropout=0.1):
        super().__init__()

        layers = []
        current_dim = input_dim

        for hidden_dim in hidden_dims:
            layers.extend([
                nn.Linear(current_dim, hidden_dim),
                nn.ReLU(),
                nn.Dropout(dropout)
            ])
            current_dim = hidden_dim

        layers.append(nn.Linear(current_dim, output_dim))
        self.network = nn.Sequential(*layers)

    def forward(self, x):
        return self.network(x)

# Sketched neural network
class SketchedMLP(nn.Module):
    def __init__(self, input_dim, hidden_dims, output_dim,
                 num_terms_schedule=None, low_rank_schedule=None, dropout=0.1):
        super().__init__()

        # Default parameter schedules
        if num_terms_schedule is None:
            num_terms_schedule = [8] * len(hidden_dims) + [4]

        if low_rank_schedule is None:
            base_rank = min(64, min(input_dim, hidden_dims[0]) // 4)
            low_rank_schedule = [base_rank // (i + 1) for i in range(len(hidden_dims))] + [16]

        layers = []
        current_dim = input_dim

        for i, hidden_dim in enumerate(hidden_dims):
            layers.extend([
                pr.nn.SKLinear(
                    current_dim, hidden_dim,
                    num_terms=num_terms_schedule[i],
                    low_rank=low_rank_schedule[i]
                ),
                nn.ReLU(),
                nn.Dropout(dropout)
            ])
            current_dim = hidden_dim

        # Output layer
        layers.append(pr.nn.SKLinear(
            current_dim, output_dim,
            num_terms=num_terms_schedule[-1],
            low_rank=low_rank_schedule[-1]
        ))

        self.network = nn.Sequential(*layers)

    def forward(self, x):
        return self.network(x)

# Compare models
input_dim, hidden_dims, output_dim = 784, [512, 256, 128], 10

standard_model = StandardMLP(input_dim, hidden_dims, output_dim)
sketched_model = SketchedMLP(input_dim, hidden_dims, output_dim)

# Parameter comparison
standard_params = sum(p.numel() for p in standard_model.parameters())
sketched_params = sum(p.numel() for p in sketched_model.parameters())

print(f"Standard model parameters: {standard_params:,}")
print(f"Sketched model parameters: {sketched_params:,}")
print(f"Parameter reduction: {(1 - sketched_params/standard_params)*100:.1f}%")

# ==== added (not tutorial text): why the reduction above is negative ==========
from _growth_note import explain_growth  # noqa: E402

explain_growth(standard_params, sketched_model,
               lambda: SketchedMLP(input_dim, hidden_dims, output_dim,
                                   num_terms_schedule=[3, 3, 2, 1], low_rank_schedule=[32, 16, 8, 4]),
               "num_terms_schedule=[3, 3, 2, 1], low_rank_schedule=[32, 16, 8, 4]")


# ==== tutorial 003, block 11: "Mixed Precision Training" (verbatim) ==========
def train_with_mixed_precision(model, train_loader, val_loader, num_epochs=10):
    """Train model using automatic mixed precision."""

    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model = model.to(device)

    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(model.parameters(), lr=0.001)
    scaler = torch.cuda.amp.GradScaler()

    for epoch in range(num_epochs):
        model.train()
        epoch_loss = 0

        for batch_idx, (data, target) in enumerate(train_loader):
            data, target = data.to(device), target.to(device)

            optimizer.zero_grad()

            # Forward pass with autocast
            with torch.cuda.amp.autocast():
                output = model(data)
                loss = criterion(output, target)

            # Backward pass with gradient scaling
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

            epoch_loss += loss.item()

        print(f"Epoch {epoch+1}, Loss: {epoch_loss/len(train_loader):.4f}")


# ---- added (not in the tutorial) so the block executes --------------------
if __name__ == "__main__":
    X, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    train_loader = DataLoader(TensorDataset(X[:192], y[:192]), batch_size=32, shuffle=True)
    val_loader = DataLoader(TensorDataset(X[192:], y[192:]), batch_size=32)
    model = SketchedMLP(784, [512, 256, 128], 10)
    train_with_mixed_precision(model, train_loader, val_loader, num_epochs=1)
    print("Mixed precision training done")
