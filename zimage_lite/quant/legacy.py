"""Legacy 32-element block formats (ggml-common.h), vectorised over all blocks.

Quantizers follow ggml's `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref` step for step in float32
(same operation order, same rounding), so their bytes equal ggml's. Dequantizers follow gguf-py's
`quants.py` operation order, so they are bit-identical to `gguf.quants.dequantize`.

Every function takes a 2-D tensor of blocks: floats (n_blocks, 32) in, uint8 (n_blocks, type_size) out,
or the reverse. Byte layouts (little-endian):
  Q8_0: fp16 d | int8 q[32]                         w = d * q
  Q4_0: fp16 d | u8 qs[16]                          w = d * (q - 8); q[j] = qs[j] & 15, q[j+16] = qs[j] >> 4
  Q4_1: fp16 d | fp16 m | u8 qs[16]                 w = d * q + m
  Q5_0: fp16 d | u32 qh | u8 qs[16]                 w = d * (q - 16); bit 4 of q[j] is bit j of qh
  Q5_1: fp16 d | fp16 m | u32 qh | u8 qs[16]        w = d * q + m
"""

from __future__ import annotations

import torch

from zimage_lite.errors import NonFiniteError

QK = 32  # elements per legacy block

# The quantizers run in two stages: the scales of all blocks in a few whole-array ops, then the values
# _PASS_BLOCKS blocks at a time (1 MB of float32, which stays in L2 from op to op), written straight into
# the output. Many small ops would be slower still in threads: each op's dispatch holds the GIL.
_PASS_BLOCKS = 8192
_BELOW_HALF = 0.49999997  # rounds to nextafterf(0.5f, 0) as a float32


def fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 (n,) -> uint8 (n, 2): round to nearest even fp16 (as GGML_FP32_TO_FP16), little-endian."""
    return v.reshape(-1, 1).to(torch.float16).view(torch.uint8)


def fp16_at(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 stored at byte `offset` of every block, as float32 (n, 1)."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).float()


def rdiv(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """numerator / t rounded once, like C. (Python's `c / tensor` computes t.reciprocal() * c.)"""
    return torch.div(torch.tensor(numerator, dtype=t.dtype, device=t.device), t)


def safe_inverse(d: torch.Tensor) -> torch.Tensor:
    """ggml's `id = d ? 1.0f/d : 0.0f`."""
    return torch.where(d != 0, rdiv(1.0, torch.where(d != 0, d, torch.ones_like(d))), torch.zeros_like(d))


def _extrema(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block max and min, (n, 1) each. NaN propagates through both, so they also tell whether every
    value is finite, which saves the caller a separate pass over the tensor."""
    mx, mn = blocks.amax(dim=-1, keepdim=True), blocks.amin(dim=-1, keepdim=True)
    if not bool(torch.isfinite(mx).all() & torch.isfinite(mn).all()):
        raise NonFiniteError("NaN or infinity among the values")
    return mx, mn


def _passes(blocks: torch.Tensor) -> list[slice]:
    """Row ranges of _PASS_BLOCKS blocks: the elementwise stage runs per range, on cache-resident data."""
    n = blocks.shape[0]
    return [slice(s, min(s + _PASS_BLOCKS, n)) for s in range(0, n, _PASS_BLOCKS)]


def _scratch(blocks: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reusable (pass, 32) buffer: no allocation per pass."""
    rows = min(_PASS_BLOCKS, blocks.shape[0])
    return torch.empty(rows, blocks.shape[1], dtype=dtype, device=blocks.device)


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) bytes -> (n, 32) uint8: element j in the low nibble of byte j, j+16 in the high one."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _qh_bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) uint8 bits, bit j at column j."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


# ---------------------------------------------------------------- Q8_0


def quantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 32) float32 -> (n, 34) uint8, as quantize_row_q8_0_ref."""
    mx, mn = _extrema(blocks)
    amax = torch.maximum(mx, mn.neg()).abs_()  # max |x|; abs_ makes an all -0.0 block's amax +0.0, as fabsf
    d = amax / 127
    inv = safe_inverse(d)
    out = torch.empty(blocks.shape[0], 34, dtype=torch.uint8, device=blocks.device)
    out[:, :2] = fp16_bytes(d)
    q = out[:, 2:].view(torch.int8)
    y, sign = _scratch(blocks), _scratch(blocks)
    half = torch.full((), _BELOW_HALF, dtype=torch.float32, device=blocks.device)
    for rows in _passes(blocks):
        m = rows.stop - rows.start
        x = torch.mul(blocks[rows], inv[rows], out=y[:m])
        # roundf(x) = trunc(x + copysign(0.49999997f, x)): exact for every float32 with |x| <= 256
        # (checked exhaustively; |x| <= 127 here). The int8 cast does the truncation.
        x.add_(torch.copysign(half, x, out=sign[:m]))
        q[rows].copy_(x)
    return out


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    q = blocks[:, 2:].contiguous().view(torch.int8).float()
    return q * fp16_at(blocks, 0)


# ---------------------------------------------------------------- Q4_0


def _signed_absmax(blocks: torch.Tensor, mx: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """(n, 32) with its block extrema (n, 1) -> (n, 1): the value of largest magnitude, the first one
    when +m and -m both occur. An all-zero block gives +0.0 whatever its zeros' signs, as ggml's C loop
    (`max` starts at 0.0f and only a larger |x| replaces it), so d = -0.0 there; gguf-py's argmax takes
    the first element instead and writes d = +0.0 for a block of -0.0. From amax/amin rather than
    argmax(|x|), which is ~6x slower over 32 lanes; the rare ties take the argmax path."""
    neg = mn.neg()
    vmax = torch.where(mx >= neg, mx, mn)
    special = (mx == neg).squeeze(-1)  # a tie of both signs, or an all-zero block
    if bool(special.any()):
        sub = blocks[special]
        tied = torch.gather(sub, -1, sub.abs().argmax(dim=-1, keepdim=True))
        vmax[special] = torch.where(tied == 0, torch.zeros_like(tied), tied)  # -0.0 -> +0.0
    return vmax


def quantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 32) float32 -> (n, 18) uint8, as quantize_row_q4_0_ref.

    The scale comes from the signed value of largest magnitude (first one on ties), d = max / -8, so that
    value maps to q = 0 exactly and the 16th level (+8) is the one that goes unused."""
    mx, mn = _extrema(blocks)
    d = _signed_absmax(blocks, mx, mn) / -8
    inv = safe_inverse(d)
    out = torch.empty(blocks.shape[0], 18, dtype=torch.uint8, device=blocks.device)
    out[:, :2] = fp16_bytes(d)
    y, q = _scratch(blocks), _scratch(blocks, torch.uint8)
    for rows in _passes(blocks):
        m = rows.stop - rows.start
        # MIN(15, (int8_t)(x*id + 8.5f)): the argument lies in [0.5, 16.5], so clamping before the
        # truncating uint8 cast is the same
        torch.mul(blocks[rows], inv[rows], out=y[:m]).add_(8.5).clamp_(max=15)
        q[:m].copy_(y[:m])
        # (m, 32) bytes as (m, 4) int64: columns 0-1 hold q[0..15], 2-3 hold q[16..31]. Byte j of the
        # block is q[j] | q[j+16] << 4; every q < 16, so the 64-bit shift carries nothing across bytes.
        q64 = q[:m].view(torch.int64)
        out[rows, 2:] = (q64[:, 2:] << 4).bitwise_or_(q64[:, :2]).view(torch.uint8)
    return out


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = unpack_nibbles(blocks[:, 2:]).to(torch.int8) - 8
    return fp16_at(blocks, 0) * q.float()


# ---------------------------------------------------------------- read-only legacy types


def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    q = unpack_nibbles(blocks[:, 4:]).float()
    return fp16_at(blocks, 0) * q + fp16_at(blocks, 2)


def dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    q = unpack_nibbles(blocks[:, 6:]) | (_qh_bits(blocks[:, 2:6]) << 4)
    return fp16_at(blocks, 0) * (q.to(torch.int8) - 16).float()


def dequantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    q = unpack_nibbles(blocks[:, 8:]) | (_qh_bits(blocks[:, 4:8]) << 4)
    return fp16_at(blocks, 0) * q.float() + fp16_at(blocks, 2)
