"""A step that still overflows float16 is redone with float32 compute: the image is written, the step is
logged once and listed in the stats, the weights stay quantized, and the planner reserved the memory."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from zimage_lite.pipeline import Pipeline
from zimage_lite.runtime.quant_linear import QuantLinear

PROMPT, SEED, STEPS, W, H = "a fox in the snow", 3, 4, 64, 48
INJECTED_GAIN = 3e4  # v rows of one block: v reaches ~1e5, past float16, where the design assumes a bound


def psnr(a, b) -> float:
    x, y = np.asarray(a).astype(np.float64), np.asarray(b).astype(np.float64)
    return 10 * np.log10(255.0**2 / max(((x - y) ** 2).mean(), 1e-12))


@pytest.fixture(scope="module")
def injected(tmp_path_factory):
    """The tiny model with two value rows of layers.0 scaled by 3e4: the fused qkv output (a matmul right
    after a norm, which models/numerics.py leaves in float16) overflows there; the diffusers folder and
    a q8_0 conversion of it."""
    from zimage_lite.convert.converter import convert
    from zimage_lite.synthetic import write_synthetic_model

    root = tmp_path_factory.mktemp("injected")
    folder = write_synthetic_model(root / "folder", "tiny", seed=0)
    (shard,) = (folder / "transformer").glob("*.safetensors")
    tensors = load_file(shard)
    tensors["layers.0.attention.to_v.weight"][:2] *= INJECTED_GAIN
    save_file(tensors, str(shard))
    return {"folder": folder, "q8_0": convert(folder, root / "q8_0", "q8_0", progress=False).out}


@pytest.mark.parametrize("source", ["folder", "q8_0"])
def test_an_overflowing_step_is_redone_in_float32(injected, source, caplog):
    reference = Pipeline.load(injected[source], device="cpu", dtype="float32")
    expected = reference.generate(PROMPT, seed=SEED, steps=STEPS, width=W, height=H)[0]
    pipe = Pipeline.load(injected[source], device="cpu", dtype="float16", vram="2.3MB")  # streamed
    quantized = {n: m.weight.dtype for n, m in pipe.transformer.named_modules() if isinstance(m, QuantLinear)}
    with caplog.at_level(logging.WARNING, logger="zimage_lite.runtime.fp32_fallback"):
        image = pipe.generate(PROMPT, seed=SEED, steps=STEPS, width=W, height=H)[0]
    steps = pipe.last_stats.fp32_fallback_steps
    assert steps and set(steps) <= set(range(1, STEPS + 1))
    assert len([r for r in caplog.records if "redone with float32" in r.message]) == 1  # logged once
    assert psnr(image, expected) >= 35.0
    assert np.asarray(image).std() > 5
    # the weights stayed as they were: quantized bytes, float16 compute for the next step
    after = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, QuantLinear)}
    assert {n: m.weight.dtype for n, m in after.items()} == quantized
    assert all(m.compute_dtype == torch.float16 for m in after.values())
    assert pipe.transformer.x_pad_token.dtype == torch.float16
    assert (source == "q8_0") == bool(quantized)
    assert pipe.last_stats.streaming["plans"]["transformer"]["streamed_blocks"]  # it really streamed


def test_the_planner_reserves_the_float32_step_and_the_ledger_shows_it(injected):
    """float16 plans the retry's extra memory (float32 activations, float32 dequantization, one dense
    weight upcast) in the transformer phase; the CPU device ledger holds it while the phase runs.
    bf16 and fp32 reserve nothing (no retry there)."""
    plans = {}
    for dtype in ("float16", "bfloat16", "float32"):
        pipe = Pipeline.load(injected["q8_0"], device="cpu", dtype=dtype)
        pipe.generate(PROMPT, seed=SEED, steps=1, width=W, height=H)
        plans[dtype] = pipe.last_stats.streaming["plans"]["transformer"]["accounted_bytes"]
        memory = pipe.last_stats.device_memory["transformer"]
        working = sum(plans[dtype][k] for k in ("activations", "dequant_scratch", "fp32_fallback"))
        assert memory["peak"] >= memory["before"] + working
    fp16 = plans["float16"]
    assert fp16["fp32_fallback"] > 0
    assert plans["bfloat16"]["fp32_fallback"] == plans["float32"]["fp32_fallback"] == 0
    # with the reserve, the float16 step has at least a float32 step's working memory
    assert sum(fp16[k] for k in ("activations", "dequant_scratch", "fp32_fallback")) >= sum(
        plans["float32"][k] for k in ("activations", "dequant_scratch")
    )


def test_cli_writes_the_image_and_the_fallback_steps(injected, tmp_path):
    from zimage_lite.cli import main

    out, stats = tmp_path / "out.png", tmp_path / "stats.json"
    code = main(["generate", PROMPT, "--model", str(injected["q8_0"]), "--device", "cpu", "--dtype", "float16",
                 "--steps", str(STEPS), "--width", str(W), "--height", str(H), "-o", str(out), "--stats",
                 str(stats), "-q"])  # fmt: skip
    assert code == 0 and out.is_file()
    steps = json.loads(stats.read_text())["fp32_fallback_steps"]
    assert steps and all(1 <= s <= STEPS for s in steps)
