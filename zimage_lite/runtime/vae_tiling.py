"""Tiled VAE decode inside a VRAM budget: overlapping tiles, blended linearly.

At 1024x1024 the FLUX decoder's last stages hold several (B, 256, 1024, 1024) tensors: ~2-3 GB in bf16,
the "OOM at VAE decode" users of small cards hit. Where those stages do not fit, we decode in tiles:

1. `conv_in` and the mid block (resnet, single-head self-attention over all positions, resnet) run on
   the whole latent: they are cheap at latent resolution, and running them whole keeps the global
   attention exact.
2. The up blocks and the output head run per tile of the mid-block output (square tiles of `tile`
   latent cells, neighbours overlapping by at least `overlap` cells), each producing a pixel tile.
3. Tiles are blended with weights that ramp linearly across each overlap (1 elsewhere); the result is
   the weighted sum divided by the sum of weights, in float32.

What remains inexact is the GroupNorm statistics of the up blocks (computed per tile instead of over the
whole image) and convolution borders inside the overlap, whose weight falls to ~0 at the tile edge. A
single tile (tile >= the latent size) is bit-identical to `VAE.decode`. tests/test_vae_tiling.py states
the measured error against the untiled decode.
"""

from __future__ import annotations

import math

import torch

from zimage_lite.config import VAEConfig
from zimage_lite.errors import UsageError
from zimage_lite.runtime.budget import format_bytes

DEFAULT_OVERLAP = 8  # latent cells (64 pixels): more than the up blocks' conv receptive field needs to fade
MIN_TILE = 2 * DEFAULT_OVERLAP


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def mid_block_bytes(cfg: VAEConfig, latent_h: int, latent_w: int, batch: int, dtype: torch.dtype,
                    attention: str = "math") -> int:  # fmt: skip
    """Peak bytes of conv_in + mid block on the whole latent (L = h*w cells, C = widest channels):
    resnet 5*L*C*e; attention: norm, q, k, v, output and two layout copies 7*L*C*e, plus the L x L
    scores and probabilities (2*L*L*e) if SDPA falls back to the math kernel (head width 512 exceeds
    the flash kernel's limit, so "math" is the safe default)."""
    e, L, c = _itemsize(dtype), latent_h * latent_w, cfg.block_out_channels[-1]
    attn = 7 * L * c * e + (2 * L * L * e if attention == "math" else 0)
    return batch * max(5 * L * c * e, attn)


def up_blocks_bytes(cfg: VAEConfig, latent_h: int, latent_w: int, batch: int, dtype: torch.dtype) -> int:
    """Peak bytes of the up blocks + output head on a latent region of h x w cells. At each stage (R
    pixels there): a resnet holds its input, norm/silu outputs, conv outputs and the skip, 5*R*C*e for
    the wider of its in/out channels; an upsample holds input, nearest x2 and its conv: 9*R*C*e; the
    head: norm, silu, conv (3*R*C*e) and the float32 image."""
    e = _itemsize(dtype)
    chans = cfg.block_out_channels[::-1]  # widest first, as the decoder runs
    peak, c_prev = 0, chans[0]
    for i, c in enumerate(chans):
        r = latent_h * latent_w * 4**i
        peak = max(peak, 5 * r * max(c_prev, c) * e)
        if i < len(chans) - 1:
            peak = max(peak, 9 * r * c * e)
        c_prev = c
    r_full = latent_h * latent_w * 4 ** (len(chans) - 1)
    return batch * max(peak, 3 * r_full * chans[-1] * e + r_full * cfg.out_channels * 4)


def decode_bytes(cfg: VAEConfig, latent_h: int, latent_w: int, batch: int, dtype: torch.dtype,
                 tile: int | None, attention: str = "math") -> int:  # fmt: skip
    """Peak activation bytes of `decode_tiled` (tile None: untiled): the whole-latent part, or the
    mid-block output + float32 accumulators + one tile's up blocks, whichever is larger."""
    th, tw = (latent_h, latent_w) if tile is None else (min(tile, latent_h), min(tile, latent_w))
    e, f = _itemsize(dtype), cfg.scale_factor
    mid_out = batch * latent_h * latent_w * cfg.block_out_channels[-1] * e
    accumulators = batch * (cfg.out_channels + 1) * latent_h * latent_w * f * f * 4
    tiles = mid_out + accumulators + up_blocks_bytes(cfg, th, tw, batch, dtype)
    return max(mid_block_bytes(cfg, latent_h, latent_w, batch, dtype, attention), tiles)


def encode_bytes(
    cfg: VAEConfig, latent_h: int, latent_w: int, dtype: torch.dtype, attention: str = "math"
) -> int:
    """Peak activation bytes of an untiled encode of one image (image-to-image encodes one): the encoder
    mirrors the decoder (same widths per resolution, a downsample holds less than an upsample), so the
    decoder's whole-latent mid block and untiled up blocks bound it, plus the float32 input image."""
    image = cfg.out_channels * latent_h * latent_w * cfg.scale_factor**2 * 4
    return image + max(
        mid_block_bytes(cfg, latent_h, latent_w, 1, dtype, attention),
        up_blocks_bytes(cfg, latent_h, latent_w, 1, dtype),
    )


def choose_vae_tile(
    cfg: VAEConfig,
    budget_bytes: int,
    width: int,
    height: int,
    batch: int,
    dtype: torch.dtype,
    *,
    weight_bytes: int,
    context_bytes: int = 0,
    overlap: int = DEFAULT_OVERLAP,
    attention: str = "math",
) -> int | None:
    """None when the whole decode fits in `budget_bytes` (with the decoder's `weight_bytes` and the
    context); else the largest tile (latent cells, a multiple of 8) that fits. UsageError with the
    minimum when not even a tile of 2*overlap cells fits."""
    f = cfg.scale_factor
    h, w = math.ceil(height / f), math.ceil(width / f)
    fixed = weight_bytes + context_bytes
    if fixed + decode_bytes(cfg, h, w, batch, dtype, None, attention) <= budget_bytes:
        return None
    smallest = max(2 * overlap, 8)
    for tile in range(_round_up(max(h, w), 8), smallest - 1, -8):
        if fixed + decode_bytes(cfg, h, w, batch, dtype, tile, attention) <= budget_bytes:
            return tile
    need = fixed + decode_bytes(cfg, h, w, batch, dtype, smallest, attention)
    whole = fixed + mid_block_bytes(cfg, h, w, batch, dtype, attention)
    why = (
        f"its mid-block attention runs over all {h * w} latent positions at once, which tiles do not shrink: "
        "use a smaller --width/--height"
        if whole >= need
        else f"even in tiles of {smallest * f} pixels"
    )
    raise UsageError(
        f"VRAM budget {format_bytes(budget_bytes, 2)} is below the minimum {format_bytes(need, 2)} for the "
        f"VAE decode at {width}x{height} batch {batch}: {why}"
    )


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` cells covering `size`, spread evenly, neighbours overlapping by
    at least `overlap` cells."""
    if tile >= size:
        return [0]
    if tile <= overlap:
        raise UsageError(f"VAE tile ({tile}) must be larger than its overlap ({overlap})")
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _ramp(length: int, rise: int, fall: int) -> torch.Tensor:
    """1-D blend weights over a tile of `length` pixels: linear over the first `rise` and last `fall`
    pixels (the overlaps with the neighbours), never 0, so every pixel has a positive total weight."""
    w = torch.ones(length, dtype=torch.float32)
    if rise:
        w[:rise] = (torch.arange(rise, dtype=torch.float32) + 0.5) / rise
    if fall:
        w[length - fall :] = torch.minimum(w[length - fall :], (torch.arange(fall, 0, -1) - 0.5) / fall)
    return w


def _axis_weights(starts: list[int], tile: int, size: int, f: int) -> list[torch.Tensor]:
    out = []
    for k, s in enumerate(starts):
        end = min(s + tile, size)
        rise = (starts[k - 1] + tile - s) * f if k > 0 else 0
        fall = (end - starts[k + 1]) * f if k + 1 < len(starts) else 0
        out.append(_ramp((end - s) * f, rise, fall))
    return out


def _up_and_out(decoder, x: torch.Tensor) -> torch.Tensor:
    """The decoder after its mid block (Decoder.head: up blocks and output head, same modules and order)."""
    return decoder.head(x)


@torch.no_grad()
def decode_tiled(vae, z: torch.Tensor, tile: int | None, overlap: int = DEFAULT_OVERLAP) -> torch.Tensor:
    """`vae.decode(z)` (z already unscaled, (B, C, h, w)) computed in tiles of `tile` latent cells
    (module docstring); tile None decodes whole. Returns (B, 3, h*f, w*f) in the VAE dtype."""
    decoder, f = vae.decoder, vae.config.scale_factor
    z = z.to(vae.dtype)
    if tile is None:
        return decoder(z)
    x = decoder.trunk(z)  # whole latent: exact global attention
    b, _, h, w = x.shape
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    if len(ys) == len(xs) == 1:
        return _up_and_out(decoder, x)
    wy, wx = _axis_weights(ys, tile, h, f), _axis_weights(xs, tile, w, f)
    acc = torch.zeros(b, vae.config.out_channels, h * f, w * f, dtype=torch.float32, device=x.device)
    total = torch.zeros(1, 1, h * f, w * f, dtype=torch.float32, device=x.device)
    for y0, ry in zip(ys, wy):
        for x0, rx in zip(xs, wx):
            pixels = _up_and_out(decoder, x[:, :, y0 : y0 + tile, x0 : x0 + tile])
            weight = (ry[:, None] * rx[None, :]).to(x.device)  # (tile_h * f, tile_w * f)
            py, px = slice(y0 * f, y0 * f + weight.shape[0]), slice(x0 * f, x0 * f + weight.shape[1])
            acc[:, :, py, px] += pixels.float() * weight
            total[:, :, py, px] += weight
    return (acc / total).to(vae.dtype)


def decode_to_uint8_tiled(vae, latents: torch.Tensor, tile: int | None, overlap: int = DEFAULT_OVERLAP):
    """`VAE.decode_to_uint8` with a tiled decode: sampler latents (B, 16, h, w) -> uint8 (B, H, W, 3).
    Same unscaling, clamping and rounding steps and dtypes as the untiled method."""
    cfg = vae.config
    z = latents.to(vae.dtype) / cfg.scaling_factor + cfg.shift_factor
    image = (decode_tiled(vae, z, tile, overlap) * 0.5 + 0.5).clamp(0, 1)
    pixels = (image.permute(0, 2, 3, 1).float() * 255).round()
    return pixels.to(torch.uint8)
