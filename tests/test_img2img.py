"""Image-to-image and inpainting parity with diffusers' ZImageImg2ImgPipeline / ZImageInpaintPipeline on the
tiny synthetic model, same seed: several strengths, non-square sizes, a batch; and what diffusers lacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline
from PIL import Image

from zimage_lite.errors import UsageError
from zimage_lite.pipeline import Pipeline
from zimage_lite.synthetic import write_synthetic_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("model") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny):
    return Pipeline.load(tiny, device="cpu", dtype="float32")


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour blobs plus fine noise: structure the VAE encodes, not a flat field."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)).astype(float)
    return Image.fromarray(np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8))


def mask_picture(width: int, height: int) -> Image.Image:
    """White (re-generate) over a rectangle in the upper left, grey values on its edge."""
    m = np.zeros((height, width), np.uint8)
    m[: height // 2, : width // 2] = 255
    m[height // 2, : width // 2] = 140  # above the 0.5 threshold: re-generated
    return Image.fromarray(m)


def max_diff(ours, theirs) -> int:
    return max(
        int(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max()) for a, b in zip(ours, theirs)
    )


def diffusers_run(cls, tiny, prompt, seed, steps, width, height, batch=1, **inputs):
    ref = cls.from_pretrained(str(tiny), torch_dtype=torch.float32)
    gen = torch.Generator("cpu").manual_seed(seed)
    return ref(
        prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=0.0,
        num_images_per_prompt=batch, generator=gen, **inputs,
    ).images  # fmt: skip


@pytest.mark.parametrize(
    "strength,width,height,batch,steps",
    [(0.35, 64, 64, 1, 8), (0.6, 80, 48, 1, 8), (1.0, 48, 64, 1, 8), (0.5, 64, 48, 2, 4)],
)
def test_img2img_matches_diffusers_fp32(tiny, pipe, strength, width, height, batch, steps):
    init = picture(width, height)
    ours = pipe.generate("a red barn", seed=11, steps=steps, width=width, height=height, batch=batch,
                         image=init, strength=strength)  # fmt: skip
    theirs = diffusers_run(ZImageImg2ImgPipeline, tiny, "a red barn", 11, steps, width, height, batch,
                           image=init, strength=strength)  # fmt: skip
    assert ours[0].size == (width, height)
    assert max_diff(ours, theirs) <= 1


def test_strength_cuts_the_steps(pipe):
    """strength 0.35 of 8 steps runs the last 3 (diffusers: int(8 - 8 * 0.35) = 5 skipped)."""
    seen = []
    pipe.generate("x", seed=0, width=32, height=32, image=picture(32, 32), strength=0.35,
                  on_step=lambda i, n: seen.append((i, n)))  # fmt: skip
    assert seen == [(0, 3), (1, 3), (2, 3)]
    assert len(pipe.last_stats.steps) == 3 and pipe.last_stats.phases["vae_encode"] > 0


def test_init_image_of_another_size_is_resized(tiny, pipe):
    """diffusers fails when the init image is not the output size; we resize it (Lanczos) first, which
    is what diffusers gives for the resized image."""
    big = picture(96, 80, seed=5)
    ours = pipe.generate("a boat", seed=2, width=64, height=48, image=big, strength=0.5)
    resized = big.resize((64, 48), Image.LANCZOS)
    theirs = diffusers_run(ZImageImg2ImgPipeline, tiny, "a boat", 2, 8, 64, 48, image=resized, strength=0.5)
    assert ours[0].size == (64, 48)
    assert max_diff(ours, theirs) <= 1


@pytest.mark.parametrize("strength,width,height", [(1.0, 64, 64), (0.7, 80, 48)])
def test_inpaint_matches_diffusers_fp32(tiny, pipe, strength, width, height):
    init, mask = picture(width, height, seed=7), mask_picture(width, height)
    ours = pipe.generate(
        "a window", seed=9, width=width, height=height, image=init, mask=mask, strength=strength
    )
    theirs = diffusers_run(ZImageInpaintPipeline, tiny, "a window", 9, 8, width, height,
                           image=init, mask_image=mask, strength=strength)  # fmt: skip
    assert max_diff(ours, theirs) <= 1


def test_inpaint_keeps_the_unmasked_latents(pipe):
    """Outside the mask the final latents are the init image's, whatever the prompt (same seed: the VAE
    posterior is sampled from it); inside they differ. Pixels are not compared: the VAE's mid-block
    attention spreads every latent over the whole image."""
    from zimage_lite.init_image import mask_tensor

    init, mask = picture(64, 64, seed=8), mask_picture(64, 64)
    a = pipe.generate_latents("a cat", seed=1, width=64, height=64, image=init, mask=mask)
    b = pipe.generate_latents("a dog", seed=1, width=64, height=64, image=init, mask=mask)
    keep = mask_tensor(mask, 64, 64, 8)[0, 0] == 0  # (8, 8)
    assert torch.equal(a[..., keep], b[..., keep])
    assert (a[..., ~keep] - b[..., ~keep]).abs().mean() > 0.05


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"strength": 0.0}, "leaves none"),
        ({"strength": 1.5}, "between 0 and 1"),
        ({"mask_only": True}, "init image"),
    ],
)
def test_bad_img2img_requests(pipe, kwargs, message):
    init = picture(64, 64)
    if kwargs.pop("mask_only", False):
        kwargs = {"mask": mask_picture(64, 64)}
    else:
        kwargs["image"] = init
    with pytest.raises(UsageError, match=message):
        pipe.generate("x", width=64, height=64, **kwargs)
