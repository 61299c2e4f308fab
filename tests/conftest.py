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


@pytest.fixture(scope="session")
def fp16_stress(tmp_path_factory):
    """The tiny synthetic model with activations that outgrow float16 as Z-Image's do
    (zimage_lite/synthetic_stress.py: FFN products and attention outputs ~1e5-1e6, massive activations)."""
    from zimage_lite.synthetic import write_synthetic_model

    return write_synthetic_model(tmp_path_factory.mktemp("fp16") / "stress", "tiny", seed=0, stress="fp16")
