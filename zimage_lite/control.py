"""Control as a part of the denoising loop: the control latents, their scale and step range, and the
hook the DiT's forward takes (`ZImageDiT.forward(..., control=part.at(t))`).

The control input, as diffusers' ZImageControlNetPipeline / ZImageControlNetInpaintPipeline build it:
- the control image resized to the output size (Lanczos), VAE-encoded with the posterior's *mode*,
  `(z - shift) * scale`, zero-padded from 16 to the branch's 33 channels (2.x);
- inpainting (2.x): channels [control latent (16), 1 - mask (1), latent of the image with the masked
  pixels set to 0 (mid grey) (16)]; the mask binarized at 0.5 and shrunk to the latent grid by nearest.
The inpaint pipeline starts from plain noise: the mask acts only through the control input.

`start` / `end` are fractions of the schedule as ComfyUI's start/end percent: a step runs with control
when its sigma lies between the sigmas the shifted schedule has at those fractions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from zimage_lite.config import SchedulerConfig, VAEConfig
from zimage_lite.errors import UsageError
from zimage_lite.init_image import image_tensor, mask_tensor
from zimage_lite.models.controlnet import ControlRun, ZImageControlNet
from zimage_lite.models.dit_sequence import patchify
from zimage_lite.sampling import TURBO

Encoder = Callable[[torch.Tensor], torch.Tensor]  # pixels (1, 3, H, W) in [-1, 1] -> moments (1, 2C, h, w)


def percent_sigma(p: float, cfg: SchedulerConfig = TURBO) -> float:
    """The sigma a fraction p of the schedule reaches: the shift applied to 1 - p (ComfyUI's
    percent_to_sigma for a flow model)."""
    s = 1.0 - p
    return cfg.shift * s / (1 + (cfg.shift - 1) * s)


def latent_mode(moments: torch.Tensor, vae: VAEConfig) -> torch.Tensor:
    """(1, 2C, h, w) moments -> (1, C, h, w) posterior mode in the sampler's space."""
    mean = moments.float().chunk(2, dim=1)[0]
    return (mean - vae.shift_factor) * vae.scaling_factor


def control_latents(
    encode: Encoder,
    vae: VAEConfig,
    in_dim: int,
    image: Image.Image,
    width: int,
    height: int,
    inpaint: Image.Image | None = None,
    mask: Image.Image | None = None,
) -> torch.Tensor:
    """(1, in_dim, H/8, W/8) float32: the control input (module docstring)."""
    z = latent_mode(encode(image_tensor(image, width, height)), vae)
    if (inpaint is None) != (mask is None):
        raise UsageError("ControlNet inpainting needs both an inpaint image and a mask")
    if mask is None:
        return torch.cat([z, z.new_zeros(1, in_dim - z.shape[1], *z.shape[2:])], dim=1)
    if in_dim != 2 * z.shape[1] + 1:
        raise UsageError(
            f"ControlNet inpainting needs a 2.x ControlNet (33 input channels, this has {in_dim})"
        )
    full = mask_tensor(mask, width, height, 1)  # (1, 1, H, W) of 0 / 1
    masked = latent_mode(encode(image_tensor(inpaint, width, height) * (full < 0.5)), vae)
    keep = 1.0 - mask_tensor(mask, width, height, vae.scale_factor)
    return torch.cat([z, keep, masked], dim=1)


@dataclass(frozen=True)
class ControlInput:
    """One generation's control: the branch, its latents (1 or B, in_dim, h, w) on the device, the scale,
    and the sigma range [sigma_end, sigma_start] in which it runs."""

    net: ZImageControlNet
    latents: torch.Tensor
    scale: float
    sigma_start: float = 1.0
    sigma_end: float = 0.0

    def at(self, t: torch.Tensor) -> ControlInput | None:
        """Itself while the step's sigma (1 - t) is in range, else None."""
        sigma = 1.0 - float(t.reshape(-1)[0])
        tol = 1e-6
        return self if self.sigma_end - tol <= sigma <= self.sigma_start + tol else None

    def start(self, seq, adaln: torch.Tensor, pad_token: torch.Tensor, chunks: int = 1) -> ControlRun:
        """The DiT hook: the control tokens for `seq`'s batch (a batch of k * n repeats n latents k times,
        as both passes of CFG take the same control), padded like the image tokens."""
        b, n_pad = seq.image_pad.shape
        lat = self.latents
        lat = lat.repeat(b // lat.shape[0], 1, 1, 1) if lat.shape[0] != b else lat
        tokens = patchify(lat, 2)  # (B, C, h, w) -> (B, h/2 * w/2, 4*C)
        tokens = torch.cat([tokens, tokens[:, -1:].expand(b, n_pad - tokens.shape[1], -1)], dim=1)
        return ControlRun(self.net, tokens, seq, adaln, pad_token, self.scale, chunks)


class NoControl:
    """The part when no control is asked for: the DiT runs without a hook."""

    def at(self, t: torch.Tensor) -> None:
        return None


def check_range(scale: float, start: float, end: float) -> None:
    if not 0.0 <= start < end <= 1.0:
        raise UsageError(f"control start/end must satisfy 0 <= start < end <= 1 (got {start}, {end})")
    if scale < 0:
        raise UsageError(f"the control scale must be >= 0 (got {scale})")


def control_part(
    net: ZImageControlNet | None,
    encode: Encoder,
    vae: VAEConfig,
    image: Image.Image | None,
    width: int,
    height: int,
    *,
    scale: float = 0.75,
    start: float = 0.0,
    end: float = 1.0,
    inpaint: Image.Image | None = None,
    mask: Image.Image | None = None,
    device: torch.device | str = "cpu",
    scheduler: SchedulerConfig = TURBO,
) -> ControlInput | NoControl:
    """The control part the loop composes (NoControl without a control image)."""
    if image is None:
        if inpaint is not None or mask is not None:
            raise UsageError("ControlNet inpainting needs a control image too")
        return NoControl()
    if net is None:
        raise UsageError("a control image needs a ControlNet (Pipeline.load(..., controlnet=PATH))")
    check_range(scale, start, end)
    lat = control_latents(encode, vae, net.config.control_in_dim, image, width, height, inpaint, mask)
    sigmas = percent_sigma(start, scheduler), percent_sigma(end, scheduler)
    return ControlInput(net, lat.to(device, net.dtype), scale, *sigmas)


def controlled(transformer, part: ControlInput | NoControl):
    """The transformer as guidance calls it, `(x, t, captions, chunks=1)`, with the part's control for
    each step (the same hints for both passes of a guided batch: `ControlInput.start` repeats the
    control latents)."""

    def call(x: torch.Tensor, t: torch.Tensor, captions: list[torch.Tensor], chunks: int = 1) -> torch.Tensor:
        return transformer(x, t, captions, chunks=chunks, control=part.at(t))

    return call
