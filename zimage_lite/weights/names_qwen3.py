"""Qwen3 text-encoder tensor names: transformers (HF) <-> llama.cpp GGUF, and checkpoint key cleanup.

HF names here are `Qwen3Model` names without the `model.` prefix that `Qwen3ForCausalLM` checkpoints
carry. GGUF names follow gguf-py's tensor map for MODEL_ARCH.QWEN3 (constants.py TENSOR_NAMES,
tensor_mapping.py); llama.cpp's qwen3 converter does not permute q/k rows (unlike llama), so tensors
map one to one with only the name changing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from zimage_lite.errors import CheckpointError

if TYPE_CHECKING:
    from zimage_lite.weights.checkpoint import Checkpoint

MODEL_PREFIX = "model."

# Per-layer module path (HF) -> llama.cpp block tensor name.
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}

_LAYER_BY_GGUF = {v: k for k, v in _LAYER_NAMES.items()}
_GLOBAL_BY_GGUF = {v: k for k, v in _GLOBAL_NAMES.items()}
_HF_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_to_gguf_name(name: str) -> str:
    """`layers.3.self_attn.q_proj.weight` (optionally `model.`-prefixed) -> `blk.3.attn_q.weight`."""
    bare = name.removeprefix(MODEL_PREFIX)
    m = _HF_LAYER.fullmatch(bare)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    module, _, suffix = bare.rpartition(".")
    if module in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[module]}.{suffix}"
    raise CheckpointError(f"text encoder tensor {name} has no llama.cpp (GGUF) name")


def gguf_to_hf_name(name: str) -> str:
    """`blk.3.attn_q.weight` -> `layers.3.self_attn.q_proj.weight` (no `model.` prefix)."""
    m = _GGUF_LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER_BY_GGUF:
        return f"layers.{m.group(1)}.{_LAYER_BY_GGUF[m.group(2)]}.{m.group(3)}"
    module, _, suffix = name.rpartition(".")
    if module in _GLOBAL_BY_GGUF and suffix in ("weight", "bias"):
        return f"{_GLOBAL_BY_GGUF[module]}.{suffix}"
    raise CheckpointError(f"GGUF tensor {name} is not a Qwen3 text encoder tensor")


def strip_model_prefix(keys: Iterable[str]) -> dict[str, str]:
    """Map bare name -> checkpoint key, removing a `model.` prefix where present (Qwen3ForCausalLM
    checkpoints have it, Qwen3Model ones do not). Two keys with the same bare name are an error."""
    bare: dict[str, str] = {}
    for key in keys:
        name = key.removeprefix(MODEL_PREFIX)
        if name in bare:
            raise CheckpointError(f"text encoder checkpoint has both {bare[name]} and {key}")
        bare[name] = key
    return bare


def bare_names(source: Checkpoint) -> dict[str, str]:
    """Bare HF name -> key of a text encoder checkpoint: llama.cpp names in a GGUF, HF names (with or
    without `model.`) in safetensors."""
    if source.format == "gguf":
        return {gguf_to_hf_name(k): k for k in source.keys()}
    return strip_model_prefix(source.keys())


def layer_index(name: str) -> int | None:
    """The decoder layer a bare HF name belongs to, or None for global tensors."""
    m = re.match(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def is_unused_by_encoder(name: str, num_hidden_layers: int) -> bool:
    """Tensors a full Qwen3 checkpoint has that Z-Image never uses (it conditions on hidden_states[-2]):
    the LM head, the final norm and the last decoder layer. `name` is a bare HF name."""
    if name in ("lm_head.weight", "norm.weight"):
        return True
    return layer_index(name) == num_hidden_layers - 1
