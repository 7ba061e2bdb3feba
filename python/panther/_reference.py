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

__all__ = [
    "sketched_linear_reference",
    "sketched_linear_dense_weight_reference",
    "favor_attention_reference",
    "softmax_attention_reference",
    "rand_multihead_attention_reference",
]


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


# Must match kFavorSoftmaxEps / kFavorReluEps in cpp/attention/impl.h.
FAVOR_SOFTMAX_EPS = 1e-6
FAVOR_RELU_EPS = 1e-3


def favor_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    kernel_fn: str = "softmax",
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    key_bias: Optional[Tensor] = None,
    return_weights: bool = False,
):
    """FAVOR+ attention in float64 through the explicit (Lq x Lk) matrix of kernel values.

    q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv), projection (M, D); key_padding_mask
    (B, Lk) bool, True = padded. Returns (B, H, Lq, Dv) in float64, and with ``return_weights``
    also the normalised matrix (B, H, Lq, Lk) whose product with v is the output.

    key_bias: optional (B, Lk) additive scores (RandMultiHeadAttention's float key_padding_mask):
    keys with a bias of -inf or <= finfo(dtype).min / 2 count as padded; the others' kernel
    values are multiplied by exp(bias_j - max_j' bias_j') (max over unpadded keys); keys whose factor underflows to 0 count as padded.

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
    factor = None
    if key_bias is not None:
        valid = valid & (key_bias > torch.finfo(key_bias.dtype).min / 2)[:, None, :]
        kb = key_bias.to(torch.float64)[:, None, :].masked_fill(~valid, float("-inf"))
        top = kb.amax(-1, keepdim=True)
        factor = torch.exp(kb - torch.where(torch.isinf(top), torch.zeros_like(top), top))  # (B, H, Lk)
        valid = valid & (factor > 0)  # keys whose weight underflows to 0 are padded
    tril = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
    if kernel_fn == "softmax":
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
    elif kernel_fn == "relu":
        phi = sM * torch.relu(q @ W.T) + FAVOR_RELU_EPS
        psi = (sM * torch.relu(k @ W.T) + FAVOR_RELU_EPS) * valid[..., None]
        A = phi @ psi.transpose(-1, -2)
        if causal:
            A = A * tril
    else:
        raise ValueError(f"favor_attention_reference: kernel_fn must be 'softmax' or 'relu', got {kernel_fn!r}")
    if factor is not None:
        A = A * factor[:, :, None, :]
    den = A.sum(-1, keepdim=True)
    weights = A / torch.where(den == 0, torch.ones_like(den), den)
    out = weights @ v
    return (out, weights) if return_weights else out


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


def rand_multihead_attention_reference(
    layer,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    causal: bool = False,
    return_weights: bool = False,
):
    """``RandMultiHeadAttention`` (``layer``: its parameters, flags and random features) in float64.

    Follows the documented conventions independently of the module's code: ``batch_first``
    layout (2-d inputs: one unbatched sequence), ``attention_mask`` keep-mask (nonzero/True =
    attend), ``key_padding_mask`` bool/integer (True/nonzero = ignore) or float (added to the
    scores: :func:`favor_attention_reference`'s ``key_bias``), ``bias_k/bias_v`` and
    ``add_zero_attn`` appended keys, no dropout. Returns the output (float64, the layer's input
    layout) and, with ``return_weights``, the (B, H, Lq, Lk) weights.
    """
    f64 = torch.float64
    batched = query.dim() == 3
    if not batched:
        query, key, value = query[None], key[None], value[None]
        if attention_mask is not None and attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if key_padding_mask is not None and key_padding_mask.dim() == 1:
            key_padding_mask = key_padding_mask[None]
    elif not layer.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    query, key, value = query.to(f64), key.to(f64), value.to(f64)
    B, Lq, E = query.shape
    Lk = key.shape[1]
    H, hd = layer.num_heads, layer.head_dim

    def lin(x, W, b):
        y = x @ W.to(f64).T
        return y if b is None else y + b.to(f64)

    def split(x):
        return x.reshape(B, -1, H, hd).transpose(1, 2)

    q = split(lin(query, layer.Wq, layer.bq))
    k = split(lin(key, layer.Wk, layer.bk))
    v = split(lin(value, layer.Wv, layer.bv))
    padded = torch.zeros(B, Lk, dtype=torch.bool, device=query.device)
    bias = None
    if attention_mask is not None:
        padded = padded | (attention_mask == 0)
    if key_padding_mask is not None:
        if key_padding_mask.is_floating_point():
            bias = key_padding_mask
        else:
            padded = padded | (key_padding_mask != 0)
    extra = []
    if layer.bias_k is not None:
        extra.append((layer.bias_k.to(f64).reshape(1, H, 1, hd), layer.bias_v.to(f64).reshape(1, H, 1, hd)))
    if layer.add_zero_attn:
        z = torch.zeros(1, H, 1, hd, dtype=f64)
        extra.append((z, z))
    for bk_, bv_ in extra:
        k = torch.cat([k, bk_.expand(B, H, 1, hd)], 2)
        v = torch.cat([v, bv_.expand(B, H, 1, hd)], 2)
        padded = torch.cat([padded, torch.zeros(B, 1, dtype=torch.bool)], 1)
        if bias is not None:
            bias = torch.cat([bias, torch.zeros(B, 1, dtype=bias.dtype)], 1)
    o, w = favor_attention_reference(q, k, v, layer.projection_matrix, layer.kernel_fn, causal, padded,
                                     key_bias=bias, return_weights=True)
    out = lin(o.transpose(1, 2).reshape(B, Lq, E), layer.W0, layer.b0)
    if not batched:
        out, w = out[0], w[0]
    elif not layer.batch_first:
        out = out.transpose(0, 1)
    return (out, w) if return_weights else out
