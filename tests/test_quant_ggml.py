"""ggml's own quantizers (libggml-base through ctypes) and what our torch fallback promises beside them.

The ggml path must reproduce every byte of ggml's test vectors on any machine. The torch emulation is
held to what it can promise on any CPU: Q8_0 / Q4_0 bytes identical; K-quants with the same relative
RMSE to 4 decimals and at least 99% of blocks identical (a one-ulp difference in an fp16 scale flips a
rounding in 1-2 blocks of 256 on AMD AVX-512 machines).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from zimage_lite.errors import NonFiniteError, UsageError
from zimage_lite.quant import formats, ggml_lib
from zimage_lite.quant.formats import QUANT_TYPES, dequantize, pick_quantizer, quantize

VECTORS = Path(__file__).parent / "data" / "ggml_quants.npz"  # see data/README.md
MATRICES = ["gauss", "student_t3", "outliers", "zero_rows_and_blocks", "positive_only"]
WRITABLE = ["Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"]

# Where the wheel is installed it must load: a broken install fails these tests rather than skipping.
needs_ggml = pytest.mark.skipif(
    importlib.util.find_spec("libggml") is None, reason="libggml-python has no wheel for this platform"
)


@pytest.fixture(scope="module")
def vectors():
    return np.load(VECTORS)


def blocks_differing(ours: np.ndarray, ref: np.ndarray, qtype: str) -> np.ndarray:
    size = QUANT_TYPES[qtype].type_size
    assert ours.shape == ref.shape
    return (ours.reshape(-1, size) != ref.reshape(-1, size)).any(1)


def rel_rmse(w: torch.Tensor, raw: np.ndarray, qtype: str) -> float:
    w_hat = dequantize(torch.from_numpy(raw), qtype, tuple(w.shape))
    return float(((w - w_hat).double().pow(2).mean() / w.double().pow(2).mean()).sqrt())


@needs_ggml
@pytest.mark.parametrize("quantizer,calls", [("ggml", True), (None, True), ("torch", False)])
def test_ggml_bytes_come_from_the_library(monkeypatch, quantizer, calls):
    """On an Intel CPU the torch emulation gives ggml's very bytes, so equal bytes do not show which ran:
    count the library's calls (each still runs the library)."""
    seen = []
    for name in ("quantize_blocks", "quantize_rows"):
        real = getattr(ggml_lib, name)
        monkeypatch.setattr(
            ggml_lib, name, lambda *a, _real=real, _name=name: (seen.append(_name), _real(*a))
        )
    quantize(torch.randn(4, 512), "Q4_K", quantizer=quantizer)
    assert seen == (["quantize_blocks"] if calls else [])
    seen.clear()
    if quantizer != "torch":  # an importance matrix takes whole rows
        quantize(torch.randn(4, 512), "Q4_K", quantizer=quantizer, imatrix=torch.rand(512))
        assert seen == ["quantize_rows"]


@needs_ggml
@pytest.mark.parametrize("qtype", WRITABLE)
@pytest.mark.parametrize("matrix", MATRICES)
def test_ggml_quantizer_gives_ggml_bytes(vectors, matrix, qtype):
    ours = quantize(torch.from_numpy(vectors[f"{matrix}/input"]), qtype, quantizer="ggml").numpy()
    bad = blocks_differing(ours, vectors[f"{matrix}/{qtype}"], qtype)
    assert not bad.any(), f"{bad.sum()} of {bad.size} blocks differ"


@pytest.mark.parametrize("qtype", WRITABLE)
@pytest.mark.parametrize("matrix", MATRICES)
def test_torch_fallback_keeps_its_promise(vectors, matrix, qtype):
    x = torch.from_numpy(vectors[f"{matrix}/input"])
    ref = vectors[f"{matrix}/{qtype}"]
    ours = quantize(x, qtype, quantizer="torch").numpy()
    bad = blocks_differing(ours, ref, qtype)
    if qtype in ("Q8_0", "Q4_0"):
        assert not bad.any(), f"{bad.sum()} of {bad.size} blocks differ"
        return
    assert bad.mean() <= 0.01, f"{bad.sum()} of {bad.size} blocks differ"
    assert abs(rel_rmse(x, ours, qtype) - rel_rmse(x, ref, qtype)) <= 5e-5  # equal to 4 decimals


@needs_ggml
def test_default_quantizer_is_ggml_on_the_cpu(vectors):
    assert pick_quantizer("cpu") == "ggml" and pick_quantizer("cpu", "torch") == "torch"
    assert pick_quantizer("cuda") == "torch"
    x = torch.from_numpy(vectors["student_t3/input"])
    assert np.array_equal(quantize(x, "Q4_K").numpy(), vectors["student_t3/Q4_K"])
    assert formats.quantizer_version("ggml").startswith("ggml 0.")
    assert formats.quantizer_version("torch").startswith(f"torch {torch.__version__}")


def test_quantizer_choice_errors():
    with pytest.raises(UsageError, match="unknown quantizer"):
        pick_quantizer("cpu", "numpy")
    with pytest.raises(UsageError, match="run on the CPU"):
        pick_quantizer("cuda", "ggml")


def test_missing_library_falls_back_to_torch(monkeypatch, vectors):
    monkeypatch.setattr(ggml_lib, "_load", lambda: "no libggml-base library under /nowhere")
    assert not ggml_lib.available() and pick_quantizer("cpu") == "torch"
    x = torch.from_numpy(vectors["gauss/input"])
    assert np.array_equal(quantize(x, "Q8_0").numpy(), vectors["gauss/Q8_0"])  # the torch path ran
    with pytest.raises(UsageError, match="unavailable: no libggml-base library under /nowhere"):
        quantize(x, "Q4_K", quantizer="ggml")
    with pytest.raises(RuntimeError, match="/nowhere"):
        ggml_lib.load()


def test_library_not_found_says_where_it_looked(monkeypatch):
    ggml_lib._load.cache_clear()
    try:
        monkeypatch.setenv(ggml_lib.ENV_LIBRARY, "/nowhere/libggml-base.so")
        assert not ggml_lib.available()
        assert "/nowhere/libggml-base.so" in ggml_lib.unavailable_reason()
    finally:
        ggml_lib._load.cache_clear()  # later tests load the real library again


def test_import_loads_nothing():
    code = (
        "import zimage_lite.quant.formats, zimage_lite.convert.converter\n"
        "from zimage_lite.quant import ggml_lib\n"
        "assert ggml_lib._load.cache_info().currsize == 0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_ggml
@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K"])
def test_ggml_chunks_in_a_pool_give_the_bytes_of_one_call(monkeypatch, qtype):
    """The converter's threads share a tensor's chunks: the bytes are those of one sequential call."""
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(37, 1024, generator=gen) * 0.02).to(torch.bfloat16)
    whole = quantize(w, qtype, quantizer="ggml")
    monkeypatch.setattr(formats, "_GGML_CHUNK_ELEMENTS", 256 * 9)  # 17 chunks, a ragged last one
    with ThreadPoolExecutor(3) as pool:
        assert torch.equal(quantize(w, qtype, quantizer="ggml", pool=pool), whole)
        w[29, 700] = float("nan")
        with pytest.raises(NonFiniteError, match="NaN or infinity"):
            quantize(w, qtype, quantizer="ggml", pool=pool)
    assert torch.equal(quantize(w[:29], qtype, quantizer="ggml"), whole[:29])


@needs_ggml
def test_quantize_blocks_refuses_what_ggml_would_abort_on():
    out = torch.empty(2, 34, dtype=torch.uint8)
    with pytest.raises(ValueError):
        ggml_lib.quantize_blocks(torch.zeros(60), out, 8, 32)  # not whole blocks
    with pytest.raises(ValueError):
        ggml_lib.quantize_blocks(torch.zeros(64, dtype=torch.float64), out, 8, 32)
    with pytest.raises(ValueError):
        ggml_lib.quantize_blocks(torch.zeros(128)[::2], out, 8, 32)  # not contiguous
