"""Open any checkpoint by its content, and tell what it holds.

Each container format has one reader, and both implement `Checkpoint` (the map of weights/ is in its
__init__.py): `SafetensorsCheckpoint` (safetensors.py, FP8 conventions in fp8.py) and `GGUFCheckpoint`
(gguf.py). Callers ask the protocol (`format`, `field`, `tokenizer`), not the reader's class.

`open_checkpoint(path)` -> a `Checkpoint`. Dispatch is on the bytes, not the file name: "GGUF" magic ->
GGUFCheckpoint, a valid safetensors header -> SafetensorsCheckpoint (plain or FP8); the reader parses
the header once, and its error is the answer for a damaged file.

`detect(path)` -> Detected(format, component, architecture, ...): a Z-Image transformer, a Qwen3 text
encoder, a FLUX VAE, or a whole model folder; anything else (Flux, SDXL, SD3, another LLM, an SD VAE) is
a CheckpointError that says what it looks like.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from zimage_lite.errors import CheckpointError, not_found
from zimage_lite.weights.components import MANIFEST
from zimage_lite.weights.gguf import GGUFCheckpoint, is_gguf_file
from zimage_lite.weights.safetensors import SafetensorsCheckpoint

__all__ = ["Checkpoint", "Detected", "classify_keys", "describe", "detect", "open_checkpoint"]


@runtime_checkable
class Checkpoint(Protocol):
    """The read side every loader, the converter and `inspect` share, whatever the container.

    Names are logical: a GGUF's `model.diffusion_model.` prefix stripped, FP8 scales and markers hidden;
    `stored_name` gives the name in the file. Shapes are in torch order. Nothing reads tensor data
    until `get`, `get_view` or `get_quant`."""

    path: Path
    architecture: str | None  # GGUF `general.architecture`; None for safetensors

    @property
    def format(self) -> str: ...  # "safetensors", "safetensors-fp8" or "gguf", as `Detected.format`
    @property
    def fp8_variant(self) -> str | None: ...  # ComfyUI's FP8 convention (fp8.py), None without FP8
    @property
    def metadata(self) -> dict[str, Any]: ...  # safetensors `__metadata__`, GGUF key/values
    def field(self, key: str, default: Any = None) -> Any: ...  # one metadata value, cheaply
    def tokenizer(self) -> Any: ...  # a `tokenizers.Tokenizer` (GGUF `tokenizer.ggml.*`) or None
    def keys(self) -> list[str]: ...
    def __contains__(self, name: str) -> bool: ...
    def __iter__(self) -> Iterator[str]: ...
    def stored_name(self, name: str) -> str: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def shapes(self) -> dict[str, tuple[int, ...]]: ...
    def qtype(self, name: str) -> str: ...  # storage type: "F32", "BF16", "Q4_K", "FP8_E4M3", ...
    def dtype(self, name: str) -> torch.dtype: ...  # dtype of `get(name)`
    def nbytes(self, name: str) -> int: ...  # stored bytes
    def get(self, name: str) -> torch.Tensor: ...  # dense, owning its memory
    def get_view(self, name: str) -> torch.Tensor: ...  # dense, zero-copy read-only where stored dense
    def get_quant(self, name: str) -> Any: ...  # a quantized tensor as `QuantWeight` (raw, zero copy)
    def prefetch(self, name: str) -> None: ...  # paging hints for streaming reads, best effort
    def release(self, name: str) -> None: ...


COMFY_PREFIX = "model.diffusion_model."
_VAE_PREFIXES = ("first_stage_model.", "vae.")
# GGUF architectures of other image models (ComfyUI-GGUF IMG_ARCH_LIST) -> how we name them
_FOREIGN_GGUF_ARCHES = {
    "flux": "a FLUX transformer",
    "sd1": "a Stable Diffusion 1.x UNet",
    "sdxl": "an SDXL UNet",
    "sd3": "an SD3 MMDiT",
    "aura": "an AuraFlow transformer",
    "hidream": "a HiDream transformer",
    "cosmos": "a Cosmos transformer",
    "ltxv": "an LTX-Video transformer",
    "hyvid": "a HunyuanVideo transformer",
    "wan": "a Wan video transformer",
    "qwen_image": "a Qwen-Image transformer",
}


@dataclass(frozen=True)
class Detected:
    path: Path
    format: (
        str  # "gguf", "safetensors", "safetensors-fp8", "diffusers" (model folder), "zimage-lite" (converted)
    )
    component: str  # "transformer", "text_encoder", "vae" or "model" (a whole model folder)
    architecture: str | None = None  # GGUF general.architecture
    key_style: str | None = None  # "comfyui", "diffusers", "transformers", "llama.cpp", "original"
    prefix: str | None = None  # a stripped key prefix, e.g. "model.diffusion_model."
    fp8_variant: str | None = None  # "comfy_quant", "scaled_fp8", "quant_metadata", "plain"
    n_tensors: int = 0


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (
        (path / MANIFEST).is_file()
        or (path / "model_index.json").is_file()
        or (path / "transformer").is_dir()
    )


def open_checkpoint(path: str | Path, check_types: bool = True) -> Checkpoint:
    """A GGUF file, a safetensors file, or a component folder of safetensors shards.

    `check_types=False` opens GGUF files with tensor types we cannot decode (for `inspect`)."""
    path = Path(path).expanduser()
    if path.is_dir():
        if is_model_folder(path):
            raise CheckpointError(
                f"{path}: a whole model folder; open one component (transformer/, text_encoder/, vae/)"
            )
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs and not any(path.glob("*.safetensors")):
            if len(ggufs) > 1:
                raise CheckpointError(f"{path}: several GGUF files, name the one to use")
            return GGUFCheckpoint(ggufs[0], check_types=check_types)
        return SafetensorsCheckpoint.open(path)
    if not path.is_file():
        raise not_found(path)
    if is_gguf_file(path):
        return GGUFCheckpoint(path, check_types=check_types)
    try:
        return SafetensorsCheckpoint([path])
    except CheckpointError:
        if _has_json_header(path):
            raise  # a damaged safetensors file: its own message (truncated, bad header) is clearer
        kind = "GGUF" if path.suffix.lower() == ".gguf" else "GGUF or safetensors"
        raise CheckpointError(f"{path}: not a {kind} file (unrecognised content)") from None


def _has_json_header(path: Path) -> bool:
    """Whether the file starts as safetensors does: an 8-byte length, then the JSON header's `{`."""
    with open(path, "rb") as f:
        return f.read(9)[8:9] == b"{"


def _strip(keys: list[str], prefix: str) -> tuple[list[str], str | None]:
    if any(k.startswith(prefix) for k in keys):
        return [k[len(prefix) :] for k in keys if k.startswith(prefix)], prefix
    return keys, None


def _foreign(keys: set[str]) -> str | None:
    """What a non-Z-Image checkpoint looks like, from tell-tale key names (ComfyUI's model detection)."""

    def has(*fragments: str) -> bool:
        return any(any(f in k for f in fragments) for k in keys)

    if has("double_blocks.", "single_blocks.", "single_transformer_blocks."):
        return "a FLUX transformer"
    if has("joint_blocks.") or has("transformer_blocks.0.attn.add_q_proj"):
        return "an SD3 MMDiT"
    if has("input_blocks.", "down_blocks.0.resnets.") and has("label_emb.", "add_embedding.", "conditioner."):
        return "an SDXL UNet"
    if has("input_blocks.", "down_blocks.0.attentions."):
        return "a Stable Diffusion 1.x/2.x UNet"
    return None


def classify_keys(
    keys: list[str], shape, architecture: str | None = None
) -> tuple[str, str | None, str | None]:
    """(component, key_style, prefix) for a tensor name list; `shape(key)` gives a stored shape.

    Raises CheckpointError naming what the checkpoint looks like when it is not a Z-Image component."""
    if architecture in _FOREIGN_GGUF_ARCHES:
        raise CheckpointError(
            f"this is {_FOREIGN_GGUF_ARCHES[architecture]} (GGUF architecture {architecture!r}), not a Z-Image component"
        )
    stripped, prefix = _strip(keys, COMFY_PREFIX)
    names = set(stripped)
    if names & {"control_all_x_embedder.2-1.weight", "control_x_embedder.weight"}:  # before the DiT's test
        style = "diffusers" if any(".attention.to_q." in k for k in names) else "comfyui"
        return "controlnet", style, prefix
    if {"x_pad_token", "cap_pad_token"} & names or {"cap_embedder.1.weight"} <= names:
        cap = shape((prefix or "") + "cap_embedder.1.weight") if "cap_embedder.1.weight" in names else None
        if cap is not None and len(cap) == 2 and cap[1] == 2304:
            raise CheckpointError(
                "this is a Lumina-Image-2.0 transformer (caption width 2304, Gemma), not Z-Image"
            )
        style = "diffusers" if any(".attention.to_q." in k for k in names) else "comfyui"
        return "transformer", style, prefix
    if "token_embd.weight" in names or any(k.startswith("blk.") for k in names):
        if architecture not in (None, "qwen3"):
            raise CheckpointError(f"this is a {architecture!r} language model GGUF, not a Qwen3 text encoder")
        if "blk.0.attn_q_norm.weight" not in names:
            raise CheckpointError(
                "this is a llama.cpp language model without q/k norms (Qwen2/Llama?), not Qwen3"
            )
        return "text_encoder", "llama.cpp", None
    bare, llm_prefix = _strip(keys, "model.")
    if "embed_tokens.weight" in bare or any(k.startswith("layers.0.self_attn.") for k in bare):
        if "layers.0.self_attn.q_norm.weight" not in bare:
            raise CheckpointError(
                "this is a language model without q/k norms (Qwen2/Llama?), not a Qwen3 text encoder"
            )
        return "text_encoder", "transformers", llm_prefix
    foreign = _foreign(names)
    if foreign:
        raise CheckpointError(f"this is {foreign}, not a Z-Image component")
    for vae_prefix in ("", *_VAE_PREFIXES):
        conv_in = vae_prefix + "decoder.conv_in.weight"
        if conv_in in names:
            latent = shape(conv_in)[1]
            if latent != 16:
                raise CheckpointError(
                    f"this is a {latent}-channel VAE (SD/SDXL), not the 16-channel FLUX VAE"
                )
            style = "original" if any(".up.0." in k or ".mid.block_1." in k for k in names) else "diffusers"
            return "vae", style, vae_prefix or None
    sample = ", ".join(sorted(names)[:3])
    raise CheckpointError(
        f"does not look like a Z-Image transformer, Qwen3 text encoder or FLUX VAE (tensors: {sample}, ...)"
    )


def stored_keys_and_shape(source: Checkpoint) -> tuple[list[str], Any]:
    """The tensor names as stored (prefixes included) and `shape(stored name)`, for `classify_keys`."""
    by_stored = {source.stored_name(k): k for k in source.keys()}
    return list(by_stored), lambda stored: source.shape(by_stored.get(stored, stored))


def detect(path: str | Path) -> Detected:
    """What `path` holds; a CheckpointError for unreadable files and for other models."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / MANIFEST).is_file():
        return Detected(path, "zimage-lite", "model")
    if is_model_folder(path):
        return Detected(path, "diffusers", "model")
    return describe(open_checkpoint(path), path)


def describe(source: Checkpoint, path: Path) -> Detected:
    """What an opened checkpoint holds (`detect` without opening it again); `path` names it in errors."""
    keys, shape = stored_keys_and_shape(source)
    try:
        component, style, prefix = classify_keys(keys, shape, source.architecture)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return Detected(
        path, source.format, component, source.architecture, style, prefix, source.fp8_variant, len(keys)
    )


def read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder / MANIFEST}: unreadable manifest ({exc})") from None
