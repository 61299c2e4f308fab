"""FP8 (float8_e4m3fn) weights with a float32 absmax scale: W ~= q.float() * scale, scale = amax / 448.

Scale shapes, and how ComfyUI stores them:
- per tensor: a 0-dim float32 tensor. ComfyUI's current convention writes exactly this as
  `<layer>.weight_scale` (shape [], float32) next to `<layer>.weight` (float8_e4m3fn) and
  `<layer>.comfy_quant` (uint8 bytes of the JSON {"format": "float8_e4m3fn"}); older "scaled_fp8" files
  name it `<layer>.scale_weight`, some with shape [1]. `dequantize_fp8` accepts () and (1,).
- per output channel: (out, 1) (broadcasts over a (out, in) weight; (out,) is accepted on reading).
  ComfyUI's per-tensor layout cannot hold these: write per-channel only for our own files.

Quantization divides by the scale and clamps to +-448 (e4m3fn has no infinity; a value one ulp above
448 would otherwise become NaN), then casts with round-to-nearest-even.
"""

from __future__ import annotations

import math

import torch

from zimage_lite.errors import NonFiniteError, UsageError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_SLAB_ELEMENTS = 1 << 21  # 8 MB of float32 quotient at a time


def quantize_fp8(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w float (any dtype) -> (q float8_e4m3fn of w's shape, scale float32).

    scale is 0-dim (per tensor) or (out, 1, ...) with w.ndim dims (per channel = per row of dim 0).
    An all-zero tensor or row gets scale 1.0, so q stays 0 rather than 0/0."""
    w32 = w.detach().to(torch.float32)
    if per_channel:
        if w32.ndim < 2:
            raise UsageError(f"per-channel FP8 needs a weight of at least 2 dims, got shape {tuple(w.shape)}")
        amax = w32.abs().amax(dim=tuple(range(1, w32.ndim)), keepdim=True)
    else:  # one pass, no |w| temporary the size of w (NaN survives aminmax)
        lo, hi = torch.aminmax(w32) if w32.numel() else (torch.zeros(()), torch.zeros(()))
        amax = torch.maximum(hi, lo.neg())
    if not torch.isfinite(amax).all():
        raise NonFiniteError("cannot quantize a weight holding NaN or infinity to FP8")
    scale = amax / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return _scaled_cast(w32, scale), scale


def _scaled_cast(w32: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(w32 / scale).clamp(+-448) cast to e4m3fn, a slab of rows at a time: the float32 quotient of a
    whole 10240 x 3840 weight would be another 157 MB at the converter's peak."""
    q = torch.empty(w32.shape, dtype=FP8_DTYPE, device=w32.device)
    if w32.ndim == 0:
        return q.copy_((w32 / scale).clamp_(-FP8_MAX, FP8_MAX))
    rows = max(1, _SLAB_ELEMENTS // max(1, math.prod(w32.shape[1:])))  # w32[0] would fail on 0 rows
    for start in range(0, w32.shape[0], rows):
        part = scale if scale.ndim == 0 else scale[start : start + rows]
        q[start : start + rows] = (w32[start : start + rows] / part).clamp_(-FP8_MAX, FP8_MAX)
    return q


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale in float32, then cast. scale: () / (1,) per tensor, or (out,) / (out, 1, ...) per row."""
    scale = scale.to(device=q.device, dtype=torch.float32)
    if scale.ndim == 1 and scale.numel() > 1 and q.ndim > 1:
        scale = scale.reshape(-1, *([1] * (q.ndim - 1)))
    if scale.numel() != 1 and (scale.ndim != q.ndim or scale.shape[0] != q.shape[0]):
        raise UsageError(
            f"FP8 scale of shape {tuple(scale.shape)} does not fit a weight of shape {tuple(q.shape)}"
        )
    return (q.to(torch.float32) * scale).to(dtype)
