"""Triton dequantization of GGUF blocks (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K) and FP8-e4m3fn weights.

Every decoder below maps (byte offset of a block, sub-block index s, index i inside the sub-block) to
the float32 weight, on broadcastable tensors: scales are loaded at the shape of the block/sub-block
tensors and only the quant bytes per element. The same code serves the plain dequant kernel (tiles of
whole blocks) and the fused dequant-matmul kernel (tiles of K x N, see matmul_triton.py). Raw weights are uint8
(rows, row_bytes); fp16 fields are read as two little-endian bytes and bitcast, because a block's
fp16 field sits at an odd-aligned or unaligned offset that no typed load could address.

Numerics: everything is computed in float32 with the same operation order as gguf-py's numpy
reference (`zimage_lite.quant.formats.dequantize` reproduces it bit for bit), and cast only at the
store: Triton's CPU interpreter mishandles bf16 arithmetic (DESIGN §4). The plain dequant kernel is
launched with `enable_fp_fusion=False` so a GPU does not contract `a*b - c` into an FMA, which would
round differently from the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# qtype -> (code used inside the kernels, elements per block, bytes per block); ggml-common.h sizes.
LAYOUTS: dict[str, tuple[int, int, int]] = {
    "Q8_0": (0, 32, 34),
    "Q4_0": (1, 32, 18),
    "Q4_K": (2, 256, 144),
    "Q5_K": (3, 256, 176),
    "Q6_K": (4, 256, 210),
}
FP8_CODE = 5
# Elements sharing one scale (the decoders' sub-block): 32, or 16 for Q6_K.
SUB_BLOCK = {"Q8_0": 32, "Q4_0": 32, "Q4_K": 32, "Q5_K": 32, "Q6_K": 16}

# Elements one program of the dequant kernel writes (a whole number of blocks).
_ELEMS_PER_PROGRAM = 2048
# (rows, columns) one program of the FP8 dequant kernel writes: 4096 elements, 32 per thread of 4 warps.
_FP8_TILE = (4, 1024)


@triton.jit
def _load_u8(raw, off, mask):
    return tl.load(raw + off, mask=mask, other=0).to(tl.int32)


@triton.jit
def _load_f16(raw, off, mask):
    """Little-endian fp16 at byte offset `off`, as float32 (exact)."""
    lo = tl.load(raw + off, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(raw + off + 1, mask=mask, other=0).to(tl.uint16)
    return ((hi << 8) | lo).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _load_i8(raw, off, mask):
    return tl.load(raw + off, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)


@triton.jit
def decode_q8_0(raw, base, s, i, mask):
    """block_q8_0 { ggml_half d; int8_t qs[32]; }: w = qs[j] * d (one sub-block: s = 0, j = i).

    Torch reference: zimage_lite.quant.formats.dequantize(raw, "Q8_0", shape)."""
    d = _load_f16(raw, base, mask)
    return _load_i8(raw, base + 2 + s * 32 + i, mask) * d


@triton.jit
def decode_q4_0(raw, base, s, i, mask):
    """block_q4_0 { ggml_half d; uint8_t qs[16]; }: elements 0..15 are the low nibbles of qs,
    16..31 the high nibbles; w = d * (q - 8) (one sub-block: s = 0, j = i).

    Torch reference: zimage_lite.quant.formats.dequantize(raw, "Q4_0", shape)."""
    d = _load_f16(raw, base, mask)
    byte = _load_u8(raw, base + 2 + s * 16 + (i % 16), mask)
    q = (byte >> ((i // 16) * 4)) & 0xF
    return d * (q - 8).to(tl.float32)


@triton.jit
def _scale_min_k4(raw, scales_off, s, mask):
    """ggml's get_scale_min_k4: 6-bit scale and min of sub-block s (0..7) from the 12 packed bytes.

    s < 4: sc = scales[s] & 63, m = scales[s+4] & 63
    s >= 4: sc = (scales[s+4] & 0xF) | ((scales[s-4] >> 6) << 4), m = (scales[s+4] >> 4) | ((scales[s] >> 6) << 4)
    """
    low = s < 4
    b_s = _load_u8(raw, scales_off + s, mask)
    b_s4 = _load_u8(raw, scales_off + s + 4, mask)
    b_sm4 = _load_u8(raw, scales_off + tl.where(low, s, s - 4), mask)
    sc = tl.where(low, b_s & 63, (b_s4 & 0xF) | ((b_sm4 >> 6) << 4))
    m = tl.where(low, b_s4 & 63, (b_s4 >> 4) | ((b_s >> 6) << 4))
    return sc.to(tl.float32), m.to(tl.float32)


@triton.jit
def _k4_low_bits(raw, qs_off, s, i, mask):
    """4-bit quants of Q4_K/Q5_K: sub-block s lives in the 32-byte chunk s // 2, low nibbles for even
    s, high nibbles for odd s."""
    byte = _load_u8(raw, qs_off + (s // 2) * 32 + i, mask)
    return (byte >> ((s % 2) * 4)) & 0xF


@triton.jit
def decode_q4_k(raw, base, s, i, mask):
    """block_q4_K { ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qs[128]; } (144 bytes),
    8 sub-blocks of 32 (j = 32 s + i): w = (d * sc) * q - dmin * m, (sc, m) = get_scale_min_k4(s).

    Torch reference: zimage_lite.quant.formats.dequantize(raw, "Q4_K", shape)."""
    d = _load_f16(raw, base, mask)
    dmin = _load_f16(raw, base + 2, mask)
    sc, m = _scale_min_k4(raw, base + 4, s, mask)
    q = _k4_low_bits(raw, base + 16, s, i, mask).to(tl.float32)
    return (d * sc) * q - dmin * m


@triton.jit
def decode_q5_k(raw, base, s, i, mask):
    """block_q5_K { ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; }
    (176 bytes): as Q4_K with a 5th bit, bit s of qh[i].

    Torch reference: zimage_lite.quant.formats.dequantize(raw, "Q5_K", shape)."""
    d = _load_f16(raw, base, mask)
    dmin = _load_f16(raw, base + 2, mask)
    sc, m = _scale_min_k4(raw, base + 4, s, mask)
    high = (_load_u8(raw, base + 16 + i, mask) >> s) & 1
    q = (_k4_low_bits(raw, base + 48, s, i, mask) | (high << 4)).to(tl.float32)
    return (d * sc) * q - dmin * m


@triton.jit
def decode_q6_k(raw, base, s, i, mask):
    """block_q6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; ggml_half d; } (210 bytes),
    16 sub-blocks of 16 (j = 16 s + i), one int8 scale each.

    Each 128-element half h = j // 128 uses ql[64h ..] and qh[32h ..]; with e = j % 128 the low 4 bits
    are ql[64h + e % 64] >> (4 * (e // 64)) and the high 2 bits qh[32h + e % 32] >> (2 * (e // 32)).
    In sub-block terms (t = s % 8): e % 64 = 16 (t % 4) + i, e // 64 = t // 4, e % 32 = 16 (t % 2) + i,
    e // 32 = t // 2. w = (d * scales[s]) * (q - 32).

    Torch reference: zimage_lite.quant.formats.dequantize(raw, "Q6_K", shape)."""
    h = s // 8
    t = s % 8
    low = (_load_u8(raw, base + h * 64 + (t % 4) * 16 + i, mask) >> ((t // 4) * 4)) & 0xF
    high = (_load_u8(raw, base + 128 + h * 32 + (t % 2) * 16 + i, mask) >> ((t // 2) * 2)) & 3
    q = ((low | (high << 4)) - 32).to(tl.float32)
    d = _load_f16(raw, base + 208, mask)
    sc = _load_i8(raw, base + 192 + s, mask)
    return (d * sc) * q


@triton.jit
def decode_fp8_e4m3fn(raw, off, mask, NATIVE: tl.constexpr):
    """float8_e4m3fn byte -> float32 (exact): sign, 4 exponent bits (bias 7), 3 mantissa bits;
    exponent 0 is subnormal (m * 2^-9), S.1111.111 is NaN, no infinities.

    Bit manipulation works on every GPU and in the interpreter; NATIVE uses the hardware conversion
    (sm >= 89). Torch reference: `q.to(torch.float32)`, as in zimage_lite.quant.fp8.dequantize_fp8."""
    byte = tl.load(raw + off, mask=mask, other=0)
    if NATIVE:
        return byte.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    b = byte.to(tl.uint32)
    sign = b >> 7
    exp = (b >> 3) & 0xF
    man = b & 0x7
    normal = ((sign << 31) | ((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
    subnormal = man.to(tl.float32) * 0.001953125 * (1.0 - 2.0 * sign.to(tl.float32))
    value = tl.where(exp == 0, subnormal, normal)
    return tl.where((exp == 15) & (man == 7), float("nan"), value)


@triton.jit
def decode_block_element(QTYPE: tl.constexpr, raw, base, s, i, mask):
    """Dispatch on the LAYOUTS code. Element j = s * SUB + i of the block at byte offset `base`, SUB
    from SUB_BLOCK. Give base/mask the block's shape and s the sub-block's, and every scale is loaded
    once per block or sub-block, not once per element; only the quant bytes are per element."""
    if QTYPE == 0:
        w = decode_q8_0(raw, base, s, i, mask)
    elif QTYPE == 1:
        w = decode_q4_0(raw, base, s, i, mask)
    elif QTYPE == 2:
        w = decode_q4_k(raw, base, s, i, mask)
    elif QTYPE == 3:
        w = decode_q5_k(raw, base, s, i, mask)
    else:
        w = decode_q6_k(raw, base, s, i, mask)
    return w


@triton.jit
def _dequant_blocks_kernel(
    raw,
    out,
    n_blocks,
    QTYPE: tl.constexpr,
    QK: tl.constexpr,
    TS: tl.constexpr,
    SUB: tl.constexpr,
    NB: tl.constexpr,
):
    """NB consecutive blocks per program: raw bytes (n_blocks * TS) -> out (n_blocks * QK).

    Rows of a (rows, row_bytes) weight are whole blocks, so the flat block order is the row-major
    element order and the kernel never needs to know the row length. Tile (NB, QK // SUB, SUB)."""
    blk = (tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB))[:, None, None]  # (NB, 1, 1)
    s = tl.arange(0, QK // SUB)[None, :, None]  # (1, S, 1)
    i = tl.arange(0, SUB)[None, None, :]  # (1, 1, SUB)
    mask = blk < n_blocks
    w = decode_block_element(QTYPE, raw, blk * TS, s, i, mask)  # (NB, S, SUB)
    tl.store(out + blk * QK + s * SUB + i, w.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_fp8_kernel(
    raw,
    scale,
    out,
    n_rows,
    n_cols,
    SCALE_PER_ROW: tl.constexpr,
    NATIVE: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    """FP8 (n_rows, n_cols) -> out: w = q * scale, scale a scalar or one float32 per row.

    Tiles of (ROWS, COLS): each row's scale is loaded once per tile and no element needs its row
    index divided out (the 1-D version computed `offset // n_cols` in int64 for every element, an
    emulated 64-bit division; it ran at 59% of copy bandwidth on an H200). Columns are contiguous, so
    loads and stores vectorize along them.

    Torch reference: zimage_lite.quant.fp8.dequantize_fp8(q, scale, dtype)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]  # (ROWS, 1)
    cols = tl.program_id(1) * COLS + tl.arange(0, COLS)[None, :]  # (1, COLS)
    row_ok = rows < n_rows
    mask = row_ok & (cols < n_cols)
    offs = rows * n_cols + cols
    q = decode_fp8_e4m3fn(raw, offs, mask, NATIVE)
    if SCALE_PER_ROW:
        s = tl.load(scale + rows, mask=row_ok, other=0.0)  # (ROWS, 1)
    else:
        s = tl.load(scale)
    tl.store(out + offs, (q * s).to(out.dtype.element_ty), mask=mask)


def _check_out(
    out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if (
        tuple(out.shape) != tuple(shape)
        or out.dtype != dtype
        or not out.is_contiguous()
        or out.device != device
    ):
        raise ValueError(
            f"out must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})"
        )
    return out


def dequantize_blocks(
    raw: torch.Tensor,
    qtype: str,
    shape: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 (rows, row_bytes) of a GGUF block type -> `dtype` tensor of `shape` (rows, cols).

    Bit-identical (float32) to zimage_lite.quant.formats.dequantize; other dtypes are that cast."""
    code, qk, ts = LAYOUTS[qtype]
    rows, cols = shape
    if cols % qk:
        raise ValueError(f"{qtype} rows must be a multiple of {qk} elements, got {cols}")
    n_blocks = rows * cols // qk
    if raw.dtype != torch.uint8 or raw.numel() != n_blocks * ts:
        raise ValueError(
            f"{qtype} {tuple(shape)} needs {n_blocks * ts} uint8 bytes, got {raw.dtype} {tuple(raw.shape)}"
        )
    raw = raw.contiguous()
    out = _check_out(out, (rows, cols), dtype, raw.device)
    nb = _ELEMS_PER_PROGRAM // qk
    grid = (triton.cdiv(n_blocks, nb),)
    sub = SUB_BLOCK[qtype]
    _dequant_blocks_kernel[grid](
        raw, out, n_blocks, QTYPE=code, QK=qk, TS=ts, SUB=sub, NB=nb, enable_fp_fusion=False
    )
    return out


def native_fp8_ok(device: torch.device, native: bool | None = None) -> bool:
    """Use the hardware e4m3 conversion (sm >= 8.9, Ada/Hopper)? Opt-in (`native=True`): the bit decode
    is proven bit-exact in the interpreter and costs a few integer ops in a bandwidth-bound kernel, while
    the native path has only a GPU test."""
    if not native:
        return False
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def dequantize_fp8(
    q: torch.Tensor,
    scale: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    native: bool | None = None,
) -> torch.Tensor:
    """float8_e4m3fn (or its uint8 bytes) (rows, cols) * scale -> `dtype` (rows, cols).

    `scale`: None (1.0), one element, or one per row ((rows,) or (rows, 1)), float32.
    `native`: decode with the hardware conversion where it exists (see native_fp8_ok)."""
    rows, cols = q.shape
    raw = q.contiguous().view(torch.uint8)
    if scale is None:
        scale = torch.ones((), dtype=torch.float32, device=q.device)
    scale = scale.to(device=q.device, dtype=torch.float32).contiguous()
    if scale.numel() not in (1, rows):
        raise ValueError(f"FP8 scale must have 1 or {rows} elements, got shape {tuple(scale.shape)}")
    out = _check_out(out, (rows, cols), dtype, q.device)
    grid = (triton.cdiv(rows, _FP8_TILE[0]), triton.cdiv(cols, _FP8_TILE[1]))
    _dequant_fp8_kernel[grid](
        raw,
        scale,
        out,
        rows,
        cols,
        SCALE_PER_ROW=scale.numel() != 1,
        NATIVE=native_fp8_ok(q.device, native),
        ROWS=_FP8_TILE[0],
        COLS=_FP8_TILE[1],
    )
    return out
