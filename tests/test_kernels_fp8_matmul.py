"""FP8 weights through torch._scaled_mm (kernels/fp8_matmul.py), checked on torch's CPU operator.

Two references:
- the exact computation, emulated: sx[m] * sw[n] * sum_k qx[m, k] * qw[n, k] in float32 (the e4m3
  products are exact in float32), so only summation order and the bf16 output rounding differ:
  |y - emul| <= 2^-8 |emul| + 1e-5 * B;
- the unquantized product x @ W^T: e4m3 rounds each activation by <= 2^-4 relative (3 mantissa bits)
  or, below e4m3's normal range, by <= 2^-10 * sx absolute (subnormal spacing 2^-9), so
  |y - ref| <= 2^-4 B + 2^-10 sx sum_k |W[n, k]| + 2^-8 |ref|.
"""

from __future__ import annotations

import pytest
import torch

from zimage_lite.errors import UsageError
from zimage_lite.kernels import dispatch
from zimage_lite.kernels.fp8_matmul import fp8_linear, quantize_per_token, row_scales, scaled_mm_usable
from zimage_lite.runtime.quant_linear import QuantLinear, set_fp8_matmul

FP8 = "FP8_E4M3"


def fp8_weight(n: int, k: int, per_row: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.linspace(0.005, 0.05, n)[:, None]
    scale = (w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax()) / 448
    q = (w / scale).to(torch.float8_e4m3fn)
    return q, scale.float()


def emulate(x, q, scale, bias=None):
    qx, sx = quantize_per_token(x)
    sw = row_scales(scale, q.shape[0], x.device)
    y = (qx.float() @ q.float().T) * sx * sw
    return y + (0 if bias is None else bias.to(torch.bfloat16).float())


def test_quantize_per_token():
    x = torch.randn(4, 64)
    x[1] *= 1000  # a loud token
    x[2] = 0  # a silent one
    qx, sx = quantize_per_token(x)
    assert qx.dtype == torch.float8_e4m3fn and sx.shape == (4, 1)
    assert torch.equal(qx.float().abs().amax(dim=1)[[0, 1, 3]], torch.full((3,), 448.0))
    assert torch.equal(qx[2].float(), torch.zeros(64))
    back = qx.float() * sx
    err = (back - x).abs()
    assert (err <= 2**-4 * x.abs() + 2**-10 * sx).all()  # each token keeps its own precision


@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "per-tensor"])
@pytest.mark.parametrize("m", [1, 7, 64])
def test_fp8_linear_is_the_scaled_computation(per_row, m):
    n, k = 48, 256
    q, scale = fp8_weight(n, k, per_row)
    x = torch.randn(m, k, dtype=torch.bfloat16) * 3
    bias = torch.randn(n, dtype=torch.bfloat16)
    y = fp8_linear(x, q, scale, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    emul = emulate(x, q, scale, bias)
    qx, sx = quantize_per_token(x)
    bound = (qx.float().abs() @ q.float().abs().T) * sx * row_scales(scale, n, x.device)
    assert ((y.float() - emul).abs() - 2**-8 * emul.abs()).div(bound + 1e-30).max() <= 1e-5


def test_fp8_linear_quality_against_the_unquantized_product():
    n, k = 64, 512
    q, scale = fp8_weight(n, k, True)
    w = q.float() * scale
    x = torch.randn(9, k) * torch.logspace(-2, 3, 9)[:, None]  # tokens of very different sizes
    y = fp8_linear(x, q, scale, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    ref = x @ w.T
    _, sx = quantize_per_token(x)
    allowed = 2**-4 * (x.abs() @ w.abs().T) + 2**-10 * sx * w.abs().sum(dim=1) + 2**-8 * ref.abs()
    assert ((y - ref).abs() <= allowed).all()
    # and it is a real approximation, not a copy of the dequant path
    assert not torch.equal(y, ref)


def test_quant_matmul_and_quant_linear_use_it_when_asked():
    layer = QuantLinear.from_linear(torch.nn.Linear(256, 32), FP8, torch.bfloat16, per_row_scale=True)
    x = torch.randn(2, 5, 256, dtype=torch.bfloat16)
    dequant = layer(x)
    assert set_fp8_matmul(torch.nn.Sequential(layer, torch.nn.ReLU()), "native") == 1
    native = layer(x)
    expected = fp8_linear(x.reshape(-1, 256), layer.weight, layer.weight_scale, layer.bias)
    assert torch.equal(native, expected.reshape(2, 5, 32))
    assert not torch.equal(native, dequant)
    w = dispatch.QuantWeight(layer.weight, FP8, (32, 256), layer.weight_scale)
    assert torch.equal(dispatch.quant_matmul(x, w, layer.bias, fp8_matmul="dequant"), dequant)


def test_other_types_ignore_it_and_bad_modes_are_refused():
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 8), "Q8_0", torch.float32)
    x = torch.randn(3, 64)
    before = layer(x)
    set_fp8_matmul(layer, "native")
    assert torch.equal(layer(x), before)
    with pytest.raises(UsageError, match="unknown fp8 matmul mode"):
        set_fp8_matmul(layer, "fast")
    w = layer.quant_weight()
    with pytest.raises(UsageError, match="unknown fp8_matmul"):
        dispatch.quant_matmul(x, w, fp8_matmul="fast")


def test_where_scaled_mm_runs():
    assert scaled_mm_usable(torch.device("cpu"), 30, 20)
    assert not scaled_mm_usable(torch.device("meta"), 32, 32)


@pytest.mark.gpu
def test_fp8_native_on_gpu():
    device = torch.device("cuda")
    if not scaled_mm_usable(device, 64, 256):
        pytest.skip("no FP8 tensor cores (needs sm >= 8.9)")
    q, scale = fp8_weight(64, 256, True)
    x = torch.randn(33, 256, dtype=torch.bfloat16)
    bias = torch.randn(64, dtype=torch.bfloat16)
    y = fp8_linear(x.cuda(), q.cuda(), scale.cuda(), bias.cuda()).float().cpu()
    emul = emulate(x, q, scale, bias)
    qx, sx = quantize_per_token(x)
    bound = (qx.float().abs() @ q.float().abs().T) * sx * row_scales(scale, 64, x.device)
    assert ((y - emul).abs() - 2**-8 * emul.abs()).div(bound + 1e-30).max() <= 1e-5
