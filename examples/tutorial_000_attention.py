"""Tutorial 000, "Attention Mechanisms with Randomized Features" as a runnable script.

Source: shared/seeds/000_64c79363b5271b5c.txt (tutorial "Neural Networks with Sketching").
Tutorial blocks, copied verbatim in tutorial order: 1 ("From Standard to Sketched"), 3 ("Attention Mechanisms with Randomized Features").
Earlier blocks are included because this block uses their imports, classes or functions.
Block 3 runs RandMultiHeadAttention on (32, 100, 512) itself; the added section at the end runs
the TransformerBlock it defines on tiny random data with a (batch, seq) 0/1 padding mask.
"""

# ==== tutorial 000, block 1: "From Standard to Sketched" (verbatim) ==========
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
                num_terms_schedule, low_rank_schedule, dropout=0.1):
        super().__init__()

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
sketched_model = SketchedMLP(input_dim, hidden_dims, output_dim,num_terms_schedule=[3,3,2],low_rank_schedule=[32,16,8])

# Parameter comparison
standard_params = sum(p.numel() for p in standard_model.parameters())
sketched_params = sum(p.numel() for p in sketched_model.parameters())

print(f"Standard model parameters: {standard_params:,}")
print(f"Sketched model parameters: {sketched_params:,}")
print(f"Parameter reduction: {(1 - sketched_params/standard_params)*100:.1f}%")


# ==== tutorial 000, block 3: "Attention Mechanisms with Randomized Features" (verbatim) ==========
from panther.nn import RandMultiHeadAttention

# Create randomized multi-head attention layer
attention_layer = RandMultiHeadAttention(
    embed_dim=512,
    num_heads=8,
    num_random_features=256,  # Number of random features for approximation
    dropout=0.1,
    kernel_fn="softmax",      # Can be "softmax" or "relu"
    iscausal=False             # Set True for autoregressive tasks
)

# Forward pass
x = torch.randn(32, 100, 512)  # (batch, seq_len, embed_dim)
output, _ = attention_layer(x, x, x)
print(f"Output shape: {output.shape}")  # (32, 100, 512)

# Example: Transformer block with sketched feed-forward
class TransformerBlock(nn.Module):
    """Transformer block with RandMultiHeadAttention and sketched feed-forward."""

    def __init__(self, d_model, n_heads, d_ff, num_random_features=256, num_terms=2, low_rank=16):
        super().__init__()

        # Use RandMultiHeadAttention from Panther
        self.attention = RandMultiHeadAttention(
            embed_dim=d_model,
            num_heads=n_heads,
            num_random_features=num_random_features,
            dropout=0.1,
            kernel_fn="softmax"
        )
        self.norm1 = nn.LayerNorm(d_model)

        # Feed-forward with sketched layers
        self.feed_forward = nn.Sequential(
            pr.nn.SKLinear(d_model, d_ff, num_terms=num_terms*2, low_rank=low_rank*2),
            nn.ReLU(),
            nn.Dropout(0.1),
            pr.nn.SKLinear(d_ff, d_model, num_terms=num_terms, low_rank=low_rank)
        )
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x, mask=None):
        # Self-attention with residual connection
        attn_out, _ = self.attention(x, x, x, attention_mask=mask)
        x = self.norm1(x + self.dropout(attn_out))

        # Feed-forward with residual connection
        ff_out = self.feed_forward(x)
        x = self.norm2(x + self.dropout(ff_out))

        return x


# ---- added (not in the tutorial) so the block executes --------------------
if __name__ == "__main__":
    block = TransformerBlock(d_model=64, n_heads=4, d_ff=256, num_random_features=32)
    tokens = torch.randn(2, 10, 64)
    mask = torch.ones(2, 10)
    mask[1, 6:] = 0  # the second sequence is padding after 6 tokens
    out = block(tokens, mask)
    out.sum().backward()
    assert out.shape == (2, 10, 64) and torch.isfinite(out).all()
    print(f"TransformerBlock output shape: {out.shape}")
