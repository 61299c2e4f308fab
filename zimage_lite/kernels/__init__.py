"""Dequant / small-M dequant-matmul kernels and their dispatch. Importing this does not import triton."""

from zimage_lite.kernels.dispatch import (
    QuantWeight,
    candidate_paths,
    dequantize,
    quant_matmul,
    select_path,
    triton_available,
)

__all__ = ["QuantWeight", "candidate_paths", "dequantize", "quant_matmul", "select_path", "triton_available"]
