"""A Qwen3 text encoder's hyperparameters as llama.cpp stores them in GGUF metadata (`qwen3.*` keys).

Read: `qwen3_config_from_gguf`; write: `qwen3_gguf_fields`. The tensor names are in names_qwen3.py, the
embedded tokenizer in gguf_tokenizer.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from zimage_lite.config import Qwen3Config
from zimage_lite.errors import CheckpointError


def _f32(value: float) -> float:
    """A float32 field as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def qwen3_config_from_gguf(metadata: Any) -> Qwen3Config:
    """A Qwen3Config from llama.cpp `qwen3.*` keys (`metadata`: a dict or a GGUF checkpoint).

    The vocabulary size comes from `token_embd.weight` when a checkpoint is given (llama.cpp keeps no
    vocab_size key), else from the tokenizer token list."""
    is_checkpoint = not isinstance(metadata, Mapping)
    get = metadata.field if is_checkpoint else metadata.get
    arch = get("general.architecture")
    if arch != "qwen3":
        raise CheckpointError(
            f"not a Qwen3 text encoder GGUF (general.architecture is {arch!r}, expected 'qwen3')"
        )

    def need(key: str):
        value = get(f"qwen3.{key}")
        if value is None:
            raise CheckpointError(f"Qwen3 GGUF lacks the qwen3.{key} key")
        return value

    vocab = None
    if is_checkpoint and "token_embd.weight" in metadata:
        vocab = metadata.shape("token_embd.weight")[0]
    if vocab is None:
        tokens = get("tokenizer.ggml.tokens")
        if tokens is None:
            raise CheckpointError("Qwen3 GGUF: cannot tell the vocabulary size (no token_embd, no tokens)")
        vocab = len(tokens)
    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    return Qwen3Config(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("qwen3.attention.head_count_kv") or heads),
        head_dim=int(get("qwen3.attention.key_length") or hidden // heads),
        rms_norm_eps=_f32(get("qwen3.attention.layer_norm_rms_epsilon") or 1e-6),
        rope_theta=_f32(get("qwen3.rope.freq_base") or 1_000_000.0),
        max_position_embeddings=int(get("qwen3.context_length") or 40960),
    )


def qwen3_gguf_fields(config: Qwen3Config) -> dict[str, Any]:
    """The llama.cpp hyperparameter keys for a Qwen3 model (`general.architecture` set separately)."""
    return {
        "qwen3.block_count": ("u32", config.num_hidden_layers),
        "qwen3.context_length": ("u32", config.max_position_embeddings),
        "qwen3.embedding_length": ("u32", config.hidden_size),
        "qwen3.feed_forward_length": ("u32", config.intermediate_size),
        "qwen3.attention.head_count": ("u32", config.num_attention_heads),
        "qwen3.attention.head_count_kv": ("u32", config.num_key_value_heads),
        "qwen3.attention.key_length": ("u32", config.head_dim),
        "qwen3.attention.value_length": ("u32", config.head_dim),
        "qwen3.rope.freq_base": ("f32", config.rope_theta),
        "qwen3.attention.layer_norm_rms_epsilon": ("f32", config.rms_norm_eps),
    }
