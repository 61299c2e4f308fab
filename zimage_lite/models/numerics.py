"""Float16's range in the model code: which tensors may leave it, and the exact ways we keep them in.

float16's largest finite value is 65504. Z-Image's activations exceed it: the SwiGLU product
`silu(w1 x) * w3 x`, the attention and FFN outputs before their post-norms, the residual stream and the
final layer's input (field reports: Tongyi-MAI/Z-Image#14, stable-diffusion.cpp#1253, sdnext PR #4753),
and Qwen3's residual stream carries a few "massive activation" channels (Sun et al. 2024, "Massive
Activations in Large Language Models"). This is a property of the model's numerics, parameterised by the
compute dtype, so it lives here, beside the layers (the runtime's QuantLinear keeps its own 1/128 input
scale for its GEMM; the two compose, see `linear_wide`):

- `wide_dtype(dtype)`: the dtype of tensors that can grow (residual streams, SwiGLU products, the outputs
  of `linear_wide`): float32 when computing in float16, the compute dtype otherwise. bfloat16 has
  float32's exponent range, so bf16 and fp32 runs execute exactly the reference's operations.
- a matmul input right after a norm is bounded by the norm: it stays in the compute dtype (norms take a
  wide input and return the compute dtype, `norm_dtype`).
- `linear_wide(linear, x, dtype)`: a bias-free linear whose *output* can outgrow float16 (attention and
  FFN output projections). In float16 each token's input row is multiplied by the power of two that puts
  its largest element in [2^5, 2^6) (exact: only exponents change), the GEMM runs in float16, and the
  result is divided by the same power of two in float32. Then |y| <= 2^6 * ||W_row||_1 whatever the
  activations: below 65504 for any row with ||W_row||_1 < 1023 (a Z-Image w2 row of 10240 weights of
  typical size 0.01-0.02 has ~100-200; the stress model's largest is ~80). Elements below ~2^-20 of their
  row's maximum become subnormal; their share of the dot product is below fp16's own rounding.
Nothing is clamped: no step here loses more than float16 rounding.
"""

from __future__ import annotations

import torch
from torch import nn

ROW_MAX_LOG2 = 6  # scaled rows have their largest |element| in [2^5, 2^6)
_TINY_ROW = 2.0**-64  # an all-zero (or subnormal) row gets a finite scale, 2^69


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of tensors that can outgrow `dtype`'s range (module docstring)."""
    return torch.float32 if dtype == torch.float16 else dtype


def norm_dtype(x_dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """A norm's output dtype: its input's (the references' cast order), except that a float32 stream
    normed for a float16 model returns to float16 (the norm has bounded it)."""
    return torch.float16 if weight_dtype == torch.float16 else x_dtype


def pow2_scale(x: torch.Tensor, dims: int | tuple[int, ...] = -1) -> torch.Tensor:
    """float32 powers of two s (x's shape with `dims` kept as 1) with max|x * s| over `dims` in [2^5, 2^6).
    A non-finite maximum gives a non-finite result later on purpose: the sampler's guard sees it."""
    # max |x| without an |x| temporary (the FFN product is S x F)
    amax = torch.linalg.vector_norm(x.detach(), float("inf"), dims, keepdim=True).float().clamp_min(_TINY_ROW)
    _, exponent = torch.frexp(amax)  # amax = m * 2^exponent, m in [0.5, 1)
    return torch.exp2((ROW_MAX_LOG2 - exponent).float())


def to_scaled(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x * scale written straight into `dtype` (no float32 copy of x: the FFN product is S x F)."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    return torch.mul(x, scale, out=out)


def linear_wide(linear: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`linear(x)` for a bias-free linear in compute dtype `dtype`, returned in `wide_dtype(dtype)`;
    in float16 through per-token power-of-two scaling (module docstring)."""
    if dtype != torch.float16:
        return linear(x.to(dtype))
    scale = pow2_scale(x)
    return linear(to_scaled(x, scale, dtype)).float() / scale
