"""Plain-PyTorch float64 references of Panther's operators.

Each function here writes an operator's math the obvious way (term by term, in float64, with
ordinary differentiable PyTorch ops), so that tests, docs and benchmarks can check the fast
native kernels against it: values, and gradients through autograd. They are slow on purpose and
never used by the modules themselves.

This is a flat module of functions: one ``<op>_reference`` per operator, plus small helpers.
"""

from typing import Optional

import torch
from torch import Tensor

__all__ = ["sketched_linear_reference", "sketched_linear_dense_weight_reference"]


def sketched_linear_reference(
    input: Tensor,
    S1s: Tensor,
    S2s: Tensor,
    U1s: Tensor,
    U2s: Tensor,
    bias: Optional[Tensor] = None,
) -> Tensor:
    r"""Float64 reference of ``panther::sketched_linear``.

    .. math::
        y = \frac{1}{2L} \sum_{i=1}^{L} \left( x S^{(1)}_i U^{(1)}_i + x U^{(2)}_i S^{(2)}_i \right) + b

    Shapes: input ``(..., d_in)``, S1s ``(L, d_in, k)``, S2s ``(L, k, d_out)``,
    U1s ``(L, k, d_out)``, U2s ``(L, d_in, k)``, bias ``(d_out,)`` or None -> ``(..., d_out)``.
    Every argument is converted to float64 (differentiably, so gradients flow back to the
    original tensors in their own dtype) and the result is float64.
    """
    x = input.to(torch.float64)
    L = S1s.shape[0]
    out: Optional[Tensor] = None
    for i in range(L):
        term = (x @ S1s[i].to(torch.float64)) @ U1s[i].to(torch.float64)
        term = term + (x @ U2s[i].to(torch.float64)) @ S2s[i].to(torch.float64)
        out = term if out is None else out + term
    assert out is not None
    out = out / (2 * L)
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out


def sketched_linear_dense_weight_reference(S1s: Tensor, S2s: Tensor, U1s: Tensor, U2s: Tensor) -> Tensor:
    r"""The dense weight ``W`` (``nn.Linear`` layout, ``d_out x d_in``, float64) of a sketched linear map.

    ``W^T = 1/(2L) * sum_i (S1s[i] U1s[i] + U2s[i] S2s[i])``, so that
    ``sketched_linear_reference(x, S1s, S2s, U1s, U2s, b) == x @ W^T + b`` up to rounding.
    """
    L = S1s.shape[0]
    Wt: Optional[Tensor] = None
    for i in range(L):
        term = S1s[i].to(torch.float64) @ U1s[i].to(torch.float64)
        term = term + U2s[i].to(torch.float64) @ S2s[i].to(torch.float64)
        Wt = term if Wt is None else Wt + term
    assert Wt is not None
    return (Wt / (2 * L)).t()
