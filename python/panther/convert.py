"""Convert a trained model in one call: sketched linear layers and random-feature attention.

:func:`convert` walks a model, picks the layers a config names and replaces them:

* ``nn.Linear`` and GPT-2-style ``Conv1D`` (weight stored ``(in, out)``, attribute ``nf``;
  recognised by structure, without importing transformers) become :class:`panther.nn.SKLinear`,
  initialised by default from the layer's truncated SVD (optimal for the layer's rank ``2Lk``),
  or, with calibration inputs, from the SVD of the weight whitened by the inputs' second moment
  (minimising the output error instead of the weight error).
* ``nn.MultiheadAttention`` becomes :class:`panther.nn.RandMultiHeadAttention` (FAVOR+);
  Hugging Face attention modules keep their projections and switch their attention function to
  FAVOR+ (``"panther_favor"``, registered with transformers' ``AttentionInterface``).

:func:`conversion_report` lists what was done; :func:`unconvert` turns a converted model back into
dense ``nn.Linear`` / ``nn.MultiheadAttention`` layers.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import sys
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .nn.attention import RandMultiHeadAttention, make_performer, orthogonal_gaussian_projection
from .nn.linear import SKLinear

__all__ = [
    "Budget",
    "SketchConfig",
    "PerformerConfig",
    "convert",
    "conversion_report",
    "unconvert",
    "sketch_factors_from_weight",
]

_INITS = ("svd", "sketch", "empty")
_SVD_METHODS = ("auto", "exact", "randomized")
_KERNELS = ("softmax", "relu")
_RECORD = "_panther_conversion"  # attribute holding a converted module's report row
_SKIPPED = "_panther_conversion_skipped"  # on the root: rows of layers left dense


def _is_pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@dataclasses.dataclass(frozen=True)
class Budget:
    """A per-layer storage budget for :class:`SketchConfig`'s ``low_rank``.

    ``Budget(0.5)`` picks, for each layer, the largest ``low_rank`` whose stored numbers
    ``2 * num_terms * low_rank * (d_in + d_out) + bias`` are at most half the dense layer's
    ``d_in * d_out + bias``. A layer where even ``low_rank=1`` exceeds the budget stays dense.

    Raises:
        ValueError: ``fraction`` not a number in (0, 1].

    >>> Budget(0.5).fraction
    0.5
    """

    fraction: float

    def __post_init__(self):
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < float(f) <= 1.0:
            raise ValueError(f"Budget: fraction must be a number in (0, 1], got {f!r}")


@dataclasses.dataclass(frozen=True)
class SketchConfig:
    """How :func:`convert` sketches an ``nn.Linear`` or a GPT-2-style ``Conv1D``.

    Args:
        num_terms: ``L``, sketch terms of the :class:`~panther.nn.SKLinear` (>= 1).
        low_rank: ``k`` per term; the layer has rank ``2 * L * k``. An ``int``; a ``float`` in
            (0, 1], a fraction of the layer's rank ``min(d_in, d_out)`` (``k = ceil(f * rank /
            (2L))``, so ``1.0`` is full rank); or a :class:`Budget` (a fraction of the layer's
            stored numbers).
        init: ``"svd"`` (default: the truncated SVD, optimal for the rank; with calibration, the
            activation-aware SVD), ``"sketch"`` (:class:`~panther.nn.SKLinear`'s unbiased random
            init from the weight) or ``"empty"`` (allocate only, e.g. to load a state_dict).
        skip_if_larger: leave a layer dense when the sketch would store at least as many numbers
            as the dense layer (``2Lk(d_in + d_out) >= d_in * d_out``). With ``False``, such a
            layer is converted, and a rank above the layer's (``k > ceil(min(d_in, d_out) /
            (2L))``) is an error.
        svd: ``"auto"`` (a randomized SVD with oversampling and power iterations where the
            rank is at most a quarter of the layer's, which keeps the weight error within 1.01x
            of the optimum; the exact SVD otherwise), ``"exact"`` or ``"randomized"``.

    Raises:
        ValueError: a field out of range (the message names it).

    >>> SketchConfig(num_terms=1, low_rank=0.5).low_rank
    0.5
    """

    num_terms: int = 1
    low_rank: Union[int, float, Budget] = 64
    init: str = "svd"
    skip_if_larger: bool = True
    svd: str = "auto"

    def __post_init__(self):
        if not _is_pos_int(self.num_terms):
            raise ValueError(f"SketchConfig: num_terms must be a positive integer, got {self.num_terms!r}")
        lr = self.low_rank
        if isinstance(lr, bool) or not (
            _is_pos_int(lr) or isinstance(lr, Budget) or (isinstance(lr, float) and 0.0 < lr <= 1.0)
        ):
            raise ValueError(
                "SketchConfig: low_rank must be a positive int, a float in (0, 1] (fraction of the "
                f"layer's rank) or a panther.Budget, got {lr!r}"
            )
        if self.init not in _INITS:
            raise ValueError(f"SketchConfig: init must be one of {_INITS}, got {self.init!r}")
        if not isinstance(self.skip_if_larger, bool):
            raise ValueError(f"SketchConfig: skip_if_larger must be a bool, got {self.skip_if_larger!r}")
        if self.svd not in _SVD_METHODS:
            raise ValueError(f"SketchConfig: svd must be one of {_SVD_METHODS}, got {self.svd!r}")


@dataclasses.dataclass(frozen=True)
class PerformerConfig:
    """How :func:`convert` switches attention to FAVOR+ random features.

    ``nn.MultiheadAttention`` becomes :class:`~panther.nn.RandMultiHeadAttention` (weights and
    biases copied; ``batch_first``, dropout, dtype and device kept). A Hugging Face attention
    module keeps its projections; it gets a ``panther_favor_projection`` buffer ``(M, head_dim)``
    and the model's attention implementation becomes ``"panther_favor"`` (causal where the
    module is, padding masks honoured).

    Args:
        num_random_features: ``M`` per head (>= 1).
        kernel_fn: ``"softmax"`` or ``"relu"``.
        causal: ``None`` (default) keeps the module's own causality (``nn.MultiheadAttention``:
            non-causal, causal masks still accepted per call; Hugging Face: ``module.is_causal``);
            ``True``/``False`` forces it.

    Raises:
        ValueError: a field out of range.

    >>> PerformerConfig(num_random_features=64).kernel_fn
    'softmax'
    """

    num_random_features: int = 256
    kernel_fn: str = "softmax"
    causal: Optional[bool] = None

    def __post_init__(self):
        if not _is_pos_int(self.num_random_features):
            raise ValueError(
                f"PerformerConfig: num_random_features must be a positive integer, got {self.num_random_features!r}"
            )
        if self.kernel_fn not in _KERNELS:
            raise ValueError(f"PerformerConfig: kernel_fn must be 'softmax' or 'relu', got {self.kernel_fn!r}")
        if self.causal is not None and not isinstance(self.causal, bool):
            raise ValueError(f"PerformerConfig: causal must be None or a bool, got {self.causal!r}")


_Config = Union[SketchConfig, PerformerConfig]


# ----------------------------------------------------------------------------------------------
# Which modules can be converted
# ----------------------------------------------------------------------------------------------


def _is_conv1d(m: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` by structure: ``y = x @ weight + bias`` with ``weight`` ``(in, nf)``."""
    if isinstance(m, nn.Linear) or any(True for _ in m.children()):
        return False
    w = getattr(m, "weight", None)
    nf = getattr(m, "nf", None)
    if not isinstance(w, Tensor) or not isinstance(nf, int) or w.dim() != 2 or w.shape[1] != nf:
        return False
    b = getattr(m, "bias", None)
    return b is None or (isinstance(b, Tensor) and tuple(b.shape) == (nf,))


def _is_hf_attention(m: nn.Module) -> bool:
    """A Hugging Face attention module that calls a pluggable attention function."""
    cfg = getattr(m, "config", None)
    return (
        hasattr(cfg, "_attn_implementation")
        and hasattr(m, "is_causal")
        and not isinstance(m, (nn.MultiheadAttention, RandMultiHeadAttention))
    )


def _kind(m: nn.Module) -> Optional[str]:
    if isinstance(m, SKLinear) or isinstance(m, RandMultiHeadAttention):
        return None
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.MultiheadAttention):
        return "mha"
    if _is_conv1d(m):
        return "conv1d"
    if _is_hf_attention(m):
        return "hf_attention"
    return None


_FITS = {"linear": SketchConfig, "conv1d": SketchConfig, "mha": PerformerConfig, "hf_attention": PerformerConfig}


def _dense_weight_of(m: nn.Module, kind: str) -> Tensor:
    """The weight in nn.Linear layout (out, in)."""
    return m.weight.t() if kind == "conv1d" else m.weight


def _dims(m: nn.Module, kind: str) -> Tuple[int, int]:
    w = m.weight
    return (w.shape[0], w.shape[1]) if kind == "conv1d" else (w.shape[1], w.shape[0])


# ----------------------------------------------------------------------------------------------
# SVD and the factors of a sketched layer
# ----------------------------------------------------------------------------------------------


def _svd(W: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd(W, full_matrices=False)``; on CUDA computed in float64 and rounded back:
    cuSOLVER's float32 SVD returns singular vectors that are orthonormal, and reconstruct ``W``,
    only to about 1e-4, where the float32 CPU SVD and a float64 one reach 1e-6."""
    if W.is_cuda and W.dtype != torch.float64:
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        return U.to(W.dtype), S.to(W.dtype), Vh.to(W.dtype)
    return torch.linalg.svd(W, full_matrices=False)


def _randomized_svd(W: Tensor, r: int, oversample: int, niter: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Top-``r`` SVD of ``W`` by a randomized range finder (Halko, Martinsson, Tropp 2011):
    ``l = r + oversample`` Gaussian probes, ``niter`` power iterations re-orthonormalised by QR
    after every product (stable in fp32), then an exact SVD of the small ``(l, n)`` projection.
    Batched over leading dims. Returns U ``(..., m, r)``, S ``(..., r)``, V ``(..., n, r)``."""
    m, n = W.shape[-2:]
    ell = min(r + oversample, m, n)
    omega = torch.randn(*W.shape[:-2], n, ell, dtype=W.dtype, device=W.device)
    Q = torch.linalg.qr(W @ omega).Q
    for _ in range(niter):
        Z = torch.linalg.qr(W.mT @ Q).Q
        Q = torch.linalg.qr(W @ Z).Q
    Ub, S, Vh = _svd(Q.mT @ W)
    return (Q @ Ub)[..., :r], S[..., :r], Vh[..., :r, :].mT


def _svd_method(method: str, r: int, m: int, n: int) -> str:
    if method != "auto":
        return method
    # The range finder wins when its probes (r + oversampling = 2r) are a small part of the
    # matrix; there, with 4 power iterations, its Frobenius error stays within 1.01x of the
    # optimum on trained and random weights alike (bench/python/bench_convert.py measures it).
    return "randomized" if 4 * r <= min(m, n) else "exact"


def _truncated_svd(W: Tensor, r: int, method: str) -> Tuple[Tensor, Tensor, Tensor, str]:
    m, n = W.shape[-2:]
    r = min(r, m, n)
    method = _svd_method(method, r, m, n)
    if method == "randomized" and r < min(m, n):
        U, S, V = _randomized_svd(W, r, oversample=max(r, 8), niter=4)
        return U, S, V, "randomized"
    U, S, Vh = _svd(W)
    return U[..., :r], S[..., :r], Vh[..., :r, :].mT, "exact"


def _pad_cols(t: Tensor, cols: int) -> Tensor:
    if t.shape[-1] >= cols:
        return t[..., :cols]
    pad = torch.zeros(*t.shape[:-1], cols - t.shape[-1], dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], -1)


def sketch_factors_from_weight(
    W: Tensor,
    num_terms: int,
    low_rank: int,
    *,
    gram: Optional[Tensor] = None,
    svd: str = "auto",
) -> Dict[str, Any]:
    r"""Factors of an :class:`~panther.nn.SKLinear` whose effective weight is the best rank-``2Lk``
    approximation of ``W``.

    With ``W = U S V^T`` (``W`` in ``nn.Linear`` layout ``(d_out, d_in)``), the top ``2Lk``
    components are split into ``2L`` groups of ``k``: term ``i``'s first half gets the buffer
    ``U1_i = U_g^T`` and the learnable ``S1_i = 2L V_g S_g``; its second half the buffer
    ``U2_i = V_h`` and ``S2_i = 2L S_h U_h^T`` (the ``2L`` cancels the layer's ``1/(2L)``). So
    ``U1s`` and ``U2s`` hold orthonormal singular bases, and the layer's weight is the truncated
    SVD (Eckart-Young optimal in Frobenius norm). With ``gram = X^T X`` ``(d_in, d_in)`` of
    calibration inputs, the factors minimise ``||X (W - W_eff)^T||_F`` instead: the SVD of
    ``W C`` with ``C C^T = gram`` (Cholesky, regularised), mapped back by ``C^{-1}`` (the second
    halves' ``in``-side factors are re-orthonormalised by QR, so the buffers stay orthonormal).
    Computed in float32 (float64 for float64 weights; the whitened path in float64).

    Args:
        W: ``(d_out, d_in)`` weight, or a batch ``(B, d_out, d_in)`` of equally shaped weights
            (without ``gram``; :func:`convert` batches layers of one shape).
        num_terms, low_rank: ``L``, ``k``.
        gram: optional ``(d_in, d_in)`` input second moment. svd: ``"auto"|"exact"|"randomized"``.

    Returns:
        dict with ``S1s (L, d_in, k)``, ``S2s (L, k, d_out)``, ``U1s (L, k, d_out)``,
        ``U2s (L, d_in, k)`` (with the batch dim first for a batch; in the working dtype) and
        ``svd`` (the method used). Ranks beyond ``min(d_in, d_out)`` are zero-padded.

    Raises:
        ValueError: ``gram`` with a batch of weights, or of the wrong shape.

    >>> W = torch.randn(6, 8, dtype=torch.float64)
    >>> f = sketch_factors_from_weight(W, 1, 3)
    >>> W_eff_t = (f["S1s"][0] @ f["U1s"][0] + f["U2s"][0] @ f["S2s"][0]) / 2
    >>> torch.allclose(W_eff_t.T, W)
    True
    """
    L, k = num_terms, low_rank
    if W.dim() not in (2, 3) or (gram is not None and W.dim() != 2):
        raise ValueError(
            f"sketch_factors_from_weight: W must be (d_out, d_in) (or (B, d_out, d_in) without gram), "
            f"got shape {list(W.shape)}"
        )
    d_out, d_in = W.shape[-2:]
    if gram is not None and tuple(gram.shape) != (d_in, d_in):
        raise ValueError(f"sketch_factors_from_weight: gram must be (d_in, d_in) = ({d_in}, {d_in}), "
                         f"got {list(gram.shape)}")
    batch = tuple(W.shape[:-2])
    r = 2 * L * k
    work = torch.float64 if (W.dtype == torch.float64 or gram is not None) else torch.float32
    Wf = W.detach().to(work)
    if gram is None:
        U, S, P, method = _truncated_svd(Wf, r, svd)
        Pin = P  # in-side factor, orthonormal
        orth_in = True
    else:
        G = gram.to(device=Wf.device, dtype=torch.float64)
        C = _regularised_cholesky(G)
        U, S, V, method = _truncated_svd(Wf @ C, r, svd)
        # P = C^{-T} V : (d_in, r)
        Pin = torch.linalg.solve_triangular(C.mT, V, upper=True)
        orth_in = False
    U = _pad_cols(U, r)
    S = _pad_cols(S, r)
    Pin = _pad_cols(Pin, r)
    Lk = L * k
    twoL = float(2 * L)
    U1s = U[..., :Lk].mT.reshape(*batch, L, k, d_out)
    S1s = (twoL * Pin[..., :Lk] * S[..., None, :Lk]).reshape(*batch, d_in, L, k).transpose(-3, -2)
    Uh = U[..., Lk:].mT.reshape(*batch, L, k, d_out)
    Sh = S[..., Lk:].reshape(*batch, L, k, 1)
    if orth_in:
        U2s = Pin[..., Lk:].reshape(*batch, d_in, L, k).transpose(-3, -2)
        S2s = twoL * Sh * Uh
    else:
        M = (Pin[..., Lk:] * S[..., None, Lk:]).reshape(d_in, L, k).permute(1, 0, 2)  # (L, d_in, k)
        Q, R = torch.linalg.qr(M)  # Q (L, d_in, k) orthonormal columns, R (L, k, k)
        U2s = Q
        S2s = twoL * (R @ Uh)
    return {
        "S1s": S1s.contiguous(), "S2s": S2s.contiguous(),
        "U1s": U1s.contiguous(), "U2s": U2s.contiguous(), "svd": method,
    }


def _regularised_cholesky(G: Tensor) -> Tensor:
    """Lower ``C`` with ``C C^T = G + lam I``; ``lam`` starts at 1e-6 of the mean diagonal
    and grows tenfold until the factorisation succeeds (rank-deficient calibration data)."""
    n = G.shape[0]
    mean_diag = float(G.diagonal().mean()) if n else 1.0
    lam = max(mean_diag, 1e-30) * 1e-6
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    for _ in range(12):
        C, info = torch.linalg.cholesky_ex(G + lam * eye)
        if int(info) == 0:
            return C
        lam *= 10.0
    raise RuntimeError("panther.convert: the calibration second moment could not be factorised")


# ----------------------------------------------------------------------------------------------
# Resolving configs
# ----------------------------------------------------------------------------------------------


def _check_config_value(key, value) -> None:
    if value is not None and not isinstance(value, (SketchConfig, PerformerConfig)):
        raise TypeError(
            f"panther.convert: config[{key!r}] must be a SketchConfig, a PerformerConfig or None, "
            f"got {type(value).__name__}"
        )


def _plan(model: nn.Module, config, filter_fn) -> Tuple[List[Tuple[str, nn.Module, str, _Config]], List[str]]:
    """(name, module, kind, config) for every module to convert, outermost first; plus warnings."""
    names_all = [n for n, _ in model.named_modules() if n]
    modules = dict(model.named_modules())
    # Linear children of nn.MultiheadAttention (out_proj) belong to their parent.
    mha_children = set()
    for n, m in modules.items():
        if isinstance(m, (nn.MultiheadAttention, RandMultiHeadAttention)):
            for cn, _ in m.named_modules():
                if cn:
                    mha_children.add(f"{n}.{cn}" if n else cn)
    exact: Dict[str, Optional[_Config]] = {}
    regex: List[Tuple[str, "re.Pattern", Optional[_Config]]] = []
    default: Optional[_Config] = None
    single = not isinstance(config, dict)
    if single:
        _check_config_value("<config>", config)
        if config is None:
            raise TypeError("panther.convert: config must be a SketchConfig, a PerformerConfig or a dict, got None")
        default = config
    else:
        for key, value in config.items():
            if not isinstance(key, str):
                raise TypeError(f"panther.convert: config keys must be str, got {key!r}")
            _check_config_value(key, value)
            if key == "_default":
                default = value
            elif key.startswith("re:"):
                try:
                    regex.append((key, re.compile(key[3:]), value))
                except re.error as e:
                    raise ValueError(f"panther.convert: config key {key!r} is not a valid regex: {e}") from e
            else:
                exact[key] = value
    used = set()
    plan = []
    converted_prefixes: List[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in converted_prefixes):
            continue
        kind = _kind(m)
        cfg: Optional[_Config] = None
        source = None
        if name in exact:
            used.add(name)
            cfg = exact[name]
            source = name
            if cfg is not None:
                if name in mha_children:
                    raise ValueError(
                        f"panther.convert: {name!r} is a projection inside an nn.MultiheadAttention; it is "
                        f"converted with its parent (give the parent a PerformerConfig), never on its own"
                    )
                if kind is None or not isinstance(cfg, _FITS[kind]):
                    fits = {"SketchConfig": "nn.Linear or Conv1D", "PerformerConfig":
                            "nn.MultiheadAttention or a Hugging Face attention module"}[type(cfg).__name__]
                    raise TypeError(
                        f"panther.convert: config[{name!r}] is a {type(cfg).__name__}, which applies to "
                        f"{fits}, but {name!r} is a {type(m).__name__}"
                    )
        else:
            if kind is None or name in mha_children:
                continue
            found = False
            for key, pat, value in regex:
                if pat.fullmatch(name) and (value is None or isinstance(value, _FITS[kind])):
                    used.add(key)
                    cfg, source, found = value, key, True
                    break
            if not found:
                if default is not None and isinstance(default, _FITS[kind]):
                    cfg, source = default, "_default"
        if cfg is None:
            continue
        if filter_fn is not None and not filter_fn(m, name):
            continue
        plan.append((name, m, kind, cfg))
        if kind == "mha":
            converted_prefixes.append(name)
    warns = []
    convertible = [n for n, mm in modules.items() if _kind(mm) is not None]
    for key in list(exact) + [k for k, _, _ in regex]:
        if key in used:
            continue
        if key.startswith("re:") and any(re.fullmatch(key[3:], n) for n in convertible):
            continue  # it matches, but an exact name or an earlier pattern took precedence
        if key.startswith("re:"):
            # Compare the pattern's literal text with the convertible modules' names.
            probe = _regex_literal(key[3:])
            pool = [n for n, mm in modules.items() if n and _kind(mm) is not None] or names_all
            near = difflib.get_close_matches(probe, pool, n=5, cutoff=0.3)
        else:
            near = difflib.get_close_matches(key, names_all, n=5, cutoff=0.5)
        warns.append(
            f"panther.convert: config key {key!r} matches no convertible module"
            + (f"; near names: {', '.join(near)}" if near else "")
        )
    return plan, warns


def _regex_literal(pattern: str) -> str:
    """The literal text of a regex (escapes unescaped, operators as spaces), for near-name hints."""
    return re.sub(r"\\(.)|[\^$*+?()\[\]{}|]", lambda mt: mt.group(1) or " ", pattern)


def _resolve_rank(name: str, m: nn.Module, kind: str, cfg: SketchConfig) -> Tuple[Optional[int], str]:
    """(low_rank, "") or (None, reason to keep the layer dense); raises on an impossible rank."""
    d_in, d_out = _dims(m, kind)
    L = cfg.num_terms
    rank = min(d_in, d_out)
    has_bias = getattr(m, "bias", None) is not None
    dense = d_in * d_out + (d_out if has_bias else 0)
    lr = cfg.low_rank
    if isinstance(lr, Budget):
        k = int((lr.fraction * dense - (d_out if has_bias else 0)) // (2 * L * (d_in + d_out)))
        if k < 1:
            return None, f"budget {lr.fraction} is below low_rank=1"
        k = min(k, math.ceil(rank / (2 * L)))
    elif isinstance(lr, float):
        k = max(1, math.ceil(lr * rank / (2 * L) - 1e-9))
    else:
        k = lr
    if cfg.skip_if_larger and 2 * L * k * (d_in + d_out) >= d_in * d_out:
        return None, "sketch would not store fewer numbers (skip_if_larger=True)"
    if k > math.ceil(rank / (2 * L)):
        raise ValueError(
            f"panther.convert: {name!r} ({type(m).__name__}, d_in={d_in}, d_out={d_out}) has rank "
            f"{rank}, but num_terms={L}, low_rank={k} asks for rank 2*L*k={2 * L * k}; use "
            f"low_rank <= {math.ceil(rank / (2 * L))}, a fraction such as low_rank=0.5, or skip_if_larger=True"
        )
    return k, ""


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------


def _progress(msg: str, end: bool = False, done: int = 0, total: int = 0) -> None:
    """One stderr line, rewritten in place: ``msg [#####.....] done/total``."""
    bar = ""
    if total:
        filled = int(20 * done / total)
        bar = f" [{'#' * filled}{'.' * (20 - filled)}] {done}/{total}"
    sys.stderr.write("\r" + msg + bar + ("\n" if end else ""))
    sys.stderr.flush()


def _calibrate(model: nn.Module, targets: Dict[str, nn.Module], calibration, verbose: bool) -> Dict[str, Tuple[Tensor, int]]:
    """Stream the inputs of ``targets`` through forward pre-hooks: X^T X (float64) and rows."""
    stats: Dict[str, List[Any]] = {n: [None, 0] for n in targets}

    def make_hook(n):
        def hook(mod, args):
            x = args[0] if args else None
            if not isinstance(x, Tensor):
                return
            x = x.detach().reshape(-1, x.shape[-1])
            g = (x.mT @ x if x.dtype in (torch.float32, torch.float64) else x.float().mT @ x.float()).double()
            st = stats[n]
            st[0] = g if st[0] is None else st[0] + g
            st[1] += x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in targets.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if callable(calibration) and not isinstance(calibration, (Tensor, list, tuple)):
                calibration(model)
            else:
                total = len(calibration) if hasattr(calibration, "__len__") else 0
                for i, batch in enumerate(calibration):
                    if isinstance(batch, dict):
                        model(**batch)
                    elif isinstance(batch, (tuple, list)):
                        model(*batch)
                    else:
                        model(batch)
                    if verbose:
                        _progress(f"panther.convert: calibration batch {i + 1}", done=i + 1, total=total)
                if verbose:
                    _progress(" done", end=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n, st in stats.items() if st[0] is None]
    if missing:
        raise ValueError(
            f"panther.convert: calibration never reached {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"pass inputs (or a callable) that run the whole model"
        )
    return {n: (st[0], st[1]) for n, st in stats.items()}


# ----------------------------------------------------------------------------------------------
# Building the new modules
# ----------------------------------------------------------------------------------------------


def _build_sklinear(name, m, kind, cfg: SketchConfig, k: int, init: str, gram: Optional[Tensor],
                    factors: Optional[Dict[str, Any]] = None) -> SKLinear:
    d_in, d_out = _dims(m, kind)
    W = _dense_weight_of(m, kind)
    dtype, device = W.dtype, W.device
    L = cfg.num_terms
    has_bias = getattr(m, "bias", None) is not None
    record: Dict[str, Any] = {
        "name": name, "old_type": type(m).__name__, "new_type": "SKLinear",
        "before": d_in * d_out + (d_out if has_bias else 0),
        "after": 2 * L * k * (d_in + d_out) + (d_out if has_bias else 0),
        "num_terms": L, "low_rank": k, "rank": 2 * L * k, "init": init, "svd": None,
        "weight_error": None, "output_error": None, "conv1d": kind == "conv1d",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the size is decided (and reported) by the converter
        if init == "sketch":
            layer = SKLinear(d_in, d_out, L, k, W_init=W.detach(), bias=has_bias, dtype=dtype, device=device)
        else:
            layer = SKLinear(d_in, d_out, L, k, bias=has_bias, dtype=dtype, device="meta").to_empty(device=device)
    with torch.no_grad():
        if init == "empty":
            for t in (layer.S1s, layer.S2s, layer.U1s, layer.U2s):
                t.zero_()
        elif init == "svd":
            f = factors if factors is not None else sketch_factors_from_weight(W, L, k, gram=gram, svd=cfg.svd)
            for key in ("S1s", "S2s", "U1s", "U2s"):
                getattr(layer, key).copy_(f[key])
            record["svd"] = f["svd"]
        if has_bias:
            layer.bias.copy_(m.bias)
        if init != "empty":
            work = torch.float64 if dtype == torch.float64 else torch.float32
            Wt = W.detach().to(work)
            A = Wt - _effective_weight(layer, work)
            record["weight_error"] = float(A.norm() / Wt.norm().clamp_min(1e-30))
            if gram is not None:
                G = gram.to(device=device, dtype=torch.float64)
                A64, W64 = A.double(), Wt.double()
                num = torch.einsum("oi,ij,oj->", A64, G, A64)
                den = torch.einsum("oi,ij,oj->", W64, G, W64)
                record["output_error"] = float((num.clamp_min(0) / den.clamp_min(1e-300)).sqrt())
    layer.train(m.training)
    setattr(layer, _RECORD, record)
    return layer


_BATCH_BYTES = 256 * 2**20  # stacked weights per batched SVD


def _batched_factors(sketch_jobs, ranks, eff_init, grams) -> Dict[str, Dict[str, Any]]:
    """SVD-init factors of layers that share a shape (and L, k, dtype, device), computed as
    batches: one batched range finder / SVD per shape instead of one call per layer (on a GPU,
    small factorisations are bound by launches and solver set-up, not arithmetic)."""
    groups: Dict[Any, List[Tuple[str, Tensor]]] = {}
    for n, m, kind, cfg in sketch_jobs:
        if eff_init[n] != "svd" or n in grams:
            continue
        W = _dense_weight_of(m, kind)
        key = (tuple(W.shape), W.dtype, W.device, cfg.num_terms, ranks[n], cfg.svd)
        groups.setdefault(key, []).append((n, W))
    out: Dict[str, Dict[str, Any]] = {}
    for (shape, _, _, L, k, svd), items in groups.items():
        chunk = max(1, _BATCH_BYTES // (4 * shape[0] * shape[1]))
        for i in range(0, len(items), chunk):
            part = items[i:i + chunk]
            if len(part) < 2:
                continue
            with torch.no_grad():
                f = sketch_factors_from_weight(torch.stack([w.detach() for _, w in part]), L, k, svd=svd)
            for j, (n, _) in enumerate(part):
                out[n] = {key: f[key][j] for key in ("S1s", "S2s", "U1s", "U2s")}
                out[n]["svd"] = f["svd"]
    return out


def _effective_weight(layer: SKLinear, work: torch.dtype) -> Tensor:
    """(out, in) effective weight in ``work`` precision: one GEMM over the rank-2Lk factors."""
    L, d_in, d_out = layer.num_terms, layer.in_features, layer.out_features
    left = torch.cat([layer.S1s, layer.U2s], 2).to(work).permute(1, 0, 2).reshape(d_in, -1)
    right = torch.cat([layer.U1s, layer.S2s], 1).to(work)  # (L, 2k, out)
    right = right.reshape(-1, d_out)
    # left columns are ordered (term, [S1 k | U2 k]); right rows (term, [U1 k ; S2 k]): they match.
    return (left @ right).t() / (2 * L)


class _SeqFirstAttention(nn.Module):
    """Adapts a batch-first :class:`RandMultiHeadAttention` to ``(seq, batch, embed)`` inputs, as
    an ``nn.MultiheadAttention(batch_first=False)`` takes them."""

    __constants__ = ["batch_first"]

    def __init__(self, attn: RandMultiHeadAttention):
        super().__init__()
        self.attn = attn
        self.batch_first = False

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        out, w = self.attn(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                           key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal)
        return out.transpose(0, 1), w


def _build_performer(name, m: nn.MultiheadAttention, cfg: PerformerConfig) -> nn.Module:
    causal = bool(cfg.causal) if cfg.causal is not None else False
    try:
        layer = make_performer(m, cfg.num_random_features, kernel_fn=cfg.kernel_fn, iscausal=causal)
    except ValueError as e:
        raise ValueError(f"panther.convert: cannot convert {name!r}: {e}") from e
    before = sum(p.numel() for p in m.parameters())
    after = sum(p.numel() for p in layer.parameters()) + layer.projection_matrix.numel()
    new: nn.Module = layer
    # RandMultiHeadAttention takes (batch, seq, embed) unless it says otherwise (batch_first):
    # adapt it when the converted module took (seq, batch, embed).
    if not getattr(m, "batch_first", False) and getattr(layer, "batch_first", True):
        new = _SeqFirstAttention(layer)
    setattr(new, _RECORD, {
        "name": name, "old_type": type(m).__name__, "new_type": "RandMultiHeadAttention",
        "before": before, "after": after, "num_terms": None, "low_rank": None,
        "rank": None, "init": None, "svd": None, "weight_error": None, "output_error": None,
        "num_random_features": cfg.num_random_features, "kernel_fn": cfg.kernel_fn,
    })
    return new


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


# ----------------------------------------------------------------------------------------------
# The public entry points
# ----------------------------------------------------------------------------------------------


def convert(
    model: nn.Module,
    config: Union[_Config, Dict[str, Optional[_Config]]],
    *,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    inplace: bool = False,
    calibration: Optional[Union[Iterable[Any], Callable[[nn.Module], Any]]] = None,
    init: Optional[str] = None,
    verbose: bool = False,
) -> nn.Module:
    """Convert a (trained) model's layers to sketched linear layers and FAVOR+ attention.

    Args:
        model: any ``nn.Module``.
        config: one :class:`SketchConfig` / :class:`PerformerConfig` for every module it fits
            (``nn.Linear`` and GPT-2 ``Conv1D`` for the first; ``nn.MultiheadAttention`` and
            Hugging Face attention modules for the second), or a dict from module names to configs
            (``None`` = leave dense): exact names, ``"re:<regex>"`` (full match, applied to the
            modules its config fits) and ``"_default"``. Precedence: exact name, then the first
            matching regex in dict order, then ``"_default"``. A key that matches nothing gives a
            warning listing near names. The linear children of ``nn.MultiheadAttention``
            (``out_proj``) are converted with their parent, never on their own.
        filter_fn: ``filter_fn(module, name) -> bool``; False leaves the module as it is.
        inplace: modify ``model`` itself (default: convert and return a deep copy).
        calibration: an iterable of inputs (a tensor is passed as ``model(x)``, a tuple/list as
            ``model(*x)``, a dict as ``model(**x)``), or a callable ``f(model)`` that runs the
            model. Each sketched layer's input second moment ``X^T X`` is streamed through forward
            hooks (float64) and its factors minimise the output error ``||X (W - W_eff)^T||``.
        init: overrides every SketchConfig's ``init`` (e.g. ``"empty"`` builds a skeleton to load
            a state_dict into, with no SVD work).
        verbose: print the :func:`conversion_report` (and calibration progress on stderr).

    Returns:
        The converted model (``model`` itself if ``inplace``). Each converted module carries its
        row of the report.

    Raises:
        TypeError: ``model`` not an ``nn.Module``; a config or dict value of the wrong type; a
            config whose type does not fit the module it names.
        ValueError: a rank above the layer's (``skip_if_larger=False``), a bad ``init``, an invalid
            regex, an ``out_proj`` of an ``nn.MultiheadAttention`` named on its own, calibration
            that never reaches a layer. All checks run before anything is modified.

    >>> import torch, panther
    >>> net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> sk = panther.convert(net, {"0": panther.SketchConfig(low_rank=4), "2": None})
    >>> type(sk[0]).__name__, type(net[0]).__name__
    ('SKLinear', 'Linear')
    >>> sk(torch.randn(2, 32)).shape
    torch.Size([2, 4])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"panther.convert: model must be an nn.Module, got {type(model).__name__}")
    if init is not None and init not in _INITS:
        raise ValueError(f"panther.convert: init must be None or one of {_INITS}, got {init!r}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"panther.convert: filter_fn must be callable, got {type(filter_fn).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"panther.convert: inplace must be a bool, got {inplace!r}")
    if not isinstance(config, (dict, SketchConfig, PerformerConfig)):
        raise TypeError(
            f"panther.convert: config must be a SketchConfig, a PerformerConfig or a dict of them, "
            f"got {type(config).__name__}"
        )
    # Everything is checked on the original before anything is copied or modified.
    plan, warns = _plan(model, config, filter_fn)
    ranks: Dict[str, Optional[int]] = {}
    skipped: List[Dict[str, Any]] = []
    for name, m, kind, cfg in plan:
        if kind == "mha":
            # Build (and drop) the replacement once now, so an attention module it cannot convert
            # fails before anything is modified.
            _build_performer(name, m, cfg)
        if isinstance(cfg, SketchConfig):
            k, reason = _resolve_rank(name, m, kind, cfg)
            ranks[name] = k
            if k is None:
                d_in, d_out = _dims(m, kind)
                dense = d_in * d_out + (d_out if getattr(m, "bias", None) is not None else 0)
                skipped.append({"name": name, "old_type": type(m).__name__, "new_type": type(m).__name__,
                                "before": dense, "after": dense, "skipped": reason})
    for w in warns:
        warnings.warn(w, UserWarning, stacklevel=2)
    target = model if inplace else copy.deepcopy(model)
    plan = [(n, target.get_submodule(n) if n else target, kind, cfg) for n, _, kind, cfg in plan]
    sketch_jobs = [(n, m, kind, cfg) for n, m, kind, cfg in plan
                   if isinstance(cfg, SketchConfig) and ranks[n] is not None]
    grams: Dict[str, Tuple[Tensor, int]] = {}
    eff_init = {n: (init or cfg.init) for n, _, _, cfg in sketch_jobs}
    if calibration is not None:
        calib_targets = {n: m for n, m, _, _ in sketch_jobs if eff_init[n] == "svd"}
        if calib_targets:
            grams = _calibrate(target, calib_targets, calibration, verbose)
    if any(kind == "hf_attention" for _, _, kind, _ in plan):
        from . import _hf_attention

        _hf_attention.register()
    factors = _batched_factors(sketch_jobs, ranks, eff_init, grams)
    # Replace, innermost last does not matter: plan entries never nest inside a replaced module.
    n_jobs = len(plan)
    for i, (name, m, kind, cfg) in enumerate(plan):
        if isinstance(cfg, SketchConfig):
            k = ranks[name]
            if k is None:
                continue
            g = grams.get(name)
            new = _build_sklinear(name, m, kind, cfg, k, eff_init[name], g[0] if g is not None else None,
                                  factors.pop(name, None))
        elif kind == "mha":
            new = _build_performer(name, m, cfg)
        else:
            from . import _hf_attention

            _hf_attention.attach(name, m, cfg)
            continue
        if name:
            _set_submodule(target, name, new)
        else:
            target = new
        if verbose and n_jobs > 20:
            _progress("panther.convert: layers", end=i + 1 == n_jobs, done=i + 1, total=n_jobs)
    prev = list(getattr(target, _SKIPPED, []))
    try:
        object.__setattr__(target, _SKIPPED, prev + skipped)
    except AttributeError:  # pragma: no cover - exotic modules
        pass
    if verbose:
        print(conversion_report(target, as_text=True))
    return target


def conversion_report(model: nn.Module, as_text: bool = False) -> Union[List[Dict[str, Any]], str]:
    """What :func:`convert` did to ``model``: one dict per converted (or skipped) layer.

    Keys: ``name``, ``old_type``, ``new_type``, ``before`` and ``after`` (stored numbers: a
    sketched layer counts its learnable factors and its basis buffers, ``2Lk(d_in + d_out)``,
    plus bias), ``num_terms``, ``low_rank``, ``rank`` (``2Lk``), ``init``, ``svd`` (the method
    used), ``weight_error`` (``||W - W_eff||_F / ||W||_F``) and ``output_error`` (with
    calibration: ``||X (W - W_eff)^T||_F / ||X W^T||_F`` on the calibration inputs), or
    ``skipped`` (the reason a layer stayed dense). Recorded at conversion time.

    Args:
        model: a model returned by :func:`convert` (or one of its submodules).
        as_text: return a printable table with totals instead of the list.

    Raises:
        TypeError: ``model`` not an ``nn.Module``.

    >>> import torch, panther
    >>> sk = panther.convert(torch.nn.Sequential(torch.nn.Linear(64, 64)), panther.SketchConfig(low_rank=8))
    >>> rows = panther.conversion_report(sk)
    >>> rows[0]["name"], rows[0]["before"], rows[0]["after"]
    ('0', 4160, 2112)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"panther.conversion_report: model must be an nn.Module, got {type(model).__name__}")
    rows = []
    for name, m in model.named_modules():
        rec = getattr(m, _RECORD, None)
        if isinstance(rec, dict):
            row = dict(rec)
            row["name"] = name if name else rec.get("name", "")
            rows.append(row)
    rows += [dict(r) for r in getattr(model, _SKIPPED, [])]
    if not as_text:
        return rows
    head = f"{'layer':<40} {'old -> new':<46} {'before':>10} {'after':>10} {'rank':>6} {'w.err':>9} {'out.err':>9}"
    lines = [head, "-" * len(head)]

    def fmt(v):
        return "-" if v is None else f"{v:.3g}"

    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['name']:<40} {r['old_type'] + ' (kept: ' + r['skipped'] + ')':<46}")
            continue
        lines.append(
            f"{r['name']:<40} {r['old_type'] + ' -> ' + r['new_type']:<46} {r['before']:>10,} {r['after']:>10,} "
            f"{fmt(r.get('rank')) if r.get('rank') is not None else '-':>6} {fmt(r.get('weight_error')):>9} "
            f"{fmt(r.get('output_error')):>9}"
        )
    before = sum(r["before"] for r in rows)
    after = sum(r["after"] for r in rows)
    lines.append("-" * len(head))
    ratio = f"{after / before:.1%}" if before else "-"
    lines.append(f"{'total (' + str(len(rows)) + ' layers)':<40} {'stored numbers after/before = ' + ratio:<46} "
                 f"{before:>10,} {after:>10,}")
    return "\n".join(lines)


def unconvert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Turn a converted model back into dense PyTorch layers, for deploying without Panther.

    Every :class:`~panther.nn.SKLinear` becomes an ``nn.Linear`` holding its effective weight
    (:meth:`~panther.nn.SKLinear.to_linear`; GPT-2 ``Conv1D`` layers come back as ``nn.Linear``,
    which computes the same function); every :class:`~panther.nn.RandMultiHeadAttention` made by
    :func:`convert` becomes an ``nn.MultiheadAttention`` with its weights (exact softmax attention
    again); Hugging Face attention modules go back to their previous attention implementation.

    Args:
        model: an ``nn.Module``. inplace: modify ``model`` (default: a deep copy).

    Raises:
        TypeError: ``model`` not an ``nn.Module``.

    >>> import torch, panther
    >>> sk = panther.convert(torch.nn.Sequential(torch.nn.Linear(64, 64)), panther.SketchConfig(low_rank=8))
    >>> type(panther.unconvert(sk)[0]).__name__
    'Linear'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"panther.unconvert: model must be an nn.Module, got {type(model).__name__}")
    target = model if inplace else copy.deepcopy(model)
    replace = []
    for name, m in target.named_modules():
        if isinstance(m, SKLinear):
            replace.append((name, m.to_linear()))
        elif isinstance(m, _SeqFirstAttention):
            replace.append((name, _to_mha(m.attn, batch_first=False)))
        elif isinstance(m, RandMultiHeadAttention) and isinstance(getattr(m, _RECORD, None), dict):
            replace.append((name, _to_mha(m, batch_first=bool(getattr(m, "batch_first", True)))))
        elif hasattr(m, "panther_favor_projection"):
            from . import _hf_attention

            _hf_attention.detach(m)
    for name, new in replace:
        if name:
            _set_submodule(target, name, new)
        else:
            target = new
    if hasattr(target, _SKIPPED):
        try:
            object.__delattr__(target, _SKIPPED)
        except AttributeError:  # pragma: no cover
            pass
    return target


def _to_mha(layer: RandMultiHeadAttention, batch_first: bool) -> nn.MultiheadAttention:
    E = layer.embed_dim
    kdim, vdim = getattr(layer, "kdim", E), getattr(layer, "vdim", E)
    bias_k = getattr(layer, "bias_k", None)
    mha = nn.MultiheadAttention(E, layer.num_heads, dropout=layer.dropout, bias=layer.bias,
                                add_bias_kv=bias_k is not None,
                                add_zero_attn=bool(getattr(layer, "add_zero_attn", False)),
                                kdim=kdim, vdim=vdim, batch_first=batch_first,
                                device=layer.Wq.device, dtype=layer.Wq.dtype)
    with torch.no_grad():
        if mha._qkv_same_embed_dim:
            mha.in_proj_weight.copy_(torch.cat([layer.Wq, layer.Wk, layer.Wv]))
        else:
            mha.q_proj_weight.copy_(layer.Wq)
            mha.k_proj_weight.copy_(layer.Wk)
            mha.v_proj_weight.copy_(layer.Wv)
        mha.out_proj.weight.copy_(layer.W0)
        if layer.bias:
            mha.in_proj_bias.copy_(torch.cat([layer.bq, layer.bk, layer.bv]))
            mha.out_proj.bias.copy_(layer.b0)
        if bias_k is not None:
            mha.bias_k.copy_(bias_k.reshape(mha.bias_k.shape))
            mha.bias_v.copy_(layer.bias_v.reshape(mha.bias_v.shape))
    mha.train(layer.training)
    return mha
