"""Reads of a module's own tensors for host-bound eager calls."""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn


def module_tensors(module: nn.Module, names: Tuple[str, ...]) -> Tuple[Optional[Tensor], ...]:
    """``getattr(module, name)`` for each name, read straight from the module's parameter and
    buffer dicts: at transformer widths an eager layer is host-bound, and each
    ``nn.Module.__getattr__`` costs about a microsecond. If a name is in neither dict (a
    parametrized weight is a property, a pruned one a plain attribute), and while torch.compile
    traces, every name is read with ``getattr``.

    >>> lin = nn.Linear(2, 3)
    >>> module_tensors(lin, ("weight", "bias"))[0] is lin.weight
    True
    """
    if not torch.compiler.is_compiling():
        ps, bs = module._parameters, module._buffers
        try:
            return tuple(ps[n] if n in ps else bs[n] for n in names)
        except KeyError:
            pass
    return tuple(getattr(module, n) for n in names)
