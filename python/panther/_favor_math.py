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

# Must match kFavorSoftmaxEps / kFavorReluEps in cpp/attention/impl.h.
SOFTMAX_EPS = 1e-6
RELU_EPS = 1e-3


def softmax_preactivations(x: Tensor, W: Tensor) -> Tensor:
    """``b = x' W^T - |x'|^2 / 2`` with ``x' = x D^-1/4``: ``(..., M)`` for ``x (..., D)``."""
    xs = x * W.shape[1] ** -0.25
    return xs @ W.t() - 0.5 * (xs * xs).sum(-1, keepdim=True)


def query_features(q: Tensor, W: Tensor, kernel_fn: str) -> Tensor:
    """phi ``(..., M)`` of queries ``(..., D)``, eps included (softmax: stabilised per row)."""
    sM = W.shape[0] ** -0.5
    if kernel_fn == "softmax":
        preq = softmax_preactivations(q, W)
        return sM * (torch.exp(preq - preq.detach().amax(-1, keepdim=True)) + SOFTMAX_EPS)
    return sM * torch.relu(q @ W.t()) + RELU_EPS


def key_features(k: Tensor, W: Tensor, kernel_fn: str, valid: Optional[Tensor]) -> Tensor:
    """Softmax: key pre-activations ``(..., M)``, ``-inf`` at invalid keys (``valid`` bool, the
    leading shape of ``k``, or None: every key valid); relu: the key features
    ``M^-1/2 relu(k W^T)``, 0 at invalid keys."""
    M = W.shape[0]
    if kernel_fn == "softmax":
        prek = softmax_preactivations(k, W)
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


def ratio(y: Tensor, dv: int) -> Tensor:
    """``num / den`` of ``y = [num, den]`` (last dim ``dv + 1``), 0 where no key was seen."""
    num, den = y[..., :dv], y[..., dv:]
    return num / torch.where(den == 0, torch.ones_like(den), den)


def _any_requires_grad(*ts: Tensor) -> bool:
    return any(t.requires_grad for t in ts)


def fused_decode_applies(q: Tensor, kv: Tensor, tensors: Tuple[Optional[Tensor], ...]) -> bool:
    """Whether an in-place decoding step with queries like ``q`` and state ``kv`` runs as the fused
    op (``torch.ops.panther._favor_decode_step_``): CUDA, a float32/float64 state of the queries'
    decode dtype, and nothing for autograd to record among ``tensors``."""
    return (q.is_cuda and kv.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
            and not (torch.is_grad_enabled() and _any_requires_grad(*(t for t in tensors if t is not None))))


def decode_step(q: Tensor, k: Tensor, v: Tensor, W: Tensor, kernel_fn: str, kv: Tensor, v_sum: Tensor,
                r: Tensor, inplace: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One causal position against a running state -> ``(out, kv, v_sum, r)``.

    ``q, k (..., D)``, ``v (..., Dv)`` (one new position, compute dtype); state ``kv (..., M, Dv + 1)``
    (key features relative to the stabiliser ``r (...)`` times ``[v, 1]``), ``v_sum (..., Dv + 1)``
    (plain sum of ``[v, 1]``: the eps term). The new key joins the state first (softmax: ``r``
    becomes ``max(r, max_m b(k))`` and ``kv`` is rescaled by ``exp(r_old - r_new)``), then the query
    reads it: ``out = num / den`` of ``phi(q) (kv + e_k v_sum)`` (``den > 0``: the query sees at
    least its own key and every feature is >= eps). ``inplace``: ``kv``, ``v_sum`` and ``r`` are
    updated in place (and returned). No host synchronisation.

    On CUDA, ``inplace`` float32/float64 calls with nothing for autograd to record run as one fused kernel
    (``torch.ops.panther._favor_decode_step_``, the same math); the code below is the reference,
    and the path of CPU tensors, of ``inplace=False`` and of calls autograd records.
    """
    if inplace and q.dtype == kv.dtype and fused_decode_applies(q, kv, (q, k, v, W, kv, v_sum, r)):
        out = torch.ops.panther._favor_decode_step_(q, k, v, W, kernel_fn, kv, v_sum, r)
        return out, kv, v_sum, r
    M = W.shape[0]
    sM = M ** -0.5
    qk = torch.stack([q, k])  # (2, ..., D): one pass of the feature map for both
    V1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # (..., Dv+1)
    if kernel_fn == "softmax":
        pre = softmax_preactivations(qk, W)  # (2, ..., M)
        c = pre.detach().amax(-1)  # (2, ...): the query row's stabiliser, the key's max exponent
        r_new = torch.maximum(r, c[1])  # finite: the new key is valid
        e = torch.exp(pre - torch.stack([c[0], r_new]).unsqueeze(-1))
        phi = sM * (e[0] + SOFTMAX_EPS)
        kf = sM * e[1]
        alpha = torch.exp(r - r_new)[..., None, None]  # <= 1; 0 while the state is empty (r = -inf)
        if inplace:
            kv.mul_(alpha)
            r.copy_(r_new)
            r_new = r
        else:
            kv = alpha * kv
    else:
        f = sM * torch.relu(qk @ W.t())
        phi = f[0] + RELU_EPS
        kf = f[1]
        r_new = r
    if inplace:
        kv.addcmul_(kf.unsqueeze(-1), V1.unsqueeze(-2))
        v_sum.add_(V1)
    else:
        kv = torch.addcmul(kv, kf.unsqueeze(-1), V1.unsqueeze(-2))
        v_sum = v_sum + V1
    y = (phi.unsqueeze(-2) @ (kv + key_eps(M, kernel_fn) * v_sum.unsqueeze(-2))).squeeze(-2)  # (..., Dv+1)
    return y[..., :-1] / y[..., -1:], kv, v_sum, r_new
