"""The sampler against diffusers' FlowMatchEulerDiscreteScheduler (built from the published
scheduler.json) driven step by step as ZImagePipeline / ZImageImg2ImgPipeline / ZImageInpaintPipeline
drive it, with a stand-in denoiser: the sampling arithmetic alone, float32, compared exactly."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas
from diffusers.pipelines.z_image.pipeline_z_image_img2img import ZImageImg2ImgPipeline

from zimage_lite.config import SchedulerConfig
from zimage_lite.errors import UsageError
from zimage_lite.sampling import (
    euler_sample,
    initial_noise,
    keep_unmasked,
    model_time,
    noised,
    strength_start,
    turbo_sigmas,
)

SCHEDULER = Path(__file__).parent / "data" / "reference-configs" / "scheduler.json"


def scheduler(steps: int, **changes) -> FlowMatchEulerDiscreteScheduler:
    sched = FlowMatchEulerDiscreteScheduler.from_config({**json.loads(SCHEDULER.read_text()), **changes})
    sched.set_timesteps(sigmas=get_default_z_image_sigmas(steps), device="cpu")
    return sched


def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in model output that depends on both inputs (t is the pipeline's (1000 - timestep) / 1000)."""
    return torch.sin(3 * x) * (1.5 - t.view(-1, 1, 1, 1)) + 0.1 * t.view(-1, 1, 1, 1)


def diffusers_loop(sched, latents, start=0, blend=None, seen=None):
    """ZImagePipeline's loop: t = (1000 - timestep) / 1000, noise_pred = -model output, scheduler.step."""
    sched.set_begin_index(start)
    timesteps = sched.timesteps[start:]
    for i, ts in enumerate(timesteps):
        t = (1000 - ts.expand(latents.shape[0])) / 1000
        latents = sched.step(-denoiser(latents, t).float(), ts, latents, return_dict=False)[0]
        if blend is not None:
            latents = blend(latents, timesteps[i + 1] if i + 1 < len(timesteps) else None)
        if seen is not None:
            seen.append(latents)
    return latents


@pytest.mark.parametrize("steps", [1, 2, 8, 9])
def test_euler_loop_equals_the_scheduler_steps(steps):
    """Every step's latents (what on_step receives, e.g. for previews) and the result."""
    x0 = initial_noise(2, 16, 48, 64, seed=3)
    ours, theirs = [], []
    out = euler_sample(denoiser, x0, steps, on_step=lambda i, x: ours.append((i, x.clone())))
    assert torch.equal(out, diffusers_loop(scheduler(steps), x0.clone(), seen=theirs))
    assert [i for i, _ in ours] == list(range(steps))
    assert all(torch.equal(x, y) for (_, x), y in zip(ours, theirs))


def test_euler_loop_follows_the_scheduler_config():
    """Another shift (Z-Image base publishes 6.0) changes every sigma: the loop must use the config it is
    given, not the Turbo default."""
    x0 = initial_noise(1, 16, 32, 32, seed=4)
    ours = euler_sample(denoiser, x0, 8, SchedulerConfig(shift=6.0))
    assert torch.equal(ours, diffusers_loop(scheduler(8, shift=6.0), x0.clone()))
    assert not torch.equal(ours, euler_sample(denoiser, x0, 8))


def test_model_time_is_the_pipelines_timestep_input():
    sched = scheduler(8)
    ours = model_time(turbo_sigmas(8))
    assert torch.equal(ours[:-1], (1000 - sched.timesteps) / 1000)
    assert ours[0] == 0.0 and ours[-1] == 1.0  # 0 = pure noise, 1 = clean


@pytest.mark.parametrize("steps", [1, 4, 8, 9])
@pytest.mark.parametrize("strength", [0.0, 0.1, 0.35, 0.5, 0.6, 0.99, 1.0])
def test_strength_start_is_img2img_get_timesteps(steps, strength):
    stub = SimpleNamespace(scheduler=scheduler(steps))
    timesteps, n = ZImageImg2ImgPipeline.get_timesteps(stub, steps, strength, "cpu")
    if n == 0:
        with pytest.raises(UsageError, match="leaves none"):
            strength_start(steps, strength)
        return
    start = strength_start(steps, strength)
    assert steps - start == n and torch.equal(timesteps, stub.scheduler.timesteps[start:])


@pytest.mark.parametrize("strength", [-0.01, 1.01])
def test_strength_outside_0_1_is_refused(strength):
    with pytest.raises(UsageError, match="between 0 and 1"):
        strength_start(8, strength)


def test_img2img_from_an_image_equals_the_scheduler():
    """Entered at `start` from scale_noise(image, first timestep, noise), as ZImageImg2ImgPipeline does."""
    steps, start = 8, strength_start(8, 0.35)
    image = torch.randn(1, 16, 6, 8)
    noise = initial_noise(1, 16, 48, 64, seed=5)
    sched = scheduler(steps)
    theirs_x0 = sched.scale_noise(image, sched.timesteps[start : start + 1], noise)
    ours_x0 = noised(image, noise, turbo_sigmas(steps)[start])
    assert torch.equal(ours_x0, theirs_x0)
    ours = euler_sample(denoiser, ours_x0, steps, start=start)
    assert torch.equal(ours, diffusers_loop(sched, theirs_x0.clone(), start=start))


def test_inpainting_blend_equals_the_inpaint_pipeline():
    """After each step the kept region is the image noised to the next timestep (clean after the last)."""
    steps = 4
    image, noise = torch.randn(1, 16, 6, 8), initial_noise(1, 16, 48, 64, seed=6)
    mask = (torch.rand(1, 1, 6, 8) > 0.5).float()
    sched = scheduler(steps)

    def theirs_blend(latents, next_timestep):
        kept = image if next_timestep is None else sched.scale_noise(image, next_timestep.reshape(1), noise)
        return (1 - mask) * kept + mask * latents

    ours = euler_sample(denoiser, noise, steps, blend=keep_unmasked(image, noise, mask))
    assert torch.equal(ours, diffusers_loop(sched, noise.clone(), blend=theirs_blend))
    assert torch.equal(ours * (1 - mask), image * (1 - mask))  # the kept region ends clean


def test_initial_noise_is_one_draw_from_the_seed():
    """diffusers draws one (B, C, H/8, W/8) float32 tensor from a CPU generator seeded once."""
    gen = torch.Generator("cpu").manual_seed(11)
    assert torch.equal(initial_noise(3, 16, 64, 48, seed=11), torch.randn((3, 16, 8, 6), generator=gen))


def test_zero_steps_are_refused():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        turbo_sigmas(0)
