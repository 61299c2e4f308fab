"""Classifier-free guidance: parity with diffusers' ZImagePipeline / ZImageImg2ImgPipeline /
ZImageInpaintPipeline on the tiny synthetic *base* model (its scheduler config, shift 6, is read by both),
float32, same seed, every pixel within 1/255; and the parts diffusers does not show (no negative pass at
guidance 0, the two passes run one after the other give the same result)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline, ZImagePipeline
from safetensors.torch import save_file
from test_img2img import mask_picture, max_diff, picture

from zimage_lite.errors import UsageError
from zimage_lite.guidance import Guidance, guided
from zimage_lite.pipeline import Pipeline
from zimage_lite.synthetic import write_synthetic_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("model") / "base", "tiny", seed=0, variant="base")


@pytest.fixture(scope="module")
def pipe(base):
    return Pipeline.load(base, device="cpu", dtype="float32")


def ours_and_theirs(pipe, base, cls=ZImagePipeline, *, prompt, seed, steps, width, height, guidance,
                    negative=None, norm=0.0, trunc=1.0, batch=1, **inputs):  # fmt: skip
    ours = pipe.generate(
        prompt, seed=seed, steps=steps, width=width, height=height, batch=batch, guidance=guidance,
        negative_prompt=negative, cfg_normalization=norm, cfg_truncation=trunc, **inputs,
    )  # fmt: skip
    ref = cls.from_pretrained(str(base), torch_dtype=torch.float32)
    if "mask" in inputs:
        inputs["mask_image"] = inputs.pop("mask")
    theirs = ref(
        prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
        negative_prompt=negative, cfg_normalization=norm, cfg_truncation=trunc, num_images_per_prompt=batch,
        generator=torch.Generator("cpu").manual_seed(seed), **inputs,
    ).images  # fmt: skip
    return ours, theirs


CASES = {
    "g4-negative-nonsquare": dict(prompt="a red barn", seed=3, steps=10, width=64, height=48, guidance=4.0,
                                  negative="blurry, low quality"),
    "g3-normalized": dict(prompt="a lighthouse at dusk", seed=5, steps=12, width=48, height=64, guidance=3.0,
                          negative="fog", norm=1.0),
    "g5-truncated-batch2": dict(prompt="a cat on a wall", seed=8, steps=10, width=64, height=64, guidance=5.0,
                                trunc=0.6, batch=2),
    "two-prompts-caption-lengths-differ": dict(
        prompt=["a dog", "a very long prompt about a small wooden boat on a calm lake at sunrise, mist"],
        seed=1, steps=10, width=48, height=48, guidance=4.0, negative=["ugly, distorted, extra limbs", ""],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_text_to_image_with_guidance_matches_diffusers(pipe, base, case):
    ours, theirs = ours_and_theirs(pipe, base, **CASES[case])
    assert max_diff(ours, theirs) <= 1


def test_normalization_and_truncation_change_the_image(pipe):
    """So the parity cases above are not blind to them."""
    kw = dict(seed=5, steps=10, width=48, height=48, guidance=5.0, negative_prompt="fog")
    plain = np.asarray(pipe.generate("a lighthouse", **kw)[0]).astype(int)
    for extra in ({"cfg_normalization": 1.0}, {"cfg_truncation": 0.5}):
        other = np.asarray(pipe.generate("a lighthouse", **kw, **extra)[0]).astype(int)
        assert np.abs(other - plain).mean() > 1


def test_img2img_with_guidance_matches_diffusers(pipe, base):
    ours, theirs = ours_and_theirs(
        pipe, base, ZImageImg2ImgPipeline, prompt="a red barn", seed=11, steps=10, width=64, height=48,
        guidance=4.0, negative="blurry", trunc=0.8, image=picture(64, 48), strength=0.6,
    )  # fmt: skip
    assert max_diff(ours, theirs) <= 1


def test_inpaint_with_guidance_matches_diffusers(pipe, base):
    ours, theirs = ours_and_theirs(
        pipe, base, ZImageInpaintPipeline, prompt="a window", seed=9, steps=10, width=48, height=64,
        guidance=3.5, negative="bricks", norm=1.0, image=picture(48, 64, 2), mask=mask_picture(48, 64),
        strength=0.9,
    )  # fmt: skip
    assert max_diff(ours, theirs) <= 1


@pytest.mark.slow
def test_base_defaults_are_the_model_cards(pipe, base):
    """No settings given: the base model's 50 steps, guidance 4, empty negative prompt, as diffusers runs
    the model card's example (its scheduler config, shift 6, read from the folder by both)."""
    assert (pipe.variant.name, pipe.variant.scheduler.shift) == ("base", 6.0)
    ours = pipe.generate("a tree", seed=2, width=32, height=32)
    ref = ZImagePipeline.from_pretrained(str(base), torch_dtype=torch.float32)
    theirs = ref("a tree", height=32, width=32, num_inference_steps=50, guidance_scale=4.0,
                 generator=torch.Generator("cpu").manual_seed(2)).images  # fmt: skip
    assert len(pipe.last_stats.steps) == 50
    assert max_diff(ours, theirs) <= 1


class Recorder:
    """Wraps the real transformer and records the batch of each call (observes, replaces nothing)."""

    def __init__(self, transformer):
        self.transformer, self.batches = transformer, []

    def __call__(self, x, t, captions, **kwargs):
        self.batches.append(x.shape[0])
        return self.transformer(x, t, captions, **kwargs)


def test_no_negative_pass_without_guidance_or_past_truncation(pipe):
    captions = pipe.encode_prompts(["a cat"])
    negative = pipe.encode_prompts([""])
    x = torch.randn(1, 16, 4, 4)
    rec = Recorder(pipe.transformer)
    guided(rec, captions, negative, Guidance(0.0))(x, torch.tensor([0.2]))
    guided(rec, captions, negative, Guidance(4.0, truncation=0.5))(x, torch.tensor([0.7]))
    guided(rec, captions, negative, Guidance(4.0, truncation=0.5))(x, torch.tensor([0.3]))
    assert rec.batches == [1, 1, 2]


def test_passes_one_after_the_other_equal_one_batch(pipe):
    """chunks=2 (each block runs the positive half, then the negative one) gives the batched result, also
    when the captions differ in length (masked batch)."""
    captions = pipe.encode_prompts(["a cat", "a long prompt about two cats sleeping on a red sofa"])
    negative = pipe.encode_prompts(["", "blurry"])
    x = torch.randn(2, 16, 6, 4)
    t = torch.tensor([0.3, 0.3])
    cfg = Guidance(4.0, normalization=1.2)
    batched = guided(pipe.transformer, captions, negative, cfg, passes=1)(x, t)
    one_by_one = guided(pipe.transformer, captions, negative, cfg, passes=2)(x, t)
    torch.testing.assert_close(one_by_one, batched, rtol=1e-5, atol=1e-5)


def test_lora_applies_to_both_passes(base, tmp_path):
    """A LoRA with guidance: diffusers (peft) and ours, same image."""
    pytest.importorskip("peft")
    ref = ZImagePipeline.from_pretrained(str(base), torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, m in ref.transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(("attention.to_q", "feed_forward.w2")):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=gen) * 0.3
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=gen) * 0.3
    path = tmp_path / "style.safetensors"
    save_file(tensors, str(path))
    ref.load_lora_weights(str(path), adapter_name="a")
    kw = dict(height=48, width=48, num_inference_steps=10, guidance_scale=4.0, negative_prompt="dark")
    theirs = ref("a cabin", generator=torch.Generator("cpu").manual_seed(4), **kw).images
    pipe = Pipeline.load(base, device="cpu", dtype="float32")
    pipe.load_lora(path)
    ours = pipe.generate(
        "a cabin", seed=4, steps=10, width=48, height=48, guidance=4.0, negative_prompt="dark"
    )
    assert max_diff(ours, theirs) <= 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"guidance": -1.0}, "must be a finite number >= 0"),
        ({"cfg_truncation": float("nan")}, "must be a finite number >= 0"),
        ({"guidance": 4.0, "negative_prompt": ["a", "b"]}, "2 negative prompts for 1 prompts"),
    ],
)
def test_bad_guidance_requests(pipe, kwargs, message):
    with pytest.raises(UsageError, match=message):
        pipe.generate_latents("a cat", steps=1, width=32, height=32, **kwargs)
