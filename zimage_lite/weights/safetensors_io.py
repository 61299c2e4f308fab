"""Read safetensors checkpoints lazily (mmap), one tensor at a time.

A `TensorSource` is the read side every loader and the converter share: key names, shapes and dtypes
without reading data, and `get(name)` to materialise one tensor on the CPU.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from zimage_lite.errors import CheckpointError

_ST_DTYPES = {
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


def read_header(path: Path) -> dict:
    """The JSON header of one safetensors file, validated against the file size."""
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
    return header


class SafetensorsSource:
    """Tensors of one or more safetensors files (shards), read through mmap on demand."""

    def __init__(self, files: list[Path]):
        if not files:
            raise CheckpointError("no safetensors files given")
        self.files = files
        self._where: dict[str, Path] = {}
        self._info: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.metadata: dict[str, str] = {}
        for path in files:
            header = read_header(path)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for name, info in header.items():
                dtype = _ST_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
                self._where[name] = path
                self._info[name] = (tuple(info["shape"]), dtype)
        self._handles: dict[Path, object] = {}

    @classmethod
    def open(cls, path: str | Path) -> SafetensorsSource:
        """A .safetensors file, or a folder of shards (with or without an index json)."""
        path = Path(path)
        if path.is_file():
            return cls([path])
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such file or folder")
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
            return cls(files)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no .safetensors files in this folder")
        return cls(files)

    def keys(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._info[name][1]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v[0] for k, v in self._info.items()}

    def nbytes(self, name: str) -> int:
        shape, dtype = self._info[name]
        n = 1
        for d in shape:
            n *= d
        return n * dtype.itemsize

    def get(self, name: str) -> torch.Tensor:
        path = self._where[name]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return handle.get_tensor(name)
