"""GGUF files: a lazy zero-copy reader (`GGUFSource`) and a streaming writer (`GGUFStreamWriter`).

Reading goes through gguf-py's `GGUFReader`, which maps the file (np.memmap) and hands out views: we turn
them into torch tensors without copying. GGUF stores dims reversed (ne[0] is the row length); `shape()`
answers in torch order. Conventions we accept on reading:
- ComfyUI-GGUF files: `general.architecture` ("lumina2" for Z-Image), tensors under their ComfyUI names;
  `comfy.gguf.orig_shape.<name>` (an INT32 array) overrides the stored shape where present;
- stable-diffusion.cpp files: no architecture key and a `model.diffusion_model.` prefix. When any tensor
  has the prefix, only prefixed tensors are kept (ComfyUI-GGUF does the same), prefix stripped;
- llama.cpp text encoders (`general.architecture` = "qwen3") with `tokenizer.ggml.*` fields.

Writing goes through gguf-py's `GGUFWriter` in its "infos first, data one tensor at a time" mode, so a
converter never holds more than the tensor it is writing.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from zimage_lite.config import Qwen3Config
from zimage_lite.errors import CheckpointError
from zimage_lite.weights.mapping import advise

log = logging.getLogger(__name__)

COMFY_PREFIX = "model.diffusion_model."
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
GGUF_MAGIC = b"GGUF"

# Storage types whose raw bytes are plain values.
DENSE_TYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

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
}


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


def _to_torch(array: np.ndarray) -> torch.Tensor:
    """A read-only mapped numpy array as a torch tensor over the same memory (no copy).

    torch warns that the memory is not writable; nothing here writes to it (consumers copy or cast)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class GGUFSource:
    """Tensors of one GGUF file, read on demand from the mapping.

    `check_types=False` opens files with quant types we cannot decode (for `inspect`); `strip_prefix=False`
    keeps every tensor under its stored name."""

    def __init__(self, path: str | Path, check_types: bool = True, strip_prefix: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        if not is_gguf_file(self.path):
            raise CheckpointError(f"{self.path}: not a GGUF file (no GGUF magic bytes)")
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
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
        return _to_torch(self._t(name).data).reshape(-1).view(torch.uint8)

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


def _f32(value: float) -> float:
    """A float32 field as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def qwen3_config_from_gguf(metadata: Any) -> Qwen3Config:
    """A Qwen3Config from llama.cpp `qwen3.*` keys (`metadata`: a dict or a GGUFSource).

    The vocabulary size comes from `token_embd.weight` when a GGUFSource is given (llama.cpp keeps no
    vocab_size key), else from the tokenizer token list."""
    get = metadata.field if isinstance(metadata, GGUFSource) else metadata.get
    arch = get("general.architecture")
    if arch != "qwen3":
        raise CheckpointError(
            f"not a Qwen3 text encoder GGUF (general.architecture is {arch!r}, expected 'qwen3')"
        )

    def need(key: str):
        value = get(f"qwen3.{key}")
        if value is None:
            raise CheckpointError(f"Qwen3 GGUF lacks the qwen3.{key} key")
        return value

    vocab = None
    if isinstance(metadata, GGUFSource) and "token_embd.weight" in metadata:
        vocab = metadata.shape("token_embd.weight")[0]
    if vocab is None:
        tokens = get("tokenizer.ggml.tokens")
        if tokens is None:
            raise CheckpointError("Qwen3 GGUF: cannot tell the vocabulary size (no token_embd, no tokens)")
        vocab = len(tokens)
    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    return Qwen3Config(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("qwen3.attention.head_count_kv") or heads),
        head_dim=int(get("qwen3.attention.key_length") or hidden // heads),
        rms_norm_eps=_f32(get("qwen3.attention.layer_norm_rms_epsilon") or 1e-6),
        rope_theta=_f32(get("qwen3.rope.freq_base") or 1_000_000.0),
        max_position_embeddings=int(get("qwen3.context_length") or 40960),
    )


def qwen3_gguf_fields(config: Qwen3Config) -> dict[str, Any]:
    """The llama.cpp hyperparameter keys for a Qwen3 model (`general.architecture` set separately)."""
    return {
        "qwen3.block_count": ("u32", config.num_hidden_layers),
        "qwen3.context_length": ("u32", config.max_position_embeddings),
        "qwen3.embedding_length": ("u32", config.hidden_size),
        "qwen3.feed_forward_length": ("u32", config.intermediate_size),
        "qwen3.attention.head_count": ("u32", config.num_attention_heads),
        "qwen3.attention.head_count_kv": ("u32", config.num_key_value_heads),
        "qwen3.attention.key_length": ("u32", config.head_dim),
        "qwen3.attention.value_length": ("u32", config.head_dim),
        "qwen3.rope.freq_base": ("f32", config.rope_theta),
        "qwen3.attention.layer_norm_rms_epsilon": ("f32", config.rms_norm_eps),
    }


# -- writing -----------------------------------------------------------------------------------------
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
