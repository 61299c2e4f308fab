"""Triton dequant kernels against gguf-py's numpy dequantizer and our torch reference, on `kernel_device`
(conftest): compiled on the GPU where there is CUDA, the CPU interpreter elsewhere.

Tolerance: none. float32 outputs must be bit-identical; fp16 outputs equal the float32 result cast
to fp16; bf16 outputs equal the float32 result rounded the way the running mode rounds (the interpreter
truncates, compiled kernels round to nearest even: DESIGN §4). Output buffers are pre-filled with NaN so
an element the kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from zimage_lite.kernels import dequant_triton, dispatch
from zimage_lite.kernels.dequant_triton import LAYOUTS, dequantize_blocks, dequantize_fp8
from zimage_lite.quant import formats, fp8

# Byte offsets of the fp16 fields in each block (ggml-common.h).
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}

SHAPES = [(3, 256), (5, 512), (2, 2560), (2, 3840), (1, 9728), (1, 10240)]


def sane_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """Finite fp16 scales of mixed size and sign, with zeros, subnormals and large values."""
    d = rng.standard_normal(n) * 10.0 ** rng.integers(-4, 2, n)
    special = rng.integers(0, 16, n)
    d = np.where(special == 0, 0.0, d)
    d = np.where(special == 1, 3e-7, d)  # fp16 subnormal
    d = np.where(special == 2, -1000.0, d)
    return d.astype(np.float16)


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random valid block bytes (rows, row_bytes): every bit pattern for the quants, sane fp16 d's."""
    rng = np.random.default_rng(seed)
    _, qk, ts = LAYOUTS[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // qk, ts), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[:, off : off + 2] = sane_f16(rng, raw.shape[0]).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def truncate_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 by dropping the low 16 bits (what the Triton interpreter does)."""
    return (x.contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def expected_bf16(x: torch.Tensor) -> torch.Tensor:
    """What the kernels' bf16 store gives in the mode that actually runs (not what the device suggests)."""
    return truncate_to_bf16(x) if dispatch.kernel_mode() == "interpreted" else x.to(torch.bfloat16)


def poisoned(shape, dtype, device="cpu") -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def test_truncation_helper():
    x = torch.tensor([1.0 + 2**-8 + 2**-9, -(1.0 + 2**-8 + 2**-9)])  # 0.75 ulp of bf16 above +-1
    assert truncate_to_bf16(x).float().tolist() == [1.0, -1.0]
    assert x.to(torch.bfloat16).float().tolist() == [1.0 + 2**-7, -(1.0 + 2**-7)]


def test_layouts_match_formats():
    for qtype, (_, qk, ts) in LAYOUTS.items():
        q = formats.QUANT_TYPES[qtype]
        assert (q.block_size, q.type_size) == (qk, ts)
    assert set(dispatch.TRITON_QTYPES) == {*LAYOUTS, "FP8_E4M3"}


@pytest.mark.parametrize("qtype", list(LAYOUTS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dequant_fp32_bit_identical(qtype, shape, kernel_device):
    raw = random_blocks(qtype, *shape, seed=shape[1] + len(qtype))
    ggml = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]))
    ours = formats.dequantize(torch.from_numpy(raw), qtype, shape)
    out = poisoned(shape, torch.float32, kernel_device)
    got = dequantize_blocks(torch.from_numpy(raw).to(kernel_device), qtype, shape, out=out)
    assert got.data_ptr() == out.data_ptr()
    got = got.cpu()
    assert torch.isfinite(ggml).all()
    assert torch.equal(got, ggml)
    assert torch.equal(got, ours)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # d up to 1000: some fp16 outputs are inf
@pytest.mark.parametrize("qtype", list(LAYOUTS))
def test_dequant_fp16_and_bf16_outputs(qtype, kernel_device):
    shape, dev = (4, 512), kernel_device
    raw = torch.from_numpy(random_blocks(qtype, *shape, seed=7))
    ref = formats.dequantize(raw, qtype, shape)
    raw = raw.to(dev)
    half = dequantize_blocks(raw, qtype, shape, torch.float16, out=poisoned(shape, torch.float16, dev))
    assert torch.equal(half.cpu(), ref.to(torch.float16))
    bf16 = dequantize_blocks(raw, qtype, shape, torch.bfloat16, out=poisoned(shape, torch.bfloat16, dev))
    assert torch.equal(bf16.cpu(), expected_bf16(ref))


def all_fp8_bytes(rows: int) -> torch.Tensor:
    """Every e4m3fn bit pattern, shuffled over (rows, 256 * k / rows)."""
    codes = torch.arange(256, dtype=torch.uint8).repeat(2)[torch.randperm(512)]
    return codes.reshape(rows, -1).view(torch.float8_e4m3fn)


def assert_equal_with_nans(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


@pytest.mark.parametrize("scale_shape", [(), (4,), (4, 1)], ids=["tensor", "row", "row2d"])
def test_fp8_all_codes(scale_shape, kernel_device):
    dev = kernel_device
    q = all_fp8_bytes(4)
    scale = torch.rand(scale_shape) * 0.01 + 1e-3
    ref = q.float() * scale.reshape(-1, 1)
    qd, sd = q.to(dev), scale.to(dev)
    got = dequantize_fp8(qd, sd, torch.float32, out=poisoned(q.shape, torch.float32, dev)).cpu()
    assert got.isnan().sum() == 4  # 0x7F and 0xFF, twice each
    assert_equal_with_nans(got, ref)
    assert_equal_with_nans(
        got, fp8.dequantize_fp8(q, scale.reshape(-1, 1) if scale_shape else scale, torch.float32)
    )
    half = dequantize_fp8(qd, sd, torch.float16, out=poisoned(q.shape, torch.float16, dev))
    assert_equal_with_nans(half.cpu(), ref.to(torch.float16))
    bf16 = dequantize_fp8(qd, sd, torch.bfloat16, out=poisoned(q.shape, torch.bfloat16, dev))
    assert_equal_with_nans(bf16.cpu(), expected_bf16(ref))


@pytest.mark.parametrize("shape", [(7, 2600), (5, 1024), (1, 3)])
def test_fp8_tiles_cover_ragged_shapes(shape, kernel_device):
    """Rows not a multiple of the 4-row tile, columns not a multiple of the 1024-column tile: every
    element is written once, with its own row's scale."""
    q = (torch.randn(shape) * 100).to(torch.float8_e4m3fn)
    scale = torch.rand(shape[0], 1) + 0.5
    out = poisoned(shape, torch.float32, kernel_device)
    got = dequantize_fp8(q.to(kernel_device), scale.to(kernel_device), torch.float32, out=out)
    assert torch.equal(got.cpu(), q.float() * scale)


def test_fp8_uint8_view_and_no_scale(kernel_device):
    q = all_fp8_bytes(2)
    got = dequantize_fp8(q.view(torch.uint8).to(kernel_device), None)
    assert_equal_with_nans(got.cpu(), q.float())


def test_bad_arguments_are_refused(kernel_device):
    raw = torch.from_numpy(random_blocks("Q8_0", 2, 64)).to(kernel_device)
    with pytest.raises(ValueError, match="bytes"):
        dequantize_blocks(raw[:, :-1], "Q8_0", (2, 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        dequantize_blocks(raw, "Q8_0", (4, 34))
    with pytest.raises(ValueError, match="out must be"):
        dequantize_blocks(raw, "Q8_0", (2, 64), out=torch.empty(2, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="scale"):
        dequantize_fp8(all_fp8_bytes(2).to(kernel_device), torch.ones(3))


@pytest.mark.parametrize("qtype", [*LAYOUTS, "FP8_E4M3"])
def test_dispatch_backends_agree(qtype, kernel_device):
    shape = (3, 256)
    scale = None
    if qtype == "FP8_E4M3":
        raw = (torch.randn(shape) * 50).to(torch.float8_e4m3fn).to(kernel_device)
        scale = torch.tensor(0.01, device=kernel_device)
    else:
        raw = torch.from_numpy(random_blocks(qtype, *shape)).to(kernel_device)
    by_triton = dispatch.dequantize(raw, qtype, shape, torch.float32, backend="triton", scale=scale)
    by_torch = dispatch.dequantize(raw, qtype, shape, torch.float32, backend="torch", scale=scale)
    assert torch.equal(by_triton, by_torch)
    out = poisoned(shape, torch.float16, kernel_device)
    assert dispatch.dequantize(raw, qtype, shape, torch.float16, backend="torch", out=out, scale=scale) is out
    assert torch.equal(out, by_torch.half())


def test_auto_on_cpu_uses_torch(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("Triton kernel called for a CPU tensor under backend='auto'")

    monkeypatch.setattr(dequant_triton, "dequantize_blocks", boom)
    raw = torch.from_numpy(random_blocks("Q4_K", 2, 256))
    w = dispatch.dequantize(raw, "Q4_K", (2, 256))
    assert torch.equal(w, formats.dequantize(raw, "Q4_K", (2, 256)))
    assert dispatch.select_path(1, "Q4_K", torch.device("cpu")) == "torch"
    assert dispatch.candidate_paths(1, "Q4_K", torch.device("cpu")) == ("torch",)


@pytest.mark.interpreter
def test_forced_triton_on_cpu_offers_both_paths():
    assert dispatch.candidate_paths(16, "Q4_K", torch.device("cpu"), "triton") == ("dequant", "gemv")
    assert dispatch.candidate_paths(17, "Q4_K", torch.device("cpu"), "triton") == ("dequant",)


def test_dispatch_refuses_what_triton_cannot_do():
    from zimage_lite.errors import UsageError

    raw = torch.zeros(1, 110, dtype=torch.uint8)  # one Q3_K block: torch only
    with pytest.raises(UsageError, match="no Triton kernel for Q3_K"):
        dispatch.dequantize(raw, "Q3_K", (1, 256), backend="triton")
    assert dispatch.dequantize(raw, "Q3_K", (1, 256)).shape == (1, 256)
    with pytest.raises(UsageError, match="unknown kernel backend"):
        dispatch.dequantize(raw, "Q3_K", (1, 256), backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", list(LAYOUTS))
def test_dequant_on_gpu(qtype):
    shape = (64, 3840)
    raw = torch.from_numpy(random_blocks(qtype, *shape)).cuda()
    ref = formats.dequantize(raw.cpu(), qtype, shape)
    assert torch.equal(dequantize_blocks(raw, qtype, shape).cpu(), ref)
    assert torch.equal(dequantize_blocks(raw, qtype, shape, torch.bfloat16).cpu(), ref.to(torch.bfloat16))


def test_works_without_triton():
    """With triton unimportable, the package imports, reports it, and QuantLinear runs on torch."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, zimage_lite.kernels as k\n"
        "from zimage_lite.runtime.quant_linear import QuantLinear\n"
        "assert not k.triton_available()\n"
        "m = QuantLinear.from_linear(torch.nn.Linear(64, 8), 'Q8_0', torch.float32)\n"
        "assert m(torch.randn(2, 64)).shape == (2, 8)\n"
        "assert k.select_path(1, 'Q8_0', torch.device('cpu'), 'auto') == 'torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.gpu
def test_fp8_native_decode_on_gpu():
    q = all_fp8_bytes(4).cuda()
    scale = torch.rand(4, 1, device="cuda")
    ref = q.float() * scale
    assert_equal_with_nans(dequantize_fp8(q, scale, native=False), ref)
    assert_equal_with_nans(dequantize_fp8(q, scale, native=True), ref)  # bit decode where no hardware
