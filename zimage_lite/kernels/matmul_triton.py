"""Fused dequant-matmul for small M: y = x @ W^T (+ bias) without materialising W.

Each program owns a (BLOCK_M, BLOCK_N) tile of y and walks K in BLOCK_K steps; per step it decodes the
(BLOCK_K, BLOCK_N) slice of W straight from the raw block bytes (the same element decoders as the
dequant kernel), casts both operands to `dot_dtype` and accumulates in float32 with tl.dot. Block
headers are looked up per element, so a K-tile may cover part of a 256-element K-quant block; K must
only be a whole number of blocks. For FP8 the per-row scale is applied to the float32 accumulator
(y[:, n] = scale[n] * sum_k x[:, k] q[n, k]) instead of to every weight.

Why small M: with M <= 64 the kernel is bound by reading W (~0.5-1 byte per weight) and skipping the
bf16 copy of W saves its write and re-read. For larger M dequantize + cuBLAS wins (DESIGN §5).

fp16: the accumulator is float32 whatever the operands, so partial sums cannot overflow; only the
stored result is cast to the output dtype (pass out_dtype=torch.float32 if |y| may exceed 65504).
`dot_dtype`: bf16 on sm >= 80 in production; fp16 or fp32 in the CPU interpreter, where tl.dot on
bf16 operands returns garbage (DESIGN §4).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zimage_lite.kernels.dequant_triton import (
    FP8_CODE,
    LAYOUTS,
    SUB_BLOCK,
    decode_block_element,
    decode_fp8_e4m3fn,
    native_fp8_ok,
)

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _fused_kernel(
    x,
    raw,
    scale,
    bias,
    y,
    M,
    N,
    K,
    stride_xm,
    stride_ym,
    row_bytes,
    QTYPE: tl.constexpr,
    QK: tl.constexpr,
    TS: tl.constexpr,
    SUB: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SCALE_PER_ROW: tl.constexpr,
    NATIVE_FP8: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """x (M, K) row-major, raw uint8 (N, row_bytes), y (M, N). Torch reference:
    F.linear(x.float(), dequantize(raw).float(), bias) with zimage_lite.quant.formats.dequantize
    (or zimage_lite.quant.fp8.dequantize_fp8 for FP8)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    rk = tl.arange(0, BLOCK_K)  # (BK,)
    m_ok = rm < M
    n_ok = rn < N
    row_off = rn.to(tl.int64)[None, :] * row_bytes  # (1, BN) byte offset of each weight row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        a = tl.load(x + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if QTYPE == 5:
            w_mask = k_ok[:, None] & n_ok[None, :]  # (BK, BN): W^T tile
            w = decode_fp8_e4m3fn(raw, row_off + k[:, None], w_mask, NATIVE_FP8)
        else:
            # The W^T tile as (BK // SUB, SUB, BN): sub-blocks x elements x rows of W, so the scales
            # are read once per (sub-block, row); K is a whole number of blocks, so masking whole
            # sub-blocks is exact.
            sb = k0 // SUB + tl.arange(0, BLOCK_K // SUB)[:, None, None]  # (BK/SUB, 1, 1) sub-block index
            sub_mask = (sb * SUB < K) & n_ok[None, None, :]  # (BK/SUB, 1, BN)
            base = row_off[:, None, :] + (sb // (QK // SUB)) * TS  # (BK/SUB, 1, BN) block byte offset
            i = tl.arange(0, SUB)[None, :, None]  # (1, SUB, 1)
            w = decode_block_element(QTYPE, raw, base, sb % (QK // SUB), i, sub_mask)
            w = tl.reshape(tl.where(sub_mask, w, 0.0), (BLOCK_K, BLOCK_N))
        if QTYPE == 5:
            w = tl.where(w_mask, w, 0.0)
        if DOT_DTYPE == tl.float32:
            acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE))
    if QTYPE == 5:
        if SCALE_PER_ROW:
            acc = acc * tl.load(scale + rn, mask=n_ok, other=0.0)[None, :]
        else:
            acc = acc * tl.load(scale)
    if HAS_BIAS:
        acc = acc + tl.load(bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(y + rm[:, None] * stride_ym + rn[None, :], acc.to(y.dtype.element_ty), mask=y_mask)


FUSED_QTYPES = (*LAYOUTS, "FP8_E4M3")


def _block_m(m: int) -> int:
    # tl.dot needs >= 16 rows; bigger tiles only once there are rows to fill them.
    return min(64, max(16, triton.next_power_of_2(m)))


def fused_matmul(
    x: torch.Tensor,
    raw: torch.Tensor,
    qtype: str,
    n_out: int,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    *,
    dot_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    block_n: int = 64,
    block_k: int = 64,
    native_fp8: bool | None = None,
) -> torch.Tensor:
    """y (M, n_out) = x (M, K) @ W^T + bias, W given as raw blocks (n_out, row_bytes) of `qtype`
    or float8_e4m3fn (n_out, K) with `scale` (None, scalar or one per row).

    dot_dtype: operand dtype of tl.dot (default: x's dtype if fp16/bf16, else float32).
    out_dtype: dtype of y (default x's dtype). Accumulation is float32 in every case.
    native_fp8: decode FP8 with the hardware conversion on sm >= 8.9 (opt-in, see native_fp8_ok)."""
    if x.ndim != 2:
        raise ValueError(f"fused_matmul expects x of shape (M, K), got {tuple(x.shape)}")
    if qtype not in FUSED_QTYPES:
        raise ValueError(f"no fused kernel for {qtype} (have {', '.join(FUSED_QTYPES)})")
    m, k = x.shape
    if qtype == "FP8_E4M3":
        code, qk, ts, sub = FP8_CODE, 1, 1, 1
        if tuple(raw.shape) != (n_out, k):
            raise ValueError(f"FP8 weight must be ({n_out}, {k}), got {tuple(raw.shape)}")
    else:
        code, qk, ts = LAYOUTS[qtype]
        sub = SUB_BLOCK[qtype]
        assert k % qk == 0, f"fused {qtype} matmul: K={k} must be a multiple of the block size {qk}"
        if raw.dtype != torch.uint8 or tuple(raw.shape) != (n_out, k // qk * ts):
            raise ValueError(
                f"{qtype} weight must be uint8 ({n_out}, {k // qk * ts}), got {raw.dtype} {tuple(raw.shape)}"
            )
    raw = raw.contiguous().view(torch.uint8)
    x = x if x.stride(-1) == 1 else x.contiguous()
    if dot_dtype is None:
        dot_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    out_dtype = out_dtype or x.dtype
    if out is None:
        out = torch.empty((m, n_out), dtype=out_dtype, device=x.device)
    elif tuple(out.shape) != (m, n_out) or out.dtype != out_dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {out_dtype} ({m}, {n_out}) with unit column stride")
    if scale is None:
        scale = torch.ones((), dtype=torch.float32, device=x.device)
    scale = scale.to(device=x.device, dtype=torch.float32).contiguous()
    if scale.numel() not in (1, n_out):
        raise ValueError(f"FP8 scale must have 1 or {n_out} elements, got shape {tuple(scale.shape)}")
    block_m = _block_m(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n_out, block_n))
    _fused_kernel[grid](
        x,
        raw,
        scale,
        bias if bias is not None else scale,
        out,
        m,
        n_out,
        k,
        x.stride(0),
        out.stride(0),
        raw.shape[1],
        QTYPE=code,
        QK=qk,
        TS=ts,
        SUB=sub,
        HAS_BIAS=bias is not None,
        SCALE_PER_ROW=scale.numel() != 1,
        NATIVE_FP8=native_fp8_ok(x.device, native_fp8),
        DOT_DTYPE=_TL_DTYPES[dot_dtype],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out
