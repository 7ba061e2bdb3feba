"""Tutorial 003, "Memory Monitoring During Training" as a runnable script.

Source: shared/seeds/003_bf3f5784e51f22f7.txt (tutorial "Neural Networks with Sketching").
Tutorial blocks, copied verbatim in tutorial order: 1 ("From Standard to Sketched"), 9 ("Memory Monitoring During Training").
Earlier blocks are included because this block uses their imports, classes or functions.
The page escapes the docstring quotes and one line-continuation backslash with extra
backslashes; here they are ordinary Python (the only edits to tutorial text).
The added section trains SketchedMLP for one epoch on 256 random samples with
MemoryEfficientTrainer, validates, and prints the memory log.
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


# ==== tutorial 003, block 9: "Memory Monitoring During Training" (verbatim) ==========
import psutil
import gc

class MemoryEfficientTrainer:
    """Trainer with memory monitoring and optimization."""

    def __init__(self, model, train_loader, val_loader, device):
        self.model = model.to(device)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.device = device

        self.memory_stats = []

    def train_epoch(self, optimizer, criterion, accumulation_steps=1):
        """Train one epoch with gradient accumulation."""

        self.model.train()
        total_loss = 0
        num_batches = 0

        optimizer.zero_grad()

        for batch_idx, (data, target) in enumerate(self.train_loader):
            data, target = data.to(self.device), target.to(self.device)

            # Forward pass
            output = self.model(data)
            loss = criterion(output, target) / accumulation_steps

            # Backward pass
            loss.backward()

            total_loss += loss.item() * accumulation_steps
            num_batches += 1

            # Update weights every accumulation_steps
            if (batch_idx + 1) % accumulation_steps == 0:
                optimizer.step()
                optimizer.zero_grad()

            # Memory monitoring
            if batch_idx % 50 == 0:
                self.log_memory_usage(batch_idx)

            # Cleanup
            del data, target, output, loss
            if self.device.type == 'cuda':
                torch.cuda.empty_cache()

        return total_loss / num_batches

    def log_memory_usage(self, batch_idx):
        """Log current memory usage."""

        if self.device.type == 'cuda':
            gpu_memory = torch.cuda.memory_allocated() / 1024**2  # MB
            gpu_cached = torch.cuda.memory_reserved() / 1024**2   # MB
        else:
            gpu_memory = gpu_cached = 0

        cpu_memory = psutil.virtual_memory().used / 1024**2  # MB

        self.memory_stats.append({
            'batch': batch_idx,
            'gpu_allocated': gpu_memory,
            'gpu_cached': gpu_cached,
            'cpu_used': cpu_memory
        })

    def validate(self, criterion):
        """Validate model performance."""

        self.model.eval()
        total_loss = 0
        correct = 0
        total = 0

        with torch.no_grad():
            for data, target in self.val_loader:
                data, target = data.to(self.device), target.to(self.device)

                output = self.model(data)
                loss = criterion(output, target)

                total_loss += loss.item()
                _, predicted = torch.max(output.data, 1)
                total += target.size(0)
                correct += (predicted == target).sum().item()

        accuracy = correct / total
        avg_loss = total_loss / len(self.val_loader)

        return avg_loss, accuracy


# ---- added (not in the tutorial) so the block executes --------------------
if __name__ == "__main__":
    X, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    train_loader = DataLoader(TensorDataset(X[:192], y[:192]), batch_size=32, shuffle=True)
    val_loader = DataLoader(TensorDataset(X[192:], y[192:]), batch_size=32)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model = SketchedMLP(784, [512, 256, 128], 10)
    trainer = MemoryEfficientTrainer(model, train_loader, val_loader, device)
    criterion = nn.CrossEntropyLoss()
    train_loss = trainer.train_epoch(optim.Adam(model.parameters(), lr=1e-3), criterion, accumulation_steps=2)
    val_loss, val_acc = trainer.validate(criterion)
    print(f"Train loss: {train_loss:.4f}, val loss: {val_loss:.4f}, val accuracy: {val_acc:.3f}")
    print(f"Memory log: {trainer.memory_stats}")
