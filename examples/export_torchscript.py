"""Export a small transformer-style Panther model as TorchScript, for C++ (or Python) deployment.

Usage::

    python examples/export_torchscript.py OUT_DIR

writes

* ``OUT_DIR/model.pt``: the scripted model (``torch.jit.script``), eval mode.
* ``OUT_DIR/io.pt``: a scripted holder module whose attributes ``input`` and ``output`` are the
  example input and the output Python computed (C++: ``torch::jit::load(path).attr("input").toTensor()``).

The model (``TinyTransformer``, embedding dim 64) is one pre-norm transformer block: LayerNorm ->
``pr.nn.RandMultiHeadAttention`` (FAVOR+; only when this Panther build has it) -> residual, then
LayerNorm -> ``SKLinear`` -> ReLU -> ``SKLinear`` -> residual, then a LayerNorm.

Loading the model elsewhere needs Panther's operator library in that process:
Python ``import panther`` or ``torch.ops.load_library(panther.library_path())``; C++: link
``libpanther_ops.so`` with ``-Wl,--no-as-needed`` (``panther::panther_ops`` from
``find_package(panther)``) so its ``TORCH_LIBRARY`` registrations run. See examples/cpp/.

torch >= 2.13 marks ``torch.jit.script`` deprecated (it still works); for new deployments prefer
``torch.export`` + AOTInductor (examples/export_aoti.py).
"""
from __future__ import annotations

import argparse
import os
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

import panther as pr

EMBED_DIM = 64
NUM_HEADS = 4
FF_DIM = 128
BATCH, SEQ = 2, 16


def has_attention() -> bool:
    """True when this Panther build provides ``pr.nn.RandMultiHeadAttention``."""
    return hasattr(pr.nn, "RandMultiHeadAttention")


class TinyTransformer(nn.Module):
    """One pre-norm transformer block with sketched feed-forward (and FAVOR+ attention if available).

    Shape: ``(batch, seq, EMBED_DIM)`` -> ``(batch, seq, EMBED_DIM)``.
    """

    def __init__(self, d_model: int = EMBED_DIM, n_heads: int = NUM_HEADS, d_ff: int = FF_DIM,
                 use_attention: Optional[bool] = None) -> None:
        super().__init__()
        if use_attention is None:
            use_attention = has_attention()
        self.use_attention = use_attention
        # TorchScript needs the attributes to exist; None modules prune the branch when scripting.
        self.norm1 = nn.LayerNorm(d_model) if use_attention else None
        self.attn = (
            pr.nn.RandMultiHeadAttention(
                embed_dim=d_model, num_heads=n_heads, num_random_features=32, dropout=0.0,
                kernel_fn="softmax",
            )
            if use_attention
            else None
        )
        self.norm2 = nn.LayerNorm(d_model)
        with warnings.catch_warnings():
            # Small demo sizes: the sketch is not smaller than the dense layer; that is fine here.
            warnings.simplefilter("ignore", UserWarning)
            self.ff1 = pr.nn.SKLinear(d_model, d_ff, num_terms=2, low_rank=8)
            self.ff2 = pr.nn.SKLinear(d_ff, d_model, num_terms=2, low_rank=8)
        self.norm_out = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        if self.attn is not None and self.norm1 is not None:
            h = self.norm1(x)
            a, _ = self.attn(h, h, h)
            x = x + a
        x = x + self.ff2(torch.relu(self.ff1(self.norm2(x))))
        return self.norm_out(x)


def build_model(seed: int = 0) -> TinyTransformer:
    """The example model, in eval mode, with parameters from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return TinyTransformer().eval()


def example_input(seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, SEQ, EMBED_DIM, generator=g)


class TensorHolder(nn.Module):
    """Holds named tensors as TorchScript attributes (readable from C++ with ``attr(name)``)."""

    def __init__(self, tensors: dict) -> None:
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t.detach().clone())

    def forward(self) -> Tensor:
        return torch.zeros(0)


def save_tensors(path: str, **tensors: Tensor) -> None:
    """Saves tensors as attributes of a scripted module (``torch.jit.load(path).input`` etc.)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TensorHolder(tensors)).save(path)


def load_tensors(path: str, *names: str) -> list:
    m = torch.jit.load(path)
    return [getattr(m, n) for n in names]


def script_model(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(model)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)

    model = build_model(args.seed)
    x = example_input()
    with torch.no_grad():
        y = model(x)
        scripted = script_model(model)
        y_scripted = scripted(x)
    diff = (y - y_scripted).abs().max().item()
    if diff > 1e-5:
        raise SystemExit(f"export_torchscript: scripted model differs from eager by {diff:.3g}")
    model_path = os.path.join(args.out_dir, "model.pt")
    scripted.save(model_path)
    save_tensors(os.path.join(args.out_dir, "io.pt"), input=x, output=y)
    print(
        f"export_torchscript: wrote {model_path} and io.pt (attention: {model.attn is not None}, "
        f"output {tuple(y.shape)}, scripted vs eager max abs diff {diff:.3g})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
