"""SKLinear: a sketched, randomized low-rank replacement for ``nn.Linear``."""

import math
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .._checks import check_dtype, check_int, check_tensor, memory_limit_bytes
from ._tensors import module_tensors, panther_op

_OPERANDS = ("S1s", "S2s", "U1s", "U2s", "bias")


def _check_positive_int(layer: str, name: str, value) -> int:
    return check_int(layer, name, value)


# Refuse layers whose tensors cannot exist, before anything is allocated (a typo such as
# SKLinear(10**9, 10**9, ...) would otherwise start filling RAM or fail deep in an allocator).
_MAX_NUMEL = 2**63 - 1


def _check_size(layer: str, in_features: int, out_features: int, L: int, k: int,
                dtype: Optional[torch.dtype], device, dense_init: bool) -> None:
    shapes = {
        "S1s/U2s (num_terms, in_features, low_rank)": (L, in_features, k),
        "S2s/U1s (num_terms, low_rank, out_features)": (L, k, out_features),
        "initial dense weight (out_features, in_features)": (out_features, in_features),
    }
    for what, shape in shapes.items():
        if math.prod(shape) > _MAX_NUMEL:
            raise ValueError(
                f"{layer}: {what} = {shape} has more elements than a tensor can hold "
                f"(in_features={in_features}, out_features={out_features}, num_terms={L}, low_rank={k})"
            )
    dev = torch.device(device) if device is not None else torch.empty(0).device
    limit = memory_limit_bytes(dev)
    if limit is None:
        return
    item = torch.empty(0, dtype=dtype if dtype is not None else torch.get_default_dtype()).element_size()
    # Parameters and buffers (2 * L * k * (in + out) numbers) plus, without W_init, the dense
    # weight drawn at construction (at least fp32) to be sketched.
    need = 2 * L * k * (in_features + out_features) * item
    if dense_init:
        need += in_features * out_features * max(item, 4)
    if need > limit:
        raise ValueError(
            f"{layer}(in_features={in_features}, out_features={out_features}, num_terms={L}, "
            f"low_rank={k}) needs {need / 2**30:,.1f} GiB to build (sketches"
            f"{' + initial dense weight' if dense_init else ''}), "
            f"more than the {limit / 2**30:,.1f} GiB of memory on device {dev} this process can use"
        )


def rademacher(shape, scale: float, *, generator: Optional[torch.Generator] = None,
               dtype=None, device=None) -> Tensor:
    """Entries +-scale with equal probability, drawn from ``generator`` (or the global one)."""
    signs = torch.randint(0, 2, shape, generator=generator, device=device, dtype=torch.int8)
    return (signs.to(dtype or torch.get_default_dtype()) * 2 - 1) * scale


class SKLinear(nn.Module):
    r"""Sketched linear layer: a rank-``2 * num_terms * low_rank`` randomized stand-in for ``nn.Linear``.

    .. math::
        y = \frac{1}{2L} \sum_{i=1}^{L} \left( x S^{(1)}_i U^{(1)}_i + x U^{(2)}_i S^{(2)}_i \right) + b

    with ``L = num_terms`` and ``k = low_rank``. ``S1s`` ``(L, in_features, k)`` and ``S2s``
    ``(L, k, out_features)`` are learned; ``U1s`` ``(L, k, out_features)`` and ``U2s``
    ``(L, in_features, k)`` are fixed random sign matrices with entries ``+-1/sqrt(k)`` (buffers,
    saved in the state dict). Initialised from a dense weight ``W`` (``nn.Linear`` layout,
    ``out x in``) as ``S1_i = W^T U1_i^T`` and ``S2_i = U2_i^T W^T``, so every term is an unbiased
    estimate of ``W^T``. Names and shapes match the original Panther, so its checkpoints load.

    Args:
        in_features, out_features: sizes of each input and output sample.
        num_terms: number of sketch terms ``L`` (>= 1).
        low_rank: sketch size ``k`` (>= 1; any value, no multiple-of-16 restriction).
        W_init: optional ``(out_features, in_features)`` weight to sketch (e.g. a trained
            ``nn.Linear.weight``); default: a random ``W`` drawn so that the layer's effective
            weight (:meth:`dense_weight`, ``W`` plus the sketch noise) has ``nn.Linear``'s scale.
        bias: learn an additive bias (initialised as ``nn.Linear``'s).
        dtype, device: of parameters and buffers.
        generator: ``torch.Generator`` for the random draws (default: the global generator;
            constructing a layer never reseeds anything).

    Shape: input ``(..., in_features)`` -> output ``(..., out_features)``, in the layer's dtype
    (fp32, fp64, fp16 or bf16; low precision accumulates in fp32).

    Raises:
        ValueError: a size that is not a positive integer, a layer that cannot fit in the memory
            the process may use, a ``W_init`` of the wrong shape, or (at call time) an input
            whose last dim is not ``in_features``.
        TypeError: a ``dtype`` that is not a floating-point ``torch.dtype``, or a ``W_init`` that
            is not a tensor.

    A ``UserWarning`` says when the sketch holds more numbers than the dense layer it replaces.

    >>> layer = SKLinear(64, 32, num_terms=1, low_rank=4)
    >>> layer(torch.randn(5, 64)).shape
    torch.Size([5, 32])
    >>> (layer.S1s.shape, layer.U1s.shape)
    (torch.Size([1, 64, 4]), torch.Size([1, 4, 32]))
    """

    __constants__ = ["in_features", "out_features", "num_terms", "low_rank"]
    in_features: int
    out_features: int
    num_terms: int
    low_rank: int
    bias: Optional[Tensor]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_terms: int,
        low_rank: int,
        W_init: Optional[Tensor] = None,
        bias: bool = True,
        dtype: Optional[torch.dtype] = None,
        device=None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        dtype = check_dtype(name, dtype)
        self.in_features = _check_positive_int(name, "in_features", in_features)
        self.out_features = _check_positive_int(name, "out_features", out_features)
        self.num_terms = _check_positive_int(name, "num_terms", num_terms)
        self.low_rank = _check_positive_int(name, "low_rank", low_rank)
        in_features, out_features = self.in_features, self.out_features
        L, k = self.num_terms, self.low_rank
        _check_size(name, in_features, out_features, L, k, dtype, device, dense_init=W_init is None)
        if W_init is not None:
            if not isinstance(W_init, Tensor):
                raise TypeError(f"{name}: W_init must be a Tensor or None, got {type(W_init).__name__}")
            if tuple(W_init.shape) != (out_features, in_features):
                raise ValueError(
                    f"{name}: W_init must have shape (out_features={out_features}, "
                    f"in_features={in_features}) (nn.Linear layout), got {tuple(W_init.shape)}"
                )
        sketch_numbers = 2 * L * k * (in_features + out_features)
        if sketch_numbers > in_features * out_features:
            warnings.warn(
                f"{name}({in_features}, {out_features}, num_terms={L}, low_rank={k}) holds "
                f"{sketch_numbers:,} sketch numbers, more than the {in_features * out_features:,} "
                f"weights of the dense layer it replaces; lower num_terms or low_rank to save memory",
                UserWarning,
                stacklevel=2,
            )
        fk = {"dtype": dtype if dtype is not None else torch.get_default_dtype(), "device": device}
        self.register_buffer("U1s", torch.empty(L, k, out_features, **fk))
        self.register_buffer("U2s", torch.empty(L, in_features, k, **fk))
        # Contiguous, as FSDP2 (fully_shard) and flat-buffer optimizers require of parameters.
        self.S1s = nn.Parameter(torch.empty(L, in_features, k, **fk))
        self.S2s = nn.Parameter(torch.empty(L, k, out_features, **fk))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **fk))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters(generator=generator, W_init=W_init)

    def reset_parameters(self, generator: Optional[torch.Generator] = None, W_init: Optional[Tensor] = None) -> None:
        """(Re)initialise in place: new random sign matrices ``U1s, U2s``, sketches of ``W_init``
        (default: a fresh random ``W`` with ``nn.Linear``'s scale) and ``nn.Linear``'s bias init.

        Same shapes, dtypes, devices and tensor objects (so optimizers and shared memory keep
        them). Used by the constructor, and after meta-device construction plus ``to_empty``. A
        layer converted from a trained weight with the SVD init (:func:`panther.convert`) holds
        orthonormal singular bases, not random signs, in ``U1s``/``U2s``: this returns it to
        random initialisation and drops its conversion record.

        >>> layer = SKLinear(16, 8, 1, 2, device="meta").to_empty(device="cpu")
        >>> layer.reset_parameters()
        >>> bool(layer(torch.ones(3, 16)).isfinite().all())
        True
        """
        L, k = self.num_terms, self.low_rank
        in_features, out_features = self.in_features, self.out_features
        dtype, device = self.U1s.dtype, self.U1s.device
        scale = 1.0 / math.sqrt(k)
        # The sketches are formed in at least fp32 and rounded once to the layer's dtype.
        work = torch.float64 if dtype == torch.float64 else torch.float32
        with torch.no_grad():
            self.U1s.copy_(rademacher((L, k, out_features), scale, generator=generator, dtype=dtype, device=device))
            self.U2s.copy_(rademacher((L, in_features, k), scale, generator=generator, dtype=dtype, device=device))
            if W_init is None:
                W = torch.empty(out_features, in_features, dtype=work, device=device)
                nn.init.kaiming_uniform_(W, a=math.sqrt(5), generator=generator)
                # The layer's effective weight (dense_weight()) is W plus the sketch noise, whose
                # variance per entry is var(W) * (in + out - 2) / (4 L k). Shrink W so that the
                # effective weight has nn.Linear's variance, hence activations nn.Linear's scale.
                W.mul_((1.0 + (in_features + out_features - 2) / (4.0 * L * k)) ** -0.5)
            else:
                W = W_init.detach().to(device=device, dtype=work)
            U1 = self.U1s.to(work)
            U2 = self.U2s.to(work)
            self.S1s.copy_(torch.einsum("oi,lko->lik", W, U1))  # W^T U1_i^T: (L, in, k)
            self.S2s.copy_(torch.einsum("lik,oi->lko", U2, W))  # U2_i^T W^T: (L, k, out)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(in_features)
                self.bias.uniform_(-bound, bound, generator=generator)
        if hasattr(self, "_panther_conversion"):
            del self._panther_conversion

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        num_terms: int,
        low_rank: int,
        generator: Optional[torch.Generator] = None,
    ):
        """Sketch a (trained) ``nn.Linear``: its weight initialises the sketches, its bias is copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SKLinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features,
            linear.out_features,
            num_terms,
            low_rank,
            W_init=linear.weight,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
            generator=generator,
        )
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def dense_weight(self) -> Tensor:
        """The equivalent dense weight ``(out_features, in_features)`` (for inspection and tests).

        Summed in float64 and rounded once to the parameters' dtype, so a fp16/bf16 layer's weight
        is as close to the sketch's exact value as that dtype allows.
        """
        L = self.num_terms
        work = torch.float64
        S1, U1, U2, S2 = (t.to(work) for t in (self.S1s, self.U1s, self.U2s, self.S2s))
        W_t = torch.einsum("lik,lko->io", S1, U1) + torch.einsum("lik,lko->io", U2, S2)
        return (W_t / (2 * L)).t().to(self.S1s.dtype)

    @torch.jit.unused
    def _operands(self) -> Tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
        """(S1s, S2s, U1s, U2s, bias), read cheaply (module_tensors)."""
        return module_tensors(self, _OPERANDS)  # type: ignore[return-value]

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            check_tensor("SKLinear", "input", input)
        if input.dim() == 0:
            raise ValueError("SKLinear: input must have at least 1 dimension (..., in_features), got a 0-d tensor")
        if input.size(-1) != self.in_features:
            raise ValueError(
                f"SKLinear: input last dim must be in_features={self.in_features}, got {input.size(-1)}"
            )
        if not torch.jit.is_scripting():
            S1s, S2s, U1s, U2s, bias = self._operands()
            return panther_op("sketched_linear")(input, S1s, S2s, U1s, U2s, bias)
        return torch.ops.panther.sketched_linear(input, self.S1s, self.S2s, self.U1s, self.U2s, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_terms={self.num_terms}, low_rank={self.low_rank}, bias={self.bias is not None}"
        )

    # -- Conversion helpers (used by panther.convert / panther.unconvert) -------------------------

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` computing the same function (for deploying without Panther).

        Its weight is :meth:`dense_weight` (summed in float64, rounded once to the layer's dtype),
        its bias a copy; dtype, device and train/eval mode are kept. Nothing is shared.

        >>> import torch
        >>> from panther.nn import SKLinear
        >>> sk = SKLinear(16, 8, num_terms=1, low_rank=4)
        >>> lin = sk.to_linear()
        >>> x = torch.randn(3, 16)
        >>> torch.allclose(lin(x), sk(x), atol=1e-5)
        True
        """
        W = self.dense_weight().detach()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        dtype=W.dtype, device=W.device)
        with torch.no_grad():
            lin.weight.copy_(W)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.train(self.training)
        return lin
