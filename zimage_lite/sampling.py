"""Z-Image-Turbo sampling: FlowMatch-Euler with a static shift, as plain functions.

Matches diffusers' FlowMatchEulerDiscreteScheduler as ZImagePipeline drives it: sigmas are
linspace(1, 1/N, N) in float32, shifted by s*x / (1 + (s-1)*x) in float32, with a final 0; the
transformer gets t = (1000 - 1000*sigma) / 1000 (1 = clean); velocity = -model output; latents stay float32.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from zimage_lite.config import SchedulerConfig

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


Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def euler_sample(
    denoise: Denoiser,
    latents: torch.Tensor,
    steps: int,
    cfg: SchedulerConfig = TURBO,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the Euler loop. `denoise(latents_f32, t (B,)) -> model output`; returns float32 latents."""
    sigmas = turbo_sigmas(steps, cfg).to(latents.device)
    x = latents.float()
    for i in range(steps):
        t = model_time(sigmas[i], cfg).expand(x.shape[0])
        velocity = -denoise(x, t).float()
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity
        if on_step is not None:
            on_step(i, x)
    return x
