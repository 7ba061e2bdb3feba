"""Context parallelism for FAVOR+ attention: one long sequence split across ranks.

Import it explicitly (``import panther.distributed``); ``import panther`` does not load
``torch.distributed`` machinery.

Each rank of a process group holds one contiguous chunk of the sequence (rank 0 the first chunk,
then in group-rank order; chunks may differ in length). Random-feature attention needs only small
states from the other ranks, never their keys or values:

* non-causal: the key stabiliser is the maximum over every unpadded key of the sequence (one
  all-reduce MAX of a ``(B, H)`` tensor), and the key-value state ``sum_j psi(k_j) [v_j, 1]^T``
  (``(B, H, M, Dv + 1)``) is summed over ranks (one all-reduce; its backward is an all-reduce of
  the state gradient);
* causal: each rank's local state relative to its own key maximum is all-gathered
  (``(B, H, M + 1, Dv + 1)`` per rank, with the per-rank maxima); every rank sums the states of
  the ranks before it, rescaled to their running maximum (an exclusive prefix scan done locally),
  and continues the chunked causal computation of the single-process op from there. The backward
  of the gather is one all-reduce of the gathered states' gradient.

The result equals ``torch.ops.panther.favor_attention`` on the concatenated sequence up to
rounding, stabilisers included: per query row for queries; for keys the running maximum over the
unpadded keys up to the position (causal, carried across ranks) or the maximum over all unpadded
keys (non-causal). These are the only cross-rank dependencies, and no position depends on a later
one in the causal mode.

This path is written with differentiable PyTorch operations (no TorchScript) and works with any
``torch.distributed`` backend (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["context_parallel_favor_attention", "context_parallel_attention_forward", "ContextParallel"]

from ._favor_math import RELU_EPS as _RELU_EPS, SOFTMAX_EPS as _SOFTMAX_EPS  # noqa: F401
from ._favor_math import features as _features, finite_or as _finite_or, ratio as _ratio
_OP = "context_parallel_favor_attention"


# ----------------------------------------------------------------------------- collectives


class _AllReduceSum(torch.autograd.Function):
    """Sum of ``x`` over the group; every rank uses the sum, so the backward sums the gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        y = x.contiguous().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


class _AllGather(torch.autograd.Function):
    """Stack of every rank's ``x`` -> ``(world, *x.shape)``; backward: this rank's slice of the
    gradient summed over ranks (an all-reduce: the states are small)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g[ctx.rank], None


class _ChunkScan(torch.autograd.Function):
    """Exclusive scan over chunk states: ``H_0 = h0``, ``H_{c+1} = alpha_c H_c + T_c``.

    h0 ``(BH, M, E)``, T ``(BH, n, M, E)``, alpha ``(BH, n)`` (constants: built from the
    stabilisers) -> H ``(BH, n, M, E)``. One fused operation per chunk, forward and backward (the
    backward is the reverse scan), instead of a graph of small autograd nodes per chunk.
    """

    @staticmethod
    def forward(ctx, h0: Tensor, T: Tensor, alpha: Tensor) -> Tensor:  # type: ignore[override]
        n = T.shape[1]
        a = alpha.transpose(0, 1).contiguous()[..., None, None]  # (n, BH, 1, 1)
        Tn = T.transpose(0, 1)
        out = torch.empty((n,) + tuple(h0.shape), dtype=h0.dtype, device=h0.device)
        if n:
            out[0] = h0
        for c in range(1, n):
            torch.addcmul(Tn[c - 1], a[c - 1], out[c - 1], out=out[c])
        ctx.save_for_backward(a)
        return out.transpose(0, 1)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (a,) = ctx.saved_tensors
        gn = g.transpose(0, 1)
        n = gn.shape[0]
        dT = torch.zeros_like(gn)
        D = gn[n - 1].clone()
        for c in range(n - 2, -1, -1):  # D_c = g_c + alpha_c D_{c+1}; dT_c = D_{c+1}
            dT[c] = D
            D = torch.addcmul(gn[c], a[c], D)
        return D, dT.transpose(0, 1), None


def _gather_detached(x: Tensor, group) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


# ----------------------------------------------------------------------------- checks


def _check(query: Tensor, key: Tensor, value: Tensor, projection: Tensor, kernel_fn: str, causal: bool,
           key_padding_mask: Optional[Tensor], chunk_size: int) -> None:
    if kernel_fn not in ("softmax", "relu"):
        raise ValueError(f"{_OP}: kernel_fn must be 'softmax' or 'relu', got {kernel_fn!r}")
    for name, t, what in (("query", query, "(batch, heads, Lq, head_dim)"),
                          ("key", key, "(batch, heads, Lk, head_dim)"),
                          ("value", value, "(batch, heads, Lk, value_dim)")):
        if not isinstance(t, Tensor) or t.dim() != 4:
            shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{_OP}: {name} must be a 4-d tensor {what} (this rank's chunk), got {shape}")
    if not isinstance(projection, Tensor) or projection.dim() != 2:
        shape = list(projection.shape) if isinstance(projection, Tensor) else type(projection).__name__
        raise ValueError(f"{_OP}: projection must be 2-d (num_random_features, head_dim), got {shape}")
    if not query.is_floating_point():
        raise ValueError(f"{_OP}: query must be a floating-point tensor, got {query.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise ValueError(f"{_OP}: {name} must have the query's dtype {query.dtype}, got {t.dtype}")
    if not projection.is_floating_point():
        raise ValueError(f"{_OP}: projection must be a floating-point tensor, got {projection.dtype}")
    for name, t in (("key", key), ("value", value), ("projection", projection)):
        if t.device != query.device:
            raise ValueError(f"{_OP}: {name} must be on the query's device {query.device}, got {t.device}")
    B, H, Lq, D = query.shape
    Lk = key.shape[2]
    if key.shape[0] != B or key.shape[1] != H or key.shape[3] != D:
        raise ValueError(f"{_OP}: key must have shape (batch={B}, heads={H}, Lk, head_dim={D}) to match "
                         f"query {list(query.shape)}, got {list(key.shape)}")
    if value.shape[0] != B or value.shape[1] != H or value.shape[2] != Lk:
        raise ValueError(f"{_OP}: value must have shape (batch={B}, heads={H}, Lk={Lk}, value_dim) to "
                         f"match key {list(key.shape)}, got {list(value.shape)}")
    if D < 1 or projection.shape[0] < 1 or projection.shape[1] != D:
        raise ValueError(f"{_OP}: projection must have shape (num_random_features >= 1, head_dim={D}), "
                         f"got {list(projection.shape)}")
    if causal and Lq != Lk:
        raise ValueError(f"{_OP}: causal=True needs equal query and key chunk lengths on each rank, "
                         f"got Lq={Lq} and Lk={Lk}")
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            raise ValueError(f"{_OP}: key_padding_mask must be a bool tensor (True = padded key), got "
                             f"{m.dtype if isinstance(m, Tensor) else type(m).__name__}")
        if m.dim() != 2 or m.shape[0] != B or m.shape[1] != Lk:
            raise ValueError(f"{_OP}: key_padding_mask must have shape (batch={B}, Lk={Lk}) (this "
                             f"rank's chunk), got {list(m.shape)}")
        if m.device != query.device:
            raise ValueError(f"{_OP}: key_padding_mask must be on the query's device {query.device}, "
                             f"got {m.device}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{_OP}: chunk_size must be a positive integer, got {chunk_size!r}")


# ----------------------------------------------------------------------------- the local math


def _max_last(x: Tensor) -> Tensor:
    """Max over the last dim; -inf where it is empty (a rank with an empty chunk)."""
    if x.shape[-1] == 0:
        return torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)
    return x.amax(-1)


def _noncausal(phi, kfeat, V, valid, ek, softmax: bool, group) -> Tensor:
    if softmax:
        a = _max_last(kfeat.detach().amax(-1))  # (BH,) local max over unpadded keys (-inf if none)
        dist.all_reduce(a, op=dist.ReduceOp.MAX, group=group)
        r = _finite_or(a)
        khat = (kfeat.shape[-1] ** -0.5) * torch.exp(kfeat - r[:, None, None])
    else:
        khat = kfeat
    Kf = khat + ek * valid[..., None].to(khat.dtype)
    KV = _AllReduceSum.apply(Kf.transpose(1, 2) @ V, group)  # (BH, M, E1)
    return phi @ KV


def _causal(phi, kfeat, V, ek, softmax: bool, group, chunk: int) -> Tensor:
    BH, L, M = phi.shape
    E1 = V.shape[-1]
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    sM = M ** -0.5
    if softmax:
        a = kfeat.detach().amax(-1)  # (BH, L): per-key max exponent, -inf at padded keys
        m = _max_last(a)
        m_all = _gather_detached(m, group)  # (world, BH)
        # This rank's state relative to its own key maximum (every exponent <= 0).
        G = (sM * torch.exp(kfeat - _finite_or(m)[:, None, None])).transpose(1, 2) @ V  # (BH, M, E1)
    else:
        m_all = torch.zeros(world, BH, dtype=phi.dtype, device=phi.device)
        G = kfeat.transpose(1, 2) @ V
    # [state ; plain sum of [v, 1] over unpadded keys (the eps part)] of every rank.
    states = _AllGather.apply(torch.cat([G, V.sum(1, keepdim=True)], 1), group)  # (world, BH, M+1, E1)
    # Exclusive prefix over the ranks before this one: running max P, states rescaled to it.
    before = torch.arange(world, device=phi.device) < rank
    m_before = torch.where(before[:, None], m_all, torch.full_like(m_all, float("-inf")))
    P = m_before.amax(0)  # (BH,), -inf when no earlier unpadded key
    use = before[:, None] & torch.isfinite(m_all)
    wts = torch.where(use, torch.exp(torch.where(use, m_all - _finite_or(P)[None], torch.zeros_like(m_all))),
                      torch.zeros_like(m_all))
    prev = (wts[:, :, None, None] * states[:, :, :M]).sum(0)  # (BH, M, E1) relative to P
    # eps part: earlier ranks' counts are unscaled sums; a rank after this one adds nothing.
    cprev = (before.to(states.dtype)[:, None, None] * states[:, :, M]).sum(0)  # (BH, E1)
    if L == 0:
        return phi @ prev + cprev[:, None, :]  # (BH, 0, E1): nothing, but in the graph
    # Running key stabiliser r (BH, L): max of P and the local running max; positions that have
    # seen no unpadded key yet take the first finite value (their features are all zero).
    if softmax:
        r = torch.maximum(torch.cummax(a, dim=1).values, P[:, None])
        neg = torch.isneginf(r)
        first = _finite_or(torch.where(neg, torch.full_like(r, float("inf")), r).amin(1, keepdim=True))
        r = torch.where(neg, first.expand_as(r), r)
        khat = sM * torch.exp(kfeat - r[..., None])  # (BH, L, M), 0 at padded keys
        P0 = torch.where(torch.isneginf(P), r[:, 0], P)
    else:
        r = torch.zeros(BH, L, dtype=phi.dtype, device=phi.device)
        khat = kfeat
        P0 = torch.zeros(BH, dtype=phi.dtype, device=phi.device)
    # Chunks of C positions, as the single-process op: the state H_c before chunk c is relative
    # to P_c (r at the end of chunk c-1, or P0); every exponent below is <= 0.
    C = min(chunk, L)
    n = (L + C - 1) // C
    pad = n * C - L
    if pad:
        phi_p = F.pad(phi, (0, 0, 0, pad))
        kh_p = F.pad(khat, (0, 0, 0, pad))
        V_p = F.pad(V, (0, 0, 0, pad))
        r_p = torch.cat([r, r[:, -1:].expand(BH, pad)], 1)
    else:
        phi_p, kh_p, V_p, r_p = phi, khat, V, r
    phic, khc, Vc = phi_p.view(BH, n, C, M), kh_p.view(BH, n, C, M), V_p.view(BH, n, C, E1)
    rc = r_p.view(BH, n, C)
    R = rc[:, :, -1]  # (BH, n)
    Pc = torch.cat([P0[:, None], R[:, :-1]], 1)
    alpha = torch.exp(Pc - R)
    kfac = torch.exp(rc - R[..., None])
    T = (khc * kfac[..., None]).transpose(-1, -2) @ Vc  # (BH, n, M, E1)
    Hst = _ChunkScan.apply(prev, T, alpha)  # (BH, n, M, E1): the state before each chunk
    s = torch.exp(Pc[..., None] - rc)  # (BH, n, C)
    with torch.no_grad():  # E_ij = exp(r_j - r_i) for j <= i, else 0 (constants; built in place)
        tril = torch.ones(C, C, dtype=torch.bool, device=phi.device).tril()
        E = (rc[..., None, :] - rc[..., :, None]).clamp_max_(0).exp_().masked_fill_(~tril, 0)
    # (in place: matmul does not save its output, and mul_ saves only the constant E)
    A = (phic @ khc.transpose(-1, -2)).mul_(E)
    Y = (phic @ Hst) * s[..., None] + A @ Vc
    cum = torch.cumsum(V_p, 1) + cprev[:, None, :]
    Y = Y.reshape(BH, n * C, E1) + ek * phi_p.sum(-1, keepdim=True) * cum
    return Y[:, :L]


def context_parallel_favor_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    projection: Tensor,
    kernel_fn: str = "softmax",
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    *,
    chunk_size: int = 256,
) -> Tensor:
    """FAVOR+ attention of a sequence split across the ranks of ``group`` (context parallelism).

    Every rank of ``group`` (default: the default process group) calls this with its own
    contiguous chunk of the sequence, in group-rank order: query ``(B, H, Lq_r, D)``, key
    ``(B, H, Lk_r, D)``, value ``(B, H, Lk_r, Dv)``, key_padding_mask ``(B, Lk_r)`` bool
    (True = padded key) or None; projection ``(M, D)`` the same on every rank. Returns this
    rank's rows of the output, ``(B, H, Lq_r, Dv)`` in the query's dtype (fp16/bf16 computed in
    fp32), equal up to rounding to ``torch.ops.panther.favor_attention`` (same ``kernel_fn``,
    ``causal``) on the sequence concatenated over ranks, stabilisers and eps included.
    ``causal=True`` needs ``Lq_r == Lk_r`` on every rank; chunk lengths may differ between ranks.
    B, H, D, Dv and M must agree across ranks (the exchanged states have shape
    ``(B, H, M + 1, Dv + 1)``).

    Communication per call: non-causal, one all-reduce MAX of ``(B, H)`` (softmax kernel) and one
    all-reduce of ``(B, H, M, Dv + 1)``; causal, one all-gather of ``(B, H)`` (softmax) and one
    all-gather of ``(B, H, M + 1, Dv + 1)``. Backward: one all-reduce of the state gradient. The
    local causal work is chunked (``chunk_size`` positions, memory linear in the chunk length).

    Differentiable in query, key, value and projection (stabilisers are constants, as in the
    single-process op). The gradient of ``projection`` (replicated) is this rank's contribution:
    sum it over the group (``dist.all_reduce``, or DDP over the same group, which averages: the
    gradient of the mean of the ranks' losses) to get the gradient of the whole sequence. Every
    rank must run the forward, and the backward if any rank does (collectives inside).

    Raises ``ValueError`` for bad arguments (naming the argument, expected and actual value) and
    ``RuntimeError`` if ``torch.distributed`` is not initialised.

    A 1-rank group here (under torchrun every rank passes its chunk the same way):

    >>> import os, tempfile, torch, torch.distributed as dist, panther, panther.distributed as pd
    >>> rv = os.path.join(tempfile.mkdtemp(), "rendezvous")
    >>> dist.init_process_group("gloo", init_method="file://" + rv, rank=0, world_size=1)
    >>> q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    >>> W = torch.randn(6, 4, dtype=torch.float64)
    >>> out = pd.context_parallel_favor_attention(q, k, v, W, "softmax", causal=True)
    >>> out.shape
    torch.Size([1, 2, 8, 4])
    >>> torch.allclose(out, torch.ops.panther.favor_attention(q, k, v, W, "softmax", True, None))
    True
    >>> dist.destroy_process_group()
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{_OP}: torch.distributed is not initialised (call dist.init_process_group first)")
    _check(query, key, value, projection, kernel_fn, causal, key_padding_mask, chunk_size)
    if group is None:
        group = dist.group.WORLD
    out_dtype = query.dtype
    cdt = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    B, H, Lq, D = query.shape
    Lk, Dv = key.shape[2], value.shape[3]
    BH = B * H
    q = query.to(cdt).reshape(BH, Lq, D)
    k = key.to(cdt).reshape(BH, Lk, D)
    v = value.to(cdt).reshape(BH, Lk, Dv)
    W = projection.to(cdt)
    if key_padding_mask is not None:
        valid = (~key_padding_mask)[:, None, :].expand(B, H, Lk).reshape(BH, Lk)
    else:
        valid = torch.ones(BH, Lk, dtype=torch.bool, device=query.device)
    V = torch.cat([v, torch.ones_like(v[..., :1])], -1) * valid[..., None].to(cdt)  # (BH, Lk, Dv+1)
    softmax = kernel_fn == "softmax"
    phi, kfeat, ek = _features(q, k, W, kernel_fn, valid)
    if causal:
        Y = _causal(phi, kfeat, V, ek, softmax, group, chunk_size)
    else:
        Y = _noncausal(phi, kfeat, V, valid, ek, softmax, group)
    out = _ratio(Y, Dv)
    return out.reshape(B, H, Lq, Dv).to(out_dtype)


# ----------------------------------------------------------------------------- the module wrapper

_MHA_ATTRS = ("Wq", "Wk", "Wv", "bq", "bk", "bv", "W0", "b0", "projection_matrix", "num_heads",
              "head_dim", "kernel_fn", "causal", "dropout", "_project_heads", "_project_output")


def _key_padding(batch: int, lk: int, attention_mask: Optional[Tensor],
                 key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """Both mask conventions as one bool (batch, Lk) mask, True = ignore the key."""
    out: Optional[Tensor] = None
    for name, m, attend in (("attention_mask", attention_mask, True), ("key_padding_mask", key_padding_mask, False)):
        if m is None:
            continue
        if m.dim() != 2 or m.shape[0] != batch or m.shape[1] != lk:
            raise ValueError(f"ContextParallel: {name} must have shape (batch={batch}, key_len={lk}) "
                             f"(this rank's chunk), got {list(m.shape)}")
        if attend:
            ign = m.logical_not() if m.dtype == torch.bool else m == 0
        else:
            ign = m if m.dtype == torch.bool else torch.isneginf(m)
        out = ign if out is None else out | ign
    return out


def context_parallel_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    causal: Optional[bool] = None,
    group: Optional[dist.ProcessGroup] = None,
    chunk_size: int = 256,
) -> Tensor:
    """A ``RandMultiHeadAttention``'s forward on this rank's chunk, attention context-parallel.

    query ``(B, Lq_r, E)``, key/value ``(B, Lk_r, E)`` (this rank's chunks), key_padding_mask
    ``(B, Lk_r)`` bool (True = ignore) or None; ``causal`` None = the module's own setting.
    Runs the module's input projections, :func:`context_parallel_favor_attention` over ``group``,
    dropout (in training) and the output projection -> ``(B, Lq_r, E)``.
    """
    if causal is None:
        causal = bool(module.causal)
    q = module._project_heads(query, module.Wq, module.bq)
    k = module._project_heads(key, module.Wk, module.bk)
    v = module._project_heads(value, module.Wv, module.bv)
    ctx = context_parallel_favor_attention(q, k, v, module.projection_matrix, module.kernel_fn, causal,
                                           key_padding_mask, group, chunk_size=chunk_size)
    return module._project_output(ctx)


class ContextParallel(nn.Module):
    """Context parallelism for a ``pr.nn.RandMultiHeadAttention``: each rank passes its chunk.

    Wraps ``module`` (kept as ``self.module``, parameters and buffers shared, nothing copied);
    splits nothing itself: every rank of ``group`` (default: the default group) calls it with its
    own contiguous chunk of the sequence, in group-rank order, and gets its rows of the output of
    ``module`` on the whole sequence (up to rounding). Same call as the module:
    ``forward(query, key, value, attention_mask=None, key_padding_mask=None, need_weights=False,
    attn_mask=None, is_causal=False) -> (out, None)`` with query ``(B, Lq_r, E)``, key/value
    ``(B, Lk_r, E)``, masks ``(B, Lk_r)`` for this rank's keys. ``attn_mask`` must be None (a
    global ``(L, L)`` mask has no per-rank meaning): use ``is_causal=True`` or ``iscausal`` at
    construction. The module must hold the same parameters and ``projection_matrix`` on every
    rank (seed identically, or broadcast). Parameter gradients on a rank are its contribution:
    wrap the model in DDP over ``group`` (which averages: the gradient of the mean of the ranks'
    losses) or all-reduce them.

    Raises ``TypeError`` if ``module`` lacks the attention layer's attributes, ``ValueError`` for
    bad inputs.

    >>> import torch, panther as pr, panther.distributed as pd
    >>> layer = pr.nn.RandMultiHeadAttention(16, num_heads=2, num_random_features=8, iscausal=True)
    >>> cp = pd.ContextParallel(layer)   # then, on every rank: out, _ = cp(x_r, x_r, x_r)
    >>> cp.module is layer
    True
    """

    def __init__(self, module: nn.Module, group: Optional[dist.ProcessGroup] = None, chunk_size: int = 256) -> None:
        super().__init__()
        missing = [a for a in _MHA_ATTRS if not hasattr(module, a)]
        if missing:
            raise TypeError(f"ContextParallel: module must be a RandMultiHeadAttention (needs attributes "
                            f"{', '.join(_MHA_ATTRS)}), got {type(module).__name__} without {', '.join(missing)}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"ContextParallel: chunk_size must be a positive integer, got {chunk_size!r}")
        self.module = module
        self.group = group
        self.chunk_size = chunk_size

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = False,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
    ) -> Tuple[Tensor, None]:
        if attn_mask is not None:
            raise ValueError("ContextParallel: attn_mask must be None (each rank holds only a chunk of the "
                             "sequence): use is_causal=True or iscausal=True at construction")
        shapes = [list(t.shape) for t in (query, key, value)]
        E = self.module.Wq.shape[1]
        if any(len(s) != 3 or s[2] != E for s in shapes):
            raise ValueError(f"ContextParallel: query, key and value must be 3-d (batch, chunk_len, "
                             f"embed_dim={E}), got {shapes}")
        if key.shape[0] != query.shape[0] or value.shape[:2] != key.shape[:2]:
            raise ValueError(f"ContextParallel: key and value must have shape (batch={query.shape[0]}, "
                             f"key_len, {E}) with the same key_len, got {shapes[1]} and {shapes[2]}")
        kpm = _key_padding(query.shape[0], key.shape[1], attention_mask, key_padding_mask)
        causal = bool(self.module.causal) or is_causal
        out = context_parallel_attention_forward(self.module, query, key, value, kpm, causal, self.group,
                                                 self.chunk_size)
        return out, None

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}"
