"""Panther: randomized numerical linear algebra for PyTorch.

``import panther as pr`` loads the native operator library (``torch.ops.panther.*``) and offers
``pr.nn.SKLinear`` (a sketched, randomized low-rank replacement for ``nn.Linear``) and
``pr.nn.RandMultiHeadAttention`` (FAVOR+ random-feature attention).
"""
from __future__ import annotations

import os as _os

import torch as _torch

from . import _C

__version__: str = _C.build_info()["version"]


def build_info() -> dict:
    """What this binary was built with: versions of Panther, torch and CUDA, compiled backends."""
    return dict(_C.build_info())


def library_path() -> str:
    """Path of the native operator library (``libpanther_ops.so``).

    Processes that run Panther models without importing this package (a TorchScript or
    AOTInductor model loaded from Python or C++) must load it first:
    ``torch.ops.load_library(panther.library_path())`` in Python, or link/dlopen it in C++.
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


_load_ops()

from . import ops  # noqa: E402
from . import nn  # noqa: E402

__all__ = ["nn", "ops", "build_info", "library_path", "__version__"]

# Model conversion (one call: sketched linear layers, FAVOR+ attention, report, way back).
from .convert import (  # noqa: E402
    Budget, PerformerConfig, SketchConfig, conversion_report, convert, unconvert,
)

__all__ += ["convert", "unconvert", "conversion_report", "SketchConfig", "PerformerConfig", "Budget"]
