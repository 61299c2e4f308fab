"""Shared test setup: deterministic CPU torch, a `gpu` marker skipped without CUDA."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU interpreter in CI


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _cache_in_tmp(tmp_path_factory):
    """The bench's default cache (bench.sources.default_cache_dir) is under $XDG_CACHE_HOME: point it at
    the session's tmp, so no test (nor a CLI subprocess, which inherits it) writes into ~/.cache."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(autouse=True)
def _deterministic():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def quantized(tmp_path_factory):
    """The small synthetic model converted to q4_k_m (K-quants apply to its rows), shared by the
    streaming tests: converting it once saves CI the repeats."""
    from zimage_lite.convert.converter import convert
    from zimage_lite.synthetic import write_synthetic_model

    root = tmp_path_factory.mktemp("stream")
    src = write_synthetic_model(root / "small", "small", seed=0)
    convert(src, root / "q4", "q4_k_m", progress=False)
    return root / "q4"
