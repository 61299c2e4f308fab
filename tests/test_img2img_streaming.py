"""Image-to-image, inpainting and LoRAs under a VRAM budget on the CPU: bit-identical to the unlimited plan,
with the VAE encoder and the LoRA tensors in the plans, on Q4_K (GGUF) weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from zimage_lite.errors import UsageError
from zimage_lite.pipeline import Pipeline
from zimage_lite.runtime.quant_linear import QuantLinear
from zimage_lite.weights.lora import linear_shapes

MB = 1 << 20
BUDGET = 14 * MB  # streams the small transformer's blocks (test_pipeline_streaming)


@pytest.fixture(scope="module")
def lora_file(quantized, tmp_path_factory):
    """Rank-4 LoRA on every block linear, original (ComfyUI) names."""
    shapes = linear_shapes(Pipeline.load(quantized, device="cpu").transformer)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (n_out, n_in) in shapes.items():
        if name.startswith("layers."):
            tensors[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, n_in, generator=gen) * 0.1
            tensors[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(n_out, 4, generator=gen) * 0.1
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file(tensors, str(path))
    return path


def picture(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def mask_picture(width, height):
    m = np.zeros((height, width), np.uint8)
    m[:, : width // 2] = 255
    return Image.fromarray(m)


def run(pipe, **kwargs):
    return pipe.generate_latents("a harbour at night", seed=4, width=64, height=48, **kwargs)


@pytest.mark.parametrize("inpaint", [False, True])
def test_streamed_img2img_with_lora_is_bit_identical(quantized, lora_file, inpaint):
    inputs = {"image": picture(64, 48), "strength": 0.5}
    if inpaint:
        inputs["mask"] = mask_picture(64, 48)
    results = []
    for vram in (None, BUDGET):
        pipe = Pipeline.load(quantized, device="cpu", vram=vram)
        assert any(isinstance(m, QuantLinear) for m in pipe.transformer.modules())
        without = run(pipe, **inputs)
        pipe.load_lora(lora_file, 0.8)
        results.append((without, run(pipe, **inputs), pipe.last_stats))
    (a0, a1, _), (b0, b1, stats) = results
    assert torch.equal(a0, b0) and torch.equal(a1, b1)
    assert (a1 - a0).abs().mean() > 1e-3  # the LoRA acts on the quantized model
    plans = stats.streaming["plans"]
    assert plans["transformer"]["streamed_blocks"] and plans["vae_encoder"]["total_bytes"] <= BUDGET
    assert all(m["peak"] <= BUDGET for m in stats.device_memory.values())
    assert stats.device_memory["vae_encoder"]["after"] == 0  # the encoder is given back


def test_lora_tensors_are_planned(quantized, lora_file):
    """The planner's block sizes (what the streamer packs and the budget is checked against) grow by
    the LoRA's bytes, and a run after loading plans with them."""
    from zimage_lite.runtime.planner import block_bytes, dit_blocks

    pipe = Pipeline.load(quantized, device="cpu", vram=BUDGET)
    run(pipe)
    before = sum(block_bytes(b) for b in dit_blocks(pipe.transformer))
    pipe.load_lora(lora_file)
    after = sum(block_bytes(b) for b in dit_blocks(pipe.transformer))
    shapes = [s for name, s in linear_shapes(pipe.transformer).items() if name.startswith("layers.")]
    assert after - before >= sum(4 * (n_in + n_out) * 4 for n_out, n_in in shapes)  # rank 4, float32
    run(pipe)
    assert (
        pipe.last_stats.streaming["plans"]["transformer"]["slot_bytes"]
        >= max(block_bytes(b) for b in dit_blocks(pipe.transformer) if b in pipe.transformer.layers)
        or not pipe.last_stats.streaming["plans"]["transformer"]["streamed_blocks"]
    )


def test_encode_that_cannot_fit_is_refused_before_any_work(quantized):
    """24 MB plans text-to-image at 256x256 (the decode tiled) but not the untiled VAE encode."""
    pipe = Pipeline.load(quantized, device="cpu", vram=24 * MB)
    pipe.generate_latents("x", width=256, height=256, steps=1)
    with pytest.raises(UsageError, match="VAE encode at 256x256"):
        pipe.generate_latents("x", width=256, height=256, image=picture(64, 64), strength=0.5)
    assert pipe.last_stats.steps == [] and "text_encoder" not in pipe.last_stats.phases
