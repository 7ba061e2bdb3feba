"""Build-time metadata of the torch-panther distribution (a scikit-build-core dynamic-metadata
provider, loaded in-tree by ``[[tool.dynamic-metadata]]`` in pyproject.toml).

Panther's binaries use torch's C++ ABI, which changes between torch minor releases, so a build
only works with the torch minor it was compiled against. This provider writes that truth into
the wheel:

- ``version``: the release from ``python/panther/_version.py``; with the environment variable
  ``PANTHER_LOCAL_VERSION=1`` (``make wheel`` sets it) a wheel's version adds the local label
  ``+torch<major>.<minor>`` of the installed torch (``0.1.0+torch2.13``), so wheels built for
  different torch minors have different names. A source distribution always keeps the plain
  release (pip checks that a package built from it has the version its file name says).
- ``dependencies``: ``torch==<major>.<minor>.*`` of the installed torch.

The torch it reads is the one installed in the building environment, which is the one the build
compiles against (``pip install --no-build-isolation .``): torch is never a build requirement,
since build isolation would compile against a fresh torch that may not be the one installed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

_VERSION_FILE = Path(__file__).resolve().parents[1] / "python" / "panther" / "_version.py"


def release() -> str:
    """The release number written in python/panther/_version.py."""
    m = re.search(r'^__version__\s*=\s*"([^"]+)"', _VERSION_FILE.read_text(encoding="utf-8"), re.M)
    if not m:
        raise RuntimeError(f"torch-panther: no __version__ = \"...\" line in {_VERSION_FILE}")
    return m.group(1)


def torch_minor() -> str:
    """``<major>.<minor>`` of the torch installed in the building environment."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("torch")
    except PackageNotFoundError:
        raise RuntimeError(
            "torch-panther is compiled against the torch installed in this environment, and "
            "none is installed. Install torch first (pip install torch), then build without "
            "build isolation: pip install --no-build-isolation ."
        ) from None
    m = re.match(r"(\d+)\.(\d+)", v)
    if not m:
        raise RuntimeError(f"torch-panther: cannot read a major.minor from torch version {v!r}")
    return f"{m.group(1)}.{m.group(2)}"


class Provider:
    """scikit-build-core dynamic-metadata provider: ``field`` is "version" or "dependencies"."""

    def __init__(self) -> None:
        self._state = "wheel"

    def build_state(self, build_state: str) -> None:
        self._state = build_state

    def dynamic_metadata(self, settings: Mapping[str, Any], project: Mapping[str, Any]) -> dict:
        field = settings.get("field")
        if field == "version":
            local = os.environ.get("PANTHER_LOCAL_VERSION", "0") not in ("", "0")
            if self._state == "sdist" or not local:
                return {"version": release()}
            return {"version": f"{release()}+torch{torch_minor()}"}
        if field == "dependencies":
            return {"dependencies": [f"torch=={torch_minor()}.*"]}
        raise RuntimeError(
            f"panther_metadata: field must be 'version' or 'dependencies', got {field!r}"
        )
