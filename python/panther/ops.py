"""Typed functional forms of Panther's operators (TorchScript-friendly wrappers of torch.ops.panther)."""

from typing import Optional

import torch
from torch import Tensor


def _require_tensor(op: str, name: str, value: Optional[Tensor]) -> None:
    # A None (or a non-tensor in eager Python) for a required tensor argument is a TypeError that
    # names the argument, instead of the dispatcher's message. TorchScript checks the annotated
    # types itself before calling, so this is a no-op there.
    if value is None:
        raise TypeError(f"panther.ops.{op}: {name} must be a Tensor, got None")
    if not torch.jit.is_scripting():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"panther.ops.{op}: {name} must be a Tensor, got {type(value).__name__}")


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
    Differentiable in every tensor (second derivatives included); all tensors must share dtype
    and device.

    Raises TypeError when a required tensor is None (the message names the argument), and
    RuntimeError naming the op and the argument for a wrong shape, dtype or device.

    >>> import torch, panther
    >>> x = torch.randn(3, 4)
    >>> S1s, U2s = torch.randn(2, 4, 2), torch.randn(2, 4, 2)
    >>> S2s, U1s = torch.randn(2, 2, 5), torch.randn(2, 2, 5)
    >>> panther.ops.sketched_linear(x, S1s, S2s, U1s, U2s).shape
    torch.Size([3, 5])
    """
    _require_tensor("sketched_linear", "input", input)
    _require_tensor("sketched_linear", "S1s", S1s)
    _require_tensor("sketched_linear", "S2s", S2s)
    _require_tensor("sketched_linear", "U1s", U1s)
    _require_tensor("sketched_linear", "U2s", U2s)
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
    (stabilisers are treated as constants, exact up to O(eps)), second derivatives included
    (``create_graph=True``). Batch, heads and lengths may be dynamic under ``torch.compile`` and
    ``torch.export``.

    Raises TypeError when a required tensor is None (the message names the argument), and
    RuntimeError naming the op and the argument for a wrong shape, dtype (key_padding_mask must
    be bool) or device, an unknown ``kernel`` or ``causal=True`` with ``Lq != Lk``.

    >>> import torch, panther
    >>> q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 10, 8), torch.randn(2, 4, 10, 8)
    >>> W = panther.nn.attention.orthogonal_gaussian_projection(16, 8)
    >>> panther.ops.favor_attention(q, k, v, W, "softmax", causal=True).shape
    torch.Size([2, 4, 10, 8])
    """
    _require_tensor("favor_attention", "query", query)
    _require_tensor("favor_attention", "key", key)
    _require_tensor("favor_attention", "value", value)
    _require_tensor("favor_attention", "projection", projection)
    return torch.ops.panther.favor_attention(query, key, value, projection, kernel, causal, key_padding_mask)


__all__ = ["sketched_linear", "favor_attention"]
