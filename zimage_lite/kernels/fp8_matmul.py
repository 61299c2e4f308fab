"""FP8 weights on FP8 tensor cores: `torch._scaled_mm` with per-token and per-row scales.

y[m, n] = sx[m] * sw[n] * sum_k qx[m, k] * qw[n, k] (+ bias[n]), where
- qw (N, K) float8_e4m3fn is the stored weight and sw its scale: one per row, or one for the tensor
  (broadcast to every row), as QuantLinear holds them;
- qx = round_e4m3(x / sx) with sx[m] = max_k |x[m, k]| / 448 (448 = largest e4m3 value): each token
  gets its own scale, so one loud token does not crush the precision of the others.
torch._scaled_mm takes qx row-major, qw^T column-major (qw.t() of the row-major weight is exactly
that), scale_a (M, 1) and scale_b (1, N) float32 ("rowwise" scaling), sums in float32 and returns
bf16, the only output dtype its CUDA rowwise kernels (CUTLASS, sm89 and sm90+) write; we cast after.

Cost of the option: x is quantized to e4m3 (3 mantissa bits, relative rounding <= 2^-4 per element)
where the dequant path rounds only W to bf16. The bench reports its quality next to the dequant path.
On CUDA it needs compute capability >= 8.9 and K, N multiples of 16; torch's CPU build has the same
operator, which the tests use.
"""

from __future__ import annotations

import torch

FP8_MATMUL_MODES = ("dequant", "native")
E4M3_MAX = 448.0
# smallest activation scale: an all-zero token quantizes to zeros instead of dividing by zero
_MIN_SCALE = 1e-12


def scaled_mm_usable(device: torch.device, n: int, k: int) -> bool:
    """Can torch._scaled_mm run this (N, K) product on `device`?"""
    if device.type == "cpu":
        return True
    if device.type != "cuda" or n % 16 or k % 16:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (8, 9)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (qx float8_e4m3fn (M, K), sx float32 (M, 1)) with x ~= qx * sx."""
    xf = x.float()
    sx = (xf.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(_MIN_SCALE)
    return (xf / sx).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), sx


def row_scales(scale: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """The weight scale as scale_b: float32 (1, N), a per-tensor scale repeated on every row."""
    if scale is None:
        return torch.ones((1, n), dtype=torch.float32, device=device)
    s = scale.to(device=device, dtype=torch.float32).reshape(-1)
    if s.numel() not in (1, n):
        raise ValueError(f"FP8 scale must have 1 or {n} elements, got shape {tuple(scale.shape)}")
    return s.expand(n).reshape(1, n).contiguous()


def fp8_linear(
    x: torch.Tensor,
    qw: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y (M, N) = x (M, K) @ (qw * scale)^T + bias on FP8 tensor cores (module docstring)."""
    n, k = qw.shape
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"fp8_linear expects x of shape (M, {k}), got {tuple(x.shape)}")
    qx, sx = quantize_per_token(x)
    qw = qw if qw.dtype == torch.float8_e4m3fn else qw.view(torch.float8_e4m3fn)
    y = torch._scaled_mm(
        qx,
        qw.contiguous().t(),
        scale_a=sx,
        scale_b=row_scales(scale, n, x.device),
        bias=None if bias is None else bias.to(torch.bfloat16),
        out_dtype=torch.bfloat16,
    )
    return y.to(out_dtype or x.dtype)
