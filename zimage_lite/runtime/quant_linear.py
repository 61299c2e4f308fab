"""QuantLinear: an nn.Linear whose weight stays in its quantized storage format.

State-dict layout (what GGUF / ComfyUI FP8 files hold, so strict loading works unchanged):
- GGUF block types: `weight` uint8 (out_features, row_bytes), the raw blocks of each row;
- "FP8_E4M3": `weight` float8_e4m3fn (out_features, in_features) and `weight_scale` float32 () with
  W = weight * weight_scale (ComfyUI's per-tensor convention; per_row_scale=True makes it (out, 1),
  the per-channel shape zimage_lite.quant.fp8 writes);
- `bias` (out_features,) in the compute dtype.
All three are nn.Parameters with requires_grad=False, so `load_state_dict(..., assign=True)` onto a
meta-built module replaces them, and `.parameters()` lists everything a streamer has to move.
`.to(...)`, `.half()`, `.cuda()` may move the quantized weight and the scale to another device but never
change their dtypes (see `_apply`); only `bias` is cast. `compute_dtype` is a plain attribute: set it
(or build with `dtype=`) to choose the activation dtype; a cast bias is cast back at use.

fp16 overflow: Z-Image activations exceed the fp16 range. Triton paths accumulate in float32; on the
cuBLAS/torch paths `input_scale` (default 1.0) multiplies the fp16 input before the GEMM and is undone
in float32 after (stable-diffusion.cpp uses 1/128 for the FFN w2 input). `swap_linears` sets
input_scale = 1/128 on down-projections (in_features > out_features, e.g. w2 10240->3840) when the
compute dtype is fp16. `out_dtype` (default: compute dtype) lets a caller get float32 outputs from a
layer whose result may itself exceed 65504. These are this layer's own guards for its GEMM; the model's
numerics (which tensors may grow, the per-token power-of-two scaling of output-projection inputs) are
model code, in models/numerics.py: rows arrive here with max |x| < 2^6, then take the 1/128.

FP8 matmul: `fp8_matmul` is "dequant" (default: W dequantized to the compute dtype, cuBLAS) or "native"
(FP8 weights on FP8 tensor cores via torch._scaled_mm with per-token activation scales, where the
device has them: sm >= 8.9; see kernels/fp8_matmul.py). `set_fp8_matmul(model, mode)` sets every layer.
LoRAs run beside the layer, not in it (runtime/lora.py).
"""

from __future__ import annotations

import torch
from torch import nn

from zimage_lite.errors import CheckpointError, UsageError
from zimage_lite.kernels.dispatch import QuantWeight, dequantize, quant_matmul

FP8 = "FP8_E4M3"
FP16_DOWN_PROJ_INPUT_SCALE = 1.0 / 128.0


def _row_bytes(qtype: str, in_features: int) -> int:
    if qtype == FP8:
        return in_features
    from zimage_lite.quant.formats import QUANT_TYPES, row_bytes

    if qtype not in QUANT_TYPES:
        raise UsageError(f"unknown quantized weight type {qtype!r} (known: {', '.join([*QUANT_TYPES, FP8])})")
    return row_bytes(qtype, in_features)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W stored quantized (module docstring). Input is cast to compute_dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        qtype: str,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        per_row_scale: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.qtype = qtype
        self.compute_dtype = dtype or torch.get_default_dtype()
        self.input_scale = 1.0
        self.out_dtype: torch.dtype | None = None
        self.backend = "auto"
        self.fp8_matmul = "dequant"
        if qtype == FP8:
            self.weight = _frozen(
                torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, device=device)
            )
            scale_shape = (out_features, 1) if per_row_scale else ()
            self.weight_scale = _frozen(torch.ones(scale_shape, dtype=torch.float32, device=device))
        else:
            n_bytes = _row_bytes(qtype, in_features)
            self.weight = _frozen(torch.empty(out_features, n_bytes, dtype=torch.uint8, device=device))
            self.register_parameter("weight_scale", None)
        b = torch.zeros(out_features, dtype=self.compute_dtype, device=device) if bias else None
        self.bias = _frozen(b) if bias else None

    def quant_weight(self) -> QuantWeight:
        return QuantWeight(self.weight, self.qtype, (self.out_features, self.in_features), self.weight_scale)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
        """W as a dense (out_features, in_features) tensor (tests, debugging, LoRA merging)."""
        w = self.quant_weight()
        return dequantize(w.data, w.qtype, w.shape, dtype, backend, scale=w.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        out_dtype = self.out_dtype or self.compute_dtype
        y = quant_matmul(
            x,
            self.quant_weight(),
            self.bias,
            backend=self.backend,
            input_scale=self.input_scale,
            out_dtype=out_dtype,
            fp8_matmul=self.fp8_matmul,
        )
        return y

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, qtype: str, compute_dtype: torch.dtype, per_row_scale: bool = False
    ) -> QuantLinear:
        """Quantize a loaded nn.Linear (its weight is read in float32)."""
        q = cls(linear.in_features, linear.out_features, qtype, linear.bias is not None,
                device=linear.weight.device, dtype=compute_dtype, per_row_scale=per_row_scale)  # fmt: skip
        w = linear.weight.detach().float()
        if qtype == FP8:
            from zimage_lite.quant.fp8 import quantize_fp8

            data, scale = quantize_fp8(w, per_channel=per_row_scale)
            q.weight_scale = _frozen(scale.to(torch.float32).reshape(q.weight_scale.shape))
        else:
            from zimage_lite.quant.formats import quantize

            data = quantize(w, qtype)
        q.weight = _frozen(data.reshape(q.weight.shape))
        if linear.bias is not None:
            q.bias = _frozen(linear.bias.detach().to(compute_dtype))
        return q

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Loaders may cast every floating tensor to the compute dtype: bring the quantized weight and
        # its scale back to their storage dtypes, refusing anything that would change values.
        key = prefix + "weight"
        t = state_dict.get(key)
        if t is not None and t.dtype != self.weight.dtype:
            if self.qtype != FP8 or not t.is_floating_point():
                raise CheckpointError(
                    f"{key}: {self.qtype} weights must be {self.weight.dtype}, got {t.dtype}"
                )
            q = t.to(torch.float8_e4m3fn)
            if t.device.type != "meta" and not torch.equal(q.to(t.dtype), t):
                raise CheckpointError(f"{key}: {t.dtype} values are not FP8-e4m3 values")
            state_dict[key] = q
        scale_key = prefix + "weight_scale"
        if scale_key in state_dict and state_dict[scale_key].dtype != torch.float32:
            state_dict[scale_key] = state_dict[scale_key].to(torch.float32)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        # fn (from .to/.cuda/.half/.to_empty) may cast floating tensors; run it on same-width integer
        # views of weight/weight_scale so only their device (or storage) changes, never their dtype.
        kept = {}
        for name in ("weight", "weight_scale"):
            p = self._parameters.get(name)
            if p is not None:
                kept[name] = p
                self._parameters[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, p in kept.items():
                view_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[p.element_size()]
                moved = fn(p.detach().view(view_dtype)).view(p.dtype)
                self._parameters[name] = _frozen(moved)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, "
            f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}"
        )


def set_fp8_matmul(model: nn.Module, mode: str) -> int:
    """Set `fp8_matmul` ("dequant" or "native") on every QuantLinear in `model`; returns how many."""
    from zimage_lite.kernels.fp8_matmul import FP8_MATMUL_MODES

    if mode not in FP8_MATMUL_MODES:
        raise UsageError(f"unknown fp8 matmul mode {mode!r} (choose one of {', '.join(FP8_MATMUL_MODES)})")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.fp8_matmul = mode
    return len(layers)


def swap_linears(model: nn.Module, qtypes: dict[str, str], compute_dtype: torch.dtype) -> None:
    """Replace the nn.Linear at each module path in `qtypes` (e.g. "layers.0.attention.qkv") by a
    QuantLinear of that qtype. On the meta device the new module is empty (load it afterwards);
    otherwise the Linear's weights are quantized. In fp16, down-projections get input_scale 1/128."""
    for path, qtype in qtypes.items():
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        linear = getattr(parent, attr, None)
        if not isinstance(linear, nn.Linear):
            raise UsageError(f"cannot quantize {path!r}: it is {type(linear).__name__}, not nn.Linear")
        if linear.weight.device.type == "meta":
            q = QuantLinear(linear.in_features, linear.out_features, qtype, linear.bias is not None,
                            device="meta", dtype=compute_dtype)  # fmt: skip
        else:
            q = QuantLinear.from_linear(linear, qtype, compute_dtype)
        if compute_dtype == torch.float16 and linear.in_features > linear.out_features:
            q.input_scale = FP16_DOWN_PROJ_INPUT_SCALE
        setattr(parent, attr, q)
