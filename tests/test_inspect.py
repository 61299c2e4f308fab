"""`inspect`: format, detected component, types and sizes, per-block bytes, metadata; foreign files named."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from safetensors.torch import save_file

from zimage_lite.convert.converter import convert
from zimage_lite.errors import CheckpointError
from zimage_lite.inspect import format_report, inspect_path
from zimage_lite.quant.formats import pick_quantizer, quantizer_version
from zimage_lite.synthetic import write_synthetic_model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    model = write_synthetic_model(root / "model", "tiny", 0)
    convert(model, root / "q8", "q8_0", progress=False)
    convert(model / "transformer", root / "t.safetensors", "fp8", progress=False)
    return root


def test_model_folder_report(converted):
    report = inspect_path(converted / "q8")
    assert report["format"] == "zimage-lite" and report["quant"] == "q8_0" and report["component"] == "model"
    dit = report["components"]["transformer"]
    assert dit["format"] == "gguf" and dit["architecture"] == "lumina2" and dit["component"] == "transformer"
    assert set(dit["types"]) == {"Q8_0", "BF16", "F32"}
    assert sum(t["tensors"] for t in dit["types"].values()) == dit["tensors"]
    assert dit["blocks"]["layers"]["count"] == 2 and dit["blocks"]["layers"]["bytes_per_block"] > 0
    te = report["components"]["text_encoder"]
    assert te["component"] == "text_encoder" and te["has_tokenizer"] and te["blocks"]["blk"]["count"] == 3
    assert te["metadata"]["qwen3.block_count"] == 3
    assert te["metadata"]["tokenizer.ggml.tokens"].startswith("[512 items")
    json.dumps(report)  # JSON-able
    text = format_report(report)
    assert "lumina2" in text and "Q8_0" in text and "layers: 2 blocks" in text and "embedded" in text
    # which quantizer wrote the Q8_0 bytes: ggml's library where installed, else the torch fallback
    expected = quantizer_version(pick_quantizer("cpu"))
    assert dit["quantizer"] == te["quantizer"] == expected and f"quantizer:    {expected}" in text
    assert report["components"]["vae"]["quantizer"] is None  # BF16: nothing quantized
    diffusers = inspect_path(converted / "model")
    assert (
        diffusers["format"] == "diffusers"
        and diffusers["components"]["transformer"]["key_style"] == "diffusers"
    )


def test_fp8_and_foreign_files(converted, tmp_path):
    fp8 = inspect_path(converted / "t.safetensors")
    assert fp8["format"] == "safetensors-fp8" and fp8["fp8_variant"] == "comfy_quant"
    assert "FP8_E4M3" in fp8["types"] and fp8["component"] == "transformer"
    assert fp8["quantizer"] == f"torch {torch.__version__} (float8_e4m3fn cast)"
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, str(flux))
    report = inspect_path(flux)
    assert report["component"] is None and "FLUX" in report["problem"]
    assert "not a Z-Image component" in format_report(report)


def test_gguf_with_types_we_cannot_decode(tmp_path):
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), arch="flux")
    writer.add_tensor(
        "double_blocks.0.x",
        torch.zeros(2, 144).to(torch.uint8).numpy(),
        raw_dtype=gguf.GGMLQuantizationType.IQ4_NL,
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report = inspect_path(path)
    assert report["types"] == {"IQ4_NL": {"tensors": 1, "bytes": 288}}
    assert report["architecture"] == "flux" and "FLUX" in report["problem"]


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        inspect_path(tmp_path / "nope.gguf")
