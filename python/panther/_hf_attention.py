"""FAVOR+ as a Hugging Face transformers attention function (``attn_implementation="panther_favor"``).

transformers is imported only when :func:`register` runs (from :func:`panther.convert` with a
:class:`panther.PerformerConfig` on a Hugging Face model). Each converted attention module holds
its random features as a buffer ``panther_favor_projection`` ``(M, head_dim)`` (saved in the
state dict) and the attributes ``panther_favor_kernel`` and ``panther_favor_causal``; attention
modules of the same model without the buffer (left out by the config) keep exact attention (SDPA).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .nn.attention import orthogonal_gaussian_projection

NAME = "panther_favor"
_registered = False


def register() -> None:
    """Register ``"panther_favor"`` with transformers' AttentionInterface and AttentionMaskInterface
    (boolean masks, as for SDPA). Idempotent."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, favor_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionMaskInterface.register(NAME, sdpa_mask)
    except ImportError:  # pragma: no cover - transformers without mask interfaces pass 4-d float masks
        pass
    _registered = True


def _head_dim(m: nn.Module) -> int:
    for attr in ("head_dim", "attention_head_size"):
        v = getattr(m, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    cfg = m.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if not hidden or not heads:
        raise ValueError(f"panther.convert: cannot tell the head dimension of {type(m).__name__}")
    return hidden // heads


def attach(name: str, m: nn.Module, cfg) -> None:
    """Give module ``m`` its random features and switch its model to ``"panther_favor"``."""
    register()
    p = next(m.parameters(), None)
    dtype = p.dtype if p is not None else torch.get_default_dtype()
    device = p.device if p is not None else None
    hd = _head_dim(m)
    proj = orthogonal_gaussian_projection(cfg.num_random_features, hd, dtype=dtype, device=device)
    if "panther_favor_projection" in m._buffers:
        m.panther_favor_projection = proj
    else:
        m.register_buffer("panther_favor_projection", proj)
    m.panther_favor_kernel = cfg.kernel_fn
    m.panther_favor_causal = bool(m.is_causal) if cfg.causal is None else bool(cfg.causal)
    prev = m.config._attn_implementation
    if prev != NAME:
        m.panther_favor_previous = prev
    m.config._attn_implementation = NAME
    n_params = sum(q.numel() for q in m.parameters(recurse=False))
    m._panther_conversion = {
        "name": name, "old_type": type(m).__name__, "new_type": f"{type(m).__name__} (panther_favor)",
        "before": n_params, "after": n_params + proj.numel(), "num_terms": None, "low_rank": None,
        "rank": None, "init": None, "svd": None, "weight_error": None, "output_error": None,
        "num_random_features": cfg.num_random_features, "kernel_fn": cfg.kernel_fn,
    }


def detach(m: nn.Module) -> None:
    """Undo :func:`attach` on one module (the model's previous attention implementation returns)."""
    del m._buffers["panther_favor_projection"]
    for attr in ("panther_favor_kernel", "panther_favor_causal", "_panther_conversion"):
        if hasattr(m, attr):
            delattr(m, attr)
    prev = getattr(m, "panther_favor_previous", None)
    if prev is not None:
        m.config._attn_implementation = prev
        del m.panther_favor_previous


def key_padding_from_mask(mask: Optional[Tensor], batch: int, lq: int, lk: int, causal: bool) -> Optional[Tensor]:
    """A transformers attention mask ``(batch, 1 or heads, Lq, Lk)`` -> bool ``(batch, Lk)``
    key-padding mask (True = ignore), or None where no key is padded.

    Boolean masks (True = attend, as made for SDPA) and additive float masks (0 = attend, the
    dtype's minimum = masked, as made for eager attention) are accepted. Random-feature attention
    can only apply padding (and causality, handled separately): a mask that is anything else
    (an additive bias, a sliding window, per-query patterns) is an error, never ignored.
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        allowed = mask.bool() if mask.dtype != torch.bool else mask
        allowed = allowed[:, None, None, :]
    elif mask.dim() == 4:
        if mask.dtype == torch.bool:
            allowed = mask
        else:
            lo = torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else 0
            allowed = mask > lo
            if mask.is_floating_point() and not bool(((mask == 0) | ~allowed).all()):
                raise ValueError(
                    "panther_favor attention: the attention mask adds a bias (values other than 0 and "
                    "the dtype's minimum); random-feature attention can only drop padded keys"
                )
    else:
        raise ValueError(f"panther_favor attention: attention mask must be 2-d or 4-d, got shape {list(mask.shape)}")
    allowed = allowed[..., :lk]
    allowed = allowed.expand(batch, allowed.shape[1], lq if allowed.shape[2] != 1 else 1, lk)
    # A key is kept if the last query may see it (in causal attention it sees every earlier key).
    keep = allowed[:, :, -1, :].all(1) if allowed.shape[1] > 1 else allowed[:, 0, -1, :]
    expected = keep[:, None, None, :].expand_as(allowed)
    if causal and allowed.shape[2] == lq and lq > 1:
        offset = lk - lq
        tri = torch.ones(lq, lk, dtype=torch.bool, device=allowed.device).tril(offset)
        expected = expected & tri
    # Rows whose every key is masked carry no information (implementations fill them freely).
    live = expected.any(-1, keepdim=True)
    if not bool(((allowed == expected) | ~live).all()):
        raise ValueError(
            "panther_favor attention: the attention mask is not a padding mask (plus causality); "
            "random-feature attention cannot apply arbitrary (query, key) masks"
        )
    kpm = ~keep
    return kpm if bool(kpm.any()) else None


def favor_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> Tuple[Tensor, None]:
    """transformers attention function: q, k, v ``(batch, heads, L, head_dim)`` ->
    ``((batch, Lq, heads, head_dim), None)``. FAVOR+ with the module's random features; modules
    without them fall back to SDPA. Attention dropout does not apply (no attention matrix)."""
    proj = getattr(module, "panther_favor_projection", None)
    if proj is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    B, H, Lq, D = query.shape
    Lk = key.shape[2]
    if key.shape[1] != H:  # grouped-query attention: share each key/value head
        rep = H // key.shape[1]
        key = key.repeat_interleave(rep, 1)
        value = value.repeat_interleave(rep, 1)
    causal = bool(module.panther_favor_causal)
    if causal and Lq != Lk:
        if Lq == 1:
            causal = False  # one new query sees every cached key
        else:
            raise ValueError(
                f"panther_favor attention: causal attention needs equal query and key lengths, got {Lq} and {Lk}"
            )
    if scaling is not None and abs(scaling * math.sqrt(D) - 1.0) > 1e-6:
        # The op computes softmax(q.k / sqrt(D)); fold another scale into q.
        query = query * (scaling * math.sqrt(D))
    kpm = key_padding_from_mask(attention_mask, B, Lq, Lk, module.panther_favor_causal)
    out = torch.ops.panther.favor_attention(
        query, key, value, proj.to(query.dtype), module.panther_favor_kernel, causal, kpm
    )
    return out.transpose(1, 2).contiguous(), None
