"""Qwen3 text encoder, cut to what Z-Image conditions on: transformers' `hidden_states[-2]`.

That is the output of layer num_hidden_layers-2 (zero-based), before the last layer and the final
norm, so we build num_hidden_layers-1 layers and neither the final norm nor the LM head. Parameter
names are transformers' `Qwen3Model` names (no `model.` prefix), so checkpoints load by name.

Numerics follow transformers: RMSNorm in fp32, cast back, then times the weight in the model dtype;
RoPE tables computed in fp32 and cast to the activation dtype (rotate-half convention). In float16 the
residual stream (with its massive-activation channels), the SwiGLU product and the attention / MLP
outputs are float32 and the output projections are scaled per token (models/numerics.py); bf16 and fp32
run transformers' operations unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from zimage_lite.config import Qwen3Config
from zimage_lite.errors import CheckpointError
from zimage_lite.models.numerics import linear_wide, norm_dtype, wide_dtype
from zimage_lite.weights.names_qwen3 import layer_index

log = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(norm_dtype(x.dtype, self.weight.dtype))


def rope_cos_sin(
    config: Qwen3Config, seq_len: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, head_dim) for positions 0..seq_len-1, halves repeated."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    angles = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq  # (S, d/2)
    angles = torch.cat((angles, angles), dim=-1)  # (S, d)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, S, d): rotate pairs (i, i + d/2) by the position's angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_mask_for(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """A boolean (B, 1, S, S) mask, True where a query may attend: causal and key is a real token.

    None when nothing is padded (the caller then uses the causal fast path). Each position may also
    attend to itself, so a padding query never sees an all-masked row (which would give NaN); real
    tokens are unaffected by that.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    seq = attention_mask.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal & attention_mask.bool()[:, None, None, :]  # (B, 1, S, S)
    return allowed | torch.eye(seq, dtype=torch.bool, device=attention_mask.device)


class Qwen3Attention(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.n_heads, self.n_kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)  # per head, over head_dim
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, s, _ = x.shape
        # (B, S, heads*d) -> (B, S, heads, d), norm per head, -> (B, heads, S, d)
        q = self.q_norm(self.q_proj(x).view(b, s, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:  # GQA: q head h reads kv head h // groups
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return linear_wide(
            self.o_proj, out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim), x.dtype
        )


class Qwen3MLP(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: normed, compute dtype; the product and the output in wide_dtype (as the DiT's FeedForward)."""
        h = F.silu(self.gate_proj(x).to(wide_dtype(x.dtype)), inplace=True)
        h.mul_(self.up_proj(x))
        return linear_wide(self.down_proj, h, x.dtype)


class Qwen3Layer(nn.Module):
    """Pre-norm decoder layer: x += attn(norm(x)); x += mlp(norm(x))."""

    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Qwen3Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = Qwen3MLP(c)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Encoder(nn.Module):
    """Token ids (B, S) -> hidden states (B, S, hidden) = transformers' `hidden_states[-2]`."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen3Layer(config) for _ in range(config.num_built_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """attention_mask: (B, S) bool, True for real tokens; padding must be on the right."""
        return self.forward_embeddings(self.embed_tokens(input_ids), attention_mask)

    def forward_embeddings(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the layers on already-embedded tokens (B, S, hidden): lets a runtime keep the
        embedding table elsewhere than the layers."""
        cos, sin = rope_cos_sin(self.config, hidden.shape[1], hidden.device, hidden.dtype)
        mask = attention_mask_for(attention_mask.to(hidden.device) if attention_mask is not None else None)
        hidden = hidden.to(wide_dtype(hidden.dtype))  # the residual stream (returned in this dtype)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, mask)
        return hidden


def infer_qwen3_config(shapes: Mapping[str, tuple[int, ...]]) -> Qwen3Config:
    """A config from bare tensor names/shapes (single files carry no config.json).

    Layer count is the highest layer index + 1, so the file must hold every layer (ComfyUI's
    qwen_3_4b.safetensors does). Norm eps and RoPE theta are not recoverable from shapes: Qwen3's.
    """
    try:
        vocab, hidden = shapes["embed_tokens.weight"]
        n_layers = 1 + max(i for i in map(layer_index, shapes) if i is not None)
        intermediate = shapes["layers.0.mlp.gate_proj.weight"][0]
        head_dim = shapes["layers.0.self_attn.q_norm.weight"][0]
        q_rows = shapes["layers.0.self_attn.q_proj.weight"][0]
        kv_rows = shapes["layers.0.self_attn.k_proj.weight"][0]
    except (KeyError, ValueError) as exc:
        raise CheckpointError(
            f"not a Qwen3 text encoder checkpoint (cannot infer its config: {exc})"
        ) from None
    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=n_layers,
        num_attention_heads=q_rows // head_dim,
        num_key_value_heads=kv_rows // head_dim,
        head_dim=head_dim,
    )
