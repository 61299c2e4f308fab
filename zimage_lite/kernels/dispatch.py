"""Choosing how to dequantize and multiply: fused Triton, Triton dequant + cuBLAS, or plain torch.

Paths of `quant_matmul` (y = x @ W^T + bias):
- "fused": Triton dequant-matmul (matmul_triton.py), when M <= FUSED_MAX_M rows; reads W once.
- "dequant": Triton dequantizes W into a fresh buffer of x's dtype (from torch's caching allocator,
  so it is stream-safe), then torch.nn.functional.linear (cuBLAS). Best for large M.
- "torch": the torch reference dequantizers (zimage_lite.quant.formats / quant.fp8) + F.linear.

backend="auto" uses Triton only on CUDA devices of compute capability >= 8.0 with triton installed
(below that Triton has no tensor-core dots and Pascal is unsupported); CPU tensors always take the
torch path. backend="triton" forces Triton and also runs on CPU tensors under TRITON_INTERPRET=1 (tests).
Nothing is probed at import; probes are cached per device.

fp16 overflow (Z-Image activations exceed fp16's 65504): every Triton path accumulates in float32.
cuBLAS fp16 GEMMs may reduce split-K partial sums in fp16, so on the dequant/torch paths with fp16
inputs `input_scale` (e.g. 1/128, what stable-diffusion.cpp uses for the FFN w2 input) multiplies x
before the GEMM and the result is divided by it in float32 afterwards, bias added in float32. Pass
out_dtype=torch.float32 when y itself may exceed the fp16 range.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zimage_lite.errors import UsageError

# Kept in sync with dequant_triton.LAYOUTS (tested); here so this module imports without triton.
TRITON_QTYPES = ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "FP8_E4M3")
FUSED_MAX_M = 64
MIN_TRITON_CAPABILITY = (8, 0)
BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class QuantWeight:
    """A quantized (out, in) weight: `data` is uint8 (out, row_bytes) block bytes for GGUF types, or
    float8_e4m3fn (out, in) for "FP8_E4M3" with `scale` (None, scalar or per row, float32)."""

    data: torch.Tensor
    qtype: str
    shape: tuple[int, int]
    scale: torch.Tensor | None = None


@functools.cache
def triton_available() -> bool:
    """True when `import triton` works (it may not on Windows/macOS or CPU-only installs)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device, forced: bool = False) -> bool:
    """Can Triton kernels run on `device`? CPU only under the interpreter and only when `forced`."""
    if not triton_available():
        return False
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_capability(index) >= MIN_TRITON_CAPABILITY
    return forced and device.type == "cpu" and _interpreting()


def _use_triton(qtype: str, device: torch.device, backend: str) -> bool:
    if backend not in BACKENDS:
        raise UsageError(f"unknown kernel backend {backend!r} (choose one of {', '.join(BACKENDS)})")
    if backend == "torch":
        return False
    if backend == "auto":
        return qtype in TRITON_QTYPES and triton_usable(device)
    if qtype not in TRITON_QTYPES:
        raise UsageError(
            f"no Triton kernel for {qtype} (have {', '.join(TRITON_QTYPES)}); use backend='torch'"
        )
    if not triton_usable(device, forced=True):
        raise UsageError(
            f"the Triton backend cannot run on {device}: needs triton and a CUDA GPU of compute capability "
            f">= {MIN_TRITON_CAPABILITY[0]}.{MIN_TRITON_CAPABILITY[1]} (or TRITON_INTERPRET=1 for CPU tensors)"
        )
    return True


def select_path(m: int, qtype: str, device: torch.device, backend: str = "auto") -> str:
    """The path ("fused", "dequant" or "torch") for an M-row product with a `qtype` weight on `device`."""
    if not _use_triton(qtype, device, backend):
        return "torch"
    return "fused" if m <= FUSED_MAX_M else "dequant"


def _torch_dequantize(
    data: torch.Tensor, qtype: str, shape: tuple[int, int], dtype: torch.dtype, scale
) -> torch.Tensor:
    if qtype == "FP8_E4M3":
        from zimage_lite.quant.fp8 import dequantize_fp8

        q = data if data.dtype == torch.float8_e4m3fn else data.view(torch.float8_e4m3fn)
        if scale is None:
            scale = torch.ones((), dtype=torch.float32, device=data.device)
        return dequantize_fp8(q.reshape(shape), scale, dtype)
    from zimage_lite.quant.formats import dequantize as reference_dequantize

    return reference_dequantize(data, qtype, shape, dtype)


def dequantize(
    data: torch.Tensor,
    qtype: str,
    shape: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    out: torch.Tensor | None = None,
    *,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw weight -> `dtype` tensor of `shape` (out, in). `scale` is the FP8 scale (ignored otherwise).

    Float32 results are bit-identical on every backend (gguf-py's dequantize for GGUF types)."""
    shape = (int(shape[0]), int(shape[1]))
    if _use_triton(qtype, data.device, backend):
        from zimage_lite.kernels import dequant_triton

        if qtype == "FP8_E4M3":
            return dequant_triton.dequantize_fp8(data.reshape(shape), scale, dtype, out=out)
        return dequant_triton.dequantize_blocks(data, qtype, shape, dtype, out=out)
    w = _torch_dequantize(data, qtype, shape, dtype, scale)
    return w if out is None else out.copy_(w)


def _linear(
    x: torch.Tensor, w: torch.Tensor, bias, input_scale: float, out_dtype: torch.dtype
) -> torch.Tensor:
    if x.dtype == torch.float16 and (input_scale != 1.0 or out_dtype != torch.float16):
        # Overflow guard (module docstring): the GEMM sees x * input_scale, we undo it in float32.
        y = F.linear(x * input_scale, w).float()
        if input_scale != 1.0:
            y = y * (1.0 / input_scale)
        if bias is not None:
            y = y + bias.float()
        return y.to(out_dtype)
    y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
    return y if y.dtype == out_dtype else y.to(out_dtype)


def quant_matmul(
    x: torch.Tensor,
    weight: QuantWeight,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    input_scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y (..., out) = x (..., in) @ W^T + bias in x's dtype (or `out_dtype`), W a QuantWeight.

    `input_scale` only matters for fp16 on the non-fused paths (module docstring)."""
    n_out, k = weight.shape
    if x.shape[-1] != k:
        raise UsageError(f"quantized linear expects inputs with {k} features, got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    out_dtype = out_dtype or x.dtype
    if x2.shape[0] == 0:  # an empty grid is an error in Triton
        return x.new_empty((*lead, n_out), dtype=out_dtype)
    path = select_path(x2.shape[0], weight.qtype, x.device, backend)
    if path == "fused":
        from zimage_lite.kernels.matmul_triton import fused_matmul

        y = fused_matmul(x2, weight.data, weight.qtype, n_out, bias, weight.scale, out_dtype=out_dtype)
    else:
        w_backend = "triton" if path == "dequant" else "torch"
        w = dequantize(weight.data, weight.qtype, weight.shape, x.dtype, w_backend, scale=weight.scale)
        y = _linear(x2, w, bias, input_scale, out_dtype)
    return y.reshape(*lead, n_out)
