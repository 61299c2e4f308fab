"""The GGUF block formats zimage-lite reads and writes, and one entry point to (de)quantize any of them.

`quantize` returns the exact GGUF byte layout (rows of blocks), byte-identical to ggml's reference
quantizers; `dequantize` is bit-identical to gguf-py's `gguf.quants.dequantize` (float32), then cast.
Both run on whatever device the input lives on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import gguf
import torch

from zimage_lite.errors import NonFiniteError, UsageError
from zimage_lite.quant import kquants, legacy

BlockFn = Callable[[torch.Tensor], torch.Tensor]

# Elements handled per K-quant call: bounds the temporaries of their searches (~20 x this x 4 bytes).
# 2 MB of float32 per op: smaller calls mean more ops, and each op's dispatch holds the GIL, which stops
# the converter's threads from scaling (measured on 2 cores: 1 MB 38, 2 MB 49, 4 MB 48 MB/s of Q4_K).
# The legacy quantizers take larger calls: they stage their work themselves (legacy.py).
_CHUNK_ELEMENTS = 1 << 19
_LEGACY_CHUNK_ELEMENTS = 1 << 21  # 8 MB: the scale stage's ops then run on 65536 blocks each
_DEQUANT_CHUNK_ELEMENTS = 1 << 22  # 16 MB of float32 out per dequantize call


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in `t`. One min/max pass (NaN and +-inf survive it) instead of a bool tensor the size
    of `t`: ~13x faster than isfinite().all() on a 10240x3840 matrix, which matters to the converter."""
    if t.numel() == 0:
        return True
    dense = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    lo, hi = torch.aminmax(t if t.dtype in dense else t.float())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


@dataclass(frozen=True)
class QuantType:
    """One block format. `quantize` maps float32 blocks (n, block_size) to bytes (n, type_size),
    `dequantize` the reverse; `quantize` is None for formats we only read. `checks_finite`: the
    quantizer raises NonFiniteError itself (from block extrema it computes anyway), so no extra scan."""

    name: str
    ggml_type: gguf.GGMLQuantizationType | None
    block_size: int
    type_size: int
    quantize: BlockFn | None
    dequantize: BlockFn
    checks_finite: bool = False

    @property
    def chunk_blocks(self) -> int:
        """Blocks per quantize call."""
        elements = _LEGACY_CHUNK_ELEMENTS if self.block_size == legacy.QK else _CHUNK_ELEMENTS
        return max(1, elements // self.block_size)


def _entry(
    name: str, quantize: BlockFn | None, dequantize: BlockFn, checks_finite: bool = False
) -> QuantType:
    ggml_type = gguf.GGMLQuantizationType[name]
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    return QuantType(name, ggml_type, block_size, type_size, quantize, dequantize, checks_finite)


QUANT_TYPES: dict[str, QuantType] = {
    q.name: q
    for q in [
        _entry("Q8_0", legacy.quantize_q8_0, legacy.dequantize_q8_0, checks_finite=True),
        _entry("Q4_0", legacy.quantize_q4_0, legacy.dequantize_q4_0, checks_finite=True),
        _entry("Q4_K", kquants.quantize_q4_k, kquants.dequantize_q4_k),
        _entry("Q5_K", kquants.quantize_q5_k, kquants.dequantize_q5_k),
        _entry("Q6_K", kquants.quantize_q6_k, kquants.dequantize_q6_k),
        # read-only: community GGUF files use them
        _entry("Q4_1", None, legacy.dequantize_q4_1),
        _entry("Q5_0", None, legacy.dequantize_q5_0),
        _entry("Q5_1", None, legacy.dequantize_q5_1),
        _entry("Q2_K", None, kquants.dequantize_q2_k),
        _entry("Q3_K", None, kquants.dequantize_q3_k),
    ]
}

# Unquantized storage types: raw bytes are the little-endian values themselves.
FLOAT_TYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def is_quantized(qtype: str) -> bool:
    return qtype in QUANT_TYPES


def _lookup(qtype: str) -> QuantType:
    try:
        return QUANT_TYPES[qtype]
    except KeyError:
        known = ", ".join([*QUANT_TYPES, *FLOAT_TYPES])
        raise UsageError(f"unknown tensor type {qtype!r} (known: {known})") from None


def row_bytes(qtype: str, n_cols: int) -> int:
    """Bytes of one row of n_cols elements stored as qtype."""
    if qtype in FLOAT_TYPES:
        return n_cols * FLOAT_TYPES[qtype].itemsize
    q = _lookup(qtype)
    if n_cols % q.block_size:
        raise UsageError(
            f"a row of {n_cols} elements is not a whole number of {qtype} blocks ({q.block_size})"
        )
    return n_cols // q.block_size * q.type_size


def _by_chunks(fn: BlockFn, blocks: torch.Tensor, out_width: int, step: int) -> torch.Tensor:
    if blocks.shape[0] <= step:
        return fn(blocks)
    out = torch.empty(blocks.shape[0], out_width, dtype=torch.uint8, device=blocks.device)
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = fn(blocks[start : start + step])
    return out


def quantize(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """w (..., n) float of any dtype, n a multiple of the block size -> uint8 (..., n/block * type_size).

    Computed in float32 on w's device; the bytes are what ggml's reference quantizer writes.
    Raises NonFiniteError when w holds NaN or infinity."""
    q = _lookup(qtype)
    if q.quantize is None:
        raise UsageError(
            f"{qtype} is a read-only format here (choose one of {', '.join(quantizable_types())})"
        )
    if w.ndim == 0 or w.shape[-1] % q.block_size:
        raise UsageError(
            f"cannot store shape {tuple(w.shape)} as {qtype}: rows must be multiples of {q.block_size}"
        )
    blocks = w.detach().to(torch.float32).reshape(-1, q.block_size)
    non_finite = f"cannot quantize a tensor holding NaN or infinity to {qtype}"
    if not q.checks_finite and not all_finite(blocks):
        raise NonFiniteError(non_finite)
    try:
        raw = _by_chunks(q.quantize, blocks, q.type_size, q.chunk_blocks)
    except NonFiniteError:  # found by the quantizer itself
        raise NonFiniteError(non_finite) from None
    return raw.reshape(*w.shape[:-1], w.shape[-1] // q.block_size * q.type_size)


def dequantize(
    raw: torch.Tensor, qtype: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """raw uint8 holding prod(shape) elements of qtype (any leading layout) -> tensor of `shape`.

    The float32 values equal gguf-py's `quants.dequantize` bit for bit; `dtype` is applied last.
    Plain F32/F16/BF16 bytes are accepted too."""
    shape = tuple(int(s) for s in shape)
    n_elems = math.prod(shape)
    flat = raw.reshape(-1)
    if flat.dtype != torch.uint8:
        raise UsageError(f"dequantize expects uint8 bytes, got {raw.dtype}")
    if qtype in FLOAT_TYPES:
        values = flat.view(FLOAT_TYPES[qtype])
        if values.numel() != n_elems:
            raise UsageError(f"{flat.numel()} bytes of {qtype} do not hold shape {shape}")
        return values.reshape(shape).to(dtype)
    q = _lookup(qtype)
    if n_elems % q.block_size or flat.numel() != n_elems // q.block_size * q.type_size:
        raise UsageError(f"{flat.numel()} bytes of {qtype} do not hold shape {shape}")
    blocks = flat.reshape(-1, q.type_size)
    out = torch.empty(blocks.shape[0], q.block_size, dtype=torch.float32, device=raw.device)
    step = max(1, _DEQUANT_CHUNK_ELEMENTS // q.block_size)
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = q.dequantize(blocks[start : start + step])
    return out.reshape(shape).to(dtype)


def quantizable_types() -> list[str]:
    return [name for name, q in QUANT_TYPES.items() if q.quantize is not None]
