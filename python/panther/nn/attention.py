"""RandMultiHeadAttention: FAVOR+ random-feature multi-head attention, linear in sequence length."""

import copy
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _favor_math as _fm
from .._checks import check_dtype, check_fits, check_int, check_tensor
from ._tensors import module_tensors, panther_op

_KERNELS = ("softmax", "relu")
_WEIGHTS = ("Wq", "Wk", "Wv", "bq", "bk", "bv", "W0", "b0", "projection_matrix")  # (_weights)
# Must match kFavorSoftmaxEps / kFavorReluEps in cpp/attention/impl.h.
_SOFTMAX_EPS = 1e-6
_RELU_EPS = 1e-3


def orthogonal_gaussian_projection(
    num_features: int,
    dim: int,
    *,
    generator: Optional[torch.Generator] = None,
    dtype: Optional[torch.dtype] = None,
    device=None,
) -> Tensor:
    """Performer's random features: ``(num_features, dim)`` rows in orthogonal blocks.

    Each block of ``dim`` rows is the Haar-distributed orthogonal factor of a Gaussian
    ``(dim, dim)`` matrix (the Q of its QR with every column multiplied by the sign of the
    matching diagonal entry of R); the rows are then scaled by independent chi(dim)-distributed
    norms (norms of Gaussian vectors). So every row is marginally ``N(0, I)``, rows within a block
    are exactly orthogonal, and blocks are independent. The draws and the QR run on the
    generator's device (``device`` when no generator is given), in float64 on the CPU and in
    float32 (float64 for a float64 result) on a GPU. Draws come from ``generator`` (or that
    device's global generator); nothing is reseeded.

    Returns ``dtype`` (default: the default dtype) on ``device`` (default: the generator's
    device, else the default device). Raises ValueError for non-positive or non-integral sizes,
    TypeError/ValueError for a non-floating ``dtype``.

    >>> w = orthogonal_gaussian_projection(6, 4, generator=torch.Generator().manual_seed(0))
    >>> w.shape
    torch.Size([6, 4])
    >>> bool(torch.allclose((w[:4] @ w[:4].T).triu(1), torch.zeros(4, 4), atol=1e-5))
    True
    """
    name = "orthogonal_gaussian_projection"
    num_features = check_int(name, "num_features", num_features)
    dim = check_int(name, "dim", dim)
    dtype = check_dtype(name, dtype) or torch.get_default_dtype()
    if device is not None:
        out_device = torch.device(device)
    elif generator is not None:
        out_device = generator.device
    else:
        out_device = torch.empty(0).device
    if out_device.type == "meta":
        return torch.empty(num_features, dim, dtype=dtype, device=out_device)
    gen_device = generator.device if generator is not None else out_device
    work = torch.float64 if gen_device.type == "cpu" or dtype == torch.float64 else torch.float32
    nblocks = (num_features + dim - 1) // dim
    g = torch.randn(nblocks, dim, dim, generator=generator, device=gen_device, dtype=work)
    try:
        qmat, rmat = torch.linalg.qr(g)
    except (RuntimeError, NotImplementedError):  # no QR on this device: the CPU's, in float64
        qmat, rmat = torch.linalg.qr(g.cpu().double())
        qmat, rmat = qmat.to(gen_device, work), rmat.to(gen_device, work)
    signs = torch.diagonal(rmat, dim1=-2, dim2=-1).sign()
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    qmat = qmat * signs.unsqueeze(-2)  # column j times sign(R_jj): Haar-distributed
    rows = qmat.transpose(-1, -2).reshape(nblocks * dim, dim)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator, device=gen_device, dtype=work)
    rows = rows * norms.norm(dim=1, keepdim=True)
    return rows.to(device=out_device, dtype=dtype)


def _neg_threshold(dtype: torch.dtype) -> float:
    """``finfo(dtype).min / 2``: additive mask values at or below it exclude the key."""
    if dtype == torch.float16:
        return -32752.0
    if dtype == torch.bfloat16:
        return -1.6947656946257676e38
    if dtype == torch.float32:
        return -1.7014117331926443e38
    return -8.988465674311579e307


@torch.jit.unused
def _values_inspectable(t: Tensor) -> bool:
    """Whether reading a tensor's values on the host is allowed and cheap enough here: not while
    compiling, exporting or capturing a CUDA graph, and not for fake or meta tensors."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    if t.is_meta or (type(t) is not torch.Tensor and not isinstance(t, nn.Parameter)):
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


class FavorDecodeState(NamedTuple):
    r"""The running state of causal FAVOR+ attention for decoding (one layer): its size does not
    depend on how many positions it summarises.

    Fields (``B`` batch, ``H`` heads, ``M`` random features, ``Dv`` head_dim; float32 for
    float16/bfloat16 layers, else the layer's dtype, on the layer's device):

    * ``kv`` ``(B, H, M, Dv + 1)``: ``sum_j M^-1/2 exp(b_j - r) [v_j, 1]`` over the valid keys so
      far (softmax; ``b_j`` the key pre-activations, ``r`` the stabiliser; relu: the key features
      ``M^-1/2 relu(k_j W^T)``). ``kv[..., :Dv]`` is the numerator state (:attr:`numerator`),
      ``kv[..., Dv]`` the denominator state (:attr:`denominator`).
    * ``v_sum`` ``(B, H, Dv + 1)``: ``sum_j [v_j, 1]`` over the valid keys (the eps part of the
      key features).
    * ``stabiliser`` ``(B, H)``: ``r``, the running maximum of the key pre-activations over the
      valid keys so far (``-inf`` before any; relu: 0). ``kv`` is rescaled when it grows.
    * ``length`` ``()`` int64: positions consumed (prefill length plus steps).

    Made by :meth:`RandMultiHeadAttention.prefill`; :meth:`RandMultiHeadAttention.step` and
    ``step_`` raise ValueError for a state whose shapes do not match the layer.

    >>> attn = RandMultiHeadAttention(16, 2, 8, iscausal=True)
    >>> _, state = attn.prefill(torch.randn(1, 5, 16))
    >>> state.kv.shape, int(state.length)
    (torch.Size([1, 2, 8, 9]), 5)
    """

    kv: Tensor
    v_sum: Tensor
    stabiliser: Tensor
    length: Tensor

    @property
    def numerator(self) -> Tensor:
        """``(B, H, M, Dv)``: the running ``sum_j psi(k_j) v_j^T`` (a view of ``kv``)."""
        return self.kv[..., :-1]

    @property
    def denominator(self) -> Tensor:
        """``(B, H, M)``: the running ``sum_j psi(k_j)`` (a view of ``kv``)."""
        return self.kv[..., -1]


class RandMultiHeadAttention(nn.Module):
    r"""Multi-head attention with FAVOR+ random features (Performer): linear in sequence length.

    ``out = (phi(Q) (phi(K)^T V)) / (phi(Q) (phi(K)^T 1))`` per head, with ``phi`` the positive
    softmax random features (an unbiased estimate of ``exp(q.k / sqrt(head_dim))``) or relu
    features, computed by the native op ``torch.ops.panther.favor_attention``
    (see :func:`panther.ops.favor_attention` for the math, stabilisers and eps).

    A drop-in for ``nn.MultiheadAttention`` (same forward keywords and ``(out, weights)``
    result, usable as ``self_attn``/``multihead_attn`` of ``nn.TransformerEncoderLayer`` and
    ``nn.TransformerDecoderLayer``), with two differences: ``batch_first`` defaults to True
    (Panther's layout; ``nn.MultiheadAttention`` defaults to False, so pass
    ``batch_first=False`` where a model feeds ``(seq, batch, embed)``), and ``attn_mask`` may only
    be None or causal (an arbitrary ``(L, S)`` mask cannot be applied in linear time).
    Transformer layers' fused eval fast path is declined (it would compute exact attention):
    ``in_proj_weight`` and ``in_proj_bias`` are None.

    Args:
        embed_dim: model width ``E``; num_heads: heads ``H`` (``E % H == 0``, head_dim ``E / H``).
        num_random_features: ``M``, random features per head (shared by the heads); more features,
            closer to exact softmax attention.
        dropout: probability of zeroing entries of the per-head attention output (before the
            output projection ``W0``), in training only (``module.train()``); not in eval.
        bias: learn input/output projection biases ``bq, bk, bv, b0``.
        kernel_fn: ``"softmax"`` or ``"relu"``.
        iscausal: position i attends to positions ``<= i`` only (needs equal query/key lengths).
        batch_first (keyword): inputs and outputs are ``(batch, seq, feature)`` (default True) or
            ``(seq, batch, feature)``.
        kdim, vdim (keyword): feature sizes of key and value (default ``embed_dim``).
        add_bias_kv (keyword): learn ``bias_k, bias_v`` ``(1, 1, E)`` appended to the projected
            keys and values (as ``nn.MultiheadAttention``); add_zero_attn (keyword): append a
            zero key and value. Both add one key every query sees, so neither combines with
            causal attention (ValueError).
        device, dtype (keyword): of parameters and buffers (dtype must be floating point).
        generator (keyword): ``torch.Generator`` for parameter init and the random features
            (default: the global generator; constructing a layer never reseeds, two layers
            differ, and ``torch.manual_seed`` reproduces a model).
        context_parallel_group (keyword): a ``torch.distributed`` ProcessGroup, or None (default).
            When set, each rank of the group calls the layer with its own contiguous chunk of the
            sequence (in group-rank order; masks ``(B, chunk_len)`` for its keys) and gets its rows
            of the output of the whole sequence: the attention core runs
            :func:`panther.distributed.context_parallel_favor_attention` over the group. Then
            ``attn_mask`` must be None (use ``is_causal``/``iscausal``), ``need_weights`` False,
            masks exclude keys only, and add_bias_kv/add_zero_attn are not allowed; the layer
            cannot be scripted. Parameter gradients are this rank's contribution (DDP over the
            group, or all-reduce them).

    Autoregressive decoding (causal self-attention): :meth:`prefill` runs a prompt and returns
    its :class:`FavorDecodeState`, :meth:`step` / :meth:`step_` consume one position at a time
    in constant time and memory; the outputs equal the causal forward over the whole sequence.

    Parameters ``Wq, W0`` ``(E, E)``, ``Wk`` ``(E, kdim)``, ``Wv`` ``(E, vdim)`` (``nn.Linear``
    layout: ``q = x Wq^T + bq``), separate tensors, and biases ``bq, bk, bv, b0`` ``(E,)``;
    buffer ``projection_matrix`` ``(M, head_dim)``: Panther's names, so its checkpoints load.

    Shape (``batch_first=True``): query ``(batch, Lq, E)``, key ``(batch, Lk, kdim)``, value
    ``(batch, Lk, vdim)`` -> ``((batch, Lq, E), weights or None)``; 2-d inputs ``(L, feature)``
    are one unbatched sequence.

    TorchScript has no keyword-only arguments: ``torch.jit.script`` compiles a twin of the layer
    (same parameters, buffers and flags) whose forward also takes the keyword arguments
    positionally, and puts it in place of the layer in a scripted parent model.

    Raises ValueError for bad sizes (non-integral, non-positive, ``E % H != 0``, too large for
    the memory this process can use), dropout outside ``[0, 1)``, an unknown kernel, and
    TypeError/ValueError for a non-floating ``dtype``.

    >>> layer = RandMultiHeadAttention(16, 2, 8)
    >>> x = torch.randn(3, 5, 16)
    >>> out, weights = layer(x, x, x)
    >>> out.shape, weights
    (torch.Size([3, 5, 16]), None)
    """

    __constants__ = ["embed_dim", "num_heads", "head_dim", "num_random_features", "dropout",
                     "kernel_fn", "causal", "bias", "batch_first", "kdim", "vdim", "add_zero_attn",
                     "_qkv_same_embed_dim"]
    embed_dim: int
    num_heads: int
    head_dim: int
    num_random_features: int
    dropout: float
    kernel_fn: str
    causal: bool
    bias: bool
    batch_first: bool
    kdim: int
    vdim: int
    add_zero_attn: bool
    _qkv_same_embed_dim: bool
    bq: Optional[Tensor]
    bk: Optional[Tensor]
    bv: Optional[Tensor]
    b0: Optional[Tensor]
    bias_k: Optional[Tensor]
    bias_v: Optional[Tensor]
    in_proj_weight: Optional[Tensor]
    in_proj_bias: Optional[Tensor]

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_random_features: int,
        dropout: float = 0.0,
        bias: bool = True,
        kernel_fn: str = "softmax",
        iscausal: bool = False,
        *,
        batch_first: bool = True,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        device=None,
        dtype=None,
        generator: Optional[torch.Generator] = None,
        context_parallel_group=None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if context_parallel_group is not None:
            import torch.distributed as dist  # only when asked for

            if not isinstance(context_parallel_group, dist.ProcessGroup):
                raise ValueError(f"{name}: context_parallel_group must be a torch.distributed ProcessGroup or "
                                 f"None, got {type(context_parallel_group).__name__}")
        embed_dim = check_int(name, "embed_dim", embed_dim)
        num_heads = check_int(name, "num_heads", num_heads)
        num_random_features = check_int(name, "num_random_features", num_random_features)
        kdim = embed_dim if kdim is None else check_int(name, "kdim", kdim)
        vdim = embed_dim if vdim is None else check_int(name, "vdim", vdim)
        dtype = check_dtype(name, dtype)
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"{name}: embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, "
                f"num_heads={num_heads}"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must be a number in [0, 1), got {dropout!r}")
        for flag, value in (("bias", bias), ("iscausal", iscausal), ("batch_first", batch_first),
                            ("add_bias_kv", add_bias_kv), ("add_zero_attn", add_zero_attn)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}: {flag} must be a bool, got {value!r}")
        if kernel_fn not in _KERNELS:
            raise ValueError(f"{name}: kernel_fn must be 'softmax' or 'relu', got {kernel_fn!r}")
        if iscausal and (add_bias_kv or add_zero_attn):
            raise ValueError(
                f"{name}: add_bias_kv and add_zero_attn add a key that every query sees, which causal "
                f"attention (iscausal=True) cannot; got add_bias_kv={add_bias_kv}, add_zero_attn={add_zero_attn}"
            )
        E, M = embed_dim, num_random_features
        hd = E // num_heads
        item = torch.empty(0, dtype=dtype).element_size()
        check_fits(
            name,
            f"embed_dim={E}, num_heads={num_heads}, num_random_features={M}, kdim={kdim}, vdim={vdim}",
            [
                ("Wq and W0 (2, embed_dim, embed_dim)", (2, E, E), item),
                ("Wk (embed_dim, kdim)", (E, kdim), item),
                ("Wv (embed_dim, vdim)", (E, vdim), item),
                ("projection_matrix (num_random_features, head_dim)", (M, hd), item),
                ("random-feature draws (blocks and norms)", (2, M + hd, hd), 8),
            ],
            device,
        )
        self.embed_dim = E
        self.num_heads = num_heads
        self.head_dim = hd
        self.num_random_features = M
        self.dropout = float(dropout)
        self.kernel_fn = kernel_fn
        self.causal = iscausal
        self.bias = bias
        self.batch_first = batch_first
        self.kdim = kdim
        self.vdim = vdim
        self.add_zero_attn = add_zero_attn
        self.context_parallel_group = context_parallel_group
        # nn.MultiheadAttention's packed-projection attributes: there is no packed weight (q, k and
        # v have separate parameters), which also makes nn.Transformer*Layer decline its fused
        # exact-attention fast path.
        self._qkv_same_embed_dim = False
        self.in_proj_weight = None
        self.in_proj_bias = None
        fk = {"device": device, "dtype": dtype}
        self.Wq = nn.Parameter(torch.empty(E, E, **fk))
        self.Wk = nn.Parameter(torch.empty(E, kdim, **fk))
        self.Wv = nn.Parameter(torch.empty(E, vdim, **fk))
        self.W0 = nn.Parameter(torch.empty(E, E, **fk))
        if bias:
            self.bq = nn.Parameter(torch.empty(E, **fk))
            self.bk = nn.Parameter(torch.empty(E, **fk))
            self.bv = nn.Parameter(torch.empty(E, **fk))
            self.b0 = nn.Parameter(torch.empty(E, **fk))
        else:
            self.register_parameter("bq", None)
            self.register_parameter("bk", None)
            self.register_parameter("bv", None)
            self.register_parameter("b0", None)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, E, **fk))
            self.bias_v = nn.Parameter(torch.empty(1, 1, E, **fk))
        else:
            self.register_parameter("bias_k", None)
            self.register_parameter("bias_v", None)
        self.register_buffer("projection_matrix", torch.empty(M, hd, **fk))
        self.reset_parameters(generator)

    @torch.jit.unused
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """(Re)initialise in place: Xavier-uniform ``Wq, Wk, Wv, W0``, zero biases,
        Xavier-normal ``bias_k, bias_v``, and new random features (same tensors, shapes, dtypes
        and devices). Used by the constructor, and after meta-device construction plus
        ``to_empty``:

        >>> layer = RandMultiHeadAttention(16, 2, 8, device="meta").to_empty(device="cpu")
        >>> layer.reset_parameters()
        >>> x = torch.randn(1, 4, 16)
        >>> bool(layer(x, x, x)[0].isfinite().all())
        True
        """
        with torch.no_grad():
            for w in (self.Wq, self.Wk, self.Wv, self.W0):
                nn.init.xavier_uniform_(w, generator=generator)
            for b in (self.bq, self.bk, self.bv, self.b0):
                if b is not None:
                    b.zero_()
            self.projection_matrix.copy_(orthogonal_gaussian_projection(
                self.num_random_features, self.head_dim, generator=generator,
                dtype=self.projection_matrix.dtype, device=self.projection_matrix.device,
            ))
            if self.bias_k is not None and self.bias_v is not None:
                nn.init.xavier_normal_(self.bias_k, generator=generator)
                nn.init.xavier_normal_(self.bias_v, generator=generator)

    def _project_heads(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """An input projection split into heads: x ``(B, L, *)`` -> ``(B, H, L, head_dim)``."""
        B, L = x.shape[0], x.shape[1]
        return F.linear(x, weight, bias).reshape(B, L, self.num_heads, self.head_dim).transpose(1, 2)

    def _project_output(self, ctx: Tensor) -> Tensor:
        """The attention output ``(B, H, L, head_dim)`` -> ``(B, L, embed_dim)``: heads merged (a
        view where the op lays its output out as ``(B, L, H, head_dim)``), dropout in training,
        output projection."""
        B, L = ctx.shape[0], ctx.shape[2]
        ctx = ctx.transpose(1, 2).reshape(B, L, self.embed_dim)
        if self.training and self.dropout > 0:  # (p = 0 would still cost a launch)
            ctx = F.dropout(ctx, p=self.dropout, training=True)
        return F.linear(ctx, self.W0, self.b0)

    @torch.jit.unused
    def _eager_self_attention(self, x: Tensor, causal: bool, kpm: Optional[Tensor]) -> Optional[Tensor]:
        """The whole forward as one native call (panther::_rand_mha_self_attention, a composition
        of differentiable ops) for eager self-attention, or None (compiling, dropout active).
        Short sequences are bound by host submission. Without autograd the op also projects q, k
        and v with one GEMM over the concatenation of Wq, Wk, Wv, formed per call (nothing
        cached, so in-place edits are seen)."""
        if torch.compiler.is_compiling() or (self.training and self.dropout > 0):
            return None
        Wq, Wk, Wv, bq, bk, bv, W0, b0, P = self._weights()
        return panther_op("_rand_mha_self_attention")(
            x, Wq, Wk, Wv, bq, bk, bv, W0, b0, P, self.num_heads, self.kernel_fn, causal, kpm)

    @torch.jit.unused
    def redraw_projection(self, generator: Optional[torch.Generator] = None) -> None:
        """Draw new random features (in place, same shape, dtype and device)."""
        new = orthogonal_gaussian_projection(
            self.num_random_features, self.head_dim, generator=generator,
            dtype=self.projection_matrix.dtype, device=self.projection_matrix.device,
        )
        with torch.no_grad():
            self.projection_matrix.copy_(new)

    def _check_mask_shape(self, what: str, mask: Tensor, batch: int, lk: int, meaning: str) -> None:
        if mask.dim() != 2 or mask.size(0) != batch or mask.size(1) != lk:
            raise ValueError(
                f"RandMultiHeadAttention: {what} must have shape (batch={batch}, key_len={lk}) "
                f"with {meaning}, got {list(mask.shape)}"
            )

    def _normalize_masks(
        self, batch: int, lk: int, attention_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
        inspect: bool,
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Both mask conventions as (excluded, key_bias).

        excluded: bool ``(batch, Lk)``, True = the key is ignored (or None). key_bias: float
        ``(batch, Lk)`` additive scores of the softmax kernel (or None when every value is 0 or
        excludes). Values are checked only where ``inspect`` (eager, not capturing).
        """
        excluded: Optional[Tensor] = None
        key_bias: Optional[Tensor] = None
        if attention_mask is not None:
            m = attention_mask
            self._check_mask_shape("attention_mask", m, batch, lk, "1/True = attend")
            if m.dtype == torch.bool:
                excluded = m.logical_not()
            elif m.is_complex():
                raise ValueError(
                    f"RandMultiHeadAttention: attention_mask must be bool, integer or floating 0/1 "
                    f"(1/True = attend), got dtype {m.dtype}"
                )
            else:
                if inspect and not bool(((m == 0) | (m == 1)).all()):
                    raise ValueError(
                        "RandMultiHeadAttention: attention_mask is a keep-mask (1/True = attend, "
                        "0/False = ignore) and accepts only bool or 0/1 values, got other values (min "
                        f"{float(m.min())}, max {float(m.max())}); for an additive mask (0 = attend, -inf "
                        "or a large negative number = ignore, or finite score biases) pass it as "
                        "key_padding_mask"
                    )
                excluded = m == 0
        if key_padding_mask is not None:
            m = key_padding_mask
            self._check_mask_shape("key_padding_mask", m, batch, lk,
                                   "True/1 = ignore, or float values added to the scores")
            if m.dtype == torch.bool:
                ex = m
            elif m.is_floating_point():
                ex = m <= _neg_threshold(m.dtype)
                if inspect:
                    # One reduction and one device sync where every value is 0 or excludes.
                    if not bool(((m == 0) | ex).all()):
                        if bool((torch.isnan(m) | torch.isposinf(m)).any()):
                            raise ValueError(
                                "RandMultiHeadAttention: key_padding_mask (additive, float) has NaN or +inf values"
                            )
                        if self.kernel_fn == "relu":
                            raise ValueError(
                                "RandMultiHeadAttention: with kernel_fn='relu', a float key_padding_mask "
                                "may only hold 0 (attend) and -inf or values <= finfo(dtype).min / 2 "
                                "(ignore): the relu kernel has no scores to add a bias to; got min "
                                f"{float(m.min())}, max {float(m.max())}"
                            )
                        key_bias = m
                elif self.kernel_fn == "softmax":
                    key_bias = m
            elif m.is_complex():
                raise ValueError(
                    f"RandMultiHeadAttention: key_padding_mask must be bool (True = ignore), integer "
                    f"0/1 (1 = ignore) or floating (added to the scores), got dtype {m.dtype}"
                )
            else:
                if inspect and not bool(((m == 0) | (m == 1)).all()):
                    raise ValueError(
                        "RandMultiHeadAttention: an integer key_padding_mask must hold only 0 (attend) "
                        f"and 1 (ignore), as a bool mask, got values in [{int(m.min())}, {int(m.max())}]"
                    )
                ex = m != 0
            excluded = ex if excluded is None else excluded | ex
        return excluded, key_bias

    def _check_causal_attn_mask(self, attn_mask: Tensor, lq: int, lk: int, is_causal: bool, inspect: bool) -> None:
        if attn_mask.dim() != 2 or attn_mask.size(0) != lq or attn_mask.size(1) != lk or lq != lk:
            raise ValueError(
                f"RandMultiHeadAttention: attn_mask can only be None or a causal (L, L) mask "
                f"(random-feature attention cannot apply an arbitrary mask), got shape "
                f"{list(attn_mask.shape)} for query length {lq} and key length {lk}"
            )
        if not inspect:
            if is_causal:
                return  # the caller's hint, as nn.MultiheadAttention takes it
            raise ValueError(
                "RandMultiHeadAttention: attn_mask cannot be checked to be causal while compiling, "
                "exporting or capturing; pass is_causal=True (with or without the mask)"
            )
        upper = torch.ones(lq, lk, dtype=torch.bool, device=attn_mask.device).triu(1)
        if attn_mask.dtype == torch.bool:
            ok = bool(torch.equal(attn_mask, upper))
        elif attn_mask.is_floating_point():
            excl = attn_mask <= _neg_threshold(attn_mask.dtype)
            ok = bool(torch.all(torch.where(upper, excl, attn_mask == 0)))
        else:
            ok = False
        if not ok:
            raise ValueError(
                "RandMultiHeadAttention: attn_mask can only be None or a causal mask (bool with True "
                "above the diagonal, or float with -inf above the diagonal and 0 elsewhere); random-feature "
                "attention cannot apply an arbitrary (L, S) mask: use is_causal=True or key_padding_mask"
            )

    def _key_factor(self, key_bias: Tensor, excluded: Optional[Tensor], dtype: torch.dtype) -> Tensor:
        """exp(key_bias - max over attended keys), 0 at excluded keys: ``(batch, Lk)`` in dtype."""
        mb = key_bias.to(dtype)
        if excluded is not None:
            mb = mb.masked_fill(excluded, float("-inf"))
        mx = mb.amax(-1, keepdim=True)
        mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
        return torch.exp(mb - mx)

    def _attention_weights(
        self, q: Tensor, k: Tensor, causal: bool, excluded: Optional[Tensor], key_bias: Optional[Tensor]
    ) -> Tensor:
        """The attention matrix ``(B, H, Lq, Lk)`` implied by the random features: the op's
        output is ``weights @ v``. O(Lq Lk) time and memory."""
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        q, k = q.to(cdt), k.to(cdt)
        W = self.projection_matrix.to(cdt)
        B, H, Lq, D = q.shape
        Lk = k.shape[2]
        sM = float(W.shape[0]) ** -0.5
        if excluded is None:
            valid = torch.ones(B, 1, Lk, dtype=torch.bool, device=q.device)
        else:
            valid = excluded.logical_not().unsqueeze(1)
        if self.kernel_fn == "softmax":
            s = float(D) ** -0.25
            xq, xk = q * s, k * s
            preq = xq @ W.t() - 0.5 * (xq * xq).sum(-1, keepdim=True)
            phi = sM * (torch.exp(preq - preq.amax(-1, keepdim=True)) + 1e-6)  # _SOFTMAX_EPS (TorchScript reads no float globals)
            prek = xk @ W.t() - 0.5 * (xk * xk).sum(-1, keepdim=True)
            prek = prek.masked_fill(valid.logical_not().unsqueeze(-1), float("-inf"))
            a = prek.amax(-1)  # (B, H, Lk)
            if causal:
                r = torch.cummax(a, -1)[0]
            else:
                r = a.amax(-1, keepdim=True).expand(B, H, Lk)
            neg = torch.isneginf(r)
            first = torch.where(neg, torch.full_like(r, float("inf")), r).amin(-1, keepdim=True)
            first = torch.where(torch.isinf(first), torch.zeros_like(first), first)
            r = torch.where(neg, first.expand(B, H, Lk), r)
            khat = sM * torch.exp(prek - r.unsqueeze(-1))
            core = phi @ khat.transpose(-1, -2)
            if causal:  # psi_i(k_j) = exp(r_j - r_i) khat_j + eps (r_j <= r_i for j <= i)
                core = core * torch.exp((r.unsqueeze(-2) - r.unsqueeze(-1)).clamp_max(0.0))
            ek = 1e-6 * sM
        else:
            phi = sM * torch.relu(q @ W.t()) + 1e-3  # _RELU_EPS
            khat = sM * torch.relu(k @ W.t()) * valid.unsqueeze(-1)
            core = phi @ khat.transpose(-1, -2)
            ek = 1e-3
        A = core + ek * phi.sum(-1, keepdim=True) * valid.unsqueeze(2)
        if causal:
            A = A * torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
        if key_bias is not None:
            A = A * self._key_factor(key_bias, excluded, cdt)[:, None, None, :]
        den = A.sum(-1, keepdim=True)
        return A / torch.where(den == 0, torch.ones_like(den), den)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor] = None,
        *,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = False,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Attention of query over key/value -> ``(out, weights or None)``.

        Shapes (``batch_first=True``; with False, swap the first two dims of every input and
        of ``out``): query ``(B, Lq, E)``, key ``(B, Lk, kdim)``, value ``(B, Lk, vdim)``; 2-d
        inputs are one unbatched sequence. out ``(B, Lq, E)`` in the input dtype.

        attention_mask (positional, Panther's convention): ``(B, Lk)`` keep-mask, bool or
        numeric 0/1, 1/True = attend; other values raise ValueError (an additive mask belongs in
        key_padding_mask).

        key_padding_mask (nn.MultiheadAttention's convention): ``(B, Lk)``; bool, True = ignore
        the key; integer 0/1, 1 = ignore (other integers raise ValueError); float, added to the
        attention scores: -inf and values <= ``finfo(dtype).min / 2`` ignore the key, 0 attends,
        and (softmax kernel) other finite values weight the key by ``exp(value)``, exactly as
        an additive score bias (relu kernel: ValueError, it has no scores). A key is used only if
        neither mask ignores it. A query that sees no key outputs 0 (before ``W0, b0``).

        need_weights: also return the attention weights implied by the random features,
        ``(B, Lq, Lk)`` averaged over heads (``average_attn_weights=True``) or ``(B, H, Lq, Lk)``;
        this costs O(Lq Lk) time and memory (the output itself never forms them).

        attn_mask: None or a causal ``(L, L)`` mask (bool True above the diagonal, or float
        ``-inf`` above and 0 elsewhere); anything else raises ValueError. is_causal=True (alone
        or with a mask), a causal attn_mask or ``iscausal=True`` at construction make the call
        causal. Mask values are checked in eager mode only: while compiling, exporting or
        capturing a CUDA graph they cannot be read without a device sync, so an attn_mask then
        needs ``is_causal=True``, and the other masks are taken as given.
        """
        return self._forward_impl(query, key, value, attention_mask, key_padding_mask, need_weights,
                                  attn_mask, average_attn_weights, is_causal)

    def _forward_impl(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = False,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        same_input = False
        inspect = True
        cp = False
        if not torch.jit.is_scripting():
            cp = self.context_parallel_group is not None
            if not (isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)
                    and (attention_mask is None or isinstance(attention_mask, Tensor))
                    and (key_padding_mask is None or isinstance(key_padding_mask, Tensor))
                    and (attn_mask is None or isinstance(attn_mask, Tensor))):
                for arg, val in (("query", query), ("key", key), ("value", value)):
                    check_tensor("RandMultiHeadAttention", arg, val)
                for arg, val in (("attention_mask", attention_mask), ("key_padding_mask", key_padding_mask),
                                 ("attn_mask", attn_mask)):
                    check_tensor("RandMultiHeadAttention", arg, val, optional=True)
            same_input = query is key and key is value
            inspect = _values_inspectable(query)
        nd = query.dim()
        if (nd != 2 and nd != 3) or key.dim() != nd or value.dim() != nd:
            raise ValueError(
                f"RandMultiHeadAttention: query, key and value must be 3-d (batch, seq, feature) "
                f"(or (seq, batch, feature) with batch_first=False), or all 2-d (seq, feature) for one "
                f"unbatched sequence, got {list(query.shape)}, {list(key.shape)}, {list(value.shape)}"
            )
        batched = nd == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if attention_mask is not None and attention_mask.dim() == 1:
                attention_mask = attention_mask.unsqueeze(0)
            if key_padding_mask is not None and key_padding_mask.dim() == 1:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        qs, ks, vs = query.shape, key.shape, value.shape
        E = self.embed_dim
        if qs[2] != E or ks[2] != self.kdim or vs[2] != self.vdim:
            raise ValueError(
                f"RandMultiHeadAttention: last dim of query, key and value must be embed_dim={E}, "
                f"kdim={self.kdim}, vdim={self.vdim}, got {qs[2]}, {ks[2]}, {vs[2]}"
            )
        B, Lq, Lk = qs[0], qs[1], ks[1]
        if ks[0] != B or vs[0] != B or vs[1] != Lk:
            raise ValueError(
                f"RandMultiHeadAttention: query, key and value must have the same batch size and key "
                f"and value the same key_len, got query {list(qs)}, key {list(ks)} and value {list(vs)} "
                f"(as (batch, seq, feature))"
            )
        causal = self.causal or is_causal
        if attn_mask is not None:
            self._check_causal_attn_mask(attn_mask, Lq, Lk, is_causal, inspect)
            causal = True
        if causal and Lq != Lk:
            raise ValueError(
                f"RandMultiHeadAttention: causal attention needs equal query and key lengths, got {Lq} and {Lk}"
            )
        extra_keys = self.bias_k is not None or self.add_zero_attn
        if causal and extra_keys:
            raise ValueError(
                "RandMultiHeadAttention: add_bias_kv and add_zero_attn add a key that every query sees, "
                "which causal attention cannot"
            )
        excluded: Optional[Tensor] = None
        key_bias: Optional[Tensor] = None
        if attention_mask is not None or key_padding_mask is not None:
            excluded, key_bias = self._normalize_masks(B, Lk, attention_mask, key_padding_mask, inspect)
        if cp:
            self._check_context_parallel(attn_mask, need_weights, key_bias, extra_keys)
        fused: Optional[Tensor] = None
        if not torch.jit.is_scripting():
            if same_input and key_bias is None and not need_weights and not extra_keys and not cp:
                fused = self._eager_self_attention(query, causal, excluded)
        weights: Optional[Tensor] = None
        if fused is not None:
            out = fused
        else:
            H, hd = self.num_heads, self.head_dim
            q = self._project_heads(query, self.Wq, self.bq)
            k = self._project_heads(key, self.Wk, self.bk)
            v = self._project_heads(value, self.Wv, self.bv)
            bias_k, bias_v = self.bias_k, self.bias_v
            if bias_k is not None and bias_v is not None:
                k = torch.cat([k, bias_k.to(k.dtype).reshape(1, H, 1, hd).expand(B, H, 1, hd)], 2)
                v = torch.cat([v, bias_v.to(v.dtype).reshape(1, H, 1, hd).expand(B, H, 1, hd)], 2)
                excluded, key_bias = self._pad_masks(excluded, key_bias)
            if self.add_zero_attn:
                k = torch.cat([k, torch.zeros(B, H, 1, hd, dtype=k.dtype, device=k.device)], 2)
                v = torch.cat([v, torch.zeros(B, H, 1, hd, dtype=v.dtype, device=v.device)], 2)
                excluded, key_bias = self._pad_masks(excluded, key_bias)
            P = self.projection_matrix
            if cp:
                ctx = self._context_parallel_core(q, k, v, causal, excluded)
            elif key_bias is None:
                ctx = torch.ops.panther.favor_attention(q, k, v, P, self.kernel_fn, causal, excluded)
            else:
                # Additive key scores: weight key j by f_j = exp(bias_j - max bias), folded into
                # the values; the op's normaliser cancels in num / den.
                # Keys whose factor is 0 are excluded outright (also from the op's stabiliser).
                cdt = torch.float64 if v.dtype == torch.float64 else torch.float32
                fk = self._key_factor(key_bias, excluded, cdt)
                excluded = fk == 0
                f = fk[:, None, :, None].to(v.dtype)
                lk2 = v.shape[2]
                vf = torch.cat([v * f, f.expand(B, H, lk2, 1)], -1)
                y = torch.ops.panther.favor_attention(q, k, vf, P, self.kernel_fn, causal, excluded)
                num, den = y[..., :hd], y[..., hd:]
                ctx = num / torch.where(den == 0, torch.ones_like(den), den)
            if need_weights:
                weights = self._attention_weights(q, k, causal, excluded, key_bias).to(q.dtype)
                if average_attn_weights:
                    weights = weights.mean(1)
                if not batched:
                    weights = weights.squeeze(0)
            out = self._project_output(ctx)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _pad_masks(self, excluded: Optional[Tensor], key_bias: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Masks for one more key (appended by add_bias_kv or add_zero_attn), which is attended."""
        if excluded is not None:
            excluded = torch.cat([excluded, torch.zeros_like(excluded[:, :1])], 1)
        if key_bias is not None:
            key_bias = torch.cat([key_bias, torch.zeros_like(key_bias[:, :1])], 1)
        return excluded, key_bias

    @torch.jit.unused
    def _check_context_parallel(self, attn_mask: Optional[Tensor], need_weights: bool,
                                key_bias: Optional[Tensor], extra_keys: bool) -> None:
        what = "RandMultiHeadAttention with context_parallel_group"
        if attn_mask is not None:
            raise ValueError(f"{what}: attn_mask must be None (each rank holds only a chunk of the sequence): "
                             f"use is_causal=True or iscausal=True at construction")
        if need_weights:
            raise ValueError(f"{what}: need_weights must be False (the weights span every rank's keys)")
        if key_bias is not None:
            raise ValueError(f"{what}: masks may only exclude keys (bool, 0/1, or 0 and -inf), got a float "
                             f"key_padding_mask with finite nonzero score biases")
        if extra_keys:
            raise ValueError(f"{what}: add_bias_kv and add_zero_attn are not supported")

    @torch.jit.unused
    def _context_parallel_core(self, q: Tensor, k: Tensor, v: Tensor, causal: bool,
                               excluded: Optional[Tensor]) -> Tensor:
        import panther.distributed as pd  # torch.distributed machinery only when asked for

        return pd.context_parallel_favor_attention(q, k, v, self.projection_matrix, self.kernel_fn, causal,
                                                   excluded, self.context_parallel_group)

    # ------------------------------------------------------------------ autoregressive decoding

    @torch.jit.unused
    def _check_decode(self, what: str) -> None:
        name = f"RandMultiHeadAttention.{what}"
        if not self.causal:
            raise ValueError(f"{name}: decoding needs a causal layer (iscausal=True at construction), got "
                             f"iscausal=False")
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            raise ValueError(f"{name}: decoding is self-attention and needs kdim == vdim == embed_dim="
                             f"{self.embed_dim}, got kdim={self.kdim}, vdim={self.vdim}")
        if self.context_parallel_group is not None:
            raise ValueError(f"{name}: decoding does not combine with context_parallel_group (got a group)")

    @torch.jit.unused
    def _decode_dtype(self) -> torch.dtype:
        dt = self.Wq.dtype
        return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt

    @torch.jit.unused
    def prefill(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, FavorDecodeState]:
        r"""Causal self-attention over a prompt, and the state that continues it.

        ``x``: ``(B, P, E)`` (``(P, B, E)`` with ``batch_first=False``) or ``(P, E)`` (one
        unbatched sequence, state of batch 1), ``P >= 1``. ``key_padding_mask``: ``(B, P)`` (or
        ``(P,)`` unbatched), bool/0-1 True = ignore the key, or float 0 / -inf (as
        :meth:`forward`); padded prompt keys are left out of the state for good. Returns ``(out,
        state)``: ``out`` equals ``self(x, x, x, key_padding_mask=key_padding_mask,
        is_causal=True)[0]`` and ``state`` is a :class:`FavorDecodeState` of ``B`` sequences
        (its size is independent of ``P``). Differentiable (the state too).

        Raises ValueError when the layer is not causal self-attention (``iscausal=False``,
        ``kdim``/``vdim`` other than ``embed_dim``, ``context_parallel_group`` set), for bad
        shapes, an empty prompt, or a float mask with finite nonzero score biases.

        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> layer = RandMultiHeadAttention(16, 2, 8, iscausal=True).eval()
        >>> x = torch.randn(3, 10, 16)
        >>> out, state = layer.prefill(x[:, :6])
        >>> outs = [out]
        >>> for t in range(6, 10):
        ...     o, state = layer.step(x[:, t], state)
        ...     outs.append(o[:, None])
        >>> full, _ = layer(x, x, x)
        >>> torch.allclose(torch.cat(outs, 1), full, atol=1e-5)
        True
        >>> state.kv.shape, int(state.length)
        (torch.Size([3, 2, 8, 9]), 10)
        """
        name = "RandMultiHeadAttention.prefill"
        self._check_decode("prefill")
        check_tensor(name, "x", x)
        check_tensor(name, "key_padding_mask", key_padding_mask, optional=True)
        E = self.embed_dim
        if x.dim() not in (2, 3) or x.shape[-1] != E:
            layout = "(batch, P, embed_dim)" if self.batch_first else "(P, batch, embed_dim)"
            raise ValueError(f"{name}: x must be {layout} or (P, embed_dim) with embed_dim={E}, got "
                             f"{list(x.shape)}")
        batched = x.dim() == 3
        if not batched:
            x = x.unsqueeze(0)
            if key_padding_mask is not None and key_padding_mask.dim() == 1:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            x = x.transpose(0, 1)
        B, L = x.shape[0], x.shape[1]
        if L < 1:
            raise ValueError(f"{name}: the prompt must hold at least one position, got x of shape {list(x.shape)}")
        excluded: Optional[Tensor] = None
        if key_padding_mask is not None:
            excluded, key_bias = self._normalize_masks(B, L, None, key_padding_mask, _values_inspectable(x))
            if key_bias is not None:
                raise ValueError(f"{name}: key_padding_mask may only exclude keys (bool, 0/1, or float 0 and "
                                 f"-inf), got float score biases")
        H = self.num_heads
        q = self._project_heads(x, self.Wq, self.bq)
        k = self._project_heads(x, self.Wk, self.bk)
        v = self._project_heads(x, self.Wv, self.bv)
        ctx = torch.ops.panther.favor_attention(q, k, v, self.projection_matrix, self.kernel_fn, True, excluded)
        out = self._project_output(ctx)
        # The state: every key of the prompt relative to the running maximum at its end.
        cdt = self._decode_dtype()
        W = self.projection_matrix.to(cdt)
        if excluded is None:
            valid = torch.ones(B, 1, L, dtype=torch.bool, device=x.device).expand(B, H, L)
        else:
            valid = excluded.logical_not().unsqueeze(1).expand(B, H, L)
        kc, vc = k.to(cdt), v.to(cdt)
        V1 = torch.cat([vc, torch.ones_like(vc[..., :1])], -1) * valid.unsqueeze(-1).to(cdt)  # (B, H, L, hd+1)
        kf = _fm.key_features(kc, W, self.kernel_fn, valid)
        if self.kernel_fn == "softmax":
            r = kf.detach().amax(-1).amax(-1)  # (B, H), -inf where every key is padded
            kf = (W.shape[0] ** -0.5) * torch.exp(kf - _fm.finite_or(r)[..., None, None])
        else:
            r = torch.zeros(B, H, dtype=cdt, device=x.device)
        state = FavorDecodeState(kf.transpose(-1, -2) @ V1, V1.sum(-2), r,
                                 torch.full((), L, dtype=torch.int64, device=x.device))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, state

    @torch.jit.unused
    def _weights(self) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor],
                                Tensor, Optional[Tensor], Tensor]:
        """(Wq, Wk, Wv, bq, bk, bv, W0, b0, projection_matrix), read cheaply (module_tensors): a
        decoding step and a short sequence's eager forward are host-bound."""
        return module_tensors(self, _WEIGHTS)  # type: ignore[return-value]

    @torch.jit.unused
    def _step_math(self, x_t: Tensor, state: FavorDecodeState, what: str,
                   inplace: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(out, kv, v_sum, stabiliser) after one position (``inplace``: written into ``state``'s
        tensors, its length included); no host synchronisation. Every step checks its arguments;
        the checks are written for a host-bound loop (no list building, no module attribute
        lookups), since a decoding step's GPU work is a few microseconds."""
        self._check_decode(what)
        if not isinstance(x_t, Tensor):
            check_tensor(f"RandMultiHeadAttention.{what}", "x_t", x_t)
        if not (isinstance(state, tuple) and len(state) == 4 and isinstance(state[0], Tensor)
                and isinstance(state[1], Tensor) and isinstance(state[2], Tensor) and isinstance(state[3], Tensor)):
            raise ValueError(f"RandMultiHeadAttention.{what}: state must be a FavorDecodeState (from prefill or "
                             f"step), got {type(state).__name__}")
        E, H, hd, M = self.embed_dim, self.num_heads, self.head_dim, self.num_random_features
        shape = x_t.shape
        nd = len(shape)
        time_dim = 1 if self.batch_first else 0  # (of a 3-d x_t)
        if not (nd == 2 or (nd == 3 and shape[time_dim] == 1)) or shape[-1] != E:
            layout = "(batch, 1, embed_dim)" if self.batch_first else "(1, batch, embed_dim)"
            raise ValueError(f"RandMultiHeadAttention.{what}: x_t must be {layout} or (batch, embed_dim) with "
                             f"embed_dim={E}, got {list(shape)}")
        x = x_t.select(time_dim, 0) if nd == 3 else x_t
        B = x.shape[0]
        kv, v_sum, r, n = state
        Wq, Wk, Wv, bq, bk, bv, W0, b0, P = self._weights()
        dt = Wq.dtype
        cdt = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
        dev = x.device
        if (kv.shape != (B, H, M, hd + 1) or v_sum.shape != (B, H, hd + 1) or r.shape != (B, H)
                or kv.dtype != cdt or kv.device != dev):
            raise ValueError(f"RandMultiHeadAttention.{what}: state must hold kv ({B}, {H}, {M}, {hd + 1}), "
                             f"v_sum ({B}, {H}, {hd + 1}) and stabiliser ({B}, {H}) in {cdt} on {dev} for x_t "
                             f"of batch {B}, got kv {list(kv.shape)} {kv.dtype} on {kv.device}, v_sum "
                             f"{list(v_sum.shape)}, stabiliser {list(r.shape)}")
        if n.dim() != 0 or n.dtype != torch.int64 or n.device != dev:
            raise ValueError(f"RandMultiHeadAttention.{what}: state.length must be a 0-d int64 tensor on {dev}, "
                             f"got shape {list(n.shape)} {n.dtype} on {n.device}")
        dropout = self.training and self.dropout > 0
        if inplace and _fm.fused_decode_applies(x, kv, (x, Wq, Wk, Wv, bq, bk, bv, P, kv, v_sum, r)):
            # The projection in the layer's dtype; the fused kernels count the position into the
            # state's length.
            W = P if P.dtype in (x.dtype, cdt) else P.to(cdt)
            if not dropout and _fm.fused_decode_applies(x, kv, (W0, b0)):
                # The whole step as one op: q/k/v projections, the state's update and readout, the
                # output projection (on Hopper GPUs the first two are one kernel).
                out = panther_op("_favor_decode_layer_")(
                    x, Wq, Wk, Wv, bq, bk, bv, W, self.kernel_fn, W0, b0, kv, v_sum, r, n)
                if nd == 3:
                    out = out.unsqueeze(time_dim)
                return out, kv, v_sum, r
            # (dropout between the readout and the output projection) The fused step kernel; the
            # output comes back in the layer's dtype.
            q = F.linear(x, Wq, bq).view(B, H, hd)
            k = F.linear(x, Wk, bk).view(B, H, hd)
            v = F.linear(x, Wv, bv).view(B, H, hd)
            ctx = panther_op("_favor_decode_step_")(q, k, v, W, self.kernel_fn, kv, v_sum, r, n).reshape(B, E)
        else:
            W = P if P.dtype == cdt else P.to(cdt)
            q = F.linear(x, Wq, bq).reshape(B, H, hd).to(cdt)
            k = F.linear(x, Wk, bk).reshape(B, H, hd).to(cdt)
            v = F.linear(x, Wv, bv).reshape(B, H, hd).to(cdt)
            ctx, kv, v_sum, r = _fm.decode_step(q, k, v, W, self.kernel_fn, kv, v_sum, r, inplace)
            ctx = ctx.to(x.dtype).reshape(B, E)
            if inplace:
                n.add_(1)
        if dropout:
            ctx = F.dropout(ctx, p=self.dropout, training=True)
        out = F.linear(ctx, W0, b0)
        if nd == 3:
            out = out.unsqueeze(time_dim)
        return out, kv, v_sum, r

    @torch.jit.unused
    def step(self, x_t: Tensor, state: FavorDecodeState) -> Tuple[Tensor, FavorDecodeState]:
        r"""One decoding position: ``(out_t, new_state)``; ``state`` is left unchanged.

        ``x_t``: ``(B, 1, E)`` (``(1, B, E)`` with ``batch_first=False``) or ``(B, E)``; ``out_t``
        has the same shape. ``state``: a :class:`FavorDecodeState` of batch ``B`` (from
        :meth:`prefill` or an earlier step). ``out_t`` equals the causal forward's row at this
        position of the sequence so far (prefill keys masked out stay out). Constant time and
        memory in the context length; differentiable; no host synchronisation. For CUDA graphs
        use :meth:`step_`, which updates ``state`` in place.

        Raises ValueError when the layer is not causal self-attention, for a bad ``x_t`` shape,
        or a state of another batch, shape, dtype or device.

        >>> layer = RandMultiHeadAttention(16, 2, 8, iscausal=True)
        >>> out, state = layer.prefill(torch.randn(2, 5, 16))
        >>> out_t, state = layer.step(torch.randn(2, 1, 16), state)
        >>> out_t.shape, int(state.length)
        (torch.Size([2, 1, 16]), 6)
        """
        out, kv, v_sum, r = self._step_math(x_t, state, "step", False)
        return out, FavorDecodeState(kv, v_sum, r, state.length + 1)

    @torch.jit.unused
    def step_(self, x_t: Tensor, state: FavorDecodeState) -> Tensor:
        r"""One decoding position, writing the new state into ``state``'s tensors: ``out_t``.

        As :meth:`step`, but ``state.kv``, ``state.v_sum``, ``state.stabiliser`` and
        ``state.length`` are updated in place (same storage), so a CUDA graph that captures
        ``out = layer.step_(x_static, state)`` replays decoding: copy the next input into
        ``x_static``, ``graph.replay()``, read ``out``. Nothing synchronises with the host. Use it
        under ``torch.no_grad()`` (in-place updates of tensors that autograd saved would fail).
        On CUDA a step is one op (``torch.ops.panther._favor_decode_layer_``): the projections of
        q, k and v, the update of the state (its length included) and its readout, and the output
        projection. On Hopper GPUs (compute capability 9.0) the q/k/v projections and the state's
        update run as one kernel with a cluster of thread blocks per head (head_dim <= 128,
        value_dim <= 95, ``num_random_features`` <= 256); elsewhere they are three projection
        kernels and a one-block-per-head kernel.

        >>> layer = RandMultiHeadAttention(16, 2, 8, iscausal=True).eval()
        >>> x = torch.randn(1, 4, 16)
        >>> with torch.no_grad():
        ...     _, state = layer.prefill(x[:, :3])
        ...     kv = state.kv
        ...     out_t = layer.step_(x[:, 3:], state)
        >>> state.kv is kv, int(state.length)
        (True, 4)
        >>> torch.allclose(out_t, layer(x, x, x)[0][:, 3:], atol=1e-5)
        True
        """
        return self._step_math(x_t, state, "step_", True)[0]

    @torch.jit.unused
    def __deepcopy__(self, memo):
        # A copy (nn.Transformer*'s layer clones, EMA models) shares the process group handle,
        # which cannot be copied; everything else is copied as usual.
        group = self.__dict__.get("context_parallel_group")
        if group is not None:
            memo[id(group)] = group
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new

    def __prepare_scriptable__(self):
        # TorchScript has no keyword-only arguments: script a twin (same parameters, buffers
        # and submodules) whose forward takes the same arguments positionally.
        if self.context_parallel_group is not None:
            raise ValueError("RandMultiHeadAttention: a layer with context_parallel_group cannot be scripted "
                             "(torch.distributed collectives); script it with context_parallel_group=None")
        twin = copy.copy(self)
        twin.__class__ = _ScriptableRandMultiHeadAttention
        return twin

    def extra_repr(self) -> str:
        s = (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_random_features={self.num_random_features}, dropout={self.dropout}, bias={self.bias}, "
            f"kernel_fn={self.kernel_fn!r}, iscausal={self.causal}"
        )
        if not self.batch_first:
            s += ", batch_first=False"
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        if self.bias_k is not None:
            s += ", add_bias_kv=True"
        if self.add_zero_attn:
            s += ", add_zero_attn=True"
        return s


class _ScriptableRandMultiHeadAttention(RandMultiHeadAttention):
    """What ``torch.jit.script(RandMultiHeadAttention(...))`` compiles: the same module with the
    forward's keyword arguments also accepted positionally (TorchScript has no keyword-only
    arguments)."""

    # The same forward with every argument also positional (TorchScript compiles this).
    forward = RandMultiHeadAttention._forward_impl


def make_performer(
    mha: nn.MultiheadAttention,
    num_random_features: int,
    kernel_fn: str = "softmax",
    iscausal: bool = False,
    generator: Optional[torch.Generator] = None,
) -> RandMultiHeadAttention:
    """Convert a (trained) ``nn.MultiheadAttention`` into a :class:`RandMultiHeadAttention`.

    ``in_proj_weight`` (or ``q_proj_weight, k_proj_weight, v_proj_weight`` when kdim/vdim differ)
    becomes ``Wq, Wk, Wv``, ``in_proj_bias`` ``bq, bk, bv``, ``out_proj`` ``W0, b0``, and
    ``bias_k, bias_v`` are copied; dropout, ``batch_first``, kdim, vdim, add_zero_attn, dtype,
    device and train/eval mode are kept, so the result takes the same inputs. Weights are copied,
    not shared. Raises TypeError when ``mha`` is not an ``nn.MultiheadAttention``.

    >>> mha = nn.MultiheadAttention(16, 2)
    >>> perf = make_performer(mha, num_random_features=32)
    >>> x = torch.randn(5, 3, 16)  # (seq, batch, embed): mha.batch_first is False
    >>> perf(x, x, x)[0].shape
    torch.Size([5, 3, 16])
    """
    if not isinstance(mha, nn.MultiheadAttention):
        raise TypeError(f"make_performer: mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
    E = mha.embed_dim
    if mha._qkv_same_embed_dim:
        w = mha.in_proj_weight
        wq, wk, wv = w[:E], w[E:2 * E], w[2 * E:]
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    has_bias = mha.in_proj_bias is not None
    layer = RandMultiHeadAttention(
        E, mha.num_heads, num_random_features, dropout=float(mha.dropout), bias=has_bias,
        kernel_fn=kernel_fn, iscausal=iscausal, batch_first=mha.batch_first, kdim=mha.kdim,
        vdim=mha.vdim, add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn,
        device=wq.device, dtype=wq.dtype, generator=generator,
    )
    with torch.no_grad():
        layer.Wq.copy_(wq)
        layer.Wk.copy_(wk)
        layer.Wv.copy_(wv)
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
        if mha.bias_k is not None:
            layer.bias_k.copy_(mha.bias_k)
            layer.bias_v.copy_(mha.bias_v)
    layer.train(mha.training)
    return layer
