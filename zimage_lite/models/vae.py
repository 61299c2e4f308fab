"""The FLUX autoencoder (diffusers `AutoencoderKL` with 16 latent channels, no quant convs) in plain torch.

Parameter names equal diffusers' state-dict names, so a diffusers `vae/` folder loads as is; original
(BFL / ComfyUI `ae.safetensors`) names are renamed by `zimage_lite.weights.names_vae`.

Numerics follow diffusers operation for operation (same torch ops, same order, same dtypes): GroupNorm,
SiLU, convolutions and the single-head mid-block attention (scaled_dot_product_attention) all run in the
weight dtype, so a float32 model reproduces diffusers bit for bit on the same device, and a bf16/fp16
model reproduces diffusers in that dtype.

In float16 the skip stream (what the resnets and attention add to) is float32 (models/numerics.py): a
GroupNorm brings it back to float16 before the next convolution, and the convolutions that read it
directly (1x1 shortcut, up/down-sampling) see it scaled per image by a power of two (`_conv_wide`). bf16
and fp32 run diffusers' operations unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zimage_lite.config import VAEConfig
from zimage_lite.models.numerics import pow2_scale, to_scaled, wide_dtype

_EPS = 1e-6  # every GroupNorm of the FLUX VAE (resnets, attention, output norms)


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=_EPS, affine=True)


def _norm(gn: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm of the (possibly float32) stream, returned in the weights' dtype: statistics and
    normalisation in x's dtype (float32 for a float16 model), then the bounded result is narrowed."""
    if x.dtype == gn.weight.dtype:
        return gn(x)
    w, b = gn.weight.to(x.dtype), gn.bias.to(x.dtype)
    return F.group_norm(x, gn.num_groups, w, b, gn.eps).to(gn.weight.dtype)


def _conv_wide(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for the float32 stream of a float16 model (else plain): each image scaled by the power of
    two that puts max|x| in [2^5, 2^6), convolved without bias in float16, unscaled and biased in float32."""
    if x.dtype == conv.weight.dtype:
        return conv(x)
    scale = pow2_scale(x, (1, 2, 3))  # (B, 1, 1, 1)
    y = conv._conv_forward(to_scaled(x, scale, conv.weight.dtype), conv.weight, None).float() / scale
    return y + conv.bias.float()[:, None, None]


def _conv3x3(c_in: int, c_out: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    """norm1 -> silu -> conv1 -> norm2 -> silu -> conv2, plus a (1x1-projected when widths differ) skip."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(c_in, groups)
        self.conv1 = _conv3x3(c_in, c_out)
        self.norm2 = _group_norm(c_out, groups)
        self.conv2 = _conv3x3(c_out, c_out)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, kernel_size=1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(_norm(self.norm1, x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else _conv_wide(self.conv_shortcut, x)
        return skip + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual (diffusers `Attention` as the
    VAE mid block configures it: one head of width C, GroupNorm in front)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, C, H, W) -> (B, C, H*W): GroupNorm over channels, then tokens (B, H*W, C)
        tokens = _norm(self.group_norm, x.view(b, c, h * w)).transpose(1, 2)
        # one head: (B, 1, H*W, C)
        q = self.to_q(tokens).unsqueeze(1)
        k = self.to_k(tokens).unsqueeze(1)
        v = self.to_v(tokens).unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.to_out[0](out.squeeze(1))
        # (B, H*W, C) -> (B, C, H, W)
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right (asymmetric, as trained)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv_wide(self.conv, F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv_wide(self.conv, F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n_resnets: int, groups: int, downsample: bool):
        super().__init__()
        widths = [c_in] + [c_out] * n_resnets
        self.resnets = nn.ModuleList([ResnetBlock(a, b, groups) for a, b in zip(widths, widths[1:])])
        self.downsamplers = nn.ModuleList([Downsample(c_out)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n_resnets: int, groups: int, upsample: bool):
        super().__init__()
        widths = [c_in] + [c_out] * n_resnets
        self.resnets = nn.ModuleList([ResnetBlock(a, b, groups) for a, b in zip(widths, widths[1:])])
        self.upsamplers = nn.ModuleList([Upsample(c_out)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*latent_channels, H/f, W/f): mean, then log-variance."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = _conv3x3(cfg.in_channels, chans[0])
        self.down_blocks = nn.ModuleList(
            DownBlock(chans[max(i - 1, 0)], c, cfg.layers_per_block, groups, downsample=i < len(chans) - 1)
            for i, c in enumerate(chans)
        )
        self.mid_block = MidBlock(chans[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = _group_norm(chans[-1], groups)
        self.conv_out = _conv3x3(chans[-1], 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        x = x.to(wide_dtype(x.dtype))  # the skip stream
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(_norm(self.conv_norm_out, x)))


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f), roughly in [-1, 1]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups  # widest first
        self.conv_in = _conv3x3(cfg.latent_channels, chans[0])
        self.mid_block = MidBlock(chans[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(chans[max(i - 1, 0)], c, cfg.layers_per_block + 1, groups, upsample=i < len(chans) - 1)
            for i, c in enumerate(chans)
        )
        self.conv_norm_out = _group_norm(chans[-1], groups)
        self.conv_out = _conv3x3(chans[-1], cfg.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(z))

    def trunk(self, z: torch.Tensor) -> torch.Tensor:
        """conv_in and the mid block: the latent-resolution part (runtime/vae_tiling runs it whole)."""
        x = self.conv_in(z)
        return self.mid_block(x.to(wide_dtype(x.dtype)))  # the skip stream

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The up blocks and the output head, on (a tile of) the trunk's output."""
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(_norm(self.conv_norm_out, x)))


class VAE(nn.Module):
    """Encoder + decoder; runs in the dtype of its weights (inputs are cast to it)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Already unscaled latents (`raw / scaling_factor + shift_factor`) -> image (B, 3, H, W) in ~[-1, 1]."""
        return self.decoder(latents.to(self.dtype))

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> the posterior mean (B, latent_channels, H/f, W/f), unscaled.

        For the sampler's latent space apply `(mean - shift_factor) * scaling_factor`.
        """
        moments = self.encoder(image.to(self.dtype))
        return moments[:, : self.config.latent_channels]

    def decode_to_uint8(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampler latents (B, 16, h, w) -> uint8 pixels (B, H, W, 3) on the module's device.

        Same steps and dtypes as diffusers' ZImagePipeline + VaeImageProcessor.postprocess: cast to the
        VAE dtype, unscale there, decode, `(x * 0.5 + 0.5).clamp(0, 1)` in the VAE dtype, then float32
        `* 255`, round half to even (numpy's and torch's `round`), cast to uint8.
        """
        cfg = self.config
        z = latents.to(self.dtype) / cfg.scaling_factor + cfg.shift_factor
        image = (self.decode(z) * 0.5 + 0.5).clamp(0, 1)
        pixels = (image.permute(0, 2, 3, 1).float() * 255).round()
        return pixels.to(torch.uint8)
