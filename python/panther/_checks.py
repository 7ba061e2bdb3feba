"""Argument checks shared by Panther's modules: integers, dtypes, and whether tensors can fit.

Every error names the module (``owner``), the argument, what was expected and what was given.
"""

import math
import operator
import os
from typing import Iterable, Optional, Tuple

import torch

__all__ = ["check_int", "check_dtype", "check_tensor", "memory_limit_bytes", "check_fits"]

_MAX_NUMEL = 2**63 - 1


def check_int(owner: str, name: str, value, minimum: int = 1) -> int:
    """``value`` as a Python int (anything ``operator.index`` accepts: int, numpy integers,
    0-d integer tensors), at least ``minimum``.

    Raises ValueError for bools, non-integral values (floats included, even ``8.0``) and values
    below ``minimum``.

    >>> import numpy as np
    >>> check_int("Layer", "rank", np.int64(4))
    4
    """
    kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(f"{owner}: {name} must be {kind}, got the bool {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{owner}: {name} must be {kind}, got {value!r} of type {type(value).__name__}") from None
    if out < minimum:
        raise ValueError(f"{owner}: {name} must be {kind}, got {out}")
    return out


def check_dtype(owner: str, dtype) -> Optional[torch.dtype]:
    """``dtype`` if it is None or a floating-point ``torch.dtype``.

    Raises TypeError when it is not a ``torch.dtype`` and ValueError for integer, bool and complex
    dtypes (parameters must be real floating point).

    >>> check_dtype("Layer", torch.float16)
    torch.float16
    """
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{owner}: dtype must be a torch.dtype or None, got {dtype!r} of type {type(dtype).__name__}")
    if not dtype.is_floating_point:
        raise ValueError(
            f"{owner}: dtype must be a floating-point dtype (float16, bfloat16, float32, float64), got {dtype}"
        )
    return dtype


@torch.jit.unused
def check_tensor(owner: str, name: str, value, optional: bool = False) -> None:
    """Raise TypeError unless ``value`` is a Tensor (or None where ``optional``), naming the argument.

    >>> check_tensor("Layer", "input", torch.ones(1))
    """
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        what = "a Tensor or None" if optional else "a Tensor"
        raise TypeError(f"{owner}: {name} must be {what}, got {'None' if value is None else type(value).__name__}")


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    # cgroup v1 reports "no limit" as a huge number (about 2**63 rounded to the page size).
    return value if 0 < value < 2**60 else None


def _cgroup_memory_limit() -> Optional[int]:
    """This process's cgroup memory limit in bytes (cgroup v2 ``memory.max``, v1
    ``memory.limit_in_bytes``), or None when there is none."""
    candidates = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
    try:  # the process's own cgroup, where it is not the root of the mount
        with open("/proc/self/cgroup") as f:
            for line in f:
                parts = line.strip().split(":", 2)
                if len(parts) != 3 or parts[2] in ("", "/"):
                    continue
                if parts[0] == "0":
                    candidates.insert(0, f"/sys/fs/cgroup{parts[2]}/memory.max")
                elif "memory" in parts[1].split(","):
                    candidates.insert(0, f"/sys/fs/cgroup/memory{parts[2]}/memory.limit_in_bytes")
    except OSError:
        pass
    limits = [v for v in (_read_int(p) for p in candidates) if v is not None]
    return min(limits) if limits else None


def memory_limit_bytes(device) -> Optional[int]:
    """The most memory a new tensor on ``device`` can get, in bytes, or None where unknown (meta).

    CPU: the smallest of the cgroup memory limit, the address-space limit (``RLIMIT_AS``) and the
    physical memory. CUDA: the device's free memory plus what PyTorch's caching allocator holds
    but does not use.
    """
    dev = torch.device(device)
    if dev.type == "cpu":
        limits = []
        cg = _cgroup_memory_limit()
        if cg is not None:
            limits.append(cg)
        try:
            import resource

            soft, _ = resource.getrlimit(resource.RLIMIT_AS)
            if soft not in (resource.RLIM_INFINITY, -1) and soft > 0:
                limits.append(soft)
        except (ImportError, ValueError, OSError):  # pragma: no cover - non-POSIX
            pass
        try:
            limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
            pass
        return min(limits) if limits else None
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return int(free) + max(int(cached), 0)
    return None


def check_fits(owner: str, what: str, shapes: Iterable[Tuple[str, Tuple[int, ...], int]], device) -> None:
    """Raise ValueError, before anything is allocated, when tensors cannot be built.

    ``shapes``: ``(description, shape, bytes per element)`` of every tensor the constructor
    will hold at once (parameters, buffers and temporaries). ``what`` names the call (the
    arguments) in the message. A shape with more elements than a tensor can hold is refused on
    any device; the total is compared with :func:`memory_limit_bytes` of ``device`` (``None``: the
    default device).
    """
    total = 0
    for desc, shape, item in shapes:
        numel = math.prod(shape)
        if numel > _MAX_NUMEL:
            raise ValueError(f"{owner}: {desc} = {tuple(shape)} has more elements than a tensor can hold ({what})")
        total += numel * item
    dev = torch.device(device) if device is not None else torch.empty(0).device
    limit = memory_limit_bytes(dev)
    if limit is not None and total > limit:
        raise ValueError(
            f"{owner}({what}) needs {total / 2**30:,.1f} GiB to build, more than the "
            f"{limit / 2**30:,.1f} GiB of memory on device {dev} this process can use"
        )
