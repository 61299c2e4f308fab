"""ComfyUI's FP8 safetensors conventions: a layer the safetensors reader consults, not a reader.

FP8 (float8_e4m3fn) weights come in three ComfyUI variants (DESIGN.md §3):
- "comfy_quant" (current): `<layer>.weight` F8_E4M3, `<layer>.weight_scale` F32 (W = q * scale) and
  `<layer>.comfy_quant`, the uint8 bytes of the JSON {"format": "float8_e4m3fn"}; the header may also
  carry `__metadata__["_quantization_metadata"]` = {"format_version": "1.0", "layers": {layer: {...}}};
- "scaled_fp8" (older): a `scaled_fp8` marker tensor and `<layer>.scale_weight` (shape [] or [1]);
  `<layer>.scale_input` may be present and is not needed for weight-only use;
- "plain": a straight cast, no scales (scale 1).
`FP8Layer.detect(checkpoint)` tells the variant from the parsed header (names, dtypes, metadata); the
layer then hides the scales and markers and answers each weight's scale. We write the "comfy_quant"
variant, with the header metadata too (ComfyUI reads either): `comfy_quant_marker`, `quant_metadata`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

from zimage_lite.errors import CheckpointError

if TYPE_CHECKING:
    from zimage_lite.weights.safetensors import SafetensorsCheckpoint

FP8_FORMAT = "float8_e4m3fn"
SCALED_FP8_MARKER = "scaled_fp8"
QUANT_METADATA_KEY = "_quantization_metadata"
# per-layer companions of an FP8 weight; hidden from keys()
AUX_SUFFIXES = (".weight_scale", ".comfy_quant", ".scale_weight", ".scale_input", ".input_scale")
FP8_QTYPES = {torch.float8_e4m3fn: "FP8_E4M3", torch.float8_e5m2: "FP8_E5M2"}


def fp8_variant(keys: list[str], dtypes: dict[str, torch.dtype], metadata: dict[str, str]) -> str | None:
    """ "comfy_quant", "scaled_fp8", "quant_metadata", "plain" (FP8 weights, no scales) or None (no FP8)."""
    if any(k.endswith(".comfy_quant") for k in keys):
        return "comfy_quant"
    if any(k == SCALED_FP8_MARKER or k.endswith("." + SCALED_FP8_MARKER) for k in keys):
        return "scaled_fp8"
    if QUANT_METADATA_KEY in metadata:
        return "quant_metadata"
    if any(d in FP8_QTYPES for d in dtypes.values()):
        return "plain"
    return None


def _is_aux(key: str) -> bool:
    return key.endswith(AUX_SUFFIXES) or key == SCALED_FP8_MARKER or key.endswith("." + SCALED_FP8_MARKER)


class FP8Layer:
    """The FP8 side of one safetensors checkpoint: its variant, which tensors are companions, each
    weight's scale. Reads tensors through the checkpoint's own mapping."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, variant: str):
        self.variant = variant
        self._st = checkpoint
        self._stored = frozenset(checkpoint.all_keys())

    @classmethod
    def detect(cls, checkpoint: SafetensorsCheckpoint) -> FP8Layer | None:
        """The layer for a checkpoint with FP8 weights or markers, None for a plain one. Refuses per-layer
        formats other than FP8 e4m3 (int8, nvfp4, ...), naming the layer."""
        keys = checkpoint.all_keys()
        variant = fp8_variant(keys, {k: checkpoint.stored_dtype(k) for k in keys}, checkpoint.metadata)
        if variant is None:
            return None
        layer = cls(checkpoint, variant)
        layer._check_formats(keys)
        return layer

    def _check_formats(self, keys: list[str]) -> None:
        path = self._st.path
        for key in keys:
            if key.endswith(".comfy_quant"):
                fmt = _comfy_quant_format(self._st.view(key))
                if fmt != FP8_FORMAT:
                    raise CheckpointError(
                        f"{path}: layer {key[: -len('.comfy_quant')]} is quantized as {fmt!r}; only {FP8_FORMAT} is supported"
                    )
        for layer, conf in _quant_metadata_layers(self._st.metadata).items():
            fmt = conf.get("format") if isinstance(conf, dict) else conf
            if fmt != FP8_FORMAT:
                raise CheckpointError(
                    f"{path}: layer {layer} is quantized as {fmt!r}; only {FP8_FORMAT} is supported"
                )

    def visible(self, keys: list[str]) -> list[str]:
        """The logical tensors: scales and markers left out."""
        return [k for k in keys if not _is_aux(k)]

    def scale(self, name: str) -> torch.Tensor | None:
        """The float32 scale of an FP8 weight (None for a plain cast)."""
        layer = name[: -len(".weight")] if name.endswith(".weight") else name
        for suffix in (".weight_scale", ".scale_weight"):
            if layer + suffix in self._stored:
                return self._st.view(layer + suffix).to(torch.float32).clone()  # tiny; not tied to the file
        return None

    def dequantize(self, name: str) -> torch.Tensor:
        """The FP8 weight `name` as float32, W = q * scale."""
        from zimage_lite.quant.fp8 import dequantize_fp8

        q = self._st.view(name)
        scale = self.scale(name)
        if scale is None:
            return q.to(torch.float32)
        try:
            return dequantize_fp8(q, scale, torch.float32)
        except Exception as exc:
            raise CheckpointError(f"{self._st.path}: tensor {name}: {exc}") from None

    def quant_weight(self, name: str):
        """An FP8 e4m3 weight as `QuantWeight`: the raw 2-D values (zero copy) and its scale."""
        from zimage_lite.kernels.dispatch import QuantWeight

        q = self._st.view(name)
        if q.ndim != 2:
            raise CheckpointError(
                f"{self._st.path}: FP8 tensor {name} has shape {tuple(q.shape)}, expected 2-D"
            )
        return QuantWeight(data=q, qtype="FP8_E4M3", shape=(q.shape[0], q.shape[1]), scale=self.scale(name))


def _comfy_quant_format(marker: torch.Tensor) -> str | None:
    try:
        conf = json.loads(bytes(marker.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return conf.get("format") if isinstance(conf, dict) else None


def _quant_metadata_layers(metadata: dict[str, str]) -> dict[str, Any]:
    raw = metadata.get(QUANT_METADATA_KEY)
    if not raw:
        return {}
    try:
        layers = json.loads(raw).get("layers", {})
    except (json.JSONDecodeError, AttributeError):
        return {}
    return layers if isinstance(layers, dict) else {}


def comfy_quant_marker() -> torch.Tensor:
    """The `<layer>.comfy_quant` tensor ComfyUI expects for an FP8 e4m3fn layer."""
    return torch.tensor(list(json.dumps({"format": FP8_FORMAT}).encode("utf-8")), dtype=torch.uint8)


def quant_metadata(layers: list[str]) -> str:
    """`__metadata__["_quantization_metadata"]` listing FP8 layers (ComfyUI's checkpoint-level form)."""
    return json.dumps(
        {"format_version": "1.0", "layers": {layer: {"format": FP8_FORMAT} for layer in layers}}
    )
