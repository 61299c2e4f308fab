"""Model resolution: folders, manifests, single-file overrides, hub ids (offline here)."""

from __future__ import annotations

import json

import pytest

from zimage_lite.errors import CheckpointError
from zimage_lite.synthetic import write_synthetic_model
from zimage_lite.weights.components import MANIFEST, resolve_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("comp") / "tiny", "tiny", seed=0)


def test_diffusers_folder(tiny):
    paths = resolve_model(tiny)
    assert paths.transformer == tiny / "transformer" and paths.tokenizer == tiny / "tokenizer"


def test_manifest_points_at_files(tiny, tmp_path):
    (tmp_path / "dit.gguf").write_bytes(b"x")
    (tmp_path / "te.gguf").write_bytes(b"x")
    (tmp_path / "vae.safetensors").write_bytes(b"x")
    comps = {"transformer": "dit.gguf", "text_encoder": "te.gguf", "vae": "vae.safetensors"}
    (tmp_path / MANIFEST).write_text(json.dumps({"format": 1, "components": comps}))
    paths = resolve_model(tmp_path)
    assert paths.transformer == tmp_path / "dit.gguf"
    assert paths.tokenizer == tmp_path / "te.gguf"  # a GGUF text encoder carries the tokenizer


def test_override_replaces_folder_component(tiny, tmp_path):
    f = tmp_path / "other.safetensors"
    f.write_bytes(b"x")
    assert resolve_model(tiny, transformer=f).transformer == f


def test_single_files_need_a_tokenizer(tmp_path):
    for name in ("a.safetensors", "b.safetensors", "c.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(CheckpointError, match="--tokenizer is required"):
        resolve_model(
            None, tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
        )


def test_hub_id_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        CheckpointError, match="cannot fetch Tongyi-MAI/Z-Image-Turbo from the Hugging Face hub"
    ):
        resolve_model("Tongyi-MAI/Z-Image-Turbo")


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such model folder"):
        resolve_model(tmp_path / "nope")
