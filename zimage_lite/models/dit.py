"""Z-Image S3-DiT transformer in plain torch.

Parameter names are the original / ComfyUI checkpoint names (fused `attention.qkv`, `attention.out`,
`x_embedder`, `final_layer`), because the quantized files people share use them and a fused qkv is one
matmul instead of three. diffusers-named checkpoints are renamed (and q,k,v concatenated) at load time.

Numerics follow diffusers' `ZImageTransformer2DModel` operation for operation: RMSNorm statistics in fp32,
RoPE as a complex product in fp32, the timestep embedding in fp32, everything else in the weight dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zimage_lite.config import DiTConfig


class RMSNorm(nn.Module):
    """RMSNorm with diffusers' cast order: statistics in fp32, cast to a half weight dtype before scaling."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x: (B, S, H, D); freqs: complex64 (B, S, D/2). Rotates pairs (x[2i], x[2i+1]) in fp32."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs.unsqueeze(2)).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        head_dim = dim // n_heads
        # diffusers hard-codes eps 1e-5 for the q/k norms, independent of the config's norm_eps
        self.q_norm = RMSNorm(head_dim, eps=1e-5)
        self.k_norm = RMSNorm(head_dim, eps=1e-5)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # (B, S, 3*dim) -> 3 x (B, S, H, D)
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, -1)).unbind(2)
        q = apply_rope(self.q_norm(q), freqs)
        k = apply_rope(self.k_norm(k), freqs)
        # SDPA wants (B, H, S, D); a bool mask (B, S) of valid keys broadcasts as (B, 1, 1, S)
        attn_mask = None if mask is None else mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask)
        return self.out(o.transpose(1, 2).flatten(2).to(x.dtype))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Sandwich-normed block; `modulated` blocks take tanh gates and 1+scale from adaLN."""

    def __init__(self, cfg: DiTConfig, modulated: bool):
        super().__init__()
        dim = cfg.dim
        self.attention = Attention(dim, cfg.n_heads)
        self.feed_forward = FeedForward(dim, cfg.ffn_dim)
        self.attention_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.modulated = modulated
        if modulated:
            self.adaLN_modulation = nn.Sequential(nn.Linear(cfg.adaln_dim, 4 * dim))

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        mask: torch.Tensor | None,
        adaln: torch.Tensor | None = None,
        chunks: int = 1,
    ) -> torch.Tensor:
        """x (B, S, dim). `chunks` > 1: the batch in that many parts one after the other (the same
        result; the block's temporaries for one part at a time)."""
        if chunks <= 1:
            return self._forward(x, freqs, mask, adaln)
        parts = zip(*(_split(a, chunks) for a in (x, freqs, mask, adaln)))
        return torch.cat([self._forward(*p) for p in parts])

    def _forward(
        self, x: torch.Tensor, freqs: torch.Tensor, mask: torch.Tensor | None, adaln: torch.Tensor | None
    ) -> torch.Tensor:
        if not self.modulated:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), freqs, mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        # (B, 4*dim) -> 4 x (B, 1, dim)
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=2)
        attn = self.attention(self.attention_norm1(x) * (1.0 + scale_msa), freqs, mask)
        x = x + gate_msa.tanh() * self.attention_norm2(attn)
        ffn = self.feed_forward(self.ffn_norm1(x) * (1.0 + scale_mlp))
        return x + gate_mlp.tanh() * self.ffn_norm2(ffn)


def _split(a: torch.Tensor | None, chunks: int) -> list[torch.Tensor | None]:
    """`a` cut into `chunks` parts along the batch; a key mask whose part is all valid becomes None,
    as the DiT passes it for items of one length."""
    if a is None:
        return [None] * chunks
    parts = list(a.chunk(chunks))
    if a.dtype == torch.bool:
        parts = [None if bool(p.all()) else p for p in parts]
    return parts


class TimestepEmbedder(nn.Module):
    def __init__(self, out_dim: int, mid_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, mid_dim), nn.SiLU(), nn.Linear(mid_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, adaln_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, dim))

    def forward(self, x: torch.Tensor, adaln: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.adaLN_modulation(adaln).unsqueeze(1)
        return self.linear(F.layer_norm(x, (x.shape[-1],), eps=1e-6) * scale)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, hints, *args) -> torch.Tensor:
    """x through `blocks`; `hints.before(i, x)` (if given) returns what to add after block i, or None."""
    for i, block in enumerate(blocks):
        hint = None if hints is None else hints.before(i, x)
        x = block(x, *args)
        if hint is not None:
            x = x + hint
            hint = None  # freed now, not when the next hint is already computed
    return x


class ZImageDiT(nn.Module):
    """forward(latents (B, C, H, W), t (B,) in [0, 1] with 1 = clean, captions [(L_i, cap_dim)]) -> (B, C, H, W)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        p = cfg.patch_size
        self.x_embedder = nn.Linear(p * p * cfg.in_channels, cfg.dim)
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim, cfg.t_mid_dim)
        self.cap_embedder = nn.Sequential(
            RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, cfg.dim)
        )
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.noise_refiner = nn.ModuleList(Block(cfg, modulated=True) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(Block(cfg, modulated=False) for _ in range(cfg.n_refiner_layers))
        self.layers = nn.ModuleList(Block(cfg, modulated=True) for _ in range(cfg.n_layers))
        self.final_layer = FinalLayer(cfg.dim, cfg.adaln_dim, p * p * cfg.in_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_pad_token.dtype

    def forward(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        captions: list[torch.Tensor],
        chunks: int = 1,
        control=None,
    ) -> torch.Tensor:
        """`chunks`: each block runs the batch in that many parts (Block.forward). `control`: None, or a
        hook whose `start(seq, adaln, x_pad_token, chunks)` gives a run with `refiner_hints()` and
        `layer_hints(cap)`: objects whose `before(i, x)` returns what to add to the stream after its
        layer i (models/controlnet.py)."""
        from zimage_lite.models.dit_sequence import build_sequences, unpatchify

        seq = build_sequences(self.config, latents, captions)
        adaln = self.t_embedder(t * self.config.t_scale).to(self.dtype)
        run = None if control is None else control.start(seq, adaln, self.x_pad_token, chunks)

        x = self.x_embedder(seq.image_patches.to(self.dtype))
        x = torch.where(seq.image_pad[..., None], self.x_pad_token, x)
        hints = None if run is None else run.refiner_hints()
        x = run_blocks(self.noise_refiner, x, hints, seq.image_freqs, None, adaln, chunks)

        cap = self.cap_embedder(seq.caption_feats.to(self.dtype))
        cap = torch.where(seq.caption_pad[..., None], self.cap_pad_token, cap)
        for block in self.context_refiner:
            cap = block(cap, seq.caption_freqs, seq.caption_mask, None, chunks)

        h = seq.join(x, cap)
        hints = None if run is None else run.layer_hints(cap)
        h = run_blocks(self.layers, h, hints, seq.joint_freqs, seq.joint_mask, adaln, chunks)
        out = self.final_layer(h, adaln)
        return unpatchify(out[:, : seq.image_len], latents.shape, self.config.patch_size)
