"""Choosing how to dequantize and multiply: Triton GEMV, Triton dequant + cuBLAS, FP8 tensor cores, or torch.

Paths of `quant_matmul` (y = x @ W^T + bias):
- "dequant": Triton dequantizes W into a fresh buffer of x's dtype (from torch's caching allocator,
  so it is stream-safe), then torch.nn.functional.linear (cuBLAS). The default wherever Triton runs.
- "gemv": for M <= GEMV_MAX_M rows, a Triton kernel that reads the quantized W once (gemv_triton.py).
  Used only where it was timed faster than "dequant" on this device for this problem (choice.py):
  speed is measured per device, never assumed.
- "torch": the torch reference dequantizers (zimage_lite.quant.formats / quant.fp8) + F.linear.
- FP8 weights with fp8_matmul="native": torch._scaled_mm on FP8 tensor cores (fp8_matmul.py), where
  the device has them (sm >= 8.9); a numerics choice (activations are quantized to e4m3), so it is an
  option, off by default, not something the timing picks.

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
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zimage_lite.errors import UsageError
from zimage_lite.kernels import choice

log = logging.getLogger(__name__)

# Kept in sync with dequant_triton.LAYOUTS (tested); here so this module imports without triton.
TRITON_QTYPES = ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "FP8_E4M3")
# Kept in sync with gemv_triton.GEMV_MAX_M (tested).
GEMV_MAX_M = 16
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


def kernel_mode() -> str:
    """How this process runs the Triton kernels: "compiled", "interpreted" (Triton's CPU interpreter,
    fixed by TRITON_INTERPRET when the kernel modules are imported; it copies CUDA tensors to the host)
    or "unavailable" (no triton). Imports the kernel module, so call it only when the answer is needed."""
    if not triton_available():
        return "unavailable"
    from triton.runtime.interpreter import InterpretedFunction

    from zimage_lite.kernels import dequant_triton

    return (
        "interpreted"
        if isinstance(dequant_triton._dequant_blocks_kernel, InterpretedFunction)
        else "compiled"
    )


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


def candidate_paths(m: int, qtype: str, device: torch.device, backend: str = "auto") -> tuple[str, ...]:
    """The paths that can compute an M-row product with a `qtype` weight on `device`, default first."""
    if not _use_triton(qtype, device, backend):
        return ("torch",)
    return ("dequant", "gemv") if m <= GEMV_MAX_M else ("dequant",)


def select_path(
    m: int, qtype: str, device: torch.device, backend: str = "auto", shape: tuple[int, int] | None = None
) -> str:
    """The path quant_matmul takes for an M-row product with a `qtype` (out, in) = `shape` weight,
    without measuring anything: the choice remembered for this device (choice.py), else the default."""
    paths = candidate_paths(m, qtype, device, backend)
    if len(paths) > 1 and shape is not None:
        known = choice.chooser().known(device, choice.Problem(qtype, *shape, choice.m_bucket(m)))
        if known in paths:
            return known
    return paths[0]


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


def _run_path(
    path: str, x2: torch.Tensor, weight: QuantWeight, bias, input_scale: float, out_dtype: torch.dtype
) -> torch.Tensor:
    if path == "gemv":
        from zimage_lite.kernels.gemv_triton import gemv

        return gemv(x2, weight.data, weight.qtype, weight.shape[0], bias, weight.scale, out_dtype=out_dtype)
    w_backend = "triton" if path == "dequant" else "torch"
    w = dequantize(weight.data, weight.qtype, weight.shape, x2.dtype, w_backend, scale=weight.scale)
    return _linear(x2, w, bias, input_scale, out_dtype)


@functools.cache
def _warn_no_native_fp8(device: torch.device) -> None:
    log.warning(
        "fp8_matmul='native' needs FP8 tensor cores (CUDA sm >= 8.9); %s uses the dequant path", device
    )


def _native_fp8(weight: QuantWeight, device: torch.device, fp8_matmul: str) -> bool:
    from zimage_lite.kernels.fp8_matmul import FP8_MATMUL_MODES, scaled_mm_usable

    if fp8_matmul not in FP8_MATMUL_MODES:
        raise UsageError(f"unknown fp8_matmul {fp8_matmul!r} (choose one of {', '.join(FP8_MATMUL_MODES)})")
    if weight.qtype != "FP8_E4M3" or fp8_matmul != "native":
        return False
    if scaled_mm_usable(device, *weight.shape):
        return True
    _warn_no_native_fp8(device)
    return False


def quant_matmul(
    x: torch.Tensor,
    weight: QuantWeight,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    input_scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
    path: str | None = None,
    fp8_matmul: str = "dequant",
) -> torch.Tensor:
    """y (..., out) = x (..., in) @ W^T + bias in x's dtype (or `out_dtype`), W a QuantWeight.

    `path` forces one of candidate_paths (benchmarks, tests); None lets choice.py pick.
    `fp8_matmul`: "native" runs FP8 weights on FP8 tensor cores where the device has them.
    `input_scale` only matters for fp16 on the dequant/torch paths (module docstring)."""
    n_out, k = weight.shape
    if x.shape[-1] != k:
        raise UsageError(f"quantized linear expects inputs with {k} features, got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    out_dtype = out_dtype or x.dtype
    m = x2.shape[0]
    if m == 0:  # an empty grid is an error in Triton
        return x.new_empty((*lead, n_out), dtype=out_dtype)
    if _native_fp8(weight, x.device, fp8_matmul):
        from zimage_lite.kernels.fp8_matmul import fp8_linear

        return fp8_linear(x2, weight.data, weight.scale, bias, out_dtype).reshape(*lead, n_out)
    paths = candidate_paths(m, weight.qtype, x.device, backend)
    if path is None:
        runs = {p: functools.partial(_run_path, p, x2, weight, bias, input_scale, out_dtype) for p in paths}
        problem = choice.Problem(weight.qtype, n_out, k, choice.m_bucket(m))
        path = choice.chooser().choose(x.device, problem, runs)
    elif path not in paths:
        raise UsageError(
            f"path {path!r} cannot run {m} rows of {weight.qtype} here (can: {', '.join(paths)})"
        )
    return _run_path(path, x2, weight, bias, input_scale, out_dtype).reshape(*lead, n_out)
