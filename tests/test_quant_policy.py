"""The storage-type policy: every rule is hit, presets map roles as documented, fallbacks apply."""

from __future__ import annotations

import pytest

from zimage_lite.errors import UsageError
from zimage_lite.quant.formats import QUANT_TYPES
from zimage_lite.quant.policy import PRESETS, SMALL_RULE, choose_qtype, describe_policy, role_of

D, FFN = 3840, 10240

# real Z-Image-Turbo tensors (ComfyUI names) -> expected type per preset
TRANSFORMER = {
    "layers.0.attention.qkv.weight": (3 * D, D),
    "layers.0.attention.out.weight": (D, D),
    "layers.0.feed_forward.w1.weight": (FFN, D),
    "layers.0.feed_forward.w2.weight": (D, FFN),
    "layers.0.adaLN_modulation.0.weight": (4 * D, 256),
    "noise_refiner.1.adaLN_modulation.0.weight": (4 * D, 256),
    "x_embedder.weight": (D, 64),
    "t_embedder.mlp.0.weight": (1024, 256),
    "cap_embedder.1.weight": (D, 2560),
    "final_layer.linear.weight": (64, D),
    "final_layer.adaLN_modulation.1.weight": (D, 256),
    "x_pad_token": (1, D),
    "cap_pad_token": (1, D),
    "layers.0.attention_norm1.weight": (D,),
    "layers.0.attention.q_norm.weight": (128,),
    "cap_embedder.0.weight": (2560,),
    "layers.0.adaLN_modulation.0.bias": (4 * D,),
}


def test_transformer_q4_k_m():
    got = {name: choose_qtype(name, shape, "q4_k_m") for name, shape in TRANSFORMER.items()}
    assert got == {
        "layers.0.attention.qkv.weight": "Q5_K",
        "layers.0.attention.out.weight": "Q4_K",
        "layers.0.feed_forward.w1.weight": "Q4_K",
        "layers.0.feed_forward.w2.weight": "Q5_K",
        "layers.0.adaLN_modulation.0.weight": "Q4_K",
        "noise_refiner.1.adaLN_modulation.0.weight": "Q4_K",
        "x_embedder.weight": "BF16",
        "t_embedder.mlp.0.weight": "BF16",
        "cap_embedder.1.weight": "BF16",
        "final_layer.linear.weight": "BF16",
        "final_layer.adaLN_modulation.1.weight": "BF16",
        "x_pad_token": "BF16",
        "cap_pad_token": "BF16",
        "layers.0.attention_norm1.weight": "F32",
        "layers.0.attention.q_norm.weight": "F32",
        "cap_embedder.0.weight": "F32",
        "layers.0.adaLN_modulation.0.bias": "F32",
    }


def test_transformer_fp8_keeps_modulation():
    assert choose_qtype("layers.3.adaLN_modulation.0.weight", (4 * D, 256), "fp8") == "BF16"
    assert choose_qtype("layers.3.attention.qkv.weight", (3 * D, D), "fp8") == "FP8_E4M3"
    assert choose_qtype("layers.3.feed_forward.w2.weight", (D, FFN), "fp8") == "FP8_E4M3"
    assert choose_qtype("x_embedder.weight", (D, 64), "fp8") == "BF16"
    assert choose_qtype("layers.3.attention_norm2.weight", (D,), "fp8") == "F32"


@pytest.mark.parametrize(
    "preset, base, bumped",
    [
        ("bf16", "BF16", "BF16"),
        ("q8_0", "Q8_0", "Q8_0"),
        ("q6_k", "Q6_K", "Q6_K"),
        ("q5_k", "Q5_K", "Q5_K"),
        ("q4_k", "Q4_K", "Q4_K"),
        ("q4_0", "Q4_0", "Q4_0"),
        ("q5_k_m", "Q5_K", "Q6_K"),
    ],
)
def test_presets_base_and_bumped(preset, base, bumped):
    assert choose_qtype("layers.7.attention.out.weight", (D, D), preset) == base
    assert choose_qtype("layers.7.adaLN_modulation.0.weight", (4 * D, 256), preset) == base
    assert choose_qtype("layers.7.attention.qkv.weight", (3 * D, D), preset) == bumped
    assert choose_qtype("final_layer.linear.weight", (64, D), preset) == "BF16"


def test_prefixed_comfyui_names_match():
    name = "model.diffusion_model.layers.0.feed_forward.w2.weight"
    assert choose_qtype(name, (D, FFN), "q4_k_m") == "Q5_K"
    assert choose_qtype("model.diffusion_model.x_pad_token", (1, D), "q4_k") == "BF16"
    assert choose_qtype("model.diffusion_model.t_embedder.mlp.2.weight", (D, 1024), "q4_k") == "BF16"


def test_small_tensors_stay_f32():
    assert choose_qtype("layers.0.attention.out.weight", (32, 32), "q4_k") == "F32"  # 1024 elements
    assert choose_qtype("layers.0.attention.out.weight", (32, 64), "q8_0") == "Q8_0"


def test_block_fallbacks():
    # rows of 96: not a multiple of 256, a multiple of 32
    assert choose_qtype("layers.0.attention.out.weight", (64, 96), "q6_k") == "Q8_0"
    assert choose_qtype("layers.0.attention.out.weight", (64, 96), "q5_k") == "Q8_0"
    assert choose_qtype("layers.0.attention.out.weight", (64, 96), "q4_k") == "Q4_0"
    assert choose_qtype("layers.0.feed_forward.w2.weight", (64, 96), "q4_k_m") == "Q8_0"
    # rows of 100: no block fits
    for preset in ["q8_0", "q6_k", "q4_k", "q4_0", "q4_k_m"]:
        assert choose_qtype("layers.0.attention.out.weight", (64, 100), preset) == "BF16"
    assert choose_qtype("layers.0.attention.out.weight", (64, 100), "fp8") == "FP8_E4M3"


def test_every_chosen_type_fits_its_row():
    for preset in PRESETS:
        for name, shape in TRANSFORMER.items():
            qtype = choose_qtype(name, shape, preset)
            if qtype in QUANT_TYPES:
                assert shape[-1] % QUANT_TYPES[qtype].block_size == 0


def test_text_encoder():
    def te(name, shape, preset):
        return choose_qtype(name, shape, preset, component="text_encoder")

    assert te("embed_tokens.weight", (151936, 2560), "q4_k_m") == "Q6_K"
    assert te("model.embed_tokens.weight", (151936, 2560), "q8_0") == "Q8_0"
    assert te("embed_tokens.weight", (151936, 2560), "fp8") == "BF16"
    assert te("layers.3.self_attn.q_proj.weight", (4096, 2560), "q4_k_m") == "Q4_K"
    assert te("layers.3.self_attn.v_proj.weight", (1024, 2560), "q4_k_m") == "Q5_K"
    assert te("layers.3.mlp.down_proj.weight", (2560, 9728), "q5_k_m") == "Q6_K"
    assert te("layers.3.mlp.gate_proj.weight", (9728, 2560), "q4_0") == "Q4_0"
    assert te("layers.3.self_attn.q_norm.weight", (128,), "q4_k") == "F32"
    assert te("norm.weight", (2560,), "q4_k") == "F32"


def test_describe_policy_rows_and_every_rule_reachable():
    rows = describe_policy("q4_k_m")
    assert rows[0] == (SMALL_RULE, "F32")
    assert ("\\.attention\\.qkv\\.weight$", "Q5_K") in rows
    assert rows[-1] == ("<anything else>", "Q4_K")
    assert describe_policy("fp8")[3] == ("\\.adaLN_modulation\\.", "BF16")
    roles = {role_of(name) for name in TRANSFORMER}
    assert roles == {"keep", "modulation", "bumped", "base"}
    te = describe_policy("q4_k", component="text_encoder")
    assert te[1][1] == "Q6_K"


def test_unknown_preset_or_component():
    with pytest.raises(UsageError):
        choose_qtype("x", (256, 256), "q1_k")
    with pytest.raises(UsageError):
        choose_qtype("x", (256, 256), "q4_k", component="vae")
