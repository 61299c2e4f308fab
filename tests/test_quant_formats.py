"""Block formats against references nobody here wrote: ggml's own quantizer bytes (test vectors),
gguf-py's quantize/dequantize, and ggml's published RMSE; FP8 against its rounding bound.
Byte equality of each quantizer (ggml's library, our torch fallback) with the vectors: test_quant_ggml.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zimage_lite.errors import UsageError
from zimage_lite.quant.formats import QUANT_TYPES, dequantize, is_quantized, quantize, row_bytes
from zimage_lite.quant.fp8 import FP8_MAX, dequantize_fp8, quantize_fp8

VECTORS = Path(__file__).parent / "data" / "ggml_quants.npz"  # see data/README.md
MATRICES = ["gauss", "student_t3", "outliers", "zero_rows_and_blocks", "positive_only"]
WRITABLE = ["Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"]
ALL_TYPES = list(QUANT_TYPES)
# Both quantizers where ggml's library is installed, the torch one alone elsewhere
QUANTIZERS = ["ggml", "torch"] if importlib.util.find_spec("libggml") else ["torch"]

# ggml's reference relative RMSE, from the test vectors' README (its quantizer, gguf-py dequantizer)
GGML_RMSE = {
    "gauss": {"Q4_0": 0.0865, "Q8_0": 0.0054, "Q4_K": 0.0719, "Q5_K": 0.0363, "Q6_K": 0.0178},
    "student_t3": {"Q4_0": 0.1269, "Q8_0": 0.0084, "Q4_K": 0.0918, "Q5_K": 0.0468, "Q6_K": 0.0256},
    "outliers": {"Q4_0": 0.0984, "Q8_0": 0.0113, "Q4_K": 0.0798, "Q5_K": 0.0476, "Q6_K": 0.0322},
}


@pytest.fixture(scope="module")
def vectors():
    return np.load(VECTORS)


def assert_bits_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    """float32 arrays identical bit for bit (NaNs must be NaN in both; their payloads are not compared)."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.float32
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(ours), nan)
    np.testing.assert_array_equal(ours.view(np.int32)[~nan], ref.view(np.int32)[~nan])


def rel_rmse(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(((w - w_hat).double().pow(2).mean() / w.double().pow(2).mean()).sqrt())


# ---------------------------------------------------------------- dequantize vs gguf-py


@pytest.mark.parametrize("qtype", ALL_TYPES)
@pytest.mark.parametrize("matrix", MATRICES)
def test_dequantize_matches_gguf_py_on_ggml_bytes(vectors, matrix, qtype):
    raw = vectors[f"{matrix}/{qtype}"]
    ref = gguf.quants.dequantize(raw, QUANT_TYPES[qtype].ggml_type)
    ours = dequantize(torch.from_numpy(raw), qtype, ref.shape).numpy()
    assert_bits_equal(ours, ref)


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_dequantize_matches_gguf_py_on_random_bytes(qtype):
    """Any bytes are a valid block (fp16 scales may be NaN/Inf/subnormal): all must decode alike."""
    q = QUANT_TYPES[qtype]
    raw = np.random.default_rng(1).integers(0, 256, size=(4, 64 * q.type_size), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 in gguf-py is expected here
        ref = gguf.quants.dequantize(raw, q.ggml_type)
    assert not np.isfinite(ref).all()  # the special cases are really exercised
    ours = dequantize(torch.from_numpy(raw), qtype, ref.shape).numpy()
    assert_bits_equal(ours, ref)


# ---------------------------------------------------------------- legacy quantizers vs gguf-py


def _matrix(kind: str, rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    if kind == "integers":  # exact ties: x*id lands on k + 0.5, several values share the max |x|
        return rng.integers(-16, 17, size=(rows, cols)).astype(np.float32)
    if kind == "sparse":  # zero blocks and lone values
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        return np.where(rng.random((rows, cols)) < 0.9, np.float32(0), x)
    return (rng.standard_t(3, size=(rows, cols)) * 1e-3).astype(np.float32)


@settings(max_examples=25, deadline=None)
@given(
    qtype=st.sampled_from(["Q8_0", "Q4_0"]),
    rows=st.integers(1, 4),
    blocks=st.integers(1, 5),
    kind=st.sampled_from(["gauss", "integers", "sparse", "student"]),
    seed=st.integers(0, 2**16),
    quantizer=st.sampled_from(QUANTIZERS),
)
def test_legacy_quantize_matches_gguf_py(qtype, rows, blocks, kind, seed, quantizer):
    """gguf-py's numpy Q8_0 / Q4_0 give ggml's bytes except for Q4_0 blocks of -0.0 (see below)."""
    x = _matrix(kind, rows, blocks * 32, seed)
    ref = gguf.quants.quantize(x, QUANT_TYPES[qtype].ggml_type)
    ours = quantize(torch.from_numpy(x), qtype, quantizer=quantizer).numpy()
    np.testing.assert_array_equal(ours, ref)


@settings(max_examples=6, deadline=None)
@given(
    qtype=st.sampled_from(["Q4_K", "Q5_K", "Q6_K"]),
    rows=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    quantizer=st.sampled_from(QUANTIZERS),
)
def test_k_quantize_round_trips_through_gguf_py(qtype, rows, seed, quantizer):
    """No reference K quantizer in gguf-py: check our bytes decode (by gguf-py) close to the input."""
    x = _matrix("gauss", rows, 512, seed)
    raw = quantize(torch.from_numpy(x), qtype, quantizer=quantizer).numpy()
    back = gguf.quants.dequantize(raw, QUANT_TYPES[qtype].ggml_type)
    assert (
        rel_rmse(torch.from_numpy(x), torch.from_numpy(back))
        < {"Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.025}[qtype]
    )


# ---------------------------------------------------------------- error vs ggml and vs a naive baseline


def absmax_baseline(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric round-to-nearest with a float32 absmax scale per `group` values: the naive quantizer."""
    g = w.reshape(-1, group)
    levels = 2 ** (bits - 1) - 1
    scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-30) / levels
    return (torch.round(g / scale) * scale).reshape(w.shape)


K_BASELINE = {"Q4_K": (4, 32), "Q5_K": (5, 32), "Q6_K": (6, 16)}  # bits, sub-block size


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("matrix", ["gauss", "student_t3", "outliers"])
@pytest.mark.parametrize("qtype", WRITABLE)
def test_relative_rmse_matches_ggml_and_beats_absmax(vectors, matrix, qtype, quantizer):
    w = torch.from_numpy(vectors[f"{matrix}/input"])
    ours = rel_rmse(w, dequantize(quantize(w, qtype, quantizer=quantizer), qtype, tuple(w.shape)))
    assert abs(ours - GGML_RMSE[matrix][qtype]) <= 0.01 * GGML_RMSE[matrix][qtype] + 5e-5
    if qtype in K_BASELINE:
        assert ours < rel_rmse(w, absmax_baseline(w, *K_BASELINE[qtype]))


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_types_beat_absmax_on_fresh_gaussian_and_student_t(qtype, quantizer):
    gen = torch.Generator().manual_seed(3)
    gauss = torch.randn(8, 1024, generator=gen) * 0.02
    student = torch.distributions.StudentT(3.0).sample((8, 1024)) * 0.02
    for w in (gauss, student):
        ours = rel_rmse(w, dequantize(quantize(w, qtype, quantizer=quantizer), qtype, tuple(w.shape)))
        assert ours < rel_rmse(w, absmax_baseline(w, *K_BASELINE[qtype]))


# ---------------------------------------------------------------- API


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_quantize_layout_dtypes_and_errors(quantizer):
    w = torch.randn(2, 3, 512, dtype=torch.bfloat16)
    for qtype in WRITABLE:
        raw = quantize(w, qtype, quantizer=quantizer)
        q = QUANT_TYPES[qtype]
        assert raw.dtype == torch.uint8 and raw.shape == (2, 3, 512 // q.block_size * q.type_size)
        assert raw.shape[-1] == row_bytes(qtype, 512)
        # same bytes as from the float32 copy (and from a non-contiguous view): computed in float32
        assert torch.equal(raw, quantize(w.float(), qtype, quantizer=quantizer))
        assert torch.equal(raw[:, 1], quantize(w.transpose(0, 1)[1], qtype, quantizer=quantizer))
        out = dequantize(raw.reshape(-1), qtype, (6, 512), dtype=torch.float16)
        assert out.shape == (6, 512) and out.dtype == torch.float16
        assert gguf.GGML_QUANT_SIZES[q.ggml_type] == (q.block_size, q.type_size)
    with pytest.raises(UsageError):
        quantize(torch.randn(4, 100), "Q4_K")
    with pytest.raises(UsageError):
        quantize(torch.randn(4, 256), "Q5_1")  # read-only
    with pytest.raises(UsageError):
        quantize(torch.randn(4, 256), "Q7_K")
    with pytest.raises(UsageError):
        quantize(torch.full((1, 256), float("inf")), "Q4_K", quantizer=quantizer)
    with pytest.raises(UsageError):
        dequantize(torch.zeros(10, dtype=torch.uint8), "Q8_0", (32,))
    assert is_quantized("Q4_K") and is_quantized("Q2_K") and not is_quantized("BF16")
    assert row_bytes("BF16", 10) == 20 and row_bytes("F32", 3) == 12


def test_dequantize_plain_float_bytes():
    w = torch.randn(3, 5)
    raw = w.to(torch.bfloat16).view(torch.uint8)
    assert torch.equal(dequantize(raw, "BF16", (3, 5)), w.to(torch.bfloat16).float())
    assert torch.equal(dequantize(w.view(torch.uint8), "F32", (15,)), w.reshape(-1))


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_quantize_spans_several_chunks_like_one(quantizer):
    """Chunking is invisible: a tensor bigger than one chunk gives the bytes of its rows done alone."""
    from zimage_lite.quant import formats

    chunk = max(formats._CHUNK_ELEMENTS, formats._GGML_CHUNK_ELEMENTS)
    w = torch.randn(1, chunk * 5 // 2) * 0.02  # two chunks and a half
    whole = quantize(w, "Q6_K", quantizer=quantizer)
    parts = [quantize(p, "Q6_K", quantizer=quantizer) for p in w.split(256 * 97, dim=-1)]
    assert torch.equal(whole, torch.cat(parts, dim=-1))


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_legacy_stages_span_calls_and_passes_like_one(qtype, quantizer):
    """The legacy quantizers stage their work (65536-block calls, 8192-block passes): a tensor spanning
    several of both, with a ragged tail, gives gguf-py's bytes."""
    rng = np.random.default_rng(3)
    x = (rng.standard_t(3, size=(3, 140_000 // 32 * 32 + 32 * 5)) * 0.02).astype(np.float32)
    x[1, 32 * 70_000 : 32 * 70_001] = 0.0  # an all-zero block past the first call
    ref = gguf.quants.quantize(x, QUANT_TYPES[qtype].ggml_type)
    np.testing.assert_array_equal(quantize(torch.from_numpy(x), qtype, quantizer=quantizer).numpy(), ref)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_q8_0_rounds_half_away_from_zero_like_gguf_py(quantizer):
    """Q8_0 rounds with trunc(x + copysign(0.49999997, x)). Blocks whose scale is exactly 1 (max 127) put
    every float32 within 2048 ulps of each k + 0.5 (k = 0..126), of both signs, straight into the
    rounding; gguf-py's np_roundf must agree on every one."""
    mids = torch.arange(127, dtype=torch.float32) + 0.5
    offsets = torch.arange(-2048, 2049, dtype=torch.int32)
    near = (mids.view(torch.int32)[:, None] + offsets).view(torch.float32).reshape(-1)
    near = torch.cat([near, -near, torch.tensor([0.0, -0.0, 0.49999997, -0.49999997])])
    near = near[near.abs() <= 127]
    values = torch.nn.functional.pad(near, (0, -near.numel() % 31)).reshape(-1, 31)
    x = torch.cat([torch.full((values.shape[0], 1), 127.0), values], dim=1).numpy()
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(quantize(torch.from_numpy(x), "Q8_0", quantizer=quantizer).numpy(), ref)


@pytest.mark.parametrize(
    ("qtype", "quantizer"),
    [(q, quantizer) for q in WRITABLE for quantizer in QUANTIZERS] + [("FP8", "torch")],
)  # FP8 has one quantizer (torch's cast)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused_wherever_they_are(qtype, bad, quantizer):
    from zimage_lite.errors import NonFiniteError

    for where in (0, 70_000 * 32 - 1, 140_000 * 32 - 5):  # first block, end of a call, last block
        w = torch.randn(140_000 * 32) * 0.02
        w[where] = bad
        with pytest.raises(NonFiniteError, match="NaN or infinity"):
            quantize_fp8(w) if qtype == "FP8" else quantize(w.reshape(-1, 1024), qtype, quantizer=quantizer)


def sequential_f32_sum(terms: np.ndarray) -> np.ndarray:
    """An independent left-to-right float32 sum over axis 0 (numpy rounds each add to float32)."""
    acc = terms[0].astype(np.float32).copy()
    for t in terms[1:]:
        acc = (acc + t).astype(np.float32)
    return acc


@pytest.mark.parametrize("lanes", [1, 7, 15, 16, 40])
def test_seq_sum_adds_left_to_right_in_float32(lanes):
    """Both branches of _seq_sum (the add loop below 16 lanes and on GPUs, numpy's reduce above) give
    C's `for (...) s += t;`: terms spanning 1e8..1e-3 so any other order or a missing term shows."""
    from zimage_lite.quant.kquants import _seq_sum

    gen = np.random.default_rng(lanes)
    terms = (gen.standard_normal((33, 2, lanes)) * 10.0 ** gen.integers(-3, 9, (33, 2, lanes))).astype(
        np.float32
    )
    got = _seq_sum(torch.from_numpy(terms)).numpy()
    assert_bits_equal(got, sequential_f32_sum(terms))
    assert not np.array_equal(got, terms.sum(axis=0, dtype=np.float64).astype(np.float32))  # order matters


def blocks_differing(ours: np.ndarray, ref: np.ndarray, qtype: str) -> np.ndarray:
    size = QUANT_TYPES[qtype].type_size
    return (ours.reshape(-1, size) != ref.reshape(-1, size)).any(axis=1)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K"])
def test_few_lane_loop_branch_gives_ggml_bytes(vectors, qtype):
    """One 256-block per call has 8 lanes (sub-blocks), so every sum of the search takes _seq_sum's add
    loop (the branch GPUs always take): its bytes are ggml's wherever the many-lane (numpy) path's are
    (the torch quantizer's promise, test_quant_ggml.py), and no more than 1% of blocks differ."""
    from zimage_lite.quant import kquants

    rows = 8
    x = torch.from_numpy(vectors["outliers/input"][:rows])
    assert 256 // 32 < kquants.NUMPY_SUM_MIN_LANES  # one block's lanes take the loop
    per_block = torch.cat([quantize(b, qtype, quantizer="torch") for b in x.reshape(-1, 1, 256)])
    ref = vectors[f"outliers/{qtype}"][:rows]
    many_lanes = quantize(x, qtype, quantizer="torch").numpy()
    loop_bad = blocks_differing(per_block.numpy(), ref, qtype)
    assert not (loop_bad & ~blocks_differing(many_lanes, ref, qtype)).any()
    assert loop_bad.mean() <= 0.01, f"{loop_bad.sum()} of {loop_bad.size} blocks differ from ggml"


def test_q6_k_search_gives_the_same_scales_with_few_lanes(vectors):
    """Q6_K has 16 lanes per block, so on the CPU its search never loops: run make_qx_quants_rmse1 on a
    few of the lanes (the loop) and compare with the same lanes of the many-lane run, whose Q6_K bytes
    are ggml's (test_quant_ggml.py)."""
    from zimage_lite.quant import kquants

    lanes = torch.from_numpy(vectors["student_t3/input"][:4].reshape(-1, 16).T.copy())  # (16, 512)
    L_all, s_all = kquants.make_qx_quants_rmse1(lanes, nmax=32)
    few = kquants.NUMPY_SUM_MIN_LANES - 1
    for start in (0, 100, 500):
        L, s = kquants.make_qx_quants_rmse1(lanes[:, start : start + few].contiguous(), nmax=32)
        assert torch.equal(L, L_all[:, start : start + few]) and torch.equal(s, s_all[start : start + few])


@pytest.mark.gpu
@pytest.mark.parametrize("matrix", MATRICES)
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gpu_bytes_equal_ggml_bytes(vectors, matrix, qtype):
    """Q8_0 / Q4_0, the GGUF types `convert --device cuda` quantizes, give ggml's bytes on a GPU."""
    x = torch.from_numpy(vectors[f"{matrix}/input"])
    gpu = quantize(x.cuda(), qtype)
    np.testing.assert_array_equal(gpu.cpu().numpy(), vectors[f"{matrix}/{qtype}"])
    assert torch.equal(
        dequantize(gpu, qtype, tuple(x.shape)).cpu(), dequantize(gpu.cpu(), qtype, tuple(x.shape))
    )


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_gpu_k_quants_keep_the_fallback_promise(vectors, qtype):
    """K-quants on a GPU (the torch emulation; the converter refuses them there): as on any CPU, the error
    of ggml's bytes to 4 decimals and at least 99% of blocks identical."""
    x = torch.from_numpy(vectors["student_t3/input"])
    ref = vectors[f"student_t3/{qtype}"]
    gpu = quantize(x.cuda(), qtype).cpu().numpy()
    size = QUANT_TYPES[qtype].type_size
    assert (gpu.reshape(-1, size) != ref.reshape(-1, size)).any(1).mean() <= 0.01
    ours = rel_rmse(x, dequantize(torch.from_numpy(gpu), qtype, tuple(x.shape)))
    assert abs(ours - rel_rmse(x, dequantize(torch.from_numpy(ref), qtype, tuple(x.shape)))) <= 5e-5


# ---------------------------------------------------------------- FP8


def _fp8_bound(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Half an e4m3 ulp: 2^-4 relative for normals, scale * 2^-10 absolute in the subnormal range."""
    return torch.maximum(w.abs() * 2.0**-4, scale * 2.0**-10) * (1 + 1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_round_trip_within_half_ulp(per_channel):
    w = torch.distributions.StudentT(3.0).sample((64, 96)) * 0.02
    q, scale = quantize_fp8(w.to(torch.bfloat16).float(), per_channel=per_channel)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and scale.dtype == torch.float32
    assert scale.shape == ((64, 1) if per_channel else ())
    w = w.to(torch.bfloat16).float()
    back = dequantize_fp8(q, scale)
    assert ((back - w).abs() <= _fp8_bound(w, scale)).all()
    # the largest magnitude maps to +-448 (per row for per-channel)
    assert torch.isclose(q.float().abs().amax(), torch.tensor(FP8_MAX))
    if per_channel:
        assert torch.equal(dequantize_fp8(q, scale.reshape(-1)), back)  # (out,) scales read too
    else:
        assert torch.equal(dequantize_fp8(q, scale.reshape(1)), back)  # (1,) scales read too
    assert dequantize_fp8(q, scale, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("shape", "per_channel"),
    [((100, 96), False), ((100, 96), True), ((5000,), False), ((30, 4, 8), False), ((30, 4, 8), True)],
)
def test_fp8_slabs_equal_one_cast(shape, per_channel, monkeypatch):
    """The cast runs a slab of rows at a time; the bytes are those of one (w / scale).clamp().to()."""
    from zimage_lite.quant import fp8

    monkeypatch.setattr(fp8, "_SLAB_ELEMENTS", 96 * 7)  # several slabs and a ragged last one
    w = torch.distributions.StudentT(3.0).sample(shape) * 0.02
    q, scale = quantize_fp8(w, per_channel=per_channel)
    one = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), one.view(torch.uint8))


def test_fp8_zero_guard_and_bad_input():
    q, scale = quantize_fp8(torch.zeros(4, 8))
    assert scale.item() == 1.0 and not q.float().any()
    w = torch.randn(3, 8)
    w[1] = 0
    q, scale = quantize_fp8(w, per_channel=True)
    assert torch.isfinite(scale).all() and scale[1].item() == 1.0
    assert not q[1].float().any() and torch.isfinite(dequantize_fp8(q, scale)).all()
    with pytest.raises(UsageError):
        quantize_fp8(torch.tensor([1.0, float("nan")]))
    with pytest.raises(UsageError):
        dequantize_fp8(q, torch.ones(5))


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_sign_ties_and_signed_zeros_give_ggml_bytes(qtype, quantizer):
    """Blocks whose largest magnitude occurs with both signs (the first one sets the scale's sign in
    ggml), all-zero blocks of +0.0 and -0.0, and a block of one nonzero value: gguf-py's bytes, except
    where gguf-py and ggml differ. The one difference found: a Q4_0 block of -0.0, where ggml's C loop
    keeps `max = 0.0f` and writes d = 0.0f / -8 = -0.0 (fp16 0x8000), and gguf-py's argmax takes the
    block's -0.0 and writes d = +0.0. The values decode alike (zeros); we promise ggml's bytes."""
    import gguf.quants

    rows = np.zeros((6, 32), dtype=np.float32)
    rows[0, 3], rows[0, 9] = -0.5, 0.5
    rows[1, 3], rows[1, 9] = 0.5, -0.5
    rows[2, :] = np.linspace(-1, 1, 32, dtype=np.float32)
    rows[3, :] = -0.0
    rows[5, 31] = -2.0
    expected = gguf.quants.quantize(rows, getattr(gguf.GGMLQuantizationType, qtype))
    if qtype == "Q4_0":
        assert expected[3, :2].tolist() == [0, 0] and expected[4, :2].tolist() == [0, 0x80]
        expected[3, :2] = [0, 0x80]  # ggml's -0.0 scale
    ours = quantize(torch.from_numpy(rows), qtype, quantizer=quantizer).numpy()
    np.testing.assert_array_equal(ours, expected)
