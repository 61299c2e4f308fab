"""The `Checkpoint` protocol: both readers implement it, and opening a file reads its header once."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from safetensors.torch import save_file

import zimage_lite.weights.safetensors as st
from zimage_lite.errors import CheckpointError
from zimage_lite.weights.checkpoint import Checkpoint, detect, open_checkpoint
from zimage_lite.weights.fp8 import comfy_quant_marker
from zimage_lite.weights.gguf_writer import GGUFStreamWriter

TENSORS = {"x_pad_token": torch.randn(1, 8), "cap_pad_token": torch.randn(1, 8)}


def _gguf(path, prefix: str = "") -> None:
    writer = GGUFStreamWriter(path, "lumina2", {})
    for name, t in TENSORS.items():
        writer.add(prefix + name, tuple(t.shape), "F32")
    writer.begin()
    for name, t in TENSORS.items():
        writer.write(prefix + name, t)
    writer.close()


def test_both_readers_are_checkpoints(tmp_path):
    save_file(TENSORS, str(tmp_path / "t.safetensors"))
    _gguf(tmp_path / "t.gguf")
    for name, fmt in (("t.safetensors", "safetensors"), ("t.gguf", "gguf")):
        source = open_checkpoint(tmp_path / name)
        assert isinstance(source, Checkpoint)
        assert source.format == fmt and source.fp8_variant is None and source.tokenizer() is None
        assert sorted(source.keys()) == sorted(TENSORS)
        for key, want in TENSORS.items():
            assert source.shape(key) == tuple(want.shape) and source.qtype(key) == "F32"
            assert torch.equal(source.get(key), want) and torch.equal(source.get_view(key), want)


def test_stored_names_keep_the_prefix(tmp_path):
    _gguf(tmp_path / "p.gguf", "model.diffusion_model.")
    source = open_checkpoint(tmp_path / "p.gguf")
    assert source.keys() == list(TENSORS)
    assert source.stored_name("x_pad_token") == "model.diffusion_model.x_pad_token"
    assert detect(tmp_path / "p.gguf").prefix == "model.diffusion_model."


def test_fp8_companions_are_hidden_but_readable(tmp_path):
    q = torch.randn(4, 8).to(torch.float8_e4m3fn)
    save_file(
        {"a.weight": q, "a.weight_scale": torch.tensor(0.5), "a.comfy_quant": comfy_quant_marker()},
        str(tmp_path / "f.safetensors"),
        metadata={"note": "kept"},
    )
    source = open_checkpoint(tmp_path / "f.safetensors")
    assert source.format == "safetensors-fp8" and source.fp8_variant == "comfy_quant"
    assert source.keys() == ["a.weight"] and source.field("note") == "kept"
    assert torch.equal(source.get("a.weight"), q.to(torch.float32) * 0.5)
    assert source.view("a.weight_scale").item() == 0.5  # the companions stay readable by name


def test_each_header_is_read_once(tmp_path, monkeypatch):
    save_file(TENSORS, str(tmp_path / "t.safetensors"))
    _gguf(tmp_path / "t.gguf")
    reads = []
    real_header, real_init = st._read_header, gguf.GGUFReader.__init__
    monkeypatch.setattr(st, "_read_header", lambda path: reads.append(path) or real_header(path))
    # __init__ parses the header, whichever subclass of the reader runs it (weights/gguf.py has one)
    monkeypatch.setattr(
        gguf.GGUFReader,
        "__init__",
        lambda self, path, *a, **k: reads.append(path) or real_init(self, path, *a, **k),
    )
    for name in ("t.safetensors", "t.gguf"):
        reads.clear()
        detect(tmp_path / name)
        assert reads == [tmp_path / name]


def test_a_header_that_misstates_a_size_is_refused(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(CheckpointError, match="tensor a holds 12 bytes"):
        open_checkpoint(tmp_path / "bad.safetensors")
