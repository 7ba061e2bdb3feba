"""FAVOR+ feature maps and causal-state arithmetic in PyTorch, shared by the context-parallel path
(``panther.distributed``) and the decoding API of ``RandMultiHeadAttention`` (prefill + step).

They reproduce ``torch.ops.panther.favor_attention``'s math exactly (softmax: query features with a
per-row stabiliser, ``phi = M^-1/2 (exp(pre - max_m pre) + eps)``; key features
``M^-1/2 exp(pre - r)`` with ``r`` the key stabiliser and eps added as a separate term; relu:
``phi = M^-1/2 relu(q W^T) + eps``, key features ``M^-1/2 relu(k W^T)``, no stabiliser).
Any leading dimensions; the last is the head dim (features: the feature dim). No
``torch.distributed`` import here.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

# Must match kFavorSoftmaxEps / kFavorReluEps in cpp/kernels/favor_attention.h.
SOFTMAX_EPS = 1e-6
RELU_EPS = 1e-3


def query_features(q: Tensor, W: Tensor, kernel_fn: str) -> Tensor:
    """phi ``(..., M)`` of queries ``(..., D)``, eps included (softmax: stabilised per row)."""
    M, D = W.shape
    sM = M ** -0.5
    if kernel_fn == "softmax":
        xq = q * D ** -0.25
        preq = xq @ W.t() - 0.5 * (xq * xq).sum(-1, keepdim=True)
        return sM * (torch.exp(preq - preq.detach().amax(-1, keepdim=True)) + SOFTMAX_EPS)
    return sM * torch.relu(q @ W.t()) + RELU_EPS


def key_features(k: Tensor, W: Tensor, kernel_fn: str, valid: Optional[Tensor]) -> Tensor:
    """Softmax: key pre-activations ``(..., M)``, ``-inf`` at invalid keys (``valid`` bool, the
    leading shape of ``k``, or None: every key valid); relu: the key features
    ``M^-1/2 relu(k W^T)``, 0 at invalid keys."""
    M, D = W.shape
    if kernel_fn == "softmax":
        xk = k * D ** -0.25
        prek = xk @ W.t() - 0.5 * (xk * xk).sum(-1, keepdim=True)
        return prek if valid is None else prek.masked_fill(~valid[..., None], float("-inf"))
    kf = (M ** -0.5) * torch.relu(k @ W.t())
    return kf if valid is None else kf * valid[..., None].to(k.dtype)


def key_eps(M: int, kernel_fn: str) -> float:
    """The eps term of the key features (added once per valid key)."""
    return SOFTMAX_EPS * M ** -0.5 if kernel_fn == "softmax" else RELU_EPS


def features(q: Tensor, k: Tensor, W: Tensor, kernel_fn: str, valid: Tensor) -> Tuple[Tensor, Tensor, float]:
    """``(phi, key pre-activations (softmax) or key features (relu), key eps)``."""
    return query_features(q, W, kernel_fn), key_features(k, W, kernel_fn, valid), key_eps(W.shape[0], kernel_fn)


def finite_or(x: Tensor, fill: float = 0.0) -> Tensor:
    """``x`` with infinities replaced by ``fill``."""
    return torch.where(torch.isinf(x), torch.full_like(x, fill), x)


def causal_output(phi: Tensor, kv: Tensor, v_sum: Tensor, ek: float) -> Tensor:
    """``[num, den]`` of queries ``phi (..., Lq, M)`` against a causal state: ``kv (..., M, E1)``
    (sum of key features relative to the current stabiliser times ``[v, 1]``) and ``v_sum
    (..., E1)`` (plain sum of ``[v, 1]`` over valid keys, the eps term)."""
    return phi @ kv + ek * phi.sum(-1, keepdim=True) * v_sum.unsqueeze(-2)


def ratio(y: Tensor, dv: int) -> Tensor:
    """``num / den`` of ``y = [num, den]`` (last dim ``dv + 1``), 0 where no key was seen."""
    num, den = y[..., :dv], y[..., dv:]
    return num / torch.where(den == 0, torch.ones_like(den), den)
