"""The safetensors writer: tensors declared first, then written one at a time in any order.

Its reader is weights/safetensors.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from zimage_lite.weights.safetensors import ST_NAMES


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
                "dtype": ST_NAMES[dtype],
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
