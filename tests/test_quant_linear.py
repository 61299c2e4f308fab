"""QuantLinear: state-dict layout, meta build + strict assign-loading, forward, dtype safety, swapping.

Forward on the CPU takes the torch path, i.e. exactly F.linear(x, formats.dequantize(W), b), so the
comparisons with that are exact; the dequantized weights themselves are checked against gguf-py.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zimage_lite.errors import CheckpointError, UsageError
from zimage_lite.quant import formats
from zimage_lite.quant.fp8 import quantize_fp8
from zimage_lite.runtime.quant_linear import QuantLinear, swap_linears
from zimage_lite.weights.load import build_meta, load_strict

GGUF_TYPES = ["Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"]
IN, OUT = 512, 48


def quantized_state(qtype: str, w: torch.Tensor, bias: torch.Tensor, per_row: bool = False) -> dict:
    if qtype == "FP8_E4M3":
        q, scale = quantize_fp8(w, per_channel=per_row)
        return {"weight": q, "weight_scale": scale, "bias": bias}
    return {"weight": formats.quantize(w, qtype), "bias": bias}


@pytest.mark.parametrize("qtype", [*GGUF_TYPES, "FP8_E4M3"])
def test_state_dict_layout(qtype):
    m = QuantLinear(IN, OUT, qtype, dtype=torch.bfloat16)
    sd = m.state_dict()
    if qtype == "FP8_E4M3":
        assert {k: (tuple(v.shape), v.dtype) for k, v in sd.items()} == {
            "weight": ((OUT, IN), torch.float8_e4m3fn),
            "weight_scale": ((), torch.float32),
            "bias": ((OUT,), torch.bfloat16),
        }
    else:
        row_bytes = gguf.quants.quant_shape_to_byte_shape((OUT, IN), gguf.GGMLQuantizationType[qtype])
        assert {k: (tuple(v.shape), v.dtype) for k, v in sd.items()} == {
            "weight": (row_bytes, torch.uint8),
            "bias": ((OUT,), torch.bfloat16),
        }
    assert not any(p.requires_grad for p in m.parameters())
    assert "bias" not in QuantLinear(IN, OUT, qtype, bias=False).state_dict()


def test_per_row_scale_shape_and_bad_qtype():
    assert QuantLinear(IN, OUT, "FP8_E4M3", per_row_scale=True).weight_scale.shape == (OUT, 1)
    with pytest.raises(UsageError, match="unknown quantized weight type"):
        QuantLinear(IN, OUT, "Q7_X")
    with pytest.raises(UsageError, match="whole number of Q4_K blocks"):
        QuantLinear(300, OUT, "Q4_K")


@pytest.mark.parametrize("qtype", [*GGUF_TYPES, "FP8_E4M3"])
def test_meta_build_assign_load_and_forward(qtype):
    w = torch.randn(OUT, IN) * 0.05
    bias = torch.randn(OUT)
    state = quantized_state(qtype, w, bias)
    m = build_meta(lambda: QuantLinear(IN, OUT, qtype, dtype=torch.float32))
    assert m.weight.is_meta
    m.load_state_dict(state, strict=True, assign=True)
    assert m.weight.device.type == "cpu" and m.weight.dtype == state["weight"].dtype
    assert isinstance(m.weight, nn.Parameter) and not m.weight.requires_grad

    dense = m.dequantized_weight(torch.float32)
    if qtype == "FP8_E4M3":
        expected = state["weight"].float() * state["weight_scale"]
    else:
        raw = state["weight"].numpy()
        expected = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]))
    assert torch.equal(dense, expected)
    x = torch.randn(2, 3, IN)
    assert torch.equal(m(x), F.linear(x, expected, bias))
    assert ((m(x) - F.linear(x, w, bias)).abs().max()) < 0.25 * F.linear(x, w).abs().max()  # it is w, roughly


def test_load_strict_from_meta_survives_dtype_cast():
    """weights.load.load_strict casts floating tensors to `dtype`: fp8 bytes and the scale come back."""
    w = torch.randn(OUT, IN)
    state = quantized_state("FP8_E4M3", w, torch.randn(OUT))
    m = build_meta(lambda: QuantLinear(IN, OUT, "FP8_E4M3", dtype=torch.bfloat16))
    load_strict(m, state, "test layer", dtype=torch.bfloat16)
    assert m.weight.dtype == torch.float8_e4m3fn and torch.equal(
        m.weight.view(torch.uint8), state["weight"].view(torch.uint8)
    )
    assert m.weight_scale.dtype == torch.float32
    assert m.bias.dtype == torch.bfloat16


def test_load_refuses_wrong_storage():
    m = build_meta(lambda: QuantLinear(IN, OUT, "Q8_0"))
    bad = {"weight": torch.zeros(m.weight.shape, dtype=torch.float16), "bias": torch.zeros(OUT)}
    with pytest.raises(CheckpointError, match="Q8_0 weights must be torch.uint8"):
        m.load_state_dict(bad, assign=True)
    f = build_meta(lambda: QuantLinear(IN, OUT, "FP8_E4M3"))
    not_fp8 = {
        "weight": torch.full((OUT, IN), 0.3),
        "weight_scale": torch.tensor(1.0),
        "bias": torch.zeros(OUT),
    }
    with pytest.raises(CheckpointError, match="not FP8-e4m3 values"):
        f.load_state_dict(not_fp8, assign=True)


@pytest.mark.parametrize("qtype", ["Q4_K", "FP8_E4M3"])
def test_to_dtype_keeps_storage(qtype):
    m = QuantLinear.from_linear(nn.Linear(IN, OUT), qtype, torch.float32)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.to(torch.float16)
    m.half()
    assert m.weight.dtype == before["weight"].dtype
    assert torch.equal(m.weight.view(torch.uint8), before["weight"].view(torch.uint8))
    if qtype == "FP8_E4M3":
        assert m.weight_scale.dtype == torch.float32 and torch.equal(m.weight_scale, before["weight_scale"])
    assert m.bias.dtype == torch.float16
    m.to("meta")
    assert m.weight.is_meta and m.weight.dtype == before["weight"].dtype
    m.to_empty(device="cpu")
    assert m.weight.device.type == "cpu" and m.weight.dtype == before["weight"].dtype


def test_compute_dtype():
    lin = nn.Linear(IN, OUT)
    m = QuantLinear.from_linear(lin, "Q8_0", torch.float16)
    x = torch.randn(4, IN)  # float32 in, cast to compute dtype
    y = m(x)
    assert y.dtype == torch.float16
    w16 = m.dequantized_weight(torch.float16)
    assert torch.equal(y, F.linear(x.half(), w16, m.bias))


def test_fp16_input_scale_keeps_big_outputs():
    """Down-projection in fp16 with activations to +-3e4: out_dtype=float32 + input_scale give
    finite values matching float32 (torch path; tolerance as in test_kernels_matmul)."""
    torch.manual_seed(1)
    lin = nn.Linear(1024, 256)
    nn.init.normal_(lin.weight, std=0.1)
    model = nn.Sequential(lin)
    swap_linears(model, {"0": "Q8_0"}, torch.float16)
    q = model[0]
    assert q.input_scale == 1 / 128
    q.out_dtype = torch.float32
    x = (torch.rand(2, 1024) * 2 - 1) * 3e4
    y = q(x)
    w = q.dequantized_weight()
    ref = F.linear(x.half().float(), w, q.bias.float())
    assert ref.abs().max() > 65504 and torch.isfinite(y).all()
    bound = x.abs() @ w.abs().T
    assert ((y - ref).abs() / bound).max() < 2e-3


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.Module()
        self.attention.qkv = nn.Linear(256, 768)
        self.feed_forward = nn.Module()
        self.feed_forward.w2 = nn.Linear(1024, 256, bias=False)
        self.norm = nn.LayerNorm(256)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(256, 32)


QTYPES = {"layers.0.attention.qkv": "Q4_K", "layers.1.feed_forward.w2": "Q6_K", "head": "FP8_E4M3"}


def test_swap_linears_on_meta_then_load():
    real = Tiny()
    model = build_meta(Tiny)
    swap_linears(model, QTYPES, torch.float32)
    assert (
        isinstance(model.layers[0].attention.qkv, QuantLinear)
        and model.layers[0].attention.qkv.weight.is_meta
    )
    assert isinstance(model.layers[1].attention.qkv, nn.Linear)
    assert model.layers[1].feed_forward.w2.input_scale == 1.0  # only fp16 gets the guard
    state = dict(real.state_dict())
    for path, qtype in QTYPES.items():
        lin = real.get_submodule(path)
        sub = quantized_state(qtype, lin.weight.detach(), lin.bias)
        state.update({f"{path}.{k}": v for k, v in sub.items() if v is not None})
    state = {k: v.detach() for k, v in state.items()}
    load_strict(model, state, "tiny")
    x = torch.randn(3, 256)
    for path in QTYPES:
        mod = model.get_submodule(path)
        ref_w = mod.dequantized_weight()
        lin = real.get_submodule(path)
        xin = torch.randn(3, lin.in_features)
        assert torch.equal(mod(xin), F.linear(xin, ref_w, lin.bias))
    assert torch.equal(model.layers[1].attention.qkv(x), real.layers[1].attention.qkv(x))


def test_swap_linears_quantizes_loaded_weights():
    real = Tiny()
    model = Tiny()
    model.load_state_dict(real.state_dict())
    swap_linears(model, QTYPES, torch.float16)
    assert model.layers[1].feed_forward.w2.input_scale == 1 / 128
    assert model.layers[0].attention.qkv.input_scale == 1.0
    qkv = model.layers[0].attention.qkv
    assert torch.equal(qkv.weight, formats.quantize(real.layers[0].attention.qkv.weight.detach(), "Q4_K"))
    with pytest.raises(UsageError, match="not nn.Linear"):
        swap_linears(model, {"layers.0.norm": "Q8_0"}, torch.float16)


def test_quantized_weights_match_gguf_dequant_numpy():
    """Sanity on the reference itself: our dequantize of our quantize equals gguf-py's dequantize."""
    w = torch.randn(8, 256)
    raw = formats.quantize(w, "Q4_K")
    ours = QuantLinear(256, 8, "Q4_K", bias=False)
    ours.load_state_dict({"weight": raw}, assign=True)
    ggml = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType.Q4_K)
    assert np.array_equal(ours.dequantized_weight().numpy(), ggml)
