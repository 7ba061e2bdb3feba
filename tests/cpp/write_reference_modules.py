"""ctest fixture: writes the parameters of Python layers built right after torch.manual_seed(123),
so tests/cpp/test_torchscript.cpp can check that the C++ modules (panther/nn.h) draw the same
numbers from the same seed. Usage: python write_reference_modules.py OUT_DIR
"""
import os
import sys
import warnings

import torch

import panther as pr

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples"))
from export_torchscript import save_tensors  # noqa: E402

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
tensors = {}
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.manual_seed(123)
    lin = pr.nn.SKLinear(12, 7, num_terms=2, low_rank=3)
for name, t in list(lin.named_parameters()) + list(lin.named_buffers()):
    tensors["sklinear_" + name] = t
if hasattr(pr.nn, "RandMultiHeadAttention"):
    torch.manual_seed(123)
    attn = pr.nn.RandMultiHeadAttention(16, 4, 12)
    for name, t in list(attn.named_parameters()) + list(attn.named_buffers()):
        tensors["attention_" + name] = t
save_tensors(os.path.join(out, "reference_modules.pt"), **tensors)
print(f"write_reference_modules: {len(tensors)} tensors")
