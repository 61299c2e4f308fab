"""The GGUF writer: `GGUFStreamWriter`, through gguf-py's `GGUFWriter` in its "infos first, data one
tensor at a time" mode, so a converter never holds more than the tensor it is writing.

Its reader is weights/gguf.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from zimage_lite.errors import CheckpointError

# llama.cpp `general.file_type` (gguf.LlamaFileType) per preset: what the bulk of the weights are.
FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
    "q5_k": gguf.LlamaFileType.MOSTLY_Q5_K_S,
    "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "q3_k": gguf.LlamaFileType.MOSTLY_Q3_K_S,
    "q3_k_m": gguf.LlamaFileType.MOSTLY_Q3_K_M,
}


def _ggml_type(qtype: str) -> gguf.GGMLQuantizationType:
    try:
        return gguf.GGMLQuantizationType[qtype]
    except KeyError:
        raise CheckpointError(f"{qtype} is not a GGUF tensor type") from None


def tensor_nbytes(shape: tuple[int, ...], qtype: str) -> int:
    block, size = gguf.GGML_QUANT_SIZES[_ggml_type(qtype)]
    n = math.prod(shape)
    if shape and shape[-1] % block:
        raise CheckpointError(f"shape {shape} does not fit {qtype} blocks of {block}")
    return n // block * size


class GGUFStreamWriter:
    """Write a GGUF file tensor by tensor: declare every tensor (`add`), `begin()`, then `write` each one
    in the declared order. Metadata values are (kind, value) with kind in u32/i32/f32/bool/str/arr, or plain
    Python values (str, bool, int -> u32, float -> f32, list -> array)."""

    def __init__(self, path: str | Path, architecture: str | None, metadata: dict[str, Any]):
        self.path = Path(path)
        self._w = gguf.GGUFWriter(path=None, arch=architecture or "")
        if architecture is None:  # stable-diffusion.cpp style: no architecture key at all
            self._w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
        for key, value in metadata.items():
            self._add_kv(key, value)
        self._order: list[tuple[str, tuple[int, ...], str, int]] = []
        self._next = 0
        self._begun = False

    def _add_kv(self, key: str, value: Any) -> None:
        kind, v = value if isinstance(value, tuple) else (None, value)
        if kind is None:
            kind = (
                "bool" if isinstance(v, bool) else "u32" if isinstance(v, int) else "f32"
                if isinstance(v, float) else "str" if isinstance(v, str) else "arr"
            )  # fmt: skip
        add = {
            "u32": self._w.add_uint32,
            "i32": self._w.add_int32,
            "u64": self._w.add_uint64,
            "f32": self._w.add_float32,
            "bool": self._w.add_bool,
            "str": self._w.add_string,
            "arr": self._w.add_array,
        }[kind]
        add(key, v)

    def add(self, name: str, shape: tuple[int, ...], qtype: str) -> int:
        """Declare a tensor (torch-order shape) stored as qtype; returns its byte size."""
        if self._begun:
            raise RuntimeError("GGUFStreamWriter: add() after begin()")
        nbytes = tensor_nbytes(shape, qtype)
        byte_shape = (*shape[:-1], nbytes // max(1, math.prod(shape[:-1]))) if shape else (nbytes,)
        if qtype == "F32":
            self._w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes)
        elif qtype == "F16":
            self._w.add_tensor_info(name, shape, np.dtype(np.float16), nbytes)
        else:  # BF16 and block types are given as bytes; gguf-py turns the byte shape into elements
            self._w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=_ggml_type(qtype))
        self._order.append((name, tuple(shape), qtype, nbytes))
        return nbytes

    def begin(self) -> None:
        self._w.write_header_to_file(path=self.path)
        self._w.write_kv_data_to_file()
        self._w.write_ti_data_to_file()
        self._begun = True

    def write(self, name: str, data: torch.Tensor) -> None:
        """The next declared tensor's bytes: a CPU tensor of any dtype holding exactly its bytes."""
        expected, _, qtype, nbytes = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"GGUFStreamWriter: got {name}, expected {expected} next")
        data = data.detach().contiguous()
        if data.dtype is torch.bfloat16:
            data = data.view(torch.int16)
        array = data.numpy().reshape(-1).view(np.uint8)
        if array.nbytes != nbytes:
            raise RuntimeError(
                f"GGUFStreamWriter: {name} has {array.nbytes} bytes, declared {nbytes} ({qtype})"
            )
        self._w.write_tensor_data(array)
        self._next += 1

    def close(self) -> None:
        if self._begun and self._next != len(self._order):
            missing = self._order[self._next][0]
            self._w.close()
            raise RuntimeError(f"GGUFStreamWriter: closed before writing {missing}")
        self._w.close()

    def abort(self) -> None:
        """Close the file without checks (the caller deletes it)."""
        self._w.close()
