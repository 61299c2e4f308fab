"""Round trip through `convert` on the small synthetic model: images from each precision vs float32.

The `small` model has rows of 256-multiples, so the K-quants really apply (the tiny one falls back to
Q8_0/Q4_0). Thresholds are PSNR in dB against the float32 image of the same seed, set a few dB below
what was measured on this model (random weights amplify quantization noise more than a trained model,
so real-model figures come from the bench, not from here).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zimage_lite.convert.converter import convert
from zimage_lite.pipeline import Pipeline
from zimage_lite.runtime.quant_linear import QuantLinear
from zimage_lite.synthetic import write_synthetic_model

# preset: (minimum PSNR dB, qtypes that must appear among the transformer's QuantLinears)
EXPECT = {
    "bf16": (45.0, set()),
    "q8_0": (44.0, {"Q8_0"}),
    "q6_k": (41.0, {"Q6_K"}),
    "q5_k": (35.0, {"Q5_K"}),
    "q4_k": (27.0, {"Q4_K"}),
    "q4_0": (26.0, {"Q4_0"}),
    "fp8": (38.0, {"FP8_E4M3"}),
    "q4_k_m": (28.0, {"Q4_K", "Q5_K"}),
}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("small") / "model", "small", seed=0)


@pytest.fixture(scope="module")
def reference(small):
    pipe = Pipeline.load(small, device="cpu", dtype="float32")
    return np.asarray(pipe.generate("a lighthouse at dusk", seed=3, width=64, height=64)[0]).astype(float)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("preset", list(EXPECT))
def test_converted_model_generates_close_to_reference(small, reference, tmp_path, preset):
    out = tmp_path / preset
    convert(small, out, preset, progress=False)
    pipe = Pipeline.load(out, device="cpu", dtype="float32")
    qtypes = {m.qtype for m in pipe.transformer.modules() if isinstance(m, QuantLinear)}
    min_psnr, must_have = EXPECT[preset]
    assert must_have <= qtypes, qtypes
    if preset == "bf16":
        assert not qtypes
    image = np.asarray(pipe.generate("a lighthouse at dusk", seed=3, width=64, height=64)[0]).astype(float)
    assert psnr(image, reference) >= min_psnr


def test_quantized_model_matches_its_dequantized_twin(small, tmp_path):
    """QuantLinear forward == nn.Linear on the dequantized weights: the runtime adds no error of its own."""
    out = tmp_path / "q4"
    convert(small, out, "q4_k", progress=False)
    pipe = Pipeline.load(out, device="cpu", dtype="float32")
    layer = pipe.transformer.layers[0].feed_forward.w1
    assert isinstance(layer, QuantLinear)
    x = torch.randn(5, layer.in_features)
    dense = torch.nn.functional.linear(x, layer.dequantized_weight(torch.float32), layer.bias)
    assert torch.equal(layer(x), dense)


def test_float16_compute_is_protected_and_finite(small, reference, tmp_path):
    """fp16 (sm 7.x cards): outputs feeding the sandwich norms come back in float32; the image stays
    close to float32 (threshold as q8_0's, the weights' own error dominating)."""
    out = tmp_path / "q8"
    convert(small, out, "q8_0", progress=False)
    pipe = Pipeline.load(out, device="cpu", dtype="float16")
    w2 = pipe.transformer.layers[0].feed_forward.w2
    assert isinstance(w2, QuantLinear) and w2.out_dtype == torch.float32 and w2.input_scale == 1 / 128
    image = np.asarray(pipe.generate("a lighthouse at dusk", seed=3, width=64, height=64)[0]).astype(float)
    assert psnr(image, reference) >= 40.0
