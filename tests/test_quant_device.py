"""The torch quantizers and dequantizers run wholly on the weight's device, and their refusals say what
was wrong.

On a GPU a constant made without `device=` (a shift table, a bit index, a scratch buffer) is a CPU tensor,
and the first op that mixes it with the weight fails; the meta device fails the same way on a CPU
(tests/meta_device.py).

Mutation testing (tools/mutate.py, slice "quant") found 46 `device=` arguments whose loss no test saw."""

from __future__ import annotations

import pytest
import torch

from tests.meta_device import META, MetaScalars
from zimage_lite.errors import NonFiniteError, UsageError
from zimage_lite.quant.formats import (
    FLOAT_TYPES,
    QUANT_TYPES,
    dequantize,
    quantizable_types,
    quantize,
    row_bytes,
)
from zimage_lite.quant.fp8 import FP8_DTYPE, dequantize_fp8, quantize_fp8

SHAPE = (4, 512)  # two K-quant super-blocks, sixteen legacy blocks per row
LARGE = (1024, 8192)  # twice the largest chunk: the loops into preallocated outputs run (no data)


@pytest.mark.parametrize("qtype", [*QUANT_TYPES, *FLOAT_TYPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [SHAPE, LARGE])
def test_dequantize_stays_on_the_device_of_its_bytes(qtype, dtype, shape):
    raw = torch.empty(row_bytes(qtype, shape[1]) * shape[0], dtype=torch.uint8, device=META)
    out = dequantize(raw, qtype, shape, dtype=dtype)
    assert (out.device, out.dtype, tuple(out.shape)) == (META, dtype, shape)


@pytest.mark.parametrize(
    "qtype", [name for name in quantizable_types() if QUANT_TYPES[name].quantize is not None]
)
@pytest.mark.parametrize("shape", [SHAPE, LARGE])
def test_torch_quantizers_stay_on_the_weights_device(qtype, shape):
    with MetaScalars():
        raw = quantize(torch.empty(shape, device=META), qtype, quantizer="torch")
    want = (META, torch.uint8, (shape[0], row_bytes(qtype, shape[1])))
    assert (raw.device, raw.dtype, tuple(raw.shape)) == want


@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_stays_on_the_weights_device(per_channel):
    with MetaScalars():
        q, scale = quantize_fp8(torch.empty(SHAPE, device=META), per_channel=per_channel)
    assert (q.device, q.dtype, tuple(q.shape)) == (META, FP8_DTYPE, SHAPE)
    assert scale.device == META and tuple(scale.shape) == ((SHAPE[0], 1) if per_channel else ())
    cpu_scale = torch.ones(scale.shape)  # read from a file: on the CPU, the weight on the device
    for s in (scale, scale.reshape(-1), cpu_scale):  # (out, 1) as we write it, (out,) as some files hold it
        out = dequantize_fp8(q, s, torch.bfloat16)
        assert (out.device, out.dtype, tuple(out.shape)) == (META, torch.bfloat16, SHAPE)


def test_row_bytes_is_an_int():
    """It sizes files and offsets: 512 Q4_K elements are 2 blocks of 144 bytes, an int, not 288.0."""
    assert [type(row_bytes(q, 512)) for q in ("Q4_K", "Q8_0", "BF16")] == [int, int, int]
    assert (row_bytes("Q4_K", 512), row_bytes("Q8_0", 512), row_bytes("BF16", 512)) == (288, 544, 1024)


def test_fp8_of_a_scalar_and_of_an_empty_weight():
    """A 0-dim weight goes through the scalar branch; an empty one has no extremes and gets scale 1."""
    q, scale = quantize_fp8(torch.tensor(-3.0))
    assert q.shape == () and float(q.float() * scale) == -3.0  # -3 / (3/448) = -448, exact in e4m3fn
    q, scale = quantize_fp8(torch.empty(0, 4))  # per tensor: no extremes to take
    assert q.shape == (0, 4) and float(scale) == 1.0


def test_refusals_say_what_was_wrong():
    with pytest.raises(UsageError) as err:
        dequantize(torch.zeros(34, dtype=torch.int8), "Q8_0", (32,))
    assert str(err.value) == "dequantize expects uint8 bytes, got torch.int8"
    for qtype, n_bytes in (("Q8_0", 33), ("F16", 62)):
        with pytest.raises(UsageError) as err:
            dequantize(torch.zeros(n_bytes, dtype=torch.uint8), qtype, (32,))
        assert str(err.value) == f"{n_bytes} bytes of {qtype} do not hold shape (32,)"
    with pytest.raises(UsageError) as err:
        quantize_fp8(torch.ones(8), per_channel=True)
    assert str(err.value) == "per-channel FP8 needs a weight of at least 2 dims, got shape (8,)"
    with pytest.raises(NonFiniteError) as err:
        quantize_fp8(torch.tensor([[1.0, float("nan")]]))
    assert str(err.value) == "cannot quantize a weight holding NaN or infinity to FP8"
    with pytest.raises(UsageError) as err:
        dequantize_fp8(torch.zeros(4, 8, dtype=FP8_DTYPE), torch.ones(3, 1))
    assert str(err.value) == "FP8 scale of shape (3, 1) does not fit a weight of shape (4, 8)"


def test_quantize_refusals_say_what_was_wrong():
    w = torch.randn(4, 512)
    choices = ", ".join(quantizable_types())
    assert {"Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"} <= set(quantizable_types())
    cases = [
        (lambda: quantize(w, "Q4_1"), f"Q4_1 is a read-only format here (choose one of {choices})"),
        (lambda: quantize(torch.ones(4, 33), "Q8_0"), "cannot store shape (4, 33) as Q8_0: rows must be multiples of 32"),
        (lambda: quantize(torch.tensor(1.0), "Q8_0"), "cannot store shape () as Q8_0: rows must be multiples of 32"),
        (
            lambda: quantize(w, "Q4_K", quantizer="torch", imatrix=torch.ones(512)),
            "only ggml's quantizers (on the CPU, libggml-python installed) take an importance matrix",
        ),
        (
            lambda: quantize(w, "Q3_K", quantizer="torch"),
            "only ggml's quantizers (on the CPU, libggml-python installed) take Q3_K",
        ),
        (lambda: quantize(w, "Q4_K", imatrix=torch.ones(256)), "an imatrix of (256,) values for rows of 512"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(UsageError) as err:
            call()
        assert str(err.value) == message


@pytest.mark.parametrize("quantizer", ["ggml", "torch"])
def test_a_weight_with_no_rows_quantizes_to_no_bytes(quantizer):
    raw = quantize(torch.empty(0, 256), "Q4_K", quantizer=quantizer)
    assert tuple(raw.shape) == (0, row_bytes("Q4_K", 256))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_a_tensor_past_the_chunk_size_dequantizes_as_its_halves(qtype):
    """dequantize writes chunks of 4M values into one output: a tensor of 1.5 chunks equals its two halves
    dequantized apart (each under one chunk), so no chunk is skipped or misplaced."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3 << 11, 1024, generator=gen)  # 6M values
    raw = quantize(w, qtype)
    half = w.shape[0] // 2
    whole = dequantize(raw, qtype, tuple(w.shape))
    parts = [dequantize(r, qtype, (half, 1024)) for r in (raw[:half], raw[half:])]
    assert torch.equal(whole, torch.cat(parts))
