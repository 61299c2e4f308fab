"""Which storage type each tensor gets, per preset: the policy is data (rule tables), read in order.

A tensor's type is decided in three steps:
1. shape: 1-D tensors and tensors of <= 1024 elements stay F32 (norms, biases, small tables), as
   ComfyUI-GGUF and llama.cpp do;
2. name: the first rule whose regex is found in the name gives the tensor a *role*; the preset maps
   roles to types (PRESETS);
3. block fit: a block type whose block does not divide the row length falls back (FALLBACK) to the
   32-element type of about the same size (Q6_K/Q5_K -> Q8_0, Q4_K -> Q4_0), else to BF16.

Roles:
- "keep": kept in high precision (BF16): the embedders, the final layer and the pad tokens, which every
  Z-Image GGUF leaves unquantized and which are a negligible share of the weights;
- "modulation": adaLN_modulation linears. Quantized like "base" in GGUF presets, but BF16 for fp8:
  FP8 on the modulation wrecks Z-Image (DESIGN.md §3);
- "bumped": one type higher in the mixed presets. llama.cpp's Q4_K_M/Q5_K_M recipe stores a fused
  attn_qkv as Q5_K/Q6_K, and gives ffn_down and attn_v Q6_K in 3/8 of the layers (its use_more_bits);
  we bump attention.qkv and feed_forward.w2 (text encoder: v_proj, down_proj) in every layer instead,
  one step (Q4_K -> Q5_K, Q5_K -> Q6_K): about the same bit budget, independent of the layer index;
- "embedding": the text encoder's token table. Qwen3-4B ties it to the output head, so llama.cpp treats
  it as `output` and stores Q6_K in every K or Q4_0 preset (Q8_0 in q8_0). We follow that; it stays on
  the CPU at run time anyway;
- "base": everything else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from zimage_lite.errors import UsageError
from zimage_lite.quant.formats import QUANT_TYPES

SMALL_TENSOR_ELEMENTS = 1024
SMALL_RULE = "<1-D or <= 1024 elements>"


@dataclass(frozen=True)
class Rule:
    pattern: str  # regex, searched in the tensor name (so `model.diffusion_model.` prefixes still match)
    role: str


TRANSFORMER_RULES: tuple[Rule, ...] = (
    Rule(r"(^|\.)(x_pad_token|cap_pad_token)$", "keep"),
    Rule(r"(^|\.)(x_embedder|t_embedder|cap_embedder|final_layer)\.", "keep"),
    Rule(r"\.adaLN_modulation\.", "modulation"),
    Rule(r"\.attention\.qkv\.weight$", "bumped"),
    Rule(r"\.feed_forward\.w2\.weight$", "bumped"),
    Rule(r"", "base"),
)

TEXT_ENCODER_RULES: tuple[Rule, ...] = (
    Rule(r"(^|\.)(embed_tokens|lm_head)\.weight$", "embedding"),
    Rule(r"\.self_attn\.v_proj\.weight$", "bumped"),
    Rule(r"\.mlp\.down_proj\.weight$", "bumped"),
    Rule(r"", "base"),
)

# The ControlNet's blocks are DiT blocks: the same roles. Its embedder stays BF16 like the DiT's; the
# before_proj / after_proj linears (3840 x 3840 each: BF16 would add 0.5 GB to a 2.1 file) write the
# hints directly, so they get the "bumped" type, one step above the blocks'.
CONTROLNET_RULES: tuple[Rule, ...] = (
    Rule(r"(^|\.)control_x_embedder\.", "keep"),
    Rule(r"\.(before_proj|after_proj)\.weight$", "bumped"),
    *TRANSFORMER_RULES[2:],
)

RULES: dict[str, tuple[Rule, ...]] = {
    "transformer": TRANSFORMER_RULES,
    "text_encoder": TEXT_ENCODER_RULES,
    "controlnet": CONTROLNET_RULES,
}


def _preset(base: str, bumped: str | None = None, modulation: str | None = None, embedding: str = "Q6_K"):
    return {
        "base": base,
        "bumped": bumped or base,
        "modulation": modulation or base,
        "keep": "BF16",
        "embedding": embedding,
    }


# preset -> role -> storage type
PRESETS: dict[str, dict[str, str]] = {
    "bf16": _preset("BF16", embedding="BF16"),
    "q8_0": _preset("Q8_0", embedding="Q8_0"),
    "q6_k": _preset("Q6_K"),
    "q5_k": _preset("Q5_K"),
    "q4_k": _preset("Q4_K"),
    "q4_0": _preset("Q4_0"),
    "fp8": _preset("FP8_E4M3", modulation="BF16", embedding="BF16"),
    "q4_k_m": _preset("Q4_K", bumped="Q5_K"),
    "q5_k_m": _preset("Q5_K", bumped="Q6_K"),
}

# A block type that does not divide the row length -> the next choice (then BF16).
FALLBACK: dict[str, str] = {"Q6_K": "Q8_0", "Q5_K": "Q8_0", "Q4_K": "Q4_0", "Q8_0": "BF16", "Q4_0": "BF16"}


def _rules(component: str) -> tuple[Rule, ...]:
    try:
        return RULES[component]
    except KeyError:
        raise UsageError(f"unknown component {component!r} (known: {', '.join(RULES)})") from None


def _roles(preset: str) -> dict[str, str]:
    try:
        return PRESETS[preset]
    except KeyError:
        raise UsageError(f"unknown quantization preset {preset!r} (known: {', '.join(PRESETS)})") from None


def role_of(name: str, component: str = "transformer") -> str:
    return next(rule.role for rule in _rules(component) if re.search(rule.pattern, name))


def fit_to_row(qtype: str, row_length: int) -> str:
    """qtype, or its fallback chain's first type whose block divides row_length."""
    while qtype in QUANT_TYPES and row_length % QUANT_TYPES[qtype].block_size:
        qtype = FALLBACK[qtype]
    return qtype


def choose_qtype(name: str, shape: tuple[int, ...], preset: str, component: str = "transformer") -> str:
    """Storage type for one tensor: a QUANT_TYPES name, "FP8_E4M3", or "F32"/"BF16" (kept)."""
    roles = _roles(preset)
    numel = 1
    for s in shape:
        numel *= s
    if len(shape) <= 1 or numel <= SMALL_TENSOR_ELEMENTS:
        return "F32"
    return fit_to_row(roles[role_of(name, component)], shape[-1])


def describe_policy(preset: str, component: str = "transformer") -> list[tuple[str, str]]:
    """(pattern, type) rows in the order they apply, for a README table. Block fallbacks not shown."""
    roles = _roles(preset)
    rows = [(SMALL_RULE, "F32")]
    rows += [(rule.pattern or "<anything else>", roles[rule.role]) for rule in _rules(component)]
    return rows
