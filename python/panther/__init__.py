"""Panther: randomized numerical linear algebra for PyTorch.

``import panther as pr`` loads the native operator library (``torch.ops.panther.*``) and offers
``pr.nn.SKLinear`` (a sketched, randomized low-rank replacement for ``nn.Linear``) and
``pr.nn.RandMultiHeadAttention`` (FAVOR+ random-feature attention), and converts a trained model
in one call (``pr.convert``, ``pr.unconvert``, ``pr.conversion_report``). Context parallelism lives
in ``panther.distributed`` (imported explicitly).
"""
from __future__ import annotations

import os as _os

import torch as _torch

from . import _C

# The full version of this build (the release of _version.py, plus "+torch<minor>" for wheels
# built with `make wheel`): the string the installed distribution's metadata carries.
__version__: str = _C.build_info()["version"]


def build_info() -> dict:
    """What this binary was built with.

    Returns a new dict with the keys ``version`` (str, Panther's full version, as
    ``panther.__version__``), ``torch_version`` (str, the torch it was compiled against),
    ``torch_cuda_version`` (str, that torch's CUDA version, ``""`` for a CPU torch),
    ``cuda_arch_list`` (str, the ``TORCH_CUDA_ARCH_LIST`` the CUDA kernels were compiled for,
    ``""`` without them) and ``with_cuda`` (bool, whether CUDA kernels were compiled). Raises
    nothing.

    >>> import panther
    >>> info = panther.build_info()
    >>> info["version"] == panther.__version__
    True
    >>> sorted(info)
    ['cuda_arch_list', 'torch_cuda_version', 'torch_version', 'version', 'with_cuda']
    """
    info = dict(_C.build_info())
    info.setdefault("cuda_arch_list", "")  # (binaries built before the key existed)
    return info


_PORTABLE_ENV = "PANTHER_PORTABLE_KERNELS"


def portable_kernels() -> bool:
    """Whether CUDA kernels are forced onto their portable path (see :func:`set_portable_kernels`).

    True when the environment variable ``PANTHER_PORTABLE_KERNELS`` is set to anything but
    ``""`` or ``"0"``. Raises nothing.

    >>> import panther
    >>> isinstance(panther.portable_kernels(), bool)
    True
    """
    return _os.environ.get(_PORTABLE_ENV, "0") not in ("", "0")


def set_portable_kernels(enabled: bool) -> bool:
    """Force (``True``) or stop forcing (``False``) the portable path of the CUDA kernels.

    Panther's CUDA kernels have two paths: on Hopper GPUs (compute capability 9.0, built for
    ``9.0`` or ``9.0a``) some use Hopper-only instructions (bulk asynchronous copies); binaries for
    other GPUs (8.0, 8.6, 8.9, and PTX run on newer GPUs) use portable code only. This switch makes
    a Hopper GPU run the portable path too, e.g. to test it or to compare the two. Results are the
    same up to floating-point rounding order. It sets the environment variable
    ``PANTHER_PORTABLE_KERNELS`` (``"1"``, or removes it), which the operators read at each call,
    so it also reaches child processes. Change it between calls, not while another thread runs
    Panther operators. CPU operators ignore it.

    Args:
        enabled: bool.

    Returns:
        The previous setting (bool), so that a caller can restore it.

    Raises:
        TypeError: ``enabled`` is not a bool.

    >>> import panther
    >>> previous = panther.set_portable_kernels(True)
    >>> panther.portable_kernels()
    True
    >>> _ = panther.set_portable_kernels(previous)
    """
    if not isinstance(enabled, bool):
        raise TypeError(
            f"panther.set_portable_kernels: enabled must be a bool, got {type(enabled).__name__}"
        )
    previous = portable_kernels()
    if enabled:
        _os.environ[_PORTABLE_ENV] = "1"
    else:
        _os.environ.pop(_PORTABLE_ENV, None)
    return previous


def library_path() -> str:
    """Path (str) of the native operator library (``libpanther_ops.so``). Raises nothing.

    Processes that run Panther models without importing this package (a TorchScript or
    AOTInductor model loaded from Python or C++) must load it first:
    ``torch.ops.load_library(panther.library_path())`` in Python, or link/dlopen it in C++.

    >>> import os, panther
    >>> os.path.basename(panther.library_path())
    'libpanther_ops.so'
    """
    return _os.path.join(_os.path.dirname(__file__), "libpanther_ops.so")


def _load_ops() -> None:
    built = _C.build_info()["torch_version"]
    running = _torch.__version__
    # The C++ ABI of libtorch changes between minor releases: refuse a mismatch up front
    # instead of failing later with an unresolved symbol or a crash.
    if built.split("+")[0].split(".")[:2] != running.split("+")[0].split(".")[:2]:
        raise ImportError(
            f"panther was built for torch {built} but torch {running} is installed; "
            f"rebuild panther against this torch (pip install --no-build-isolation --force-reinstall .)"
        )
    try:
        _torch.ops.load_library(library_path())
    except (OSError, RuntimeError) as e:  # pragma: no cover - depends on a broken install
        raise ImportError(
            f"panther could not load its operator library {library_path()} "
            f"(built for torch {built}, running torch {running}): {e}"
        ) from e


def _library_digest() -> str:
    """A short content hash of the operator library: changes whenever the build does."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    with open(library_path(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _salt_compile_caches() -> None:
    # torch.compile's on-disk caches (inductor's FX graph cache, AOTAutograd's cache) key a graph
    # by its code and inputs, not by the custom ops' implementation: after an upgrade or rebuild
    # they would serve graphs that call a private op that was renamed or changed its outputs.
    # torch mixes compiler.config.cache_key_tag into every such key; add this build's digest.
    try:
        import torch.compiler.config as cc
    except ImportError:  # pragma: no cover - older torch without the option
        return
    current = getattr(cc, "cache_key_tag", None)
    if not isinstance(current, str):  # pragma: no cover - older torch without the option
        return
    piece = f"panther-{_library_digest()}"
    if piece not in current.split("+"):
        cc.cache_key_tag = f"{current}+{piece}" if current else piece


_load_ops()
_salt_compile_caches()

from . import ops  # noqa: E402
from . import nn  # noqa: E402

__all__ = [
    "nn",
    "ops",
    "build_info",
    "library_path",
    "portable_kernels",
    "set_portable_kernels",
    "__version__",
]

# Model conversion (one call: sketched linear layers, FAVOR+ attention, report, way back).
from .convert import (  # noqa: E402
    Budget, PerformerConfig, SketchConfig, conversion_report, convert, unconvert,
)

__all__ += ["convert", "unconvert", "conversion_report", "SketchConfig", "PerformerConfig", "Budget"]
