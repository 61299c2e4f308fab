"""The GGUF reader: `GGUFCheckpoint`, lazy and zero-copy, implementing the `Checkpoint` protocol.

Reading goes through gguf-py's `GGUFReader`, which maps the file (np.memmap) and hands out views: we turn
them into torch tensors without copying. GGUF stores dims reversed (ne[0] is the row length); `shape()`
answers in torch order. Conventions we accept on reading:
- ComfyUI-GGUF files: `general.architecture` ("lumina2" for Z-Image), tensors under their ComfyUI names;
  `comfy.gguf.orig_shape.<name>` (an INT32 array) overrides the stored shape where present;
- stable-diffusion.cpp files: no architecture key and a `model.diffusion_model.` prefix. When any tensor
  has the prefix, only prefixed tensors are kept (ComfyUI-GGUF does the same), prefix stripped;
- llama.cpp text encoders (`general.architecture` = "qwen3") with `tokenizer.ggml.*` fields (their
  `qwen3.*` hyperparameters are read by gguf_qwen3.py, the tokenizer rebuilt by gguf_tokenizer.py).
The writer is in weights/gguf_writer.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from zimage_lite.errors import CheckpointError
from zimage_lite.weights.mapping import advise, readonly_tensor

log = logging.getLogger(__name__)

COMFY_PREFIX = "model.diffusion_model."
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
GGUF_MAGIC = b"GGUF"

# Storage types whose raw bytes are plain values.
DENSE_TYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _supported_quants() -> set[str]:
    from zimage_lite.quant.formats import QUANT_TYPES

    return set(QUANT_TYPES)


def is_gguf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _field_value(field: Any) -> Any:
    """A metadata field as a Python value (str, int, float, bool or list of them)."""
    value = field.contents()
    return value.tolist() if isinstance(value, np.ndarray) else value


class _Truncated(Exception):
    def __init__(self, end: int):
        super().__init__(end)
        self.end = end


class _CheckedReader(gguf.GGUFReader):
    """gguf-py's reader slices its mapping without a bounds check, so a truncated file fails later with a
    reshape or index error; reading past the end here says so."""

    def _get(self, offset, dtype, count=1, override_order=None):
        end = int(offset) + int(np.empty([], dtype=dtype).itemsize) * int(count)
        if end > len(self.data):
            raise _Truncated(end)
        return super()._get(offset, dtype, count, override_order)


class GGUFCheckpoint:
    """Tensors of one GGUF file, read on demand from the mapping.

    `check_types=False` opens files with quant types we cannot decode (for `inspect`); `strip_prefix=False`
    keeps every tensor under its stored name."""

    format = "gguf"
    fp8_variant = None  # GGUF has no FP8 type

    def __init__(self, path: str | Path, check_types: bool = True, strip_prefix: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        if not is_gguf_file(self.path):
            raise CheckpointError(f"{self.path}: not a GGUF file (no GGUF magic bytes)")
        try:
            self._reader = _CheckedReader(self.path, "r")
        except _Truncated as exc:
            size = self.path.stat().st_size
            raise CheckpointError(
                f"{self.path}: truncated GGUF file (reading it needs byte {exc.end}, the file has {size})"
            ) from None
        except Exception as exc:  # gguf-py raises ValueError, IndexError, struct/numpy errors on bad files
            raise CheckpointError(
                f"{self.path}: unreadable GGUF file ({type(exc).__name__}: {exc})"
            ) from None
        self._validate_extent()
        tensors = {t.name: t for t in self._reader.tensors}
        self.has_prefix = strip_prefix and any(n.startswith(COMFY_PREFIX) for n in tensors)
        if self.has_prefix:
            tensors = {n[len(COMFY_PREFIX) :]: t for n, t in tensors.items() if n.startswith(COMFY_PREFIX)}
        self._tensors = tensors
        self._metadata: dict[str, Any] | None = None
        arch = self._reader.get_field("general.architecture")
        self.architecture: str | None = str(_field_value(arch)) if arch is not None else None
        if check_types:
            supported = _supported_quants() | set(DENSE_TYPES)
            for name, t in tensors.items():
                if t.tensor_type.name not in supported:
                    raise CheckpointError(
                        f"{self.path}: tensor {name} has GGUF type {t.tensor_type.name}, which zimage-lite "
                        f"cannot decode (supported: {', '.join(sorted(supported))})"
                    )

    def _validate_extent(self) -> None:
        size = self.path.stat().st_size
        for t in self._reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise CheckpointError(
                    f"{self.path}: truncated GGUF file (tensor {t.name} ends at byte "
                    f"{t.data_offset + t.n_bytes}, file has {size})"
                )

    # -- metadata --------------------------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        """Every key/value field (GGUF.* header pseudo-fields excluded), decoded once on first use."""
        if self._metadata is None:
            self._metadata = {
                k: _field_value(f) for k, f in self._reader.fields.items() if not k.startswith("GGUF.")
            }
        return self._metadata

    def field(self, key: str, default: Any = None) -> Any:
        """One metadata value without decoding the others (cheap for scalars in big tokenizer files)."""
        f = self._reader.get_field(key)
        return default if f is None else _field_value(f)

    def tokenizer(self):
        """The embedded llama.cpp tokenizer as a `tokenizers.Tokenizer`, or None if there is none."""
        if self._reader.get_field("tokenizer.ggml.tokens") is None:
            return None
        from zimage_lite.weights.gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(self)

    # -- tensors ---------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def _t(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name}") from None

    def stored_name(self, name: str) -> str:
        return self._t(name).name

    def shape(self, name: str) -> tuple[int, ...]:
        t = self._t(name)
        orig = self._reader.get_field(ORIG_SHAPE_KEY + t.name)
        if orig is not None:
            return tuple(int(v) for v in _field_value(orig))
        return tuple(int(d) for d in reversed(t.shape.tolist()))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self._tensors}

    def qtype(self, name: str) -> str:
        return self._t(name).tensor_type.name

    def dtype(self, name: str) -> torch.dtype:
        """dtype of `get(name)`: the stored one for F32/F16/BF16, float32 for quantized tensors."""
        return DENSE_TYPES.get(self.qtype(name), torch.float32)

    def nbytes(self, name: str) -> int:
        return int(self._t(name).n_bytes)

    def raw(self, name: str) -> torch.Tensor:
        """The stored bytes, uint8, flat, zero copy (read-only memory: do not write into it)."""
        return readonly_tensor(self._t(name).data).reshape(-1).view(torch.uint8)

    def get_view(self, name: str) -> torch.Tensor:
        """Dense tensor in torch order: F32/F16/BF16 as a zero-copy read-only view of the mapping,
        quantized types dequantized to float32 (bit-identical to gguf-py's dequantize)."""
        qtype = self.qtype(name)
        shape = self.shape(name)
        raw = self.raw(name)
        if qtype in DENSE_TYPES:
            return raw.view(DENSE_TYPES[qtype]).reshape(shape)
        if qtype not in _supported_quants():
            raise CheckpointError(
                f"{self.path}: tensor {name} has GGUF type {qtype}, which zimage-lite cannot decode"
            )
        from zimage_lite.quant.formats import dequantize

        return dequantize(raw, qtype, shape, torch.float32)

    def get(self, name: str) -> torch.Tensor:
        """Like `get_view`, but always a tensor owning its memory (safe to modify, outlives the file)."""
        t = self.get_view(name)
        return t.clone() if self.qtype(name) in DENSE_TYPES else t

    def get_quant(self, name: str):
        """A quantized tensor as `QuantWeight` (raw blocks (rows, row_bytes), zero copy)."""
        from zimage_lite.kernels.dispatch import QuantWeight

        qtype = self.qtype(name)
        if qtype in DENSE_TYPES:
            raise CheckpointError(f"{self.path}: tensor {name} is {qtype}, not quantized")
        shape = self.shape(name)
        rows = shape[0] if len(shape) > 1 else 1
        cols = math.prod(shape) // rows
        data = self.raw(name).reshape(rows, -1)
        return QuantWeight(data=data, qtype=qtype, shape=(rows, cols), scale=None)

    def release(self, name: str) -> None:
        """Drop the pages of one tensor from this process's resident set (they stay in the page cache).

        Reading a 12 GB file through a mapping would otherwise keep every touched page counted in RSS."""
        self._advise(name, "MADV_DONTNEED")

    def prefetch(self, name: str) -> None:
        """Start reading one tensor's pages in the background (best effort)."""
        self._advise(name, "MADV_WILLNEED")

    def _advise(self, name: str, advice: str) -> None:
        t = self._t(name)
        advise(getattr(self._reader.data, "_mmap", None), t.data_offset, t.data_offset + t.n_bytes, advice)
