"""`zimage-lite synthetic --stress fp16`: a random-weight model whose activations outgrow float16 as Z-Image's do.

A plain synthetic model stays far inside float16's range (max 65504), so it cannot show the overflow users
of pre-bf16 cards meet. This edits a few weights of the random model so that, in float32:
- DiT FFN: in every block, `STRESS_CHANNELS` hidden channels of w1 and w3 are scaled by `FFN_GAIN`, so the
  SwiGLU product `silu(w1 x) * w3 x` reaches ~1e5-1e6 there (sdnext PR #4753 found NaN/Inf in exactly this
  product of Z-Image's FeedForward in float16; Tongyi-MAI/Z-Image#14 and stable-diffusion.cpp#1253 are the
  black images that follow);
- DiT attention: the value rows of the same channels of every block's fused qkv are scaled by `VALUE_GAIN`
  and the matching input columns of `attention.out` by `OUT_GAIN`, so the attention output (before its
  post-norm) reaches ~1e5 while v itself stays inside float16 (sdnext PR #4753: the block's attention
  output); stable-diffusion.cpp PR #1034 scales that output by 1/16 for the same reason;
- Qwen3 text encoder: "massive activations" (Sun et al. 2024, "Massive Activations in Large Language
  Models": in LLMs, Qwen among them, a few fixed residual-stream channels reach 1e4-1e5 from an early
  layer on, at the starting token and delimiter tokens only, written by a few FFN hidden units). Here
  `<|im_start|>` (position 0 of the chat template, and the delimiter before "assistant") gets them: its
  embedding row points along `TRIGGER_CHANNEL`, every other row carries a constant `BIAS_CHANNEL` (the
  random model has no biases), and layer 0's MLP gets `STRESS_CHANNELS` units with gate = G*(x_trigger -
  2 x_bias) and up = G*x_trigger, so they fire for that token only and write, through down-projection
  columns that are zero elsewhere, into the `MASSIVE_CHANNELS` residual channels.
The gains are chosen so that float16 itself could hold every matmul input and weight (v reaches ~6e3,
w1 x ~1e3) and every weight row stays inside the bound models/numerics.py states (||row||_1 < 1023; the
largest here, attention.out's, ~80): the overflow is in the activations, as in the field reports. Edits
multiply whole rows or columns, so the quantizers keep their block structure.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

STRESSES = ("fp16",)
STRESS_CHANNELS = (0, 1, 2)  # FFN hidden channels / attention value channels edited in every block
FFN_GAIN = 300.0  # w1 and w3 rows: the product grows by 9e4
VALUE_GAIN = 1600.0  # v rows of qkv
OUT_GAIN = 100.0  # the matching columns of attention.out
TEXT_GAIN = 30.0  # G: gate/up weights of the text encoder's massive-activation units
MASSIVE_CHANNELS = (3, 17)  # residual channels they write to
MASSIVE_WEIGHT = 0.5  # down_proj[massive channel, unit]; every other row of those columns is 0
TRIGGER_CHANNEL, BIAS_CHANNEL = 5, 6  # embedding channels: the trigger direction, a constant for the rest
TRIGGER_VALUE, BIAS_VALUE = 10.0, 2.0  # above the embeddings' ~0.2 and layer 0's attention output

Edit = Callable[[str, torch.Tensor], torch.Tensor]


def _rows(t: torch.Tensor, rows, gain: float) -> torch.Tensor:
    t = t.clone()
    t[list(rows)] *= gain
    return t


def dit_fp16_stress(name: str, t: torch.Tensor) -> torch.Tensor:
    """Edit one DiT tensor (our / ComfyUI names, fused qkv) per the module docstring."""
    if re.search(r"\.feed_forward\.w[13]\.weight$", name):
        return _rows(t, STRESS_CHANNELS, FFN_GAIN)
    if name.endswith(".attention.qkv.weight"):
        dim = t.shape[1]
        return _rows(t, [2 * dim + c for c in STRESS_CHANNELS], VALUE_GAIN)
    if name.endswith(".attention.out.weight"):
        t = t.clone()
        t[:, list(STRESS_CHANNELS)] *= OUT_GAIN
        return t
    return t


def _im_start_id(vocab_rows: int) -> int:
    from zimage_lite.synthetic_tokenizer import SPECIAL_TOKENS, THINK_TOKENS

    return vocab_rows - len(SPECIAL_TOKENS) - len(THINK_TOKENS) + SPECIAL_TOKENS.index("<|im_start|>")


def text_fp16_stress(name: str, t: torch.Tensor) -> torch.Tensor:
    """Edit one Qwen3 tensor (transformers names) per the module docstring: embeddings, layer 0's MLP."""
    units = list(STRESS_CHANNELS)
    if name == "embed_tokens.weight":
        t = t.clone()
        t[:, BIAS_CHANNEL] = BIAS_VALUE
        trigger = _im_start_id(t.shape[0])
        t[trigger] = 0.0
        t[trigger, TRIGGER_CHANNEL] = TRIGGER_VALUE
        return t
    if name in ("layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight"):
        t = t.clone()
        t[units] = 0.0
        t[units, TRIGGER_CHANNEL] = TEXT_GAIN
        if "gate" in name:  # silu(G * (x_trigger - 2 x_bias)) ~ 0 for every token but the trigger
            t[units, BIAS_CHANNEL] = -2 * TEXT_GAIN
        return t
    if name == "layers.0.mlp.down_proj.weight":
        t = t.clone()
        t[:, units] = 0.0
        for i, c in enumerate(MASSIVE_CHANNELS):
            t[c, units] = MASSIVE_WEIGHT * (1 - 2 * (i % 2))
        return t
    return t


def stress_edits(stress: str | None) -> tuple[Edit | None, Edit | None]:
    """(transformer edit, text encoder edit) for a `--stress` name; (None, None) for no stress."""
    if stress is None:
        return None, None
    if stress != "fp16":
        raise ValueError(f"unknown stress {stress!r}; choose from {', '.join(STRESSES)}")
    return dit_fp16_stress, text_fp16_stress
