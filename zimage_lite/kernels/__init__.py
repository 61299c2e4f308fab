"""Dequant / small-M dequant-matmul kernels and their dispatch. Importing this does not import triton."""

from zimage_lite.kernels.dispatch import (
    QuantWeight,
    candidate_paths,
    dequantize,
    kernel_mode,
    quant_matmul,
    select_path,
    triton_available,
)

__all__ = [
    "QuantWeight",
    "candidate_paths",
    "dequantize",
    "kernel_mode",
    "quant_matmul",
    "select_path",
    "triton_available",
]
