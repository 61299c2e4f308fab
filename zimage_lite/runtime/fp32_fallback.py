"""A denoising step that still gives non-finite values is redone with float32 compute.

float16 is made overflow-free by design in the model code (models/numerics.py), for the tensors whose
growth we know of. A model can still go past that (a fine-tune, a LoRA, a merge with larger weights):
then the step is redone in float32 instead of ending the run with a black image or an error.

- `Float32Compute` is a torch function mode: inside it, every float16 tensor argument of a torch
  operation is used as float32 and every float16 dtype argument (`x.to(torch.float16)`, factories)
  becomes float32, so the same model code runs in float32 with each dense float16 weight upcast at its
  use (one layer's copy at a time) and QuantLinears dequantizing straight to float32: weights stay where
  and as they are (quantized, streamed). Raw-byte operations (views, copies, `.data`) are left alone:
  the streamer and the dequantizers reinterpret bytes through them.
- `RetryInFloat32(denoise, model, dtype, first_step)` is a denoiser (sampling.Denoiser) that wraps
  another: when the output has a NaN/Inf and the compute dtype is float16 it runs the step again
  under `Float32Compute`, logs the first such step of a generation once, and keeps the step numbers
  (1-based, as the progress counts them) in `steps`.
The planner reserves the float32 step's extra working memory in the transformer phase
(planner.fp32_fallback_bytes), so the retry cannot run out of the budget. bfloat16 has float32's range:
no retry there (nothing is checked, nothing reserved), so bf16 and fp32 runs cost what they did.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from zimage_lite.sampling import Denoiser

log = logging.getLogger(__name__)

# operations that reinterpret or move raw bytes: their dtype arguments mean storage, not arithmetic
_RAW_BYTES = frozenset(
    {
        torch.Tensor.view,
        torch.Tensor.view_as,
        torch.Tensor.copy_,
        torch.Tensor.set_,
        torch.Tensor.untyped_storage,
        torch.Tensor.data.__get__,
        torch.Tensor.data.__set__,
    }
)


def _up(value):
    if isinstance(value, torch.Tensor) and value.dtype == torch.float16:
        return value.float()
    return torch.float32 if value is torch.float16 else value


class Float32Compute(TorchFunctionMode):
    """float16 tensors and dtypes become float32 in every torch operation inside (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RAW_BYTES:
            return func(*args, **kwargs)
        if getattr(func, "__name__", "") == "__get__":  # attributes (x.dtype): no copies, rename fp16
            return _up_dtype(func(*args, **kwargs))
        args, kwargs = tree_map(_up, (args, kwargs))
        return func(*args, **kwargs)


def _up_dtype(value):
    return torch.float32 if value is torch.float16 else value


@contextmanager
def float32_compute(model: nn.Module) -> Iterator[None]:
    """`model`'s forward in float32 for the duration: QuantLinears dequantize to float32, everything
    else through `Float32Compute`."""
    from zimage_lite.runtime.quant_linear import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    kept = [m.compute_dtype for m in layers]
    for m in layers:
        m.compute_dtype = torch.float32
    try:
        with Float32Compute():
            yield
    finally:
        for m, dtype in zip(layers, kept):
            m.compute_dtype = dtype


class RetryInFloat32:
    """A Denoiser that redoes a non-finite step in float32 (module docstring)."""

    def __init__(self, denoise: Denoiser, model: nn.Module, dtype: torch.dtype, first_step: int = 0):
        self.denoise, self.model, self.dtype = denoise, model, dtype
        self.step = first_step
        self.steps: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.step += 1
        out = self.denoise(x, t)
        if self.dtype != torch.float16 or bool(torch.isfinite(out).all()):
            return out
        if not self.steps:
            log.warning(
                "step %d gave non-finite values in %s: redone with float32 compute (weights unchanged); "
                "later such steps are redone too and listed in the stats as fp32_fallback_steps",
                self.step, str(self.dtype).removeprefix("torch."),
            )  # fmt: skip
        self.steps.append(self.step)
        with float32_compute(self.model):
            return self.denoise(x, t)
