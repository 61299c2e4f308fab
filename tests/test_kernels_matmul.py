"""Fused dequant-matmul (CPU interpreter) against a float32 reference built from gguf-compatible dequant.

Reference: x.float() @ W.float().T + bias with W = formats.dequantize (bit-identical to gguf-py).
Tolerances, elementwise and relative to B = |x| @ |W|^T (the sum of |terms|, so they do not depend on
cancellation):
- fp32 operands: |y - ref| <= 1e-5 * B (observed <= 3e-7; only the summation order differs).
- fp16 operands vs the same product on fp16-rounded x and W: <= 1e-5 * B (fp16 x fp16 products are
  exact in float32, so again only the summation order differs; a single wrong weight of K=10240 would
  show as ~1e-4 * B).
- fp16 operands vs the exact fp32 reference: <= 2e-3 * B (two fp16 roundings, 2 * 2^-11, plus fp32
  accumulation).
- where the result itself is stored in fp16, 2^-11 * |y| more (one rounding of the output).
Output buffers are pre-filled with NaN so unwritten tiles fail.
"""

from __future__ import annotations

import pytest
import torch

from zimage_lite.kernels import dispatch
from zimage_lite.kernels.matmul_triton import FUSED_QTYPES, fused_matmul
from zimage_lite.quant import formats

FP8 = "FP8_E4M3"


def make_weight(qtype: str, n: int, k: int, seed: int = 0):
    """(raw, scale, dequantized float32 W) for a Gaussian weight quantized with our reference."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    if qtype == FP8:
        scale = w.abs().amax() / 448
        q = (w / scale).to(torch.float8_e4m3fn)
        return q, scale, q.float() * scale
    raw = formats.quantize(w, qtype)
    return raw, None, formats.dequantize(raw, qtype, (n, k))


def check(y, x, w, bias, dot_dtype, out_fp16=None, fp8=False):
    """out_fp16: the result was rounded to fp16 once (adds 2^-11 |y| to the fp16 bounds).
    fp8: the kernel feeds the e4m3 codes (exact in fp16) to the dot and scales the accumulator, so W
    is not rounded to fp16."""
    out_fp16 = y.dtype == torch.float16 if out_fp16 is None else out_fp16
    ref = x.float() @ w.T + (0 if bias is None else bias.float())
    bound = x.float().abs() @ w.abs().T + 1e-30
    y = y.float()
    assert torch.isfinite(y).all()
    if dot_dtype == torch.float32:
        assert ((y - ref).abs() / bound).max() <= 1e-5
        return
    w16 = w if fp8 else w.half().float()
    rounded = x.half().float() @ w16.T + (0 if bias is None else bias.float())
    out_err = 2**-11 * rounded.abs() if out_fp16 else 0
    assert ((y - rounded).abs() - out_err).div(bound).max() <= 1e-5
    assert ((y - ref).abs() - out_err).div(bound).max() <= 2e-3


CASES = [
    # (m, n, k): ragged M (1, 3, 17) and N not a multiple of the 64-wide tile
    (1, 40, 512),
    (3, 96, 256),
    (17, 72, 768),
]


@pytest.mark.parametrize("dot_dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("qtype", FUSED_QTYPES)
@pytest.mark.parametrize("mnk", CASES, ids=lambda c: "x".join(map(str, c)))
def test_fused_small(qtype, dot_dtype, mnk):
    m, n, k = mnk
    raw, scale, w = make_weight(qtype, n, k, seed=m)
    x = torch.randn(m, k).to(dot_dtype)
    bias = torch.randn(n).to(dot_dtype)
    out = torch.full((m, n), float("nan"), dtype=dot_dtype)
    y = fused_matmul(x, raw, qtype, n, bias, scale, dot_dtype=dot_dtype, out=out)
    assert y is out
    check(y, x, w, bias, dot_dtype, fp8=qtype == FP8)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("k", [96, 288])
def test_fused_k_not_a_multiple_of_the_tile(qtype, k):
    """K a whole number of 32-blocks but not of the 64-wide K tile: the last tile is half masked."""
    raw, _, w = make_weight(qtype, 20, k)
    x = torch.randn(3, k)
    y = fused_matmul(x, raw, qtype, 20, out=torch.full((3, 20), float("nan")))
    check(y, x, w, None, torch.float32)


REAL_K = {"Q8_0": 2560, "Q4_0": 3840, "Q4_K": 9728, "Q5_K": 10240, "Q6_K": 2560, FP8: 10240}


@pytest.mark.parametrize("qtype", FUSED_QTYPES)
def test_fused_real_k(qtype):
    """The K of Z-Image / Qwen3 layers, with few rows and outputs to keep the interpreter quick."""
    k = REAL_K[qtype]
    dot_dtype = torch.float16 if k != 2560 else torch.float32
    raw, scale, w = make_weight(qtype, 24, k, seed=k)
    x = torch.randn(2, k).to(dot_dtype)
    y = fused_matmul(x, raw, qtype, 24, None, scale, dot_dtype=dot_dtype)
    check(y, x, w, None, dot_dtype, fp8=qtype == FP8)


def test_fused_fp8_per_row_scale_and_float32_output():
    n, k = 40, 256
    w = torch.randn(n, k) * torch.linspace(0.01, 1.0, n)[:, None]
    scale = w.abs().amax(dim=1) / 448
    q = (w / scale[:, None]).to(torch.float8_e4m3fn)
    x = torch.randn(5, k, dtype=torch.float16)
    y = fused_matmul(x, q, FP8, n, None, scale, dot_dtype=torch.float16, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    check(y, x, q.float() * scale[:, None], None, torch.float16, fp8=True)


def test_k_must_be_whole_blocks():
    raw = torch.zeros(4, 34 * 3, dtype=torch.uint8)
    with pytest.raises(AssertionError, match="multiple of the block size 32"):
        fused_matmul(torch.zeros(1, 80), raw, "Q8_0", 4)


def test_quant_matmul_paths_agree():
    """backend='triton' (fused for M<=64, dequant+linear above) == torch path, batch dims kept."""
    raw, _, w = make_weight("Q4_K", 48, 512)
    weight = dispatch.QuantWeight(raw, "Q4_K", (48, 512))
    bias = torch.randn(48)
    for shape in [(1, 2, 512), (70, 512)]:
        x = torch.randn(shape)
        y_torch = dispatch.quant_matmul(x, weight, bias, backend="torch")
        y_triton = dispatch.quant_matmul(x, weight, bias, backend="triton")
        assert y_triton.shape == (*shape[:-1], 48)
        assert torch.equal(y_torch, torch.nn.functional.linear(x, w, bias))
        check(y_triton.reshape(-1, 48), x.reshape(-1, 512), w, bias, torch.float32)
    assert dispatch.quant_matmul(torch.randn(0, 512), weight, backend="triton").shape == (0, 48)


@pytest.mark.filterwarnings("ignore:overflow")
def test_fp16_w2_overflow_guard_full_size():
    """A w2-shaped layer (10240 -> 3840) fed fp16 activations up to +-3e4 (torch path, full size).

    |y| reaches ~1e5 here, beyond fp16: with out_dtype=float32 and input_scale=1/128 the result is
    finite and within 2e-3 * B of the float32 reference (fp16 rounding of x and W)."""
    k, n = 10240, 3840
    raw, _, w = make_weight("Q4_0", n, k)
    x = ((torch.rand(2, k) * 2 - 1) * 3e4).half()
    weight = dispatch.QuantWeight(raw, "Q4_0", (n, k))
    y = dispatch.quant_matmul(x, weight, backend="torch", input_scale=1 / 128, out_dtype=torch.float32)
    assert y.abs().max() > 65504  # the test would overflow a plain fp16 result
    assert not torch.isfinite(dispatch.quant_matmul(x, weight, backend="torch")).all()
    check(y, x, w, None, torch.float16, out_fp16=True)  # the GEMM's fp16 result, before rescaling


def test_fp16_w2_overflow_guard_triton():
    """Same through the fused kernel (fp16 operands, float32 accumulation) at reduced N."""
    k, n = 10240, 24
    raw, _, w = make_weight("Q4_K", n, k)
    x = ((torch.rand(3, k) * 2 - 1) * 3e4).half()
    weight = dispatch.QuantWeight(raw, "Q4_K", (n, k))
    y = dispatch.quant_matmul(x, weight, backend="triton", input_scale=1 / 128, out_dtype=torch.float32)
    assert y.abs().max() > 65504
    check(y, x, w, None, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", FUSED_QTYPES)
@pytest.mark.parametrize("m", [1, 16, 100])  # fused, fused, dequant + cuBLAS
def test_bf16_paths_on_gpu(qtype, m):
    """bf16 operands: each product is off by <= 2 * 2^-8 relative, plus bf16 rounding of y."""
    n, k = 200, 3840
    raw, scale, w = make_weight(qtype, n, k)
    weight = dispatch.QuantWeight(raw.cuda(), qtype, (n, k), None if scale is None else scale.cuda())
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    assert dispatch.select_path(m, qtype, x.device) == ("fused" if m <= 64 else "dequant")
    y = dispatch.quant_matmul(x, weight).float().cpu()
    ref = x.float().cpu() @ w.T
    bound = x.float().abs().cpu() @ w.abs().T
    assert ((y - ref).abs() - 2**-8 * ref.abs()).div(bound).max() <= 1e-2
