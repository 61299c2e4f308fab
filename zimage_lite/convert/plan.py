"""What to write for each component: output names, shapes, storage types (from the policy) and jobs.

Every plan is checked against the model built on the meta device before any data is read, so a
missing tensor or a wrong shape fails in a second and names the tensors.
- transformer: ComfyUI names with fused qkv (`dit_key_plan`), GGUF architecture "lumina2", or an FP8
  safetensors file in ComfyUI's comfy_quant convention. The pad tokens are stored F32 in GGUF (ComfyUI-GGUF
  keeps them at high precision: BF16 pads are upcast on its load path) and shaped (1, dim);
- text encoder: llama.cpp qwen3 GGUF with every layer, `output_norm`, `output` only when untied, the
  `qwen3.*` hyperparameters and the tokenizer; types from the policy's text-encoder rules (fp8 -> Q8_0);
- VAE: BF16 safetensors under the names it came with.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zimage_lite.config import Qwen3Config, VAEConfig
from zimage_lite.convert.stream import Job, OutTensor
from zimage_lite.weights.checkpoint import Checkpoint
from zimage_lite.weights.gguf_qwen3 import qwen3_config_from_gguf, qwen3_gguf_fields
from zimage_lite.weights.gguf_writer import FILE_TYPES
from zimage_lite.weights.load import build_meta, check_keys

log = logging.getLogger(__name__)

PAD_TOKENS = ("x_pad_token", "cap_pad_token")
FP8_TEXT_ENCODER_PRESET = "q8_0"  # FP8 has no llama.cpp type; Q8_0 is as close and as small
GGUF_QUANTIZATION_VERSION = 2


@dataclass
class ComponentPlan:
    component: str
    container: str  # "gguf" or "safetensors"
    jobs: list[Job]
    architecture: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    config_json: dict[str, Any] | None = None  # written beside a folder output (VAE)

    @property
    def outputs(self) -> list[OutTensor]:
        return [o for job in self.jobs for o in job.outputs]


def _paging(source: Checkpoint, method: str, keys: tuple[str, ...]):
    """`source.<method>(key)` for every key (release: drop pages; prefetch: read ahead)."""
    return lambda: [getattr(source, method)(k) for k in keys]


def _outputs(name: str, shape: tuple[int, ...], qtype: str) -> list[OutTensor]:
    if qtype != "FP8_E4M3":
        return [OutTensor(name, shape, qtype)]
    layer = name.removesuffix(".weight")
    from zimage_lite.weights.fp8 import comfy_quant_marker

    return [
        OutTensor(name, shape, "FP8_E4M3"),
        OutTensor(layer + ".weight_scale", (), "F32"),
        OutTensor(layer + ".comfy_quant", tuple(comfy_quant_marker().shape), "U8"),
    ]


def _job(source, name: str, keys: tuple[str, ...], shape: tuple[int, ...], qtype: str, origin: str) -> Job:
    def load() -> torch.Tensor:
        parts = [source.get_view(k) for k in keys]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return t.reshape(shape) if t.numel() == torch.Size(shape).numel() else t

    in_bytes = sum(source.nbytes(k) for k in keys)
    return Job(
        name,
        shape,
        qtype,
        load,
        in_bytes,
        _outputs(name, shape, qtype),
        _paging(source, "release", keys),
        origin,
        _paging(source, "prefetch", keys),
    )


def _general(name: str, preset: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "general.name": name,
        "general.quantization_version": ("u32", GGUF_QUANTIZATION_VERSION),
    }
    if preset in FILE_TYPES:
        meta["general.file_type"] = ("u32", int(FILE_TYPES[preset]))
    return meta


# -- transformer ---------------------------------------------------------------------------------------
def plan_transformer(source, path: Path, preset: str) -> ComponentPlan:
    from zimage_lite.models.dit import ZImageDiT
    from zimage_lite.quant.policy import choose_qtype
    from zimage_lite.weights.names_dit import dit_config_for, dit_key_plan, dit_shapes

    plan = dit_key_plan(source.keys())
    shapes = dit_shapes(source, plan)
    for pad in PAD_TOKENS:  # older checkpoints store the pads as (dim,), ComfyUI and we as (1, dim)
        if pad in shapes and len(shapes[pad]) == 1:
            shapes[pad] = (1, shapes[pad][0])
    cfg = dit_config_for(path, shapes)
    expected = {k: tuple(v.shape) for k, v in build_meta(lambda: ZImageDiT(cfg)).state_dict().items()}
    check_keys(expected, shapes, f"{path}: transformer")
    container = "safetensors" if preset == "fp8" else "gguf"
    jobs = []
    for name in expected:  # the model's own order: embedders, refiners, layers, final layer
        qtype = choose_qtype(name, expected[name], preset, "transformer")
        if name in PAD_TOKENS and container == "gguf":
            qtype = "F32"
        jobs.append(_job(source, name, plan[name], expected[name], qtype, f"{path}: "))
    if container == "gguf":
        return ComponentPlan("transformer", "gguf", jobs, "lumina2", _general("Z-Image transformer", preset))
    from zimage_lite.weights.fp8 import quant_metadata

    fp8_layers = [j.name.removesuffix(".weight") for j in jobs if j.qtype == "FP8_E4M3"]
    meta = {"_quantization_metadata": quant_metadata(fp8_layers), "format": "pt"}
    return ComponentPlan("transformer", "safetensors", jobs, None, meta)


# -- ControlNet ------------------------------------------------------------------------------------------
def plan_controlnet(source, path: Path, preset: str) -> ComponentPlan:
    """Our names (the DiT's renames), the places in the metadata (`CONTROLNET_KEY`), GGUF architecture
    "zimage_controlnet" or FP8 safetensors; 2.0's unused refiner blocks are not written."""
    import json

    from zimage_lite.models.controlnet import ZImageControlNet
    from zimage_lite.quant.policy import choose_qtype
    from zimage_lite.weights.names_controlnet import CONTROLNET_KEY, read_controlnet

    _, plan, shapes, cfg = read_controlnet(path)
    expected = {k: tuple(v.shape) for k, v in build_meta(lambda: ZImageControlNet(cfg)).state_dict().items()}
    check_keys(expected, shapes, f"{path}: ControlNet")
    container = "safetensors" if preset == "fp8" else "gguf"
    jobs = [
        _job(source, name, plan[name], shape, choose_qtype(name, shape, preset, "controlnet"), f"{path}: ")
        for name, shape in expected.items()
    ]
    places = json.dumps({"version": cfg.version, "places": cfg.places, "refiner_places": cfg.refiner_places})
    if container == "gguf":
        meta = {**_general(f"Z-Image ControlNet {cfg.version}", preset), CONTROLNET_KEY: places}
        return ComponentPlan("controlnet", "gguf", jobs, "zimage_controlnet", meta)
    from zimage_lite.weights.fp8 import quant_metadata

    fp8_layers = [j.name.removesuffix(".weight") for j in jobs if j.qtype == "FP8_E4M3"]
    meta = {"_quantization_metadata": quant_metadata(fp8_layers), "format": "pt", CONTROLNET_KEY: places}
    return ComponentPlan("controlnet", "safetensors", jobs, None, meta)


# -- text encoder ----------------------------------------------------------------------------------------
def _text_config(source, path: Path, bare_shapes: dict[str, tuple[int, ...]]) -> tuple[Qwen3Config, dict]:
    from zimage_lite.models.qwen3 import infer_qwen3_config

    config_file = path / "config.json" if path.is_dir() else None
    if config_file is not None and config_file.is_file():
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        return Qwen3Config.from_dict(raw), raw
    if source.format == "gguf":
        return qwen3_config_from_gguf(source), {}
    return infer_qwen3_config(bare_shapes), {}


def plan_text_encoder(
    source, path: Path, preset: str, tokenizer_fields: dict[str, Any] | None
) -> ComponentPlan:
    from zimage_lite.models.qwen3 import Qwen3Encoder
    from zimage_lite.quant.policy import choose_qtype
    from zimage_lite.weights.names_qwen3 import bare_names, hf_to_gguf_name

    bare = bare_names(source)
    shapes = {name: tuple(source.shape(key)) for name, key in bare.items()}
    cfg, raw_config = _text_config(source, path, shapes)
    # every layer (our encoder builds num_hidden_layers - 1; llama.cpp needs them all) and the final norm
    full = dataclasses.replace(cfg, num_hidden_layers=cfg.num_hidden_layers + 1)
    expected = {k: tuple(v.shape) for k, v in build_meta(lambda: Qwen3Encoder(full)).state_dict().items()}
    expected["norm.weight"] = (cfg.hidden_size,)
    if "lm_head.weight" in shapes:  # llama.cpp `output`: only a separate (untied) head is worth storing
        if raw_config.get("tie_word_embeddings", False):
            del shapes["lm_head.weight"]
        else:
            expected["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    check_keys(expected, shapes, f"{path}: text encoder")
    te_preset = FP8_TEXT_ENCODER_PRESET if preset == "fp8" else preset
    jobs = []
    for name, shape in expected.items():
        qtype = choose_qtype(name, shape, te_preset, "text_encoder")
        jobs.append(_job(source, hf_to_gguf_name(name), (bare[name],), shape, qtype, f"{path}: "))
    meta = _general("Qwen3 text encoder (Z-Image)", te_preset)
    meta.update(qwen3_gguf_fields(cfg))
    if tokenizer_fields:
        meta.update(tokenizer_fields)
    else:
        log.warning("%s: no tokenizer found; the text encoder GGUF will not carry one", path)
    return ComponentPlan("text_encoder", "gguf", jobs, "qwen3", meta)


def text_encoder_tokenizer_fields(source, path: Path, tokenizer_dir: Path | None) -> dict[str, Any] | None:
    """Tokenizer fields for the text encoder GGUF: from a tokenizer folder, else the source GGUF's own."""
    from zimage_lite.weights.gguf_tokenizer import load_tokenizer_files, tokenizer_gguf_fields
    from zimage_lite.weights.names_qwen3 import bare_names

    bare = bare_names(source)
    vocab = source.shape(bare["embed_tokens.weight"])[0] if "embed_tokens.weight" in bare else None
    if vocab is None:
        return None
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        tok, tok_config = load_tokenizer_files(tokenizer_dir)
        config_file = path / "config.json" if path.is_dir() else None
        bos = None
        if config_file is not None and config_file.is_file():
            bos = json.loads(config_file.read_text(encoding="utf-8")).get("bos_token_id")
        return tokenizer_gguf_fields(tok, vocab, tok_config, bos)
    if source.format == "gguf" and source.field("tokenizer.ggml.tokens") is not None:
        keys = [k for k in source.metadata if k.startswith("tokenizer.")]
        return {k: _typed(source, k) for k in keys}
    return None


def _typed(source: Checkpoint, key: str) -> Any:
    """A metadata value of a GGUF we read, typed for GGUFStreamWriter (ids stay u32, lists arrays)."""
    value = source.metadata[key]
    if isinstance(value, list):
        return ("arr", value)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("u32", value)
    return value


# -- VAE -------------------------------------------------------------------------------------------------
def plan_vae(source, path: Path) -> ComponentPlan:
    from zimage_lite.models.vae import VAE
    from zimage_lite.weights.names_vae import (
        _read_diffusers_config,
        _strip_prefix,
        is_original_vae,
        vae_config_from_shapes,
        vae_from_original,
    )

    keys = source.keys()
    meta_tensors = {k: torch.empty(source.shape(k), device="meta") for k in keys}
    renamed = (
        vae_from_original(meta_tensors)
        if is_original_vae(keys)
        else {_strip_prefix(k): v for k, v in meta_tensors.items()}
    )
    shapes = {k: tuple(v.shape) for k, v in renamed.items()}
    config_file = path / "config.json" if path.is_dir() else None
    config_json = None
    if config_file is not None and config_file.is_file():
        cfg = _read_diffusers_config(config_file)
        config_json = json.loads(config_file.read_text(encoding="utf-8"))
    else:
        cfg: VAEConfig = vae_config_from_shapes(shapes)
    expected = {k: tuple(v.shape) for k, v in build_meta(lambda: VAE(cfg)).state_dict().items()}
    check_keys(expected, shapes, f"{path}: VAE")
    jobs = [
        _job(
            source,
            _strip_prefix(k),
            (k,),
            tuple(source.shape(k)),
            "BF16" if source.dtype(k).is_floating_point else "F32",
            f"{path}: ",
        )
        for k in keys
    ]
    return ComponentPlan("vae", "safetensors", jobs, None, {"format": "pt"}, config_json)
