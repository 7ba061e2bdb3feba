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


def favor_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    projection: Tensor,
    kernel: str = "softmax",
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """FAVOR+ random-feature attention (Performer), linear in sequence length.

    Shapes: query ``(B, H, Lq, D)``, key ``(B, H, Lk, D)``, value ``(B, H, Lk, Dv)``,
    projection ``(M, D)`` (random features shared by the heads), key_padding_mask ``(B, Lk)``
    bool with True = padded key (ignored) -> ``(B, H, Lq, Dv)`` in the query's dtype, laid out
    as ``(B, Lq, H, Dv)`` in memory (like scaled_dot_product_attention's fused kernels), so
    merging the heads with ``out.transpose(1, 2).reshape(B, Lq, H * Dv)`` is a view.

    ``kernel``: ``"softmax"`` (positive random features,
    ``phi(x) = M^-1/2 (exp(x' w - |x'|^2/2 - c) + 1e-6)``, ``x' = x D^-1/4``, an unbiased
    estimate of ``exp(q.k / sqrt(D))``) or ``"relu"`` (``phi(x) = M^-1/2 relu(x w) + 1e-3``).
    ``causal=True`` (needs ``Lq == Lk``): position i attends to keys ``j <= i`` only; computed in
    chunks, time and memory linear in length. Stabilisers: per query row; for keys the running
    max over keys up to the position (causal) or the max over all unpadded keys (non-causal), so
    no output depends on a later position. A query that sees no unpadded key outputs 0.
    fp16/bf16 inputs are computed in fp32. Differentiable in query, key, value and projection
    (stabilisers are treated as constants, exact up to O(eps)).
    """
    return torch.ops.panther.favor_attention(query, key, value, projection, kernel, causal, key_padding_mask)


__all__ = ["sketched_linear", "favor_attention"]
