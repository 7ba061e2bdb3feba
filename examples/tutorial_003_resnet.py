"""Tutorial 003, "Residual Networks with Sketching" as a runnable script.

Source: shared/seeds/003_bf3f5784e51f22f7.txt (tutorial "Neural Networks with Sketching").
Tutorial blocks, copied verbatim in tutorial order: 1 ("From Standard to Sketched"), 4 ("Residual Networks with Sketching").
Earlier blocks are included because this block uses their imports, classes or functions.
The page escapes the docstring quotes and one line-continuation backslash with extra
backslashes; here they are ordinary Python (the only edits to tutorial text).
The added section runs resnet_model on a random (4, 784) batch.
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


# ==== tutorial 003, block 4: "Residual Networks with Sketching" (verbatim) ==========
class SketchedResidualBlock(nn.Module):
    """Residual block with sketched linear transformations."""

    def __init__(self, in_features, out_features, num_terms=4, low_rank=32):
        super().__init__()

        # Main path with sketched layers
        self.main_path = nn.Sequential(
            pr.nn.SKLinear(in_features, out_features, num_terms=num_terms, low_rank=low_rank),
            nn.BatchNorm1d(out_features),
            nn.ReLU(),
            pr.nn.SKLinear(out_features, out_features, num_terms=num_terms, low_rank=low_rank),
            nn.BatchNorm1d(out_features)
        )

        # Shortcut connection
        if in_features != out_features:
            self.shortcut = pr.nn.SKLinear(in_features, out_features, num_terms=2, low_rank=16)
        else:
            self.shortcut = nn.Identity()

        self.relu = nn.ReLU()

    def forward(self, x):
        main_out = self.main_path(x)
        shortcut_out = self.shortcut(x)
        return self.relu(main_out + shortcut_out)

class SketchedResNet(nn.Module):
    """ResNet-style architecture with sketched layers."""

    def __init__(self, input_dim, block_configs, num_classes):
        super().__init__()

        # Input layer
        self.input_layer = nn.Sequential(
            pr.nn.SKLinear(input_dim, block_configs[0]['features'], num_terms=8, low_rank=64),
            nn.BatchNorm1d(block_configs[0]['features']),
            nn.ReLU()
        )

        # Residual blocks
        self.blocks = nn.ModuleList()
        current_features = block_configs[0]['features']

        for config in block_configs:
            block = SketchedResidualBlock(
                current_features,
                config['features'],
                num_terms=config.get('num_terms', 4),
                low_rank=config.get('low_rank', 32)
            )
            self.blocks.append(block)
            current_features = config['features']

        # Output layer
        self.output_layer = pr.nn.SKLinear(current_features, num_classes, num_terms=2, low_rank=16)

    def forward(self, x):
        x = self.input_layer(x)

        for block in self.blocks:
            x = block(x)

        x = self.output_layer(x)
        return x

# Example usage
block_configs = [
    {'features': 256, 'num_terms': 6, 'low_rank': 48},
    {'features': 256, 'num_terms': 6, 'low_rank': 48},
    {'features': 512, 'num_terms': 8, 'low_rank': 64},
    {'features': 512, 'num_terms': 8, 'low_rank': 64},
]

resnet_model = SketchedResNet(input_dim=784, block_configs=block_configs, num_classes=10)


# ---- added (not in the tutorial) so the block executes --------------------
if __name__ == "__main__":
    x = torch.randn(4, 784)
    logits = resnet_model(x)
    logits.sum().backward()
    assert logits.shape == (4, 10)
    print(f"SketchedResNet output shape: {logits.shape}")
