"""The safetensors reader: one file, a folder of shards or a sharded index, headers parsed once.

`SafetensorsCheckpoint` implements the `Checkpoint` protocol (weights/checkpoint.py). Tensors are
zero-copy, read-only views into one lazily made mapping per file (`view`, the converter's reads):
`release(name)` drops a tensor's pages from the resident set once the converter is done with it,
`prefetch(name)` reads them ahead. `get` (the loaders' reads) gives writable tensors over a second,
copy-on-write mapping, as safetensors' own loader does: no copy until written, and writes never reach
the file nor a view. A converter thread may map a file while another reads, hence the lock.

ComfyUI FP8 files are read here too: weights/fp8.py tells their convention and holds their scales, and
`keys()` then hides the scales and markers, so a loader sees the same names as for a BF16 file.
The writer is in weights/safetensors_writer.py.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from zimage_lite.errors import CheckpointError, not_found
from zimage_lite.weights.fp8 import FP8_QTYPES, FP8Layer
from zimage_lite.weights.mapping import advise, readonly_tensor

ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


class _Entry(NamedTuple):
    """Where one tensor's bytes are: file index, absolute [begin, end) offsets."""

    file: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of one safetensors file, validated against the file size, and where data starts."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > min(size - 8, 100_000_000):
                raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a table)")
    data_len = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + data_len > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, header promises {8 + n + data_len})")
    return header, 8 + n


def shard_files(path: Path) -> list[Path]:
    """The files of a safetensors checkpoint: the file itself, or a folder's shards (index json or glob)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise not_found(path)
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        try:
            weight_map = json.loads(index[0].read_text())["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{index[0]}: unreadable shard index ({exc})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index[0]}: shard files missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files in this folder")
    return files


class SafetensorsCheckpoint:
    """Tensors of one or more safetensors files (shards), read through mmap on demand.

    Plain tensors come as stored; FP8 weights are dequantized by `get` (float32, W = q * scale) and
    raw by `get_quant`. `view`, `shape` and `stored_dtype` also answer for the hidden FP8 companions."""

    architecture: str | None = None

    def __init__(self, files: list[Path]):
        if not files:
            raise CheckpointError("no safetensors files given")
        self.files = list(files)
        self.path = self.files[0] if len(self.files) == 1 else self.files[0].parent
        self.metadata: dict[str, str] = {}
        self._entries: dict[str, _Entry] = {}
        for index, path in enumerate(self.files):
            self._add_file(index, path)
        self._maps: dict[tuple[int, int], mmap.mmap] = {}  # (file, mmap access) -> mapping
        self._lock = threading.Lock()  # converter threads map files lazily
        self._fp8 = FP8Layer.detect(self)
        self._keys = self._fp8.visible(self.all_keys()) if self._fp8 else self.all_keys()

    def _add_file(self, index: int, path: Path) -> None:
        header, start = _read_header(path)
        self.metadata.update(header.pop("__metadata__", None) or {})
        for name, info in header.items():
            dtype = ST_DTYPES.get(info["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            shape, (begin, end) = tuple(info["shape"]), info["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise CheckpointError(
                    f"{path}: tensor {name} holds {end - begin} bytes, not a {info['dtype']} {shape}"
                )
            self._entries[name] = _Entry(index, dtype, shape, start + begin, start + end)

    @classmethod
    def open(cls, path: str | Path) -> SafetensorsCheckpoint:
        """A .safetensors file, or a folder of shards (with or without an index json)."""
        return cls(shard_files(Path(path)))

    # -- what the checkpoint holds ---------------------------------------------------------------------
    @property
    def format(self) -> str:
        return "safetensors-fp8" if self._fp8 else "safetensors"

    @property
    def fp8_variant(self) -> str | None:
        """ComfyUI's FP8 convention (weights/fp8.py), None when no weight is FP8."""
        return self._fp8.variant if self._fp8 else None

    def keys(self) -> list[str]:
        return list(self._keys)

    def all_keys(self) -> list[str]:
        """Every stored tensor, FP8 scales and markers included."""
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def stored_name(self, name: str) -> str:
        return name

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self._entries[k].shape for k in self._keys}

    def stored_dtype(self, name: str) -> torch.dtype:
        return self._entries[name].dtype

    def dtype(self, name: str) -> torch.dtype:
        """dtype of `get(name)`: float32 for FP8 weights, else the stored one."""
        d = self._entries[name].dtype
        return torch.float32 if d in FP8_QTYPES else d

    def qtype(self, name: str) -> str:
        d = self._entries[name].dtype
        return FP8_QTYPES.get(d) or ST_NAMES[d]

    def nbytes(self, name: str) -> int:
        entry = self._entries[name]
        return math.prod(entry.shape) * entry.dtype.itemsize

    def field(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def tokenizer(self) -> None:
        return None

    # -- tensors ---------------------------------------------------------------------------------------
    def _map(self, index: int, access: int = mmap.ACCESS_READ) -> mmap.mmap:
        with self._lock:
            mm = self._maps.get((index, access))
            if mm is None:
                with open(self.files[index], "rb") as f:
                    mm = self._maps[index, access] = mmap.mmap(f.fileno(), 0, access=access)
        return mm

    def view(self, name: str) -> torch.Tensor:
        """The stored tensor as a zero-copy, read-only view into the mapping (FP8 weights raw)."""
        file, dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        raw = readonly_tensor(np.frombuffer(self._map(file), dtype=np.uint8, count=end - begin, offset=begin))
        try:
            return raw.view(dtype).reshape(shape)
        except RuntimeError:  # storage offset not a multiple of the item size: copy to realign
            return raw.clone().view(dtype).reshape(shape)

    def get_view(self, name: str) -> torch.Tensor:
        """Like `get`, but dense tensors are zero-copy read-only views into the mapping (converter use)."""
        if self._entries[name].dtype in FP8_QTYPES:
            return self._fp8.dequantize(name)
        return self.view(name)

    def get(self, name: str) -> torch.Tensor:
        """A writable CPU tensor over copy-on-write pages of the file; FP8 weights dequantized to float32."""
        file, dtype, shape, begin, end = self._entries[name]
        if dtype in FP8_QTYPES:
            return self._fp8.dequantize(name)
        if end == begin or begin % dtype.itemsize:  # empty, or misaligned: a copy
            return self.view(name).clone()
        private = self._map(file, mmap.ACCESS_COPY)
        return torch.frombuffer(private, dtype=dtype, count=math.prod(shape), offset=begin).reshape(shape)

    def get_quant(self, name: str):
        """An FP8 e4m3 weight as `QuantWeight` (raw values, zero copy, with its scale)."""
        if self._entries[name].dtype is not torch.float8_e4m3fn:
            raise CheckpointError(f"{self.path}: tensor {name} is {self.qtype(name)}, not FP8_E4M3")
        return self._fp8.quant_weight(name)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from the resident set (best effort)."""
        entry = self._entries[name]
        advise(self._maps.get((entry.file, mmap.ACCESS_READ)), entry.begin, entry.end, "MADV_DONTNEED")

    def prefetch(self, name: str) -> None:
        """Start reading the tensor's pages in the background (best effort)."""
        entry = self._entries[name]
        if entry.end > entry.begin:
            advise(self._map(entry.file), entry.begin, entry.end, "MADV_WILLNEED")
