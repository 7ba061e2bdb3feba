"""Reads of a module's own tensors, and direct op calls, for host-bound eager calls."""
from typing import Any, Callable, Dict, Optional, Tuple

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


_DIRECT: Dict[str, Callable[..., Any]] = {}


def panther_op(name: str) -> Callable[..., Any]:
    """``torch.ops.panther.<name>`` for eager code that is host-bound: the callable behind its
    default overload, the C++ entry that ``OpOverload.__call__`` forwards to, so a call skips the
    packet's overload resolution and a Python frame (about 10 us of host time per call on a slow
    host; dispatch, autograd and ``__torch_function__`` handling are the same). While
    torch.compile traces, the packet itself.

    >>> x = torch.randn(3, 4)
    >>> S1, U2 = torch.randn(1, 4, 2), torch.randn(1, 4, 2)
    >>> S2, U1 = torch.randn(1, 2, 5), torch.randn(1, 2, 5)
    >>> y = panther_op("sketched_linear")(x, S1, S2, U1, U2, None)
    >>> torch.equal(y, torch.ops.panther.sketched_linear(x, S1, S2, U1, U2, None))
    True
    """
    if torch.compiler.is_compiling():
        return getattr(torch.ops.panther, name)
    op = _DIRECT.get(name)
    if op is None:
        overload = getattr(torch.ops.panther, name).default
        op = _DIRECT[name] = getattr(overload, "_op", overload)
    return op
