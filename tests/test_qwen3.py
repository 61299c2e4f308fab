"""Qwen3 text encoder against transformers' Qwen3Model (hidden_states[-2]) and diffusers' ZImagePipeline.

Tiny random models (hidden 64, 4 layers, 4 q heads / 2 kv heads of 16) with non-trivial weights:
linears ~ N(0, 1/fan_in) so every layer changes the residual stream, norms 1 + 0.3 N(0, 1).
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import gguf
import pytest
import torch
import transformers
from safetensors.torch import save_file

from zimage_lite.errors import CheckpointError
from zimage_lite.models.qwen3 import Qwen3Encoder, infer_qwen3_config
from zimage_lite.synthetic_tokenizer import write_synthetic_tokenizer
from zimage_lite.text import PromptTokenizer
from zimage_lite.weights.loaders import load_text_encoder
from zimage_lite.weights.names_qwen3 import gguf_to_hf_name, hf_to_gguf_name, strip_model_prefix

LAYERS = 4
PROMPTS = ["A red fox in the snow at sunrise, soft light.", "一只橘猫 on a windowsill"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (the reference)."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def tiny_hf_model(vocab_size: int, rope_theta: float = 1e6):
    config = transformers.Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=rope_theta,
        rms_norm_eps=1e-6,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # RMSNorm weights
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_synthetic_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def hf(tok_dir):
    torch.manual_seed(1)
    return tiny_hf_model(PromptTokenizer.from_file(tok_dir).vocab_size)


@pytest.fixture(scope="module")
def checkpoints(hf, tmp_path_factory):
    """The same weights as a sharded Qwen3ForCausalLM folder (`model.` keys), a Qwen3Model folder (bare
    keys) and a ComfyUI-style single file (`model.` keys plus lm_head, no config)."""
    root = tmp_path_factory.mktemp("qwen3")
    hf.save_pretrained(root / "causal_lm", max_shard_size="100KB")  # several shards + index json
    hf.model.save_pretrained(root / "base_model")
    state = {f"model.{k}": v.contiguous() for k, v in hf.model.state_dict().items()}
    state["lm_head.weight"] = hf.lm_head.weight.detach().clone()
    save_file(state, root / "qwen_3_4b.safetensors")
    return {
        "causal_lm": root / "causal_lm",
        "base_model": root / "base_model",
        "comfy": root / "qwen_3_4b.safetensors",
    }


@pytest.fixture(scope="module")
def token_ids(tok_dir):
    return PromptTokenizer.from_file(tok_dir).encode(PROMPTS)


def reference_hidden(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        out = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[-2]


def padded_batch(token_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    seq = max(map(len, token_ids))
    ids = torch.full((len(token_ids), seq), pad_id, dtype=torch.long)
    mask = torch.zeros(len(token_ids), seq, dtype=torch.bool)
    for i, row in enumerate(token_ids):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    return ids, mask


@pytest.mark.parametrize("kind", ["causal_lm", "base_model", "comfy"])
def test_float32_matches_transformers_batch_of_one(hf, checkpoints, token_ids, kind):
    enc = load_text_encoder(checkpoints[kind], torch.float32, "cpu")
    assert enc.config.num_hidden_layers == LAYERS and len(enc.layers) == LAYERS - 1
    ids = torch.tensor([token_ids[0]])
    with torch.no_grad():
        ours = enc(ids)
    assert rel_err(ours, reference_hidden(hf, ids)) <= 1e-5


def test_float32_right_padded_batch_matches_on_real_tokens(hf, checkpoints, token_ids, tok_dir):
    assert len(token_ids[0]) != len(token_ids[1])  # so one row is padded
    ids, mask = padded_batch(token_ids, PromptTokenizer.from_file(tok_dir).pad_token_id)
    enc = load_text_encoder(checkpoints["causal_lm"], torch.float32, "cpu")
    with torch.no_grad():
        ours = enc(ids, mask)
        alone = [enc(torch.tensor([row]))[0] for row in token_ids]
    ref = reference_hidden(hf, ids, mask)
    assert torch.isfinite(ours).all()
    for i, row in enumerate(token_ids):
        n = len(row)
        assert rel_err(ours[i, :n], ref[i, :n]) <= 1e-5
        assert rel_err(ours[i, :n], alone[i]) <= 1e-5  # padding does not reach real tokens


def test_bfloat16_as_close_to_float32_as_transformers(hf, checkpoints, token_ids):
    """bf16 keeps 8 mantissa bits (rounding ~2e-3 per op); over 3 layers the reference itself drifts
    ~1-2% (of max |h|) from float32 on this model. Kernels differ in accumulation order, so we ask:
    ours within 3e-2 of transformers-bf16, and no further from float32 than it is (+25%, +2e-3)."""
    ids = torch.tensor([token_ids[0]])
    ref32 = reference_hidden(hf, ids)
    hf16 = transformers.Qwen3ForCausalLM(hf.config).to(torch.bfloat16).eval()
    hf16.load_state_dict(hf.state_dict())
    ref16 = reference_hidden(hf16, ids)
    enc = load_text_encoder(checkpoints["comfy"], torch.bfloat16, "cpu")
    assert enc.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        ours = enc(ids)
    assert ours.dtype == torch.bfloat16
    assert rel_err(ours, ref16) <= 3e-2
    assert rel_err(ours, ref32) <= 1.25 * rel_err(ref16, ref32) + 2e-3


def test_rope_theta_is_read_from_config(tok_dir, tmp_path):
    torch.manual_seed(2)
    hf = tiny_hf_model(PromptTokenizer.from_file(tok_dir).vocab_size, rope_theta=100.0)
    hf.save_pretrained(tmp_path)
    enc = load_text_encoder(tmp_path, torch.float32, "cpu")
    assert enc.config.rope_theta == 100.0
    ids = torch.randint(0, hf.config.vocab_size, (1, 40))
    with torch.no_grad():
        assert rel_err(enc(ids), reference_hidden(hf, ids)) <= 1e-5


def test_matches_diffusers_zimage_encode_prompt(hf, tok_dir, checkpoints):
    """Tokenizer + encoder against diffusers' own prompt encoding (chat template, 512-token padding,
    mask, hidden_states[-2], real tokens only)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
    pipe = diffusers.ZImagePipeline(
        scheduler=None, vae=None, text_encoder=hf.model, tokenizer=tokenizer, transformer=None
    )
    with torch.no_grad():
        expected = pipe._encode_prompt(list(PROMPTS), device=torch.device("cpu"))
    prompt_tok = PromptTokenizer.from_file(tok_dir)
    enc = load_text_encoder(checkpoints["base_model"], torch.float32, "cpu")
    for prompt, ids, want in zip(PROMPTS, prompt_tok.encode(PROMPTS), expected):
        with torch.no_grad():
            got = enc(torch.tensor([ids]))[0]
        assert got.shape == want.shape, prompt
        assert rel_err(got, want) <= 1e-5, prompt


def test_parameter_names_are_transformers_names_minus_unused(hf, checkpoints):
    enc = load_text_encoder(checkpoints["base_model"], torch.float32, "cpu")
    expected = {
        k for k in hf.model.state_dict() if k != "norm.weight" and not k.startswith(f"layers.{LAYERS - 1}.")
    }
    assert set(enc.state_dict()) == expected
    assert list(enc.buffers()) == []


def test_shape_inference_of_single_file(checkpoints, hf):
    enc = load_text_encoder(checkpoints["comfy"], torch.float32, "cpu")
    c, h = enc.config, hf.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.head_dim) == (
        h.vocab_size,
        h.hidden_size,
        h.intermediate_size,
        h.head_dim,
    )
    assert (c.num_attention_heads, c.num_key_value_heads) == (4, 2)


def test_missing_tensor_is_named(checkpoints, tmp_path):
    from safetensors.torch import load_file

    state = load_file(checkpoints["comfy"])
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors: layers\.1\.mlp\.up_proj\.weight"):
        load_text_encoder(tmp_path / "broken.safetensors", torch.float32, "cpu")


def test_stray_tensor_is_named(checkpoints, tmp_path):
    from safetensors.torch import load_file

    state = load_file(checkpoints["comfy"])
    state["model.visual.proj.weight"] = torch.zeros(2, 2)
    save_file(state, tmp_path / "stray.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensors: visual\.proj\.weight"):
        load_text_encoder(tmp_path / "stray.safetensors", torch.float32, "cpu")


def test_not_a_text_encoder(tmp_path):
    save_file({"x_pad_token": torch.zeros(1, 8)}, tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match="not a Qwen3 text encoder"):
        load_text_encoder(tmp_path / "dit.safetensors", torch.float32, "cpu")


def test_gguf_names_match_gguf_py(hf):
    """Our HF -> llama.cpp names equal gguf-py's own tensor map for MODEL_ARCH.QWEN3, and invert."""
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, LAYERS)
    names = list(hf.state_dict())  # model.-prefixed, plus lm_head.weight
    assert "lm_head.weight" in names and "model.norm.weight" in names
    for name in names:
        expected = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert expected is not None, name
        assert hf_to_gguf_name(name) == expected, name
        assert gguf_to_hf_name(expected) == name.removeprefix("model.")
    with pytest.raises(CheckpointError):
        hf_to_gguf_name("layers.0.self_attn.rotary_emb.inv_freq")
    with pytest.raises(CheckpointError):
        gguf_to_hf_name("blk.0.attn_qkv.weight")


def test_strip_model_prefix():
    assert strip_model_prefix(["model.embed_tokens.weight", "lm_head.weight"]) == {
        "embed_tokens.weight": "model.embed_tokens.weight",
        "lm_head.weight": "lm_head.weight",
    }
    with pytest.raises(CheckpointError, match="both"):
        strip_model_prefix(["model.norm.weight", "norm.weight"])


def test_fully_padded_row_gives_no_nan():
    from zimage_lite.config import Qwen3Config

    cfg = Qwen3Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)  # fmt: skip
    enc = Qwen3Encoder(cfg).eval()
    ids = torch.randint(0, 32, (2, 5))
    mask = torch.tensor([[True] * 5, [False] * 5])
    with torch.no_grad():
        out = enc(ids, mask)
        alone = enc(ids[:1])
    assert torch.isfinite(out).all()
    assert rel_err(out[0], alone[0]) <= 1e-6


def test_real_config_builds_35_layers_with_checkpoint_shapes():
    from zimage_lite.config import Qwen3Config
    from zimage_lite.weights.load import build_meta

    ref = Path(__file__).parent / "data" / "reference-configs" / "text_encoder.json"  # see data/README.md
    cfg = Qwen3Config.from_json(ref)
    enc = build_meta(lambda: Qwen3Encoder(cfg))
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert len(enc.layers) == 35 and "layers.35.mlp.up_proj.weight" not in shapes
    assert shapes["embed_tokens.weight"] == (151936, 2560)
    assert shapes["layers.34.self_attn.q_proj.weight"] == (4096, 2560)
    assert shapes["layers.34.self_attn.k_proj.weight"] == (1024, 2560)
    assert shapes["layers.34.self_attn.q_norm.weight"] == (128,)
    assert shapes["layers.34.mlp.down_proj.weight"] == (2560, 9728)
    # Shape inference on a full 36-layer file (it still has the last layer) gives the same config.
    full = dict(
        shapes, **{k.replace("layers.34.", "layers.35."): v for k, v in shapes.items() if "layers.34." in k}
    )
    assert infer_qwen3_config(full) == cfg


@pytest.mark.gpu
def test_bfloat16_on_cuda_matches_transformers(hf, checkpoints, token_ids):
    ids = torch.tensor([token_ids[0]])
    ref32 = reference_hidden(hf, ids)
    hf16 = transformers.Qwen3ForCausalLM(hf.config).eval()
    hf16.load_state_dict(hf.state_dict())
    hf16 = hf16.to("cuda", torch.bfloat16)
    ref16 = reference_hidden(hf16, ids.cuda()).cpu()
    enc = load_text_encoder(checkpoints["causal_lm"], torch.bfloat16, "cuda")
    with torch.no_grad():
        ours = enc(ids.cuda()).cpu()
    assert rel_err(ours, ref16) <= 3e-2
    assert rel_err(ours, ref32) <= 1.25 * rel_err(ref16, ref32) + 2e-3
