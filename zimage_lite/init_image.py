"""Image-to-image and inpainting inputs: the init image and mask as tensors, and the latents they start from.

Matches diffusers' ZImageImg2ImgPipeline / ZImageInpaintPipeline with their VaeImageProcessors: PIL
resize (Lanczos) to the output size, then RGB (mask: grayscale), `/ 255`; the image to [-1, 1], the mask
binarized at 0.5 (white = re-generate) and shrunk to the latent grid by nearest neighbour. The VAE
posterior is *sampled*, from the same seeded CPU generator as the noise and before it, so a seed means
the same image as in diffusers. diffusers fails on an init image of another size; we resize it.
Differences: the posterior sample and the noise are drawn in float32 whatever the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from zimage_lite.errors import UsageError, not_found
from zimage_lite.upright import upright


def upscaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """A hires pass's size: each side times `scale`, to the nearest multiple of 16 (at least 16)."""
    return tuple(max(16, round(side * scale / 16) * 16) for side in (width, height))


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """A PIL image fully read from `path`, upright as its EXIF says; UsageError with one line when it
    cannot be (a FIFO or device is refused before it is opened: reading one would wait forever or never
    end)."""
    if not Path(path).is_file():
        raise not_found(path, f"{what} file")
    try:
        with Image.open(path) as im:
            im.load()
            return upright(im)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UsageError(f"{path}: cannot read the {what} ({exc})") from None


def _resized(image: Image.Image, width: int, height: int) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def image_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """(1, 3, H, W) float32 in [-1, 1]."""
    pixels = np.asarray(_resized(image, width, height).convert("RGB")).astype(np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1)[None] * 2.0 - 1.0  # (H, W, 3) -> (1, 3, H, W)


def mask_tensor(mask: Image.Image, width: int, height: int, scale: int) -> torch.Tensor:
    """(1, 1, H/scale, W/scale) float32 of 0 (keep) and 1 (re-generate)."""
    values = np.asarray(_resized(mask, width, height).convert("L")).astype(np.float32) / 255.0
    binary = torch.from_numpy((values >= 0.5).astype(np.float32))[None, None]  # (1, 1, H, W)
    return F.interpolate(binary, size=(height // scale, width // scale), mode="nearest")


def posterior_sample(moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """diffusers' DiagonalGaussianDistribution.sample: mean + exp(logvar / 2) * noise, logvar clamped."""
    mean, logvar = moments.float().cpu().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return mean + std * torch.randn(mean.shape, generator=generator, dtype=torch.float32)


@dataclass(frozen=True)
class InitLatents:
    """What an image-to-image run starts from (float32, CPU): the clean image latents (B, C, h, w) and the
    seeded noise of the same shape."""

    image: torch.Tensor
    noise: torch.Tensor


def init_latents(moments: torch.Tensor, batch: int, seed: int, scaling: float, shift: float) -> InitLatents:
    """VAE encoder moments (1, 2C, h, w) of the init image -> sampled latents in the sampler's space,
    repeated for `batch` images, and the noise drawn after them from the same generator."""
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = (posterior_sample(moments, generator) - shift) * scaling
    noise = torch.randn((batch, *latents.shape[1:]), generator=generator, dtype=torch.float32)
    return InitLatents(latents.expand(batch, -1, -1, -1).contiguous(), noise)
