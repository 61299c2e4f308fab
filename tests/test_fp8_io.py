"""ComfyUI FP8 safetensors: the three variants read to the same weights; our writer's files read back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zimage_lite.errors import CheckpointError
from zimage_lite.weights.checkpoint import open_checkpoint
from zimage_lite.weights.fp8 import comfy_quant_marker
from zimage_lite.weights.safetensors import SafetensorsCheckpoint
from zimage_lite.weights.safetensors_writer import SafetensorsStreamWriter

SCALE = 0.5  # a power of two: q * SCALE is exact in e4m3, so a plain cast can hold the same weights


def _fp8_weights() -> dict[str, torch.Tensor]:
    """q values in [2^-4, 224] (normal e4m3 numbers, so q * 0.5 is exact) with random signs."""
    gen = torch.Generator().manual_seed(3)
    mag = torch.exp2(torch.rand(48, 64, generator=gen) * 11.8 - 4)
    sign = torch.where(torch.rand(48, 64, generator=gen) < 0.5, -1.0, 1.0)
    q = (mag * sign).to(torch.float8_e4m3fn)
    return {"layers.0.attention.qkv.weight": q, "layers.0.feed_forward.w1.weight": q[:32].clone()}


def _variants(tmp_path) -> dict[str, object]:
    fp8 = _fp8_weights()
    norm = torch.rand(64)
    files = {}
    base = {"layers.0.attention_norm1.weight": norm}
    comfy = dict(base)
    scaled = dict(base)
    plain = dict(base)
    for name, q in fp8.items():
        layer = name.removesuffix(".weight")
        comfy |= {
            name: q,
            f"{layer}.weight_scale": torch.tensor(SCALE),
            f"{layer}.comfy_quant": comfy_quant_marker(),
        }
        scaled |= {name: q, f"{layer}.scale_weight": torch.tensor([SCALE])}
        plain[name] = (q.to(torch.float32) * SCALE).to(torch.float8_e4m3fn)
    scaled["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    for variant, tensors in (("comfy_quant", comfy), ("scaled_fp8", scaled), ("plain", plain)):
        save_file(tensors, str(tmp_path / f"{variant}.safetensors"))
        files[variant] = tmp_path / f"{variant}.safetensors"
    bf16 = {
        k: (v.to(torch.float32) * SCALE if v.dtype == torch.float8_e4m3fn else v) for k, v in comfy.items()
    }
    return files, {k: v for k, v in bf16.items() if k in base or k in fp8}


def test_three_variants_load_the_same_weights(tmp_path):
    files, expected = _variants(tmp_path)
    for variant, path in files.items():
        source = open_checkpoint(path)
        assert isinstance(source, SafetensorsCheckpoint)
        assert source.fp8_variant == variant
        assert sorted(source.keys()) == sorted(expected), variant  # scales and markers hidden
        for name, want in expected.items():
            got = source.get(name)
            assert got.dtype == torch.float32 or name.endswith("norm1.weight")
            assert torch.equal(got.to(torch.float32), want.to(torch.float32)), (variant, name)
        qw = source.get_quant("layers.0.attention.qkv.weight")
        assert qw.qtype == "FP8_E4M3" and qw.shape == (48, 64) and qw.data.dtype == torch.float8_e4m3fn
        want_scale = None if variant == "plain" else SCALE
        assert (qw.scale is None) == (want_scale is None)
        assert source.qtype("layers.0.attention.qkv.weight") == "FP8_E4M3"
        assert source.qtype("layers.0.attention_norm1.weight") == "F32"


def test_other_comfy_quant_formats_are_refused(tmp_path):
    marker = torch.tensor(list(json.dumps({"format": "int8_tensorwise"}).encode()), dtype=torch.uint8)
    save_file(
        {
            "a.weight": torch.zeros(4, 4, dtype=torch.int8),
            "a.weight_scale": torch.tensor(1.0),
            "a.comfy_quant": marker,
        },
        str(tmp_path / "int8.safetensors"),
    )
    with pytest.raises(CheckpointError, match="layer a .*int8_tensorwise"):
        open_checkpoint(tmp_path / "int8.safetensors")


def test_stream_writer_output_reads_with_safetensors(tmp_path):
    tensors = {
        "b.weight": torch.randn(3, 5).to(torch.float8_e4m3fn),
        "u.comfy_quant": comfy_quant_marker(),
        "a.bias": torch.randn(7),
        "c": torch.randn(2, 2).to(torch.bfloat16),
        "s": torch.tensor(0.25),
    }
    writer = SafetensorsStreamWriter(tmp_path / "w.safetensors", {"k": "v"})
    for name, t in tensors.items():
        writer.add(name, tuple(t.shape), t.dtype)
    writer.begin()
    for name in reversed(list(tensors)):  # any order: each tensor lands at its reserved offset
        writer.write(name, tensors[name])
    writer.close()
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.metadata() == {"k": "v"}
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and torch.equal(
                got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)
            ), name


def test_stream_writer_refuses_incomplete_file(tmp_path):
    writer = SafetensorsStreamWriter(tmp_path / "w.safetensors")
    writer.add("a", (2,), torch.float32)
    writer.begin()
    with pytest.raises(RuntimeError, match="before writing a"):
        writer.close()
