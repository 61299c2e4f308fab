"""Should zimage-lite write i-quants (IQ4_XS, IQ4_NL, IQ3_S...)? Their output error beside the K-quants, with
and without an importance matrix, on one matrix whose inputs have outlier channels.

W: 1024 x 1024, N(0, 1/1024). X: 4096 tokens x 1024, N(0, 1) with 16 channels x16 (as trained transformers
have). imatrix = mean of X^2 per channel. Each type is quantized by ggml's own `ggml_quantize_chunk` (the
libggml-python wheel; `ggml_quantize_init` first, which the i-quants' grids need) and dequantized by
gguf-py; the error is ||X (W - W')^T|| / ||X W^T||.

Run: python benchmarks/iquants_vs_kquants.py
"""

from __future__ import annotations

import ctypes

import gguf
import gguf.quants
import numpy as np

from zimage_lite.quant import ggml_lib

T = gguf.GGMLQuantizationType
TYPES = (T.Q4_K, T.IQ4_XS, T.IQ4_NL, T.Q4_0, T.Q3_K, T.IQ3_S, T.IQ3_XXS, T.Q2_K)


def main() -> None:
    lib = ctypes.CDLL(str(ggml_lib.load().path))
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    quantize = ggml_lib.load().quantize_chunk
    rng = np.random.default_rng(0)
    n = rows = 1024
    w = (rng.standard_normal((rows, n)) / np.sqrt(n)).astype(np.float32)
    x = rng.standard_normal((4096, n)).astype(np.float32)
    x[:, rng.permutation(n)[:16]] *= 16
    imatrix = (x.astype(np.float64) ** 2).mean(0).astype(np.float32)
    ref = x @ w.T
    print("| type | bits/weight | plain | with imatrix |\n|---|---|---|---|")
    for t in TYPES:
        lib.ggml_quantize_init(int(t))
        block, size = gguf.GGML_QUANT_SIZES[t]
        errors = []
        for im in (None, imatrix):
            dst = np.zeros(rows * n // block * size, np.uint8)
            quantize(
                int(t), w.ctypes.data, dst.ctypes.data, 0, rows, n, None if im is None else im.ctypes.data
            )
            back = gguf.quants.dequantize(dst.reshape(rows, -1), t).reshape(rows, n)
            errors.append(np.linalg.norm(x @ back.T - ref) / np.linalg.norm(ref))
        print(f"| {t.name} | {8 * size / block:.3f} | {errors[0]:.4f} | {errors[1]:.4f} |")


if __name__ == "__main__":
    main()
