"""The GGUF block formats zimage-lite reads and writes, and one entry point to (de)quantize any of them.

`quantize` returns the GGUF byte layout (rows of blocks). On the CPU it runs ggml's own reference
quantizers (ggml_lib.py: ggml's bytes by construction) where the libggml-python wheel is installed, else
our torch emulation of them (legacy.py, kquants.py), which also runs on GPUs: Q8_0 / Q4_0 bytes equal
ggml's, K-quant bytes nearly all (a one-ulp difference in an fp16 scale can flip a rounding; the error
is the same). `dequantize` is bit-identical to gguf-py's `gguf.quants.dequantize` (float32), then cast,
on whatever device the input lives on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import gguf
import torch

from zimage_lite.errors import NonFiniteError, UsageError
from zimage_lite.quant import ggml_lib, kquants, legacy

BlockFn = Callable[[torch.Tensor], torch.Tensor]

# Elements handled per K-quant call: bounds the temporaries of their searches (~20 x this x 4 bytes).
# 2 MB of float32 per op: smaller calls mean more ops, and each op's dispatch holds the GIL, which stops
# the converter's threads from scaling (measured on 2 cores: 1 MB 38, 2 MB 49, 4 MB 48 MB/s of Q4_K).
# The legacy quantizers take larger calls: they stage their work themselves (legacy.py).
_CHUNK_ELEMENTS = 1 << 19
_LEGACY_CHUNK_ELEMENTS = 1 << 21  # 8 MB: the scale stage's ops then run on 65536 blocks each
_DEQUANT_CHUNK_ELEMENTS = 1 << 22  # 16 MB of float32 out per dequantize call
# Elements per ggml call: the float32 copy each worker holds (4 MB), and the unit of work that the
# converter's threads share (~50 ms of Q4_K per thread, so a tensor's chunks spread evenly).
_GGML_CHUNK_ELEMENTS = 1 << 20

QUANTIZERS = ("ggml", "torch")  # what `quantizer=` may force; None picks ggml where usable
QUANTIZER_KEY = "zimage_lite.quantizer"  # file metadata: what wrote the quantized bytes
# Types whose torch quantizer gives ggml's bytes on any device (fast on a GPU). The K-quant emulation
# misses 1-2 blocks in 256 on some CPUs and GPUs and is slow there: ggml's job, on the CPU.
EXACT_ON_ANY_DEVICE = ("Q8_0", "Q4_0")


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
    ggml_writes: bool = False  # no torch quantizer, but ggml's library writes it (Q3_K, Q2_K)

    @property
    def chunk_blocks(self) -> int:
        """Blocks per quantize call."""
        elements = _LEGACY_CHUNK_ELEMENTS if self.block_size == legacy.QK else _CHUNK_ELEMENTS
        return max(1, elements // self.block_size)


def _entry(
    name: str, quantize: BlockFn | None, dequantize: BlockFn, checks_finite: bool = False, ggml: bool = False
) -> QuantType:
    ggml_type = gguf.GGMLQuantizationType[name]
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    return QuantType(name, ggml_type, block_size, type_size, quantize, dequantize, checks_finite, ggml)


QUANT_TYPES: dict[str, QuantType] = {
    q.name: q
    for q in [
        _entry("Q8_0", legacy.quantize_q8_0, legacy.dequantize_q8_0, checks_finite=True),
        _entry("Q4_0", legacy.quantize_q4_0, legacy.dequantize_q4_0, checks_finite=True),
        _entry("Q4_K", kquants.quantize_q4_k, kquants.dequantize_q4_k),
        _entry("Q5_K", kquants.quantize_q5_k, kquants.dequantize_q5_k),
        _entry("Q6_K", kquants.quantize_q6_k, kquants.dequantize_q6_k),
        # written by ggml's library only (no torch quantizer): the 2-3 bit types, where an imatrix matters most
        _entry("Q2_K", None, kquants.dequantize_q2_k, ggml=True),
        _entry("Q3_K", None, kquants.dequantize_q3_k, ggml=True),
        # read-only: community GGUF files use them
        _entry("Q4_1", None, legacy.dequantize_q4_1),
        _entry("Q5_0", None, legacy.dequantize_q5_0),
        _entry("Q5_1", None, legacy.dequantize_q5_1),
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
    n = blocks.shape[0]
    if 0 < n <= step:
        return fn(blocks)
    # n == 0 takes this path too: the block functions' byte views fail on empty tensors
    out = torch.empty(n, out_width, dtype=torch.uint8, device=blocks.device)
    for start in range(0, n, step):
        out[start : start + step] = fn(blocks[start : start + step])
    return out


def pick_quantizer(device: torch.device | str = "cpu", quantizer: str | None = None) -> str:
    """Which quantizer `quantize` runs for a tensor on `device`: "ggml" (CPU, where its library loads) or
    "torch". `quantizer` forces one; forcing ggml where it cannot run is a UsageError saying why."""
    if quantizer not in (None, *QUANTIZERS):
        raise UsageError(f"unknown quantizer {quantizer!r} (choose {' or '.join(QUANTIZERS)})")
    on_cpu = torch.device(device).type == "cpu"
    if quantizer == "ggml":
        if not on_cpu:
            raise UsageError(f"ggml's quantizers run on the CPU, not on {device}")
        if not ggml_lib.available():
            raise UsageError(f"ggml's quantizers are unavailable: {ggml_lib.unavailable_reason()}")
        return "ggml"
    if quantizer == "torch" or not on_cpu:
        return "torch"
    return "ggml" if ggml_lib.available() else "torch"


def quantize_on(qtype: str, device: str | None) -> str:
    """Where a converter asked for `device` quantizes `qtype`: there for the exact types, else the CPU."""
    return device if device is not None and qtype in EXACT_ON_ANY_DEVICE else "cpu"


def quantizer_version(quantizer: str) -> str:
    """What wrote the bytes, for file metadata (`zimage_lite.quantizer`)."""
    if quantizer == "ggml":
        return ggml_lib.load().version
    return f"torch {torch.__version__} (zimage-lite's emulation of ggml's quantizers)"


def _run_all(pool: Executor, fn: Callable[[int], None], args: range) -> None:
    futures = [pool.submit(fn, a) for a in args]
    try:
        for f in futures:
            f.result()
    finally:  # after a failure, chunks not yet started are dropped
        for f in futures:
            f.cancel()


def _run_chunks(one_chunk: Callable[[int], None], starts: range, pool: Executor | None) -> None:
    if pool is None or len(starts) == 1:
        for start in starts:
            one_chunk(start)
    else:
        _run_all(pool, one_chunk, starts)


def _quantize_ggml_imatrix(
    w: torch.Tensor, q: QuantType, pool: Executor | None, imatrix: torch.Tensor
) -> torch.Tensor:
    """ggml's bytes with an importance matrix: whole rows per call (the imatrix weighs columns)."""
    n = w.shape[-1]
    rows = w.detach().reshape(-1, n)
    out = torch.empty(rows.shape[0], n // q.block_size * q.type_size, dtype=torch.uint8)
    weights = imatrix.detach().to(torch.float32, copy=True).contiguous()
    step = max(1, _GGML_CHUNK_ELEMENTS // n)

    def one_chunk(start: int) -> None:
        values = rows[start : start + step].to(torch.float32).contiguous()
        if not all_finite(values):
            raise NonFiniteError("NaN or infinity among the values")
        ggml_lib.quantize_rows(values, out[start : start + step], int(q.ggml_type), weights)

    _run_chunks(one_chunk, range(0, rows.shape[0], step), pool)
    return out


def _quantize_ggml(w: torch.Tensor, q: QuantType, pool: Executor | None) -> torch.Tensor:
    """ggml's bytes, one chunk of blocks per call (in `pool` when given). Each chunk is copied to float32
    (bounded temporaries) and checked for NaN/Inf there: ggml would quantize them silently."""
    flat = w.detach().reshape(-1)
    n_blocks = flat.numel() // q.block_size
    out = torch.empty(n_blocks, q.type_size, dtype=torch.uint8)
    step = max(1, _GGML_CHUNK_ELEMENTS // q.block_size)

    def one_chunk(start: int) -> None:
        stop = min(start + step, n_blocks)
        values = flat[start * q.block_size : stop * q.block_size].to(torch.float32).contiguous()
        if not all_finite(values):
            raise NonFiniteError("NaN or infinity among the values")
        ggml_lib.quantize_blocks(values, out[start:stop], int(q.ggml_type), q.block_size)

    _run_chunks(one_chunk, range(0, n_blocks, step), pool)
    return out


def _quantize_torch(w: torch.Tensor, q: QuantType) -> torch.Tensor:
    blocks = w.detach().to(torch.float32).reshape(-1, q.block_size)
    if not q.checks_finite and not all_finite(blocks):
        raise NonFiniteError("NaN or infinity among the values")
    return _by_chunks(q.quantize, blocks, q.type_size, q.chunk_blocks)


def quantize(
    w: torch.Tensor,
    qtype: str,
    quantizer: str | None = None,
    pool: Executor | None = None,
    imatrix: torch.Tensor | None = None,
) -> torch.Tensor:
    """w (..., n) float of any dtype, n a multiple of the block size -> uint8 (..., n/block * type_size).

    Computed in float32. `quantizer`: None picks ggml's (CPU tensors, library present), else the torch
    emulation on w's device; "ggml" or "torch" forces one (see pick_quantizer). `pool`: threads that
    share ggml's chunks (the converter's); the torch quantizers ignore it. `imatrix` (w.shape[-1],): the
    mean square of each input channel, for ggml's importance-weighted quantizers (ggml only).
    Raises NonFiniteError when w holds NaN or infinity."""
    q = _lookup(qtype)
    if q.quantize is None and not q.ggml_writes:
        raise UsageError(
            f"{qtype} is a read-only format here (choose one of {', '.join(quantizable_types())})"
        )
    if w.ndim == 0 or w.shape[-1] % q.block_size:
        raise UsageError(
            f"cannot store shape {tuple(w.shape)} as {qtype}: rows must be multiples of {q.block_size}"
        )
    use_ggml = pick_quantizer(w.device, quantizer) == "ggml"
    if not use_ggml and (q.quantize is None or imatrix is not None):
        why = "an importance matrix" if imatrix is not None else qtype
        raise UsageError(f"only ggml's quantizers (on the CPU, libggml-python installed) take {why}")
    if imatrix is not None and tuple(imatrix.shape) != (w.shape[-1],):
        raise UsageError(f"an imatrix of {tuple(imatrix.shape)} values for rows of {w.shape[-1]}")
    try:
        if imatrix is not None:
            raw = _quantize_ggml_imatrix(w, q, pool, imatrix)
        else:
            raw = _quantize_ggml(w, q, pool) if use_ggml else _quantize_torch(w, q)
    except NonFiniteError:  # one message, wherever it was found
        raise NonFiniteError(f"cannot quantize a tensor holding NaN or infinity to {qtype}") from None
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
    return [name for name, q in QUANT_TYPES.items() if q.quantize is not None or q.ggml_writes]
