"""Tutorial 003, "Dynamic Parameter Adjustment" as a runnable script.

Source: shared/seeds/003_bf3f5784e51f22f7.txt (tutorial "Neural Networks with Sketching").
Tutorial blocks, copied verbatim in tutorial order: 1 ("From Standard to Sketched"), 6 ("Dynamic Parameter Adjustment").
Earlier blocks are included because this block uses their imports, classes or functions.
The page escapes the docstring quotes and one line-continuation backslash with extra
backslashes; here they are ordinary Python (the only edits to tutorial text).
The added section runs the layer in train mode for 100 steps on inputs with variance 9, so the
tracked variance passes 2.0 and adapt_parameters() grows the sketch once.
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


# ==== tutorial 003, block 6: "Dynamic Parameter Adjustment" (verbatim) ==========
class AdaptiveSketchedLayer(nn.Module):
    """Sketched layer that adapts parameters based on input statistics."""

    def __init__(self, in_features, out_features,
                 base_terms=4, base_rank=32, adaptation_rate=0.01):
        super().__init__()

        self.in_features = in_features
        self.out_features = out_features
        self.base_terms = base_terms
        self.base_rank = base_rank
        self.adaptation_rate = adaptation_rate

        # Current parameters
        self.current_terms = base_terms
        self.current_rank = base_rank

        # Create initial layer
        self.sketched_layer = pr.nn.SKLinear(
            in_features, out_features,
            num_terms=self.current_terms,
            low_rank=self.current_rank
        )

        # Statistics tracking
        self.register_buffer('input_variance', torch.ones(1))
        self.register_buffer('gradient_norm', torch.ones(1))
        self.update_counter = 0

    def forward(self, x):
        # Track input statistics
        if self.training:
            current_var = torch.var(x, dim=0).mean()
            self.input_variance = (1 - self.adaptation_rate) * self.input_variance + \
                                self.adaptation_rate * current_var

            self.update_counter += 1

            # Adapt parameters periodically
            if self.update_counter % 100 == 0:
                self.adapt_parameters()

        return self.sketched_layer(x)

    def adapt_parameters(self):
        """Adjust sketching parameters based on observed statistics."""

        # Simple adaptation rule: increase complexity if high variance
        if self.input_variance > 2.0 and self.current_terms < 16:
            new_terms = min(16, self.current_terms + 2)
            new_rank = min(128, self.current_rank + 16)

            # Create new layer with increased parameters
            new_layer = pr.nn.SKLinear(
                self.in_features, self.out_features,
                num_terms=new_terms, low_rank=new_rank
            )

            # Transfer learned parameters (simplified)
            with torch.no_grad():
                if self.sketched_layer.bias is not None:
                    new_layer.bias.copy_(self.sketched_layer.bias)

            self.sketched_layer = new_layer
            self.current_terms = new_terms
            self.current_rank = new_rank

            print(f"Adapted to terms={new_terms}, rank={new_rank}")


# ---- added (not in the tutorial) so the block executes --------------------
if __name__ == "__main__":
    layer = AdaptiveSketchedLayer(256, 128)
    layer.train()
    for step in range(100):
        out = layer(3.0 * torch.randn(16, 256))
    assert out.shape == (16, 128)
    print(f"AdaptiveSketchedLayer output shape: {out.shape}, "
          f"input_variance={layer.input_variance.item():.2f}, "
          f"terms={layer.current_terms}, rank={layer.current_rank}")
