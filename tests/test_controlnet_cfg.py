"""ControlNet with classifier-free guidance: both passes get the hints, as diffusers'
ZImageControlNetPipeline repeats the control image for its negative half (tiny *base* model, its
shift-6 scheduler read by both, float32, same seed)."""

from __future__ import annotations

import pytest
import torch
from controlnet_fixtures import build, write_diffusers
from diffusers import ZImageControlNetPipeline, ZImagePipeline
from test_img2img import max_diff, picture

from zimage_lite.control import ControlInput, control_latents, controlled
from zimage_lite.guidance import Guidance, guided
from zimage_lite.pipeline import Pipeline
from zimage_lite.synthetic import write_synthetic_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    base = write_synthetic_model(root / "base", "tiny", seed=0, variant="base")
    net = build("control_noise_refiner", 33, [0, 1], [0], n_refiner=1, seed=4, zero_refiner_out=True)
    return base, write_diffusers(root / "cn", net), net


@pytest.mark.slow
def test_guided_control_matches_diffusers_fp32(setup):
    base, path, net = setup
    W, H, control = 64, 48, picture(64, 48, 3)
    pipe = Pipeline.load(base, device="cpu", dtype="float32", controlnet=path)
    kw = dict(
        seed=9, steps=4, width=W, height=H, batch=2, guidance=4.0, cfg_normalization=0.0, cfg_truncation=1.0
    )
    ours = pipe.generate("a red barn", control_image=control, control_scale=0.8, **kw)
    ref = ZImageControlNetPipeline(
        **ZImagePipeline.from_pretrained(str(base), torch_dtype=torch.float32).components, controlnet=net
    )
    theirs = ref(
        "a red barn", height=H, width=W, num_inference_steps=4, guidance_scale=4.0, num_images_per_prompt=2,
        generator=torch.Generator("cpu").manual_seed(9), control_image=control,
        controlnet_conditioning_scale=0.8,
    ).images  # fmt: skip
    assert max_diff(ours, theirs) <= 1
    unguided = pipe.generate(
        "a red barn", control_image=control, control_scale=0.8, **{**kw, "guidance": 0.0}
    )
    assert max_diff(ours, unguided) > 10


def test_guided_control_in_two_passes_equals_one_batch(setup):
    """passes=2 (each block, control blocks included, runs the positive half, then the negative one: the
    DiT's chunks) gives the batched result with control, also for captions of different lengths."""
    base, path, _ = setup
    pipe = Pipeline.load(base, device="cpu", dtype="float32", controlnet=path)
    captions = pipe.encode_prompts(["a cat", "a long prompt about two cats sleeping on a red sofa"])
    negative = pipe.encode_prompts(["", "blurry"])
    lat = control_latents(lambda px: pipe.vae.encoder(px), pipe.vae.config, 33, picture(32, 48), 32, 48)
    transformer = controlled(pipe.transformer, ControlInput(pipe.controlnet, lat, 0.9))
    x = torch.randn(2, 16, 6, 4)
    t = torch.tensor([0.3, 0.3])
    cfg = Guidance(4.0)
    with torch.no_grad():
        batched = guided(transformer, captions, negative, cfg, passes=1)(x, t)
        one_by_one = guided(transformer, captions, negative, cfg, passes=2)(x, t)
        plain = guided(pipe.transformer, captions, negative, cfg, passes=1)(x, t)
    torch.testing.assert_close(one_by_one, batched, rtol=1e-5, atol=1e-5)
    assert (batched - plain).abs().max() > 1e-2  # the control acted
