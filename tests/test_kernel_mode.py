"""Which Triton the tests run: compiled kernels on a GPU, the CPU interpreter only without CUDA.

Triton fixes the mode when a kernel module's @triton.jit runs; conftest sets TRITON_INTERPRET=1 before
that, and only where torch sees no CUDA. Under the interpreter a CUDA tensor is copied to the host and
back, so a GPU session that interpreted would pass its kernel tests without running a compiled kernel.
"""

from __future__ import annotations

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from zimage_lite.kernels import dequant_triton, gemv_triton, kernel_mode
from zimage_lite.quant import formats

KERNELS = [
    dequant_triton._dequant_blocks_kernel,
    dequant_triton._dequant_fp8_kernel,
    gemv_triton._gemv_kernel,
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is for machines without CUDA")
def test_kernels_are_interpreted_without_cuda():
    assert kernel_mode() == "interpreted"
    assert all(isinstance(k, InterpretedFunction) for k in KERNELS)
    w = torch.randn(2, 64)
    raw = formats.quantize(w, "Q8_0")
    got = dequant_triton.dequantize_blocks(raw, "Q8_0", (2, 64))  # a CPU tensor: only the interpreter runs it
    assert torch.equal(got, formats.dequantize(raw, "Q8_0", (2, 64)))


@pytest.mark.gpu
def test_kernels_are_compiled_on_a_gpu():
    assert kernel_mode() == "compiled"
    assert all(isinstance(k, JITFunction) and not isinstance(k, InterpretedFunction) for k in KERNELS)
    w = torch.randn(4, 256)
    raw = formats.quantize(w, "Q4_K")
    got = dequant_triton.dequantize_blocks(raw.cuda(), "Q4_K", (4, 256))
    assert got.is_cuda and torch.equal(got.cpu(), formats.dequantize(raw, "Q4_K", (4, 256)))
