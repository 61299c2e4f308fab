"""Z-Image-Turbo sampling: FlowMatch-Euler with a static shift, as plain functions.

Matches diffusers' FlowMatchEulerDiscreteScheduler as ZImagePipeline drives it: sigmas are
linspace(1, 1/N, N) in float32, shifted by s*x / (1 + (s-1)*x) in float32, with a final 0; the
transformer gets t = (1000 - 1000*sigma) / 1000 (1 = clean); velocity = -model output; latents stay float32.

Image-to-image and inpainting as ZImageImg2ImgPipeline / ZImageInpaintPipeline: the same N-step schedule,
entered at index `strength_start(N, strength)`, from `sigma * noise + (1 - sigma) * image_latents`
(the scheduler's `scale_noise`); inpainting puts the kept region back after every step, noised to the
next sigma (clean after the last).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from zimage_lite.config import SchedulerConfig
from zimage_lite.errors import UsageError

TURBO = SchedulerConfig()  # frozen, so a safe shared default


def turbo_sigmas(steps: int, cfg: SchedulerConfig = TURBO) -> torch.Tensor:
    """(steps + 1,) float32 sigmas from 1 down to 0."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    base = np.array(torch.linspace(1.0, 1.0 / steps, steps).tolist(), dtype=np.float32)
    shifted = cfg.shift * base / (1 + (cfg.shift - 1) * base)  # float32 arithmetic, as diffusers does
    return torch.cat([torch.from_numpy(shifted.astype(np.float32)), torch.zeros(1)])


def model_time(sigma: torch.Tensor, cfg: SchedulerConfig = TURBO) -> torch.Tensor:
    """The transformer's time input for a sigma: (T - T*sigma) / T with T = num_train_timesteps."""
    t = sigma * cfg.num_train_timesteps
    return (cfg.num_train_timesteps - t) / cfg.num_train_timesteps


def initial_noise(
    batch: int, channels: int, height: int, width: int, seed: int, scale: int = 8
) -> torch.Tensor:
    """Seeded noise drawn on the CPU, so a seed means the same image as in diffusers on any device.

    diffusers draws one (B, C, H/8, W/8) tensor from a single generator; so do we (not per image).
    """
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((batch, channels, height // scale, width // scale), generator=gen, dtype=torch.float32)


def strength_start(steps: int, strength: float) -> int:
    """Index of the first of `steps` sigmas an image-to-image run uses (diffusers' get_timesteps, with
    its float arithmetic): strength 1 starts at 0 (all steps), strength 0.35 of 8 steps at 5 (3 steps)."""
    if not 0.0 <= strength <= 1.0:
        raise UsageError(f"strength must be between 0 and 1 (got {strength})")
    start = int(max(steps - min(steps * strength, steps), 0))
    if start >= steps:
        raise UsageError(f"strength {strength} leaves none of the {steps} steps to run: raise it or --steps")
    return start


def noised(latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The flow-matching forward process at `sigma` (the scheduler's scale_noise)."""
    return sigma * noise + (1.0 - sigma) * latents


def keep_unmasked(
    image: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Inpainting's blend after each step: where mask is 0, the image latents noised to the next sigma."""

    def blend(x: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return (1 - mask) * noised(image, noise, sigma_next) + mask * x

    return blend


Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def euler_sample(
    denoise: Denoiser,
    latents: torch.Tensor,
    steps: int,
    cfg: SchedulerConfig = TURBO,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    start: int = 0,
    blend: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the Euler loop from sigma index `start` (0: all `steps`). `denoise(latents_f32, t (B,)) -> model
    output`; `blend(x, sigma_next)` rewrites x after each step (inpainting); returns float32 latents."""
    sigmas = turbo_sigmas(steps, cfg).to(latents.device)
    x = latents.float()
    for i in range(start, steps):
        t = model_time(sigmas[i], cfg).expand(x.shape[0])
        velocity = -denoise(x, t).float()
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity
        if blend is not None:
            x = blend(x, sigmas[i + 1])
        if on_step is not None:
            on_step(i, x)
    return x
