"""Shared test setup: deterministic CPU torch, a `gpu` marker skipped without CUDA."""

from __future__ import annotations

import os

import pytest


def _has_cuda() -> bool:
    import torch  # importing torch does not import triton

    return torch.cuda.is_available()


# Triton fixes interpreted-or-compiled when a kernel module's @triton.jit runs (at import), so this must be
# decided here, before any test module imports zimage_lite.kernels: the CPU interpreter only where there
# is no CUDA (it would copy CUDA tensors to the host and never run a compiled kernel).
HAS_CUDA = _has_cuda()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interpreter: runs Triton kernels on CPU tensors (skipped where the kernels are compiled)"
    )


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    compiled = pytest.mark.skip(
        reason="Triton on CPU tensors needs the interpreter; kernels are compiled here"
    )
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(no_gpu)
        if "interpreter" in item.keywords and not interpreted:
            item.add_marker(compiled)


@pytest.fixture(scope="session")
def kernel_device():
    """Where this session's Triton kernels run: the GPU when compiled, the CPU under the interpreter."""
    import torch

    from zimage_lite.kernels import kernel_mode

    mode = kernel_mode()
    if mode == "compiled" and not HAS_CUDA:
        pytest.skip("Triton kernels are compiled (TRITON_INTERPRET is not 1) but there is no CUDA device")
    return torch.device("cuda" if mode == "compiled" else "cpu")


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


@pytest.fixture(scope="session")
def fp16_stress(tmp_path_factory):
    """The tiny synthetic model with activations that outgrow float16 as Z-Image's do
    (zimage_lite/synthetic_stress.py: FFN products and attention outputs ~1e5-1e6, massive activations)."""
    from zimage_lite.synthetic import write_synthetic_model

    return write_synthetic_model(tmp_path_factory.mktemp("fp16") / "stress", "tiny", seed=0, stress="fp16")
