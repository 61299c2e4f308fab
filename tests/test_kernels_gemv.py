"""Small-M GEMV kernel (CPU interpreter) against a float32 reference built from gguf-compatible dequant.
(Tests marked `interpreter` pass CPU tensors to Triton: they skip where the kernels are compiled, and the
gpu-marked tests run the compiled kernels there.)

Reference: x.float() @ W.T + bias with W = formats.dequantize (bit-identical to gguf-py). The kernel
converts x to float32 exactly and decodes W exactly, so only the summation order differs:
|y - ref| <= 1e-5 * B elementwise, B = |x| @ |W|^T (the sum of |terms|, independent of cancellation;
a single wrong weight of K=10240 would show as ~1e-4 * B). Where y is stored in fp16, one rounding of
the output (2^-11 |y|) more. Output buffers are pre-filled with NaN so unwritten elements fail.
"""

from __future__ import annotations

import pytest
import torch

from zimage_lite.errors import UsageError
from zimage_lite.kernels import dispatch
from zimage_lite.kernels.gemv_triton import GEMV_MAX_M, GEMV_QTYPES, gemv
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


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias=None) -> None:
    ref = x.float() @ w.T + (0 if bias is None else bias.float())
    bound = x.float().abs() @ w.abs().T + 1e-30
    out_err = 2**-11 * ref.abs() if y.dtype == torch.float16 else 0
    assert torch.isfinite(y).all()
    assert ((y.float() - ref).abs() - out_err).div(bound).max() <= 1e-5


CASES = [
    # (m, n, k): M = 1, ragged M, the largest M; N not a multiple of the 8-row tile
    (1, 40, 512),
    (3, 20, 256),
    (16, 12, 768),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("qtype", GEMV_QTYPES)
@pytest.mark.parametrize("mnk", CASES, ids=lambda c: "x".join(map(str, c)))
def test_gemv_small(qtype, x_dtype, mnk):
    m, n, k = mnk
    raw, scale, w = make_weight(qtype, n, k, seed=m)
    x = torch.randn(m, k).to(x_dtype)
    bias = torch.randn(n).to(x_dtype)
    out = torch.full((m, n), float("nan"), dtype=x_dtype)
    y = gemv(x, raw, qtype, n, bias, scale, out=out)
    assert y is out
    check(y, x, w, bias)


# K-quant rows are whole 256-element blocks, so Q4_K only takes the 768 case
@pytest.mark.interpreter
@pytest.mark.parametrize(
    "qtype,k", [(q, k) for q in ("Q8_0", "Q4_0") for k in (96, 288, 768)] + [("Q4_K", 768)]
)
def test_gemv_k_not_a_multiple_of_the_step(qtype, k):
    """K a whole number of blocks but not of the 256-wide K step (Q4_K: 768 = 3 steps of one block,
    with block_k=128 each step covers half a block): the last step is partly masked."""
    raw, _, w = make_weight(qtype, 20, k)
    x = torch.randn(3, k)
    for block_k in (128, 256):
        y = gemv(x, raw, qtype, 20, out=torch.full((3, 20), float("nan")), block_k=block_k)
        check(y, x, w)


REAL_K = {"Q8_0": 2560, "Q4_0": 3840, "Q4_K": 9728, "Q5_K": 10240, "Q6_K": 2560, FP8: 10240}


@pytest.mark.interpreter
@pytest.mark.parametrize("qtype", GEMV_QTYPES)
def test_gemv_real_k(qtype):
    """The K of Z-Image / Qwen3 layers, with few outputs to keep the interpreter quick."""
    k = REAL_K[qtype]
    raw, scale, w = make_weight(qtype, 12, k, seed=k)
    x = torch.randn(2, k).half()
    check(gemv(x, raw, qtype, 12, None, scale), x, w)


@pytest.mark.interpreter
def test_gemv_fp8_per_row_scale_and_float32_output():
    n, k = 40, 256
    w = torch.randn(n, k) * torch.linspace(0.01, 1.0, n)[:, None]
    scale = w.abs().amax(dim=1) / 448
    q = (w / scale[:, None]).to(torch.float8_e4m3fn)
    x = torch.randn(5, k, dtype=torch.float16)
    y = gemv(x, q, FP8, n, None, scale, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    check(y, x, q.float() * scale[:, None])


def test_gemv_refuses_bad_shapes():
    raw = torch.zeros(4, 34 * 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        gemv(torch.zeros(1, 80), raw, "Q8_0", 4)
    with pytest.raises(ValueError, match="M <= 16"):
        gemv(torch.zeros(GEMV_MAX_M + 1, 96), raw, "Q8_0", 4)
    with pytest.raises(ValueError, match="no GEMV kernel for Q3_K"):
        gemv(torch.zeros(1, 256), torch.zeros(4, 110, dtype=torch.uint8), "Q3_K", 4)


def test_gemv_max_m_matches_dispatch():
    assert dispatch.GEMV_MAX_M == GEMV_MAX_M


@pytest.mark.interpreter
def test_quant_matmul_paths_agree():
    """Forced gemv, forced dequant and the torch path give the same product; batch dims kept."""
    raw, _, w = make_weight("Q4_K", 48, 512)
    weight = dispatch.QuantWeight(raw, "Q4_K", (48, 512))
    bias = torch.randn(48)
    for shape, paths in [((1, 2, 512), ["gemv", "dequant", None]), ((70, 512), ["dequant", None])]:
        x = torch.randn(shape)
        y_torch = dispatch.quant_matmul(x, weight, bias, backend="torch")
        assert torch.equal(y_torch, torch.nn.functional.linear(x, w, bias))
        for path in paths:
            y = dispatch.quant_matmul(x, weight, bias, backend="triton", path=path)
            assert y.shape == (*shape[:-1], 48)
            check(y.reshape(-1, 48), x.reshape(-1, 512), w, bias)
    assert dispatch.quant_matmul(torch.randn(0, 512), weight, backend="triton").shape == (0, 48)


@pytest.mark.interpreter
def test_quant_matmul_refuses_a_path_that_cannot_run():
    raw, _, _ = make_weight("Q8_0", 8, 64)
    weight = dispatch.QuantWeight(raw, "Q8_0", (8, 64))
    with pytest.raises(UsageError, match="path 'gemv' cannot run 17 rows"):
        dispatch.quant_matmul(torch.randn(17, 64), weight, backend="triton", path="gemv")
    with pytest.raises(UsageError, match="path 'gemv' cannot run 1 rows"):
        dispatch.quant_matmul(torch.randn(1, 64), weight, backend="torch", path="gemv")


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
    ref = x.float() @ w.T
    bound = x.float().abs() @ w.abs().T
    assert ((y - ref).abs() - 2**-11 * ref.abs()).div(bound).max() <= 2e-3


@pytest.mark.interpreter
def test_fp16_w2_overflow_guard_gemv():
    """The GEMV kernel sums in float32: fp16 inputs up to +-3e4, |y| > 65504, float32 output exact."""
    k, n = 10240, 24
    raw, _, w = make_weight("Q4_K", n, k)
    x = ((torch.rand(3, k) * 2 - 1) * 3e4).half()
    weight = dispatch.QuantWeight(raw, "Q4_K", (n, k))
    y = dispatch.quant_matmul(x, weight, backend="triton", path="gemv", out_dtype=torch.float32)
    assert y.abs().max() > 65504
    check(y, x, w)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", GEMV_QTYPES)
@pytest.mark.parametrize("m", [1, 16, 100])
def test_bf16_paths_on_gpu(qtype, m):
    """bf16 activations: gemv (M <= 16) is exact up to summation order and one bf16 rounding of y;
    dequant + cuBLAS also rounds W to bf16 (2^-8 relative per product)."""
    n, k = 200, 3840
    raw, scale, w = make_weight(qtype, n, k)
    weight = dispatch.QuantWeight(raw.cuda(), qtype, (n, k), None if scale is None else scale.cuda())
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    ref = x.float().cpu() @ w.T
    bound = x.float().abs().cpu() @ w.abs().T
    for path in dispatch.candidate_paths(m, qtype, x.device):
        y = dispatch.quant_matmul(x, weight, path=path).float().cpu()
        tolerance = 1e-5 if path == "gemv" else 1e-2
        assert ((y - ref).abs() - 2**-8 * ref.abs()).div(bound).max() <= tolerance, path
