"""ggml's own reference quantizers, called through ctypes on `libggml-base` (the `libggml-python` wheel).

`ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)` (ggml.h) with imatrix NULL runs
`quantize_row_<type>_ref` from ggml-quants.c: the bytes that define the GGUF formats, the same on every
machine (our torch emulation missed 1-2 blocks in 256 on AMD AVX-512 CPUs). ctypes releases the GIL
during the call, so threads scale. ggml does not look for NaN/Inf: callers check (formats.quantize).

Nothing is loaded at import; `load()` finds the library on first use. Where it is missing (no wheel
for the platform) `available()` is False and `unavailable_reason()` says why; the torch quantizers in
legacy.py / kquants.py are the fallback. `ZIMAGE_LITE_GGML_BASE` may name a libggml-base built elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV_LIBRARY = "ZIMAGE_LITE_GGML_BASE"
# Where the wheels put the library: lib64/ on Linux, lib/ on macOS, bin/ on Windows.
_NAMES = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")
_FOLDERS = ("lib64", "lib", "bin", ".")


@dataclass(frozen=True)
class GgmlLibrary:
    """The loaded library: the quantize entry point and what it is (for file metadata)."""

    path: Path
    quantize_chunk: ctypes._CFuncPtr
    version: str  # e.g. "ggml 0.20.2 (8c63e70), libggml-python 0.20.2.post1"


def _package_dir() -> Path | None:
    spec = importlib.util.find_spec("libggml")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _find() -> Path:
    """The libggml-base file to load; FileNotFoundError says where we looked."""
    if os.environ.get(ENV_LIBRARY):
        return Path(os.environ[ENV_LIBRARY])
    package = _package_dir()
    if package is None:
        raise FileNotFoundError("the libggml-python package is not installed (pip install libggml-python)")
    for folder in _FOLDERS:
        for name in _NAMES:
            if (package / folder / name).is_file():
                return package / folder / name
    raise FileNotFoundError(f"no libggml-base library under {package}")


def _wheel_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("libggml-python")
    except metadata.PackageNotFoundError:
        return None


def _open(path: Path) -> GgmlLibrary:
    lib = ctypes.CDLL(str(path))
    fn = lib.ggml_quantize_chunk
    # size_t ggml_quantize_chunk(enum ggml_type, const float *src, void *dst, int64_t start,
    #                            int64_t nrows, int64_t n_per_row, const float *imatrix)
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    fn.restype = ctypes.c_size_t
    lib.ggml_version.restype = lib.ggml_commit.restype = ctypes.c_char_p
    version = f"ggml {lib.ggml_version().decode()} ({lib.ggml_commit().decode()})"
    wheel = _wheel_version()
    if wheel and not os.environ.get(ENV_LIBRARY):
        version += f", libggml-python {wheel}"
    return GgmlLibrary(path, fn, version)


@functools.cache
def _load() -> GgmlLibrary | str:
    """The library, or why it could not be loaded (cached: one attempt per process)."""
    try:
        found = _find()
        library = _open(found)
    except (OSError, AttributeError) as exc:  # FileNotFoundError is an OSError; AttributeError: no symbol
        log.info("ggml's quantizers are unavailable (%s); using the torch quantizers", exc)
        return str(exc)
    log.debug("loaded %s from %s", library.version, found)
    return library


def available() -> bool:
    return isinstance(_load(), GgmlLibrary)


def unavailable_reason() -> str | None:
    loaded = _load()
    return None if isinstance(loaded, GgmlLibrary) else loaded


def load() -> GgmlLibrary:
    """The library; RuntimeError with the reason when it cannot be loaded."""
    loaded = _load()
    if isinstance(loaded, str):
        raise RuntimeError(f"ggml's quantizers are unavailable: {loaded}")
    return loaded


def quantize_blocks(src: torch.Tensor, dst: torch.Tensor, ggml_type: int, block_size: int) -> None:
    """ggml's reference quantizer over whole blocks: src float32 (n_blocks * block_size,) contiguous on the
    CPU -> dst uint8 (n_blocks, type_size) contiguous, written in place.

    Passed as one row: with no importance matrix every type here quantizes block by block
    (`quantize_<type>` calls `quantize_row_<type>_ref` on nrows * n_per_row values), so rows do not
    matter. ggml aborts the process on a failed GGML_ASSERT, hence the checks here."""
    n = src.numel()
    if src.dtype != torch.float32 or dst.dtype != torch.uint8 or src.device.type != "cpu":
        raise ValueError("quantize_blocks takes float32 in and uint8 out, on the CPU")
    if not (src.is_contiguous() and dst.is_contiguous()) or n % block_size or dst.shape[0] * block_size != n:
        raise ValueError(f"bad layout: {n} values, {tuple(dst.shape)} blocks of {block_size}")
    if n == 0:
        return
    written = load().quantize_chunk(ggml_type, src.data_ptr(), dst.data_ptr(), 0, 1, n, None)
    if written != dst.numel():
        raise RuntimeError(f"ggml wrote {written} bytes, expected {dst.numel()}")


def quantize_rows(src: torch.Tensor, dst: torch.Tensor, ggml_type: int, imatrix: torch.Tensor) -> None:
    """ggml's quantizer with an importance matrix: src float32 (rows, n) -> dst uint8 (rows, row bytes),
    in place; imatrix float32 (n,), the mean square of each input channel.

    With an imatrix, `quantize_<type>` runs `quantize_row_<type>_impl` row by row, each weight's error
    weighted by imatrix[column] (Q8_0 ignores it), so here rows are real rows."""
    if src.dtype != torch.float32 or dst.dtype != torch.uint8 or imatrix.dtype != torch.float32:
        raise ValueError("quantize_rows takes float32 values and imatrix, uint8 out")
    if (
        src.ndim != 2
        or dst.ndim != 2
        or dst.shape[0] != src.shape[0]
        or tuple(imatrix.shape) != src.shape[1:]
    ):
        raise ValueError(
            f"bad layout: {tuple(src.shape)} -> {tuple(dst.shape)}, imatrix {tuple(imatrix.shape)}"
        )
    if not (src.is_contiguous() and dst.is_contiguous() and imatrix.is_contiguous()):
        raise ValueError("quantize_rows takes contiguous tensors")
    if src.device.type != "cpu" or imatrix.device.type != "cpu":
        raise ValueError("quantize_rows runs on the CPU")
    rows, n = src.shape
    if rows == 0:
        return
    written = load().quantize_chunk(ggml_type, src.data_ptr(), dst.data_ptr(), 0, rows, n, imatrix.data_ptr())
    if written != dst.numel():
        raise RuntimeError(f"ggml wrote {written} bytes, expected {dst.numel()}")
