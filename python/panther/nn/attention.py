"""RandMultiHeadAttention: FAVOR+ random-feature multi-head attention, linear in sequence length."""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_KERNELS = ("softmax", "relu")


def _check_positive_int(layer: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{layer}: {name} must be a positive integer, got {value!r}")
    return value


def orthogonal_gaussian_projection(
    num_features: int,
    dim: int,
    *,
    generator: Optional[torch.Generator] = None,
    dtype: Optional[torch.dtype] = None,
    device=None,
) -> Tensor:
    """Performer's random features: ``(num_features, dim)`` rows in orthogonal blocks.

    Each block of ``dim`` rows is the Q factor of a Gaussian ``(dim, dim)`` matrix (QR in float64
    on the CPU); the rows are then scaled by independent chi(dim)-distributed norms (norms of
    Gaussian vectors), so each row is marginally ``N(0, I)`` and rows within a block are exactly
    orthogonal. Draws come from ``generator`` (or the global generator); nothing is reseeded.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    nblocks = (num_features + dim - 1) // dim
    blocks = []
    for _ in range(nblocks):
        g = torch.randn(dim, dim, generator=generator, device=gen_device, dtype=torch.float64).cpu()
        qmat, _ = torch.linalg.qr(g)
        blocks.append(qmat.T)
    rows = torch.cat(blocks, 0)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator, device=gen_device, dtype=torch.float64)
    rows = rows * norms.cpu().norm(dim=1, keepdim=True)
    return rows.to(device=device, dtype=dtype if dtype is not None else torch.get_default_dtype())


class RandMultiHeadAttention(nn.Module):
    r"""Multi-head attention with FAVOR+ random features (Performer): linear in sequence length.

    ``out = (phi(Q) (phi(K)^T V)) / (phi(Q) (phi(K)^T 1))`` per head, with ``phi`` the positive
    softmax random features (an unbiased estimate of ``exp(q.k / sqrt(head_dim))``) or relu
    features, computed by the native op ``torch.ops.panther.favor_attention``
    (see :func:`panther.ops.favor_attention` for the math, stabilisers and eps).

    Args:
        embed_dim: model width ``E``; num_heads: heads ``H`` (``E % H == 0``, head_dim ``E / H``).
        num_random_features: ``M``, random features per head (shared by the heads); more features,
            closer to exact softmax attention.
        dropout: probability of zeroing entries of the per-head attention output (before the
            output projection ``W0``), in training only (``module.train()``); not in eval.
        bias: learn input/output projection biases ``bq, bk, bv, b0``.
        kernel_fn: ``"softmax"`` or ``"relu"``.
        iscausal: position i attends to positions ``<= i`` only (needs equal query/key lengths).
        device, dtype: of parameters and buffers.
        generator: ``torch.Generator`` for parameter init and the random features (default: the
            global generator; constructing a layer never reseeds, two layers differ, and
            ``torch.manual_seed`` reproduces a model).

    Parameters ``Wq, Wk, Wv, W0`` ``(E, E)`` (``nn.Linear`` layout: ``q = x Wq^T + bq``) and biases
    ``bq, bk, bv, b0`` ``(E,)``; buffer ``projection_matrix`` ``(M, head_dim)``: Panther's names, so
    its checkpoints load.

    Shape: query ``(batch, Lq, E)``, key and value ``(batch, Lk, E)`` -> ``((batch, Lq, E), None)``.
    """

    __constants__ = ["embed_dim", "num_heads", "head_dim", "num_random_features", "dropout",
                     "kernel_fn", "causal", "bias"]
    embed_dim: int
    num_heads: int
    head_dim: int
    num_random_features: int
    dropout: float
    kernel_fn: str
    causal: bool
    bias: bool
    bq: Optional[Tensor]
    bk: Optional[Tensor]
    bv: Optional[Tensor]
    b0: Optional[Tensor]

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_random_features: int,
        dropout: float = 0.0,
        bias: bool = True,
        kernel_fn: str = "softmax",
        iscausal: bool = False,
        device=None,
        dtype=None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        _check_positive_int(name, "embed_dim", embed_dim)
        _check_positive_int(name, "num_heads", num_heads)
        _check_positive_int(name, "num_random_features", num_random_features)
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"{name}: embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, "
                f"num_heads={num_heads}"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must be a number in [0, 1), got {dropout!r}")
        if not isinstance(bias, bool):
            raise ValueError(f"{name}: bias must be a bool, got {bias!r}")
        if kernel_fn not in _KERNELS:
            raise ValueError(f"{name}: kernel_fn must be 'softmax' or 'relu', got {kernel_fn!r}")
        if not isinstance(iscausal, bool):
            raise ValueError(f"{name}: iscausal must be a bool, got {iscausal!r}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.num_random_features = num_random_features
        self.dropout = float(dropout)
        self.kernel_fn = kernel_fn
        self.causal = iscausal
        self.bias = bias
        fk = {"device": device, "dtype": dtype}
        # Wq, Wk, Wv (and bq, bk, bv) are separate parameters that live back to back in one
        # buffer, so that inference can project q, k and v with one GEMM (see _eager_self_attention).
        w_in = torch.empty(3 * embed_dim, embed_dim, **fk)
        self.Wq = nn.Parameter(w_in[:embed_dim])
        self.Wk = nn.Parameter(w_in[embed_dim:2 * embed_dim])
        self.Wv = nn.Parameter(w_in[2 * embed_dim:])
        self.W0 = nn.Parameter(torch.empty(embed_dim, embed_dim, **fk))
        if bias:
            b_in = torch.zeros(3 * embed_dim, **fk)
            self.bq = nn.Parameter(b_in[:embed_dim])
            self.bk = nn.Parameter(b_in[embed_dim:2 * embed_dim])
            self.bv = nn.Parameter(b_in[2 * embed_dim:])
            self.b0 = nn.Parameter(torch.zeros(embed_dim, **fk))
        else:
            self.register_parameter("bq", None)
            self.register_parameter("bk", None)
            self.register_parameter("bv", None)
            self.register_parameter("b0", None)
        with torch.no_grad():
            for w in (self.Wq, self.Wk, self.Wv, self.W0):
                nn.init.xavier_uniform_(w, generator=generator)
        self.register_buffer(
            "projection_matrix",
            orthogonal_gaussian_projection(num_random_features, self.head_dim, generator=generator, **fk),
        )

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.half() give every parameter new storage; put the input projections
        # back to back again (values, dtypes and Parameter objects unchanged).
        out = super()._apply(fn, *args, **kwargs)
        with torch.no_grad():
            for names in (("Wq", "Wk", "Wv"), ("bq", "bk", "bv")):
                ps = [getattr(self, n) for n in names]
                if any(p is None for p in ps) or self._adjacent(ps):
                    continue
                if len({(p.dtype, p.device, p.shape) for p in ps}) != 1:
                    continue
                buf = torch.cat([p.detach() for p in ps])
                for i, p in enumerate(ps):
                    p.data = buf[i * self.embed_dim:(i + 1) * self.embed_dim]
        return out

    @staticmethod
    def _adjacent(ps) -> bool:
        """Whether the tensors are contiguous, alike and back to back in memory (on one device:
        CPU and CUDA memory share one address space, so adjacent addresses imply one device)."""
        first = ps[0]
        if not first.is_contiguous():
            return False
        addr, step = first.data_ptr(), first.numel() * first.element_size()
        shape, dtype = first.shape, first.dtype
        for p in ps[1:]:
            addr += step
            if p.data_ptr() != addr or p.shape != shape or p.dtype != dtype or not p.is_contiguous():
                return False
        return True

    @torch.jit.unused
    def _eager_self_attention(self, x: Tensor, causal: bool, kpm: Optional[Tensor]) -> Optional[Tensor]:
        """The whole forward as one native call (panther::_rand_mha_self_attention, a composition
        of differentiable ops) for eager self-attention, or None (compiling, dropout active).
        Short sequences are bound by host submission. Without autograd the op also projects q, k
        and v with one GEMM over the back-to-back Wq, Wk, Wv (nothing copied or cached, so
        in-place edits are seen)."""
        if torch.compiler.is_compiling() or (self.training and self.dropout > 0):
            return None
        return torch.ops.panther._rand_mha_self_attention(
            x, self.Wq, self.Wk, self.Wv, self.bq, self.bk, self.bv, self.W0, self.b0,
            self.projection_matrix, self.num_heads, self.kernel_fn, causal, kpm)

    @torch.jit.unused
    def redraw_projection(self, generator: Optional[torch.Generator] = None) -> None:
        """Draw new random features (in place, same shape, dtype and device)."""
        new = orthogonal_gaussian_projection(
            self.num_random_features, self.head_dim, generator=generator,
            dtype=self.projection_matrix.dtype, device=self.projection_matrix.device,
        )
        with torch.no_grad():
            self.projection_matrix.copy_(new)

    def _padding_mask(
        self, batch: int, lk: int, attention_mask: Optional[Tensor], key_padding_mask: Optional[Tensor]
    ) -> Optional[Tensor]:
        """Combine both mask conventions into one bool (batch, Lk) mask, True = ignore the key."""
        out: Optional[Tensor] = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.size(0) != batch or attention_mask.size(1) != lk:
                raise ValueError(
                    f"RandMultiHeadAttention: attention_mask must have shape (batch={batch}, key_len={lk}) "
                    f"with 1/True = attend, got {list(attention_mask.shape)}"
                )
            if attention_mask.dtype == torch.bool:
                out = attention_mask.logical_not()
            else:
                out = attention_mask == 0
        if key_padding_mask is not None:
            if key_padding_mask.dim() != 2 or key_padding_mask.size(0) != batch or key_padding_mask.size(1) != lk:
                raise ValueError(
                    f"RandMultiHeadAttention: key_padding_mask must have shape (batch={batch}, key_len={lk}) "
                    f"with True = ignore, got {list(key_padding_mask.shape)}"
                )
            if key_padding_mask.dtype == torch.bool:
                kpm = key_padding_mask
            else:
                # nn.MultiheadAttention's float convention: 0 = attend, -inf = ignore.
                kpm = torch.isneginf(key_padding_mask)
            if out is None:
                out = kpm
            else:
                out = out | kpm
        return out

    def _attn_mask_is_causal(self, attn_mask: Tensor, lq: int, lk: int) -> bool:
        if attn_mask.dim() != 2 or attn_mask.size(0) != lq or attn_mask.size(1) != lk or lq != lk:
            raise ValueError(
                f"RandMultiHeadAttention: attn_mask can only be None or a causal (L, L) mask "
                f"(random-feature attention cannot apply an arbitrary mask), got shape "
                f"{list(attn_mask.shape)} for query length {lq} and key length {lk}"
            )
        upper = torch.ones(lq, lk, dtype=torch.bool, device=attn_mask.device).triu(1)
        if attn_mask.dtype == torch.bool:
            ok = bool(torch.equal(attn_mask, upper))
        else:
            ok = bool(torch.all(torch.where(upper, torch.isneginf(attn_mask), attn_mask == 0)))
        if not ok:
            raise ValueError(
                "RandMultiHeadAttention: attn_mask can only be None or a causal mask (bool with True "
                "above the diagonal, or float with -inf above the diagonal and 0 elsewhere); random-feature "
                "attention cannot apply an arbitrary (L, S) mask: use is_causal=True or key_padding_mask"
            )
        return True

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
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """query ``(batch, Lq, E)``, key/value ``(batch, Lk, E)`` -> ``((batch, Lq, E), None)``.

        attention_mask: ``(batch, Lk)``, bool or numeric 0/1, 1/True = attend (the tutorials'
        convention). key_padding_mask: ``(batch, Lk)``, True (or float -inf) = ignore
        (nn.MultiheadAttention's convention). Both may be given; a key is used if neither masks it.
        need_weights: accepted for compatibility; no attention matrix exists, so None is returned.
        attn_mask: None or a causal ``(L, L)`` mask (anything else is an error); is_causal=True,
        a causal attn_mask or ``iscausal=True`` at construction make the layer causal. The mask is
        checked by value, which torch.compile(fullgraph=True)/torch.export cannot trace: there,
        pass ``is_causal=True`` instead of a mask.
        """
        # (Shapes read once: short sequences are bound by host time, and each query costs.)
        qs, ks, vs = query.shape, key.shape, value.shape
        if len(qs) != 3 or len(ks) != 3 or len(vs) != 3:
            raise ValueError(
                f"RandMultiHeadAttention: query, key and value must be 3-d (batch, seq, embed_dim), got "
                f"{list(qs)}, {list(ks)}, {list(vs)}"
            )
        E = self.embed_dim
        if qs[2] != E or ks[2] != E or vs[2] != E:
            raise ValueError(
                f"RandMultiHeadAttention: last dim of query, key and value must be embed_dim={E}, got "
                f"{qs[2]}, {ks[2]}, {vs[2]}"
            )
        B, Lq, Lk = qs[0], qs[1], ks[1]
        if ks[0] != B or vs[0] != B or vs[1] != Lk:
            raise ValueError(
                f"RandMultiHeadAttention: key and value must have shape (batch={B}, key_len, {E}) with the "
                f"same key_len, got {list(key.shape)} and {list(value.shape)}"
            )
        causal = self.causal or is_causal
        if attn_mask is not None:
            causal = self._attn_mask_is_causal(attn_mask, Lq, Lk)
        if causal and Lq != Lk:
            raise ValueError(
                f"RandMultiHeadAttention: causal attention needs equal query and key lengths, got {Lq} and {Lk}"
            )
        kpm: Optional[Tensor] = None
        if attention_mask is not None or key_padding_mask is not None:
            kpm = self._padding_mask(B, Lk, attention_mask, key_padding_mask)
        if not torch.jit.is_scripting() and query is key and key is value:
            out = self._eager_self_attention(query, causal, kpm)
            if out is not None:
                return out, None
        H, hd = self.num_heads, self.head_dim
        q = F.linear(query, self.Wq, self.bq).view(B, Lq, H, hd).transpose(1, 2)
        k = F.linear(key, self.Wk, self.bk).view(B, Lk, H, hd).transpose(1, 2)
        v = F.linear(value, self.Wv, self.bv).view(B, Lk, H, hd).transpose(1, 2)
        ctx = torch.ops.panther.favor_attention(q, k, v, self.projection_matrix, self.kernel_fn, causal, kpm)
        # A view, not a copy: the op lays its (B, H, Lq, hd) output out as (B, Lq, H, hd).
        ctx = ctx.transpose(1, 2).reshape(B, Lq, E)
        if self.training and self.dropout > 0:  # (p = 0 would still cost a launch)
            ctx = F.dropout(ctx, p=self.dropout, training=True)
        return F.linear(ctx, self.W0, self.b0), None

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_random_features={self.num_random_features}, dropout={self.dropout}, bias={self.bias}, "
            f"kernel_fn={self.kernel_fn!r}, iscausal={self.causal}"
        )


def make_performer(
    mha: nn.MultiheadAttention,
    num_random_features: int,
    kernel_fn: str = "softmax",
    iscausal: bool = False,
    generator: Optional[torch.Generator] = None,
) -> RandMultiHeadAttention:
    """Convert a (trained) ``nn.MultiheadAttention`` into a :class:`RandMultiHeadAttention`.

    ``in_proj_weight`` is split into ``Wq, Wk, Wv`` (and ``in_proj_bias`` into ``bq, bk, bv``);
    ``out_proj`` becomes ``W0, b0``; dropout, dtype and device are kept; weights are copied, not
    shared. The result always takes (batch, seq, embed) inputs: if ``mha.batch_first`` is False
    (nn.MultiheadAttention's default, (seq, batch, embed)), transpose inputs and outputs.
    Only the packed form is supported (kdim = vdim = embed_dim, no bias_k/bias_v, no add_zero_attn).
    """
    if not isinstance(mha, nn.MultiheadAttention):
        raise TypeError(f"make_performer: mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
    if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        raise ValueError("make_performer: mha must have kdim == vdim == embed_dim (packed in_proj_weight)")
    if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
        raise ValueError("make_performer: mha with add_bias_kv or add_zero_attn is not supported")
    E = mha.embed_dim
    w = mha.in_proj_weight
    has_bias = mha.in_proj_bias is not None
    layer = RandMultiHeadAttention(
        E, mha.num_heads, num_random_features, dropout=float(mha.dropout), bias=has_bias,
        kernel_fn=kernel_fn, iscausal=iscausal, device=w.device, dtype=w.dtype, generator=generator,
    )
    with torch.no_grad():
        layer.Wq.copy_(w[:E])
        layer.Wk.copy_(w[E:2 * E])
        layer.Wv.copy_(w[2 * E:])
        layer.W0.copy_(mha.out_proj.weight)
        if has_bias:
            b = mha.in_proj_bias
            layer.bq.copy_(b[:E])
            layer.bk.copy_(b[E:2 * E])
            layer.bv.copy_(b[2 * E:])
            if mha.out_proj.bias is not None:
                layer.b0.copy_(mha.out_proj.bias)
            else:
                layer.b0.zero_()
    layer.train(mha.training)
    return layer
