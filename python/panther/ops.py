"""Typed functional forms of Panther's operators (TorchScript-friendly wrappers of torch.ops.panther)."""

from typing import Optional

import torch
from torch import Tensor


def sketched_linear(
    input: Tensor,
    S1s: Tensor,
    S2s: Tensor,
    U1s: Tensor,
    U2s: Tensor,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """Sketched linear map ``1/(2L) * sum_i (x S1s[i] U1s[i] + x U2s[i] S2s[i]) + bias``.

    Shapes: input ``(..., d_in)``, S1s ``(L, d_in, k)``, S2s ``(L, k, d_out)``,
    U1s ``(L, k, d_out)``, U2s ``(L, d_in, k)``, bias ``(d_out,)`` or None -> ``(..., d_out)``.
    Differentiable in every tensor; all tensors must share dtype and device.
    """
    return torch.ops.panther.sketched_linear(input, S1s, S2s, U1s, U2s, bias)


__all__ = ["sketched_linear"]
