"""Plain-PyTorch float64 references of Panther's ops, used by tests, docs and benchmarks.

They are deliberately straightforward (quadratic in sequence length, no chunking) and follow the
exact definitions in DESIGN.md, including the same feature maps, stabilisers and eps as the
native ops, so a native op can be compared with them to tight tolerances.
"""
from typing import Optional

import torch
from torch import Tensor

# Must match kFavorSoftmaxEps / kFavorReluEps in cpp/kernels/favor_attention.h.
FAVOR_SOFTMAX_EPS = 1e-6
FAVOR_RELU_EPS = 1e-3


def favor_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    kernel: str = "softmax",
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """FAVOR+ attention in float64 through the explicit (Lq x Lk) matrix of kernel values.

    q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv), projection (M, D); key_padding_mask
    (B, Lk) bool, True = padded. Returns (B, H, Lq, Dv) in float64.

    softmax: phi(q_i) = M^-1/2 (exp(q'_i W^T - |q'_i|^2/2 - c_i) + eps), c_i the row max;
    psi_i(k_j) = M^-1/2 (exp(k'_j W^T - |k'_j|^2/2 - r_i) + eps), r_i the max of the same
    exponent over valid keys j' <= i (causal) or over all valid keys (non-causal); x' = x D^-1/4.
    relu: phi(x) = M^-1/2 relu(x W^T) + eps for queries and keys.
    A query that sees no valid key outputs 0. The stabilisers c and r are computed from detached
    tensors (constants for autograd, as in the native op's backward: the ratio does not depend on
    them except through eps), so autograd through this function gives the op's exact gradients.
    """
    q, k, v, W = (t.to(torch.float64) for t in (q, k, v, projection))
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    M = W.shape[0]
    sM = M ** -0.5
    if key_padding_mask is not None:
        valid = (~key_padding_mask.bool()).to(q.device)[:, None, :].expand(B, H, Lk)
    else:
        valid = torch.ones(B, H, Lk, dtype=torch.bool, device=q.device)
    tril = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
    if kernel == "softmax":
        s = D ** -0.25
        xq, xk = q * s, k * s
        preq = xq @ W.T - 0.5 * (xq * xq).sum(-1, keepdim=True)
        phi = sM * (torch.exp(preq - preq.detach().amax(-1, keepdim=True)) + FAVOR_SOFTMAX_EPS)
        prek = xk @ W.T - 0.5 * (xk * xk).sum(-1, keepdim=True)
        prek = prek.masked_fill(~valid[..., None], float("-inf"))
        a = prek.detach().amax(-1)  # (B, H, Lk)
        if causal:
            r = torch.cummax(a, dim=-1).values
        else:
            r = a.amax(-1, keepdim=True).expand(B, H, Lq)
        r = torch.where(torch.isinf(r), torch.zeros_like(r), r)  # only for queries that see nothing
        expo = prek[:, :, None, :, :] - r[:, :, :, None, None]  # (B, H, Lq, Lk, M)
        see = valid[:, :, None, :]
        if causal:
            see = see & tril
        expo = expo.masked_fill(~see[..., None], float("-inf"))
        psi = sM * (torch.exp(expo) + FAVOR_SOFTMAX_EPS) * see[..., None]
        A = torch.einsum("bhim,bhijm->bhij", phi, psi)
    elif kernel == "relu":
        phi = sM * torch.relu(q @ W.T) + FAVOR_RELU_EPS
        psi = (sM * torch.relu(k @ W.T) + FAVOR_RELU_EPS) * valid[..., None]
        A = phi @ psi.transpose(-1, -2)
        if causal:
            A = A * tril
    else:
        raise ValueError(f"favor_attention_reference: kernel must be 'softmax' or 'relu', got {kernel!r}")
    num = A @ v
    den = A.sum(-1, keepdim=True)
    return num / torch.where(den == 0, torch.ones_like(den), den)


def softmax_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """Exact softmax attention softmax(q k^T / sqrt(D)) v in float64; rows that see no key give 0."""
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    D = q.shape[-1]
    Lq, Lk = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) / D ** 0.5
    see = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:
        see = see.tril()
    see = see.expand(q.shape[0], q.shape[1], Lq, Lk)
    if key_padding_mask is not None:
        see = see & ~key_padding_mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~see, float("-inf"))
    w = torch.softmax(scores, dim=-1)
    w = torch.nan_to_num(w, nan=0.0)
    return w @ v
