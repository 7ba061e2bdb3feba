"""Tutorial 003, "Progressive Training Strategy" as a runnable script.

Source: shared/seeds/003_bf3f5784e51f22f7.txt (tutorial "Neural Networks with Sketching").
Tutorial blocks, copied verbatim in tutorial order: 1 ("From Standard to Sketched"), 8 ("Progressive Training Strategy").
Earlier blocks are included because this block uses their imports, classes or functions.
The page escapes the docstring quotes and one line-continuation backslash with extra
backslashes; here they are ordinary Python (the only edits to tutorial text).
The added section builds a two-layer network and advances it through all phases.
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


# ==== tutorial 003, block 8: "Progressive Training Strategy" (verbatim) ==========
class ProgressiveSketchedNetwork(nn.Module):
    """Network that progressively increases sketch complexity during training."""

    def __init__(self, layer_configs, num_classes):
        super().__init__()

        self.layer_configs = layer_configs
        self.num_classes = num_classes
        self.current_phase = 0
        self.max_phases = 3

        # Initialize with minimal complexity
        self.build_network()

    def build_network(self):
        """Build network for current training phase."""

        layers = []
        phase_multiplier = (self.current_phase + 1) / self.max_phases

        for i, config in enumerate(self.layer_configs):
            # Scale parameters based on training phase
            num_terms = max(2, int(config['num_terms'] * phase_multiplier))
            low_rank = max(16, int(config['low_rank'] * phase_multiplier))

            layer = pr.nn.SKLinear(
                config['in_features'],
                config['out_features'],
                num_terms=num_terms,
                low_rank=low_rank
            )

            layers.extend([layer, nn.ReLU(), nn.Dropout(0.1)])

        # Output layer
        layers.append(pr.nn.SKLinear(
            self.layer_configs[-1]['out_features'],
            self.num_classes,
            num_terms=2, low_rank=16
        ))

        self.network = nn.Sequential(*layers)

    def advance_phase(self):
        """Move to next training phase with increased complexity."""

        if self.current_phase < self.max_phases - 1:
            old_state = self.network.state_dict()
            self.current_phase += 1
            self.build_network()

            # Transfer compatible parameters
            new_state = self.network.state_dict()
            for key in old_state:
                if key in new_state and old_state[key].shape == new_state[key].shape:
                    new_state[key] = old_state[key]

            self.network.load_state_dict(new_state)

            print(f"Advanced to phase {self.current_phase + 1}/{self.max_phases}")
            return True

        return False

    def forward(self, x):
        return self.network(x)


# ---- added (not in the tutorial) so the block executes --------------------
if __name__ == "__main__":
    layer_configs = [
        {'in_features': 784, 'out_features': 256, 'num_terms': 8, 'low_rank': 64},
        {'in_features': 256, 'out_features': 128, 'num_terms': 6, 'low_rank': 48},
    ]
    net = ProgressiveSketchedNetwork(layer_configs, num_classes=10)
    x = torch.randn(4, 784)
    print(f"Phase 1 output shape: {net(x).shape}")
    while net.advance_phase():
        assert net(x).shape == (4, 10)
    assert net.current_phase == net.max_phases - 1
    print(f"Final phase output shape: {net(x).shape}")
