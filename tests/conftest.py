"""Shared pytest set-up for Panther's tests.

- The ``cuda`` marker: tests (or parameters) marked ``@pytest.mark.cuda`` are skipped when no
  CUDA GPU is available, so CI without a GPU runs everything else.
- ``DEVICES`` / the ``device`` fixture: "cpu", plus "cuda" (marked ``cuda``) when available.
- ``seed`` (autouse): every test starts from ``torch.manual_seed(SEED)``; ``generator`` gives a
  fresh seeded CPU ``torch.Generator`` for tests that draw their own randomness.
- ``inductor_cache``: for tests that use the inductor backend of ``torch.compile``; see there.
"""

import hashlib
import os
import tempfile

import pytest
import torch

SEED = 0

HAS_CUDA = torch.cuda.is_available()

# Device parameters for tests that run on every available device. The CUDA one carries the
# ``cuda`` mark so that ``-m "not cuda"`` deselects it and it is skipped without a GPU.
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if HAS_CUDA else [])


def pytest_configure(config):
    # Also declared in pyproject.toml; repeated here so the marker exists with any config file.
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_cuda)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each available device: "cpu", and "cuda" when a GPU is present."""
    return request.param


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seeds the global generators so every test is reproducible on its own; returns the seed."""
    torch.manual_seed(SEED)
    return SEED


@pytest.fixture
def generator() -> torch.Generator:
    """A fresh CPU ``torch.Generator`` seeded with ``SEED``."""
    g = torch.Generator()
    g.manual_seed(SEED)
    return g


@pytest.fixture
def inductor_cache():
    """Runs the test with an inductor cache directory private to this build of libpanther_ops.

    Inductor's on-disk caches do not key on custom ops' C++ code: a graph cached with an earlier
    build (e.g. one whose internal ``_sketched_linear_forward`` saved a different shape) would be
    reused after a rebuild. A directory named after the library's hash keeps the cache (fast
    reruns) without that hazard.
    """
    import panther

    try:
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
    except ImportError:  # older torch: fall back to switching caches off
        import torch._inductor.config as inductor_config

        def temporary_cache_dir(directory):
            return inductor_config.patch(force_disable_caches=True)

    h = hashlib.sha1()
    with open(panther.library_path(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    directory = os.path.join(tempfile.gettempdir(), f"panther_inductor_{h.hexdigest()[:16]}")
    torch._dynamo.reset()
    with temporary_cache_dir(directory):
        yield directory
    torch._dynamo.reset()
