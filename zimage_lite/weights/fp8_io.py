"""Safetensors checkpoints as the loaders and the converter see them: plain, or FP8 in ComfyUI's conventions.

FP8 (float8_e4m3fn) weights come in three ComfyUI variants (DESIGN.md §3), all read here:
- "comfy_quant" (current): `<layer>.weight` F8_E4M3, `<layer>.weight_scale` F32 (W = q * scale) and
  `<layer>.comfy_quant`, the uint8 bytes of the JSON {"format": "float8_e4m3fn"}; the header may also
  carry `__metadata__["_quantization_metadata"]` = {"format_version": "1.0", "layers": {layer: {...}}};
- "scaled_fp8" (older): a `scaled_fp8` marker tensor and `<layer>.scale_weight` (shape [] or [1]);
  `<layer>.scale_input` may be present and is not needed for weight-only use;
- "plain": a straight cast, no scales (scale 1).
`keys()` shows only the logical tensors (no scales or markers), so a loader sees the same names as for a
BF16 file. We write the "comfy_quant" variant, with the header metadata too (ComfyUI reads either).

Reading is zero-copy where it can be (`MappedSafetensors`): tensors are views into a read-only mapping,
and `release(name)` drops a tensor's pages from the process's resident set once the converter is done.
"""

from __future__ import annotations

import json
import math
import mmap
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zimage_lite.errors import CheckpointError
from zimage_lite.weights.mapping import advise
from zimage_lite.weights.safetensors_io import _ST_DTYPES, SafetensorsSource, read_header

FP8_FORMAT = "float8_e4m3fn"
SCALED_FP8_MARKER = "scaled_fp8"
QUANT_METADATA_KEY = "_quantization_metadata"
# per-layer companions of an FP8 weight; hidden from keys()
AUX_SUFFIXES = (".weight_scale", ".comfy_quant", ".scale_weight", ".scale_input", ".input_scale")
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_QTYPE_NAMES = {torch.float8_e4m3fn: "FP8_E4M3", torch.float8_e5m2: "FP8_E5M2"}


def _readonly_torch(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class MappedSafetensors:
    """Zero-copy, read-only tensor views into safetensors files (one mapping per file)."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, tuple[int, torch.dtype, tuple[int, ...], int, int]] = {}
        self._maps: list[mmap.mmap | None] = []
        self._files = list(files)
        self._lock = threading.Lock()  # converter threads map files lazily
        for index, path in enumerate(files):
            header = read_header(path)
            header.pop("__metadata__", None)
            with open(path, "rb") as f:
                start = 8 + int.from_bytes(f.read(8), "little")
            for name, info in header.items():
                begin, end = info["data_offsets"]
                self._where[name] = (
                    index,
                    _ST_DTYPES[info["dtype"]],
                    tuple(info["shape"]),
                    start + begin,
                    start + end,
                )
            self._maps.append(None)

    def _map(self, index: int) -> mmap.mmap:
        with self._lock:
            mm = self._maps[index]
            if mm is None:
                with open(self._files[index], "rb") as f:
                    mm = self._maps[index] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return mm

    def view(self, name: str) -> torch.Tensor:
        index, dtype, shape, begin, end = self._where[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        raw = _readonly_torch(
            np.frombuffer(self._map(index), dtype=np.uint8, count=end - begin, offset=begin)
        )
        try:
            return raw.view(dtype).reshape(shape)
        except RuntimeError:  # storage offset not a multiple of the item size: copy to realign
            return raw.clone().view(dtype).reshape(shape)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from the resident set (best effort)."""
        index, _, _, begin, end = self._where[name]
        advise(self._maps[index], begin, end, "MADV_DONTNEED")

    def prefetch(self, name: str) -> None:
        """Start reading the tensor's pages in the background (best effort)."""
        index, _, _, begin, end = self._where[name]
        if end > begin:
            advise(self._map(index), begin, end, "MADV_WILLNEED")


def fp8_variant(keys: list[str], dtypes: dict[str, torch.dtype], metadata: dict[str, str]) -> str | None:
    """ "comfy_quant", "scaled_fp8", "quant_metadata", "plain" (FP8 weights, no scales) or None (no FP8)."""
    if any(k.endswith(".comfy_quant") for k in keys):
        return "comfy_quant"
    if any(k == SCALED_FP8_MARKER or k.endswith("." + SCALED_FP8_MARKER) for k in keys):
        return "scaled_fp8"
    if QUANT_METADATA_KEY in metadata:
        return "quant_metadata"
    if any(d in _QTYPE_NAMES for d in dtypes.values()):
        return "plain"
    return None


def _is_aux(key: str) -> bool:
    return key.endswith(AUX_SUFFIXES) or key == SCALED_FP8_MARKER or key.endswith("." + SCALED_FP8_MARKER)


class SafetensorsCheckpoint:
    """A safetensors file or shard folder: plain tensors as `SafetensorsSource` gives them, FP8 weights
    dequantized by `get` (float32, W = q * scale) and raw by `get_quant`."""

    architecture: str | None = None

    def __init__(self, source: SafetensorsSource):
        self.path = source.files[0] if len(source.files) == 1 else source.files[0].parent
        self._st = source
        self._map = MappedSafetensors(source.files)
        self.metadata = dict(source.metadata)
        all_keys = source.keys()
        self.fp8_variant = fp8_variant(all_keys, {k: source.dtype(k) for k in all_keys}, self.metadata)
        self._keys = [k for k in all_keys if not _is_aux(k)] if self.fp8_variant else list(all_keys)
        self._check_formats(all_keys)

    @classmethod
    def open(cls, path: str | Path) -> SafetensorsCheckpoint:
        return cls(SafetensorsSource.open(path))

    def _check_formats(self, all_keys: list[str]) -> None:
        """Refuse per-layer formats other than FP8 e4m3 (int8, nvfp4, ...) with the layer's name."""
        for key in all_keys:
            if key.endswith(".comfy_quant"):
                fmt = _comfy_quant_format(self._map.view(key))
                if fmt != FP8_FORMAT:
                    raise CheckpointError(
                        f"{self.path}: layer {key[: -len('.comfy_quant')]} is quantized as {fmt!r}; only {FP8_FORMAT} is supported"
                    )
        layers = _quant_metadata_layers(self.metadata)
        for layer, conf in layers.items():
            fmt = conf.get("format") if isinstance(conf, dict) else conf
            if fmt != FP8_FORMAT:
                raise CheckpointError(
                    f"{self.path}: layer {layer} is quantized as {fmt!r}; only {FP8_FORMAT} is supported"
                )

    def keys(self) -> list[str]:
        return list(self._keys)

    def all_keys(self) -> list[str]:
        """Every stored tensor, scales and markers included."""
        return self._st.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._st.shape(name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self._st.shape(k) for k in self._keys}

    def stored_dtype(self, name: str) -> torch.dtype:
        return self._st.dtype(name)

    def dtype(self, name: str) -> torch.dtype:
        """dtype of `get(name)`: float32 for FP8 weights, else the stored one."""
        d = self._st.dtype(name)
        return torch.float32 if d in _QTYPE_NAMES else d

    def qtype(self, name: str) -> str:
        d = self._st.dtype(name)
        return _QTYPE_NAMES.get(d) or _ST_NAMES[d]

    def nbytes(self, name: str) -> int:
        return self._st.nbytes(name)

    def tokenizer(self) -> None:
        return None

    def scale(self, name: str) -> torch.Tensor | None:
        """The float32 scale of an FP8 weight (None for a plain cast)."""
        layer = name[: -len(".weight")] if name.endswith(".weight") else name
        for suffix in (".weight_scale", ".scale_weight"):
            if layer + suffix in self._st:
                return self._map.view(layer + suffix).to(torch.float32).clone()  # tiny; not tied to the file
        return None

    def _dequant(self, name: str, q: torch.Tensor) -> torch.Tensor:
        from zimage_lite.quant.fp8 import dequantize_fp8

        scale = self.scale(name)
        if scale is None:
            return q.to(torch.float32)
        try:
            return dequantize_fp8(q, scale, torch.float32)
        except Exception as exc:
            raise CheckpointError(f"{self.path}: tensor {name}: {exc}") from None

    def get(self, name: str) -> torch.Tensor:
        """A CPU tensor owning its memory (as SafetensorsSource.get); FP8 weights dequantized to float32."""
        if self._st.dtype(name) in _QTYPE_NAMES:
            return self._dequant(name, self._map.view(name))
        return self._st.get(name)

    def get_view(self, name: str) -> torch.Tensor:
        """Like `get`, but dense tensors are zero-copy read-only views into the mapping (converter use)."""
        if self._st.dtype(name) in _QTYPE_NAMES:
            return self._dequant(name, self._map.view(name))
        return self._map.view(name)

    def get_quant(self, name: str):
        from zimage_lite.kernels.dispatch import QuantWeight

        if self._st.dtype(name) is not torch.float8_e4m3fn:
            raise CheckpointError(f"{self.path}: tensor {name} is {self.qtype(name)}, not FP8_E4M3")
        q = self._map.view(name)
        if q.ndim != 2:
            raise CheckpointError(f"{self.path}: FP8 tensor {name} has shape {tuple(q.shape)}, expected 2-D")
        return QuantWeight(data=q, qtype="FP8_E4M3", shape=(q.shape[0], q.shape[1]), scale=self.scale(name))

    def release(self, name: str) -> None:
        self._map.release(name)

    def prefetch(self, name: str) -> None:
        self._map.prefetch(name)


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


class SafetensorsStreamWriter:
    """Write a safetensors file tensor by tensor: `add` every tensor, `begin()`, then `write` them in any
    order (each lands at its reserved offset). Tensors are laid out by item size, largest first, so every
    tensor is aligned to its dtype; data is contiguous, as safetensors' loader requires."""

    def __init__(self, path: str | Path, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._decl: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        self._written: set[str] = set()
        self._file = None
        self._data_start = 0

    def add(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        if self._file is not None:
            raise RuntimeError("SafetensorsStreamWriter: add() after begin()")
        if name in self._decl:
            raise RuntimeError(f"SafetensorsStreamWriter: duplicate tensor {name}")
        self._decl[name] = (dtype, tuple(int(s) for s in shape))
        return math.prod(shape) * dtype.itemsize

    def begin(self) -> None:
        order = sorted(self._decl, key=lambda n: -self._decl[n][0].itemsize)  # stable: keeps add order
        header: dict[str, Any] = {}
        if self.metadata:
            header["__metadata__"] = self.metadata
        offset = 0
        for name in order:
            dtype, shape = self._decl[name]
            size = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": _ST_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self._offsets[name] = (offset, size)
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        self._file = open(self.path, "wb")
        self._file.write(len(blob).to_bytes(8, "little"))
        self._file.write(blob)
        self._data_start = 8 + len(blob)
        self._file.truncate(self._data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self._decl[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(
                f"SafetensorsStreamWriter: {name} is {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {shape}"
            )
        offset, size = self._offsets[name]
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        assert self._file is not None and data.nbytes == size
        self._file.seek(self._data_start + offset)
        self._file.write(memoryview(data))
        self._written.add(name)

    def close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        missing = self._decl.keys() - self._written
        if missing:
            raise RuntimeError(f"SafetensorsStreamWriter: closed before writing {sorted(missing)[0]}")

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
