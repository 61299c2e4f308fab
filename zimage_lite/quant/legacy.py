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

QK = 32  # elements per legacy block


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


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero), exactly: x - trunc(x) is exact, so is doubling it.
    Overwrites `x` (in-place ops: this runs over every weight of a checkpoint)."""
    t = torch.trunc(x)
    return x.sub_(t).mul_(2).trunc_().add_(t)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) values < 16 -> (n, 16) bytes: element j in the low nibble of byte j, j+16 in the high one."""
    return (q[:, :16] | (q[:, 16:] << 4)).to(torch.uint8)


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) bytes -> (n, 32) uint8, inverse of pack_nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _qh_bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) uint8 bits, bit j at column j."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


# ---------------------------------------------------------------- Q8_0


def quantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 32) float32 -> (n, 34) uint8, as quantize_row_q8_0_ref."""
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    d = amax / 127
    q = roundf(blocks.mul(safe_inverse(d))).to(torch.int8).view(torch.uint8)
    return torch.cat([fp16_bytes(d), q], dim=-1)


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    q = blocks[:, 2:].contiguous().view(torch.int8).float()
    return q * fp16_at(blocks, 0)


# ---------------------------------------------------------------- Q4_0


def _signed_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 32) -> (n, 1): the value of largest magnitude, the first one when +m and -m both occur.
    An all-zero block gives its first element (+0.0 or -0.0), as gguf-py's argmax does (ggml's C loop
    would keep +0.0; gguf-py is the reference we match). amax/amin instead of argmax(|x|): argmax
    over 32 lanes is ~6x slower and this is the hot path."""
    mx = blocks.amax(dim=-1, keepdim=True)
    mn = blocks.amin(dim=-1, keepdim=True)
    vmax = torch.where(mx >= -mn, mx, mn)
    vmax = torch.where((mx == 0) & (mn == 0), blocks[:, :1], vmax)
    tie = ((mx == -mn) & (mx != 0)).squeeze(-1)
    if bool(tie.any()):  # both signs reach the magnitude: the first in the block wins
        sub = blocks[tie]
        vmax[tie] = torch.gather(sub, -1, sub.abs().argmax(dim=-1, keepdim=True))
    return vmax


def quantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 32) float32 -> (n, 18) uint8, as quantize_row_q4_0_ref.

    The scale comes from the signed value of largest magnitude (first one on ties), d = max / -8, so that
    value maps to q = 0 exactly and the 16th level (+8) is the one that goes unused."""
    vmax = _signed_absmax(blocks)
    d = vmax / -8
    # (int8_t)(x*id + 8.5f) truncates toward zero; the argument lies in [0.5, 16.5], so the uint8
    # conversion (which truncates) does it directly and the clamp runs on bytes.
    q = blocks.mul(safe_inverse(d)).add_(8.5).to(torch.uint8).clamp_(max=15)
    return torch.cat([fp16_bytes(d), pack_nibbles(q)], dim=-1)


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
