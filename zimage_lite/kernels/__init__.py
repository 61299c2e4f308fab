"""Dequant / fused dequant-matmul kernels and their dispatch. Importing this does not import triton."""

from zimage_lite.kernels.dispatch import QuantWeight, dequantize, quant_matmul, select_path, triton_available

__all__ = ["QuantWeight", "dequantize", "quant_matmul", "select_path", "triton_available"]
