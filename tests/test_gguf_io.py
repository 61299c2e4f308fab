"""GGUF reading and streaming writing, checked against gguf-py (GGUFReader, quants.quantize/dequantize)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from zimage_lite.config import Qwen3Config
from zimage_lite.errors import CheckpointError
from zimage_lite.quant.formats import quantize
from zimage_lite.synthetic_tokenizer import build_synthetic_tokenizer
from zimage_lite.weights.checkpoint import open_checkpoint
from zimage_lite.weights.gguf import GGUFCheckpoint as GGUFSource
from zimage_lite.weights.gguf_qwen3 import qwen3_config_from_gguf, qwen3_gguf_fields
from zimage_lite.weights.gguf_tokenizer import tokenizer_from_gguf, tokenizer_gguf_fields
from zimage_lite.weights.gguf_writer import GGUFStreamWriter

TYPES = ["Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "F32", "F16", "BF16"]
PROMPTS = [
    "A photograph of a red fox sitting in the snow at sunrise.",
    "一只橘猫坐在窗台上，阳光洒在它的毛上。",
    "Mixed: 一只可爱的熊猫 eating bamboo, 4k, 100% & more!  \n\n It's   done",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n<think>",
]


def _weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {f"w.{t}": torch.randn(6, 512, generator=gen) * 0.05 for t in TYPES} | {"norm": torch.rand(512)}


def _encode(w: torch.Tensor, qtype: str) -> torch.Tensor:
    dense = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    return w.to(dense[qtype]) if qtype in dense else quantize(w, qtype)


@pytest.fixture
def written(tmp_path):
    path = tmp_path / "t.gguf"
    weights = _weights()
    plan = {name: (name.split(".")[1] if name.startswith("w.") else "F32") for name in weights}
    writer = GGUFStreamWriter(path, "lumina2", {"general.file_type": ("u32", 7), "x.f": 1.5, "x.s": "hi"})
    for name, qtype in plan.items():
        writer.add(name, tuple(weights[name].shape), qtype)
    writer.begin()
    for name, qtype in plan.items():
        writer.write(name, _encode(weights[name], qtype))
    writer.close()
    return path, weights, plan


def test_gguf_py_reads_what_we_write(written):
    path, weights, plan = written
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "lumina2"
    assert reader.get_field("general.file_type").contents() == 7
    assert reader.get_field("x.s").contents() == "hi"
    by_name = {t.name: t for t in reader.tensors}
    assert list(by_name) == list(plan)
    for name, qtype in plan.items():
        t = by_name[name]
        assert t.tensor_type.name == qtype
        assert tuple(int(d) for d in reversed(t.shape.tolist())) == tuple(weights[name].shape)
        ours = _encode(weights[name], qtype).contiguous().view(torch.uint8).numpy().reshape(-1)
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), ours)


def test_dequantize_bit_identical_to_gguf_py(written):
    path, _, plan = written
    reader = gguf.GGUFReader(path)
    source = GGUFSource(path)
    for t in reader.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        ours = source.get(t.name).to(torch.float32).numpy()
        assert ours.shape == ref.shape
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), t.name


def test_legacy_bytes_equal_gguf_py_quantize():
    w = (torch.randn(8, 1024) * 0.02).numpy()
    for qtype in ("Q8_0", "Q4_0"):
        ref = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
        assert np.array_equal(quantize(torch.from_numpy(w), qtype).numpy(), ref)


def test_get_quant_is_zero_copy_raw_blocks(written):
    path, weights, _ = written
    source = GGUFSource(path)
    qw = source.get_quant("w.Q4_K")
    assert qw.qtype == "Q4_K" and qw.shape == (6, 512) and qw.scale is None
    assert qw.data.dtype == torch.uint8 and tuple(qw.data.shape) == (6, 2 * 144)
    assert torch.equal(qw.data, quantize(weights["w.Q4_K"], "Q4_K"))
    assert source.dtype("w.Q4_K") == torch.float32 and source.dtype("w.BF16") == torch.bfloat16
    with pytest.raises(CheckpointError):
        source.get_quant("norm")


def test_prefix_and_missing_architecture(tmp_path):
    w = torch.randn(4, 64)
    writer = gguf.GGUFWriter(str(tmp_path / "sdcpp.gguf"), arch="")  # no general.architecture
    writer.add_tensor("model.diffusion_model.a.weight", w.numpy())
    writer.add_tensor("first_stage_model.x", w.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source = open_checkpoint(tmp_path / "sdcpp.gguf")
    assert source.architecture is None
    assert source.keys() == ["a.weight"]
    assert torch.equal(source.get("a.weight"), w)
    assert GGUFSource(tmp_path / "sdcpp.gguf", strip_prefix=False).keys() == [
        "model.diffusion_model.a.weight",
        "first_stage_model.x",
    ]


def test_unsupported_type_names_tensor(tmp_path):
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), arch="lumina2")
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL]
    writer.add_tensor(
        "odd.weight", np.zeros((2, 256 // block * size), np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ4_NL
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="odd.weight.*IQ4_NL"):
        open_checkpoint(path)
    assert GGUFSource(path, check_types=False).qtype("odd.weight") == "IQ4_NL"


def test_truncated_and_garbage_files(written, tmp_path):
    path, _, _ = written
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated|unreadable"):
        open_checkpoint(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:40])
    with pytest.raises(CheckpointError):
        open_checkpoint(tmp_path / "head.gguf")
    (tmp_path / "rand.gguf").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        open_checkpoint(tmp_path / "rand.gguf")


def test_writer_refuses_wrong_order_and_size(tmp_path):
    writer = GGUFStreamWriter(tmp_path / "x.gguf", "lumina2", {})
    writer.add("a", (2, 32), "Q8_0")
    writer.add("b", (3,), "F32")
    writer.begin()
    with pytest.raises(RuntimeError, match="expected a"):
        writer.write("b", torch.zeros(3))
    with pytest.raises(RuntimeError, match="bytes"):
        writer.write("a", torch.zeros(2, 32))
    writer.abort()


def _tokenizer_gguf(tmp_path, vocab: int = 520):
    tok = build_synthetic_tokenizer(512)
    config = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_theta=5e5, rms_norm_eps=1e-5)  # fmt: skip
    meta = {**qwen3_gguf_fields(config), **tokenizer_gguf_fields(tok, vocab, {"chat_template": "{{x}}"})}
    path = tmp_path / "te.gguf"
    writer = GGUFStreamWriter(path, "qwen3", meta)
    writer.add("token_embd.weight", (vocab, 32), "F32")
    writer.begin()
    writer.write("token_embd.weight", torch.zeros(vocab, 32))
    writer.close()
    return path, tok, config


def test_tokenizer_round_trip(tmp_path):
    path, tok, _ = _tokenizer_gguf(tmp_path)
    reader = gguf.GGUFReader(path)
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert reader.get_field("tokenizer.ggml.pre").contents() == "qwen2"
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    assert len(tokens) == 520 and tokens[515] == "[PAD515]" and types[515] == 5
    assert types[tok.token_to_id("<|im_end|>")] == 3 and types[tok.token_to_id("<think>")] == 4
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == tok.token_to_id("<|im_end|>")
    assert reader.get_field("tokenizer.ggml.padding_token_id").contents() == tok.token_to_id("<|endoftext|>")
    assert reader.get_field("tokenizer.chat_template").contents() == "{{x}}"
    rebuilt = GGUFSource(path).tokenizer()
    for prompt in PROMPTS:
        assert rebuilt.encode(prompt).ids == tok.encode(prompt).ids, prompt
        ids = tok.encode(prompt).ids
        assert rebuilt.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False)
    assert tokenizer_from_gguf(GGUFSource(path).metadata).encode(PROMPTS[1]).ids == tok.encode(PROMPTS[1]).ids


def test_qwen3_config_from_gguf(tmp_path):
    path, _, config = _tokenizer_gguf(tmp_path)
    assert qwen3_config_from_gguf(GGUFSource(path)) == config
    with pytest.raises(CheckpointError, match="qwen3"):
        qwen3_config_from_gguf({"general.architecture": "llama"})
