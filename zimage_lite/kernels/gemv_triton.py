"""Small-M dequant-matmul: y = x @ W^T (+ bias) for M <= 16 rows, reading the quantized W once.

At M <= 16 (the text encoder on short prompts) the product is memory-bound: 2*M*N*K flops on 0.5-1
byte per weight. Dequant + cuBLAS writes a bf16 copy of W and reads it again (4 more bytes per weight
moved); this kernel reads each weight byte once and keeps the rest in registers.

Layout: one program per BLOCK_N rows of W (outputs) and every row of x in that program, so W is read
exactly once. It walks K in BLOCK_K steps; each step decodes a (BLOCK_N, BLOCK_K) tile of W along the
contiguous row bytes (coalesced) with the element decoders of dequant_triton, then for each row m of x
accumulates sum_k x[m, k] * w[n, k] in float32 on the CUDA cores. No tl.dot: it pads M to 16 rows, work
thrown away at M = 1. The tl.dot tile kernel this replaces (BLOCK_M >= 16, 64x64 tiles, so only 180
programs for an 11520-output layer at M = 1) lost to dequant + cuBLAS by 1.1-4.8x at every M on an
H200 (issue #12). For FP8 the per-row scale multiplies the accumulator: y[:, n] = scale[n] * sum_k
x[:, k] q[n, k].

Numerics: x is converted to float32, W decoded exactly in float32 (bit-identical to gguf-py), products
and sums in float32, one rounding at the store; so the result is closer to the float32 reference than
bf16 dequant + cuBLAS, and there is no bf16 arithmetic to go wrong in the CPU interpreter (DESIGN §4).
Whether it is faster than dequant + cuBLAS is measured per device (kernels/choice.py): the dispatcher
uses it only where it was timed faster.
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

GEMV_QTYPES = (*LAYOUTS, "FP8_E4M3")
GEMV_MAX_M = 16


@triton.jit
def _weight_tile(raw, row_off, n_ok, k0, K, QTYPE: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr,
                 SUB: tl.constexpr, NATIVE_FP8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """W[rows, k0 : k0 + BLOCK_K] as float32 (BLOCK_N, BLOCK_K), zero outside the matrix.

    One return at the end: the compiler resolves the constexpr branch, and an early return inside it
    is not something every Triton version handles."""
    if QTYPE == 5:
        k = k0 + tl.arange(0, BLOCK_K)
        mask = n_ok[:, None] & (k < K)[None, :]
        w = tl.where(mask, decode_fp8_e4m3fn(raw, row_off[:, None] + k[None, :], mask, NATIVE_FP8), 0.0)
    else:
        # (rows, sub-blocks, elements): scales are read once per (row, sub-block). K is a whole number
        # of blocks, so masking whole sub-blocks is exact; a K step may cover part of a 256-element block.
        sb = k0 // SUB + tl.arange(0, BLOCK_K // SUB)[None, :, None]  # (1, S, 1) sub-block index in the row
        mask = n_ok[:, None, None] & (sb * SUB < K)  # (BN, S, 1)
        base = row_off[:, None, None] + (sb // (QK // SUB)) * TS  # (BN, S, 1) byte offset of the block
        i = tl.arange(0, SUB)[None, None, :]  # (1, 1, SUB)
        w = decode_block_element(QTYPE, raw, base, sb % (QK // SUB), i, mask)  # (BN, S, SUB)
        w = tl.reshape(tl.where(mask, w, 0.0), (BLOCK_N, BLOCK_K))
    return w


@triton.jit
def _gemv_kernel(
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """x (M, K) with unit column stride, raw uint8 (N, row_bytes), y (M, N); M <= BLOCK_M.

    Torch reference: F.linear(x.float(), W, bias) with W = zimage_lite.quant.formats.dequantize(raw)
    (or zimage_lite.quant.fp8.dequantize_fp8 for FP8)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) outputs = rows of W
    n_ok = rn < N
    rm = tl.arange(0, BLOCK_M)  # (BM,) every row of x
    row_off = rn.to(tl.int64) * row_bytes
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _weight_tile(raw, row_off, n_ok, k0, K, QTYPE, QK, TS, SUB, NATIVE_FP8, BLOCK_N, BLOCK_K)
        k = k0 + tl.arange(0, BLOCK_K)
        for mi in tl.static_range(BLOCK_M):
            a_mask = (k < K) & (k * 0 + mi < M)  # row mi exists (a scalar mask trips the interpreter)
            a = tl.load(x + mi * stride_xm + k, mask=a_mask, other=0.0).to(tl.float32)
            part = tl.sum(w * a[None, :], axis=1)  # (BN,)
            acc = tl.where(rm[:, None] == mi, acc + part[None, :], acc)
    if QTYPE == 5:
        if SCALE_PER_ROW:
            acc = acc * tl.load(scale + rn, mask=n_ok, other=0.0)[None, :]
        else:
            acc = acc * tl.load(scale)
    if HAS_BIAS:
        acc = acc + tl.load(bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_mask = (rm < M)[:, None] & n_ok[None, :]
    tl.store(y + rm[:, None] * stride_ym + rn[None, :], acc.to(y.dtype.element_ty), mask=y_mask)


def _layout(qtype: str, raw: torch.Tensor, n_out: int, k: int) -> tuple[int, int, int, int]:
    """(kernel code, block elements, block bytes, sub-block) after checking raw's shape."""
    if qtype not in GEMV_QTYPES:
        raise ValueError(f"no GEMV kernel for {qtype} (have {', '.join(GEMV_QTYPES)})")
    if qtype == "FP8_E4M3":
        if tuple(raw.shape) != (n_out, k):
            raise ValueError(f"FP8 weight must be ({n_out}, {k}), got {tuple(raw.shape)}")
        return FP8_CODE, 1, 1, 1
    code, qk, ts = LAYOUTS[qtype]
    if k % qk:
        raise ValueError(f"{qtype} GEMV: K={k} must be a multiple of the block size {qk}")
    if raw.dtype != torch.uint8 or tuple(raw.shape) != (n_out, k // qk * ts):
        raise ValueError(
            f"{qtype} weight must be uint8 ({n_out}, {k // qk * ts}), got {raw.dtype} {tuple(raw.shape)}"
        )
    return code, qk, ts, SUB_BLOCK[qtype]


def _fp8_scale(scale: torch.Tensor | None, n_out: int, device: torch.device) -> torch.Tensor:
    if scale is None:
        return torch.ones((), dtype=torch.float32, device=device)
    scale = scale.to(device=device, dtype=torch.float32).contiguous()
    if scale.numel() not in (1, n_out):
        raise ValueError(f"FP8 scale must have 1 or {n_out} elements, got shape {tuple(scale.shape)}")
    return scale


def gemv(
    x: torch.Tensor,
    raw: torch.Tensor,
    qtype: str,
    n_out: int,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    block_n: int = 8,
    block_k: int = 256,
    native_fp8: bool | None = None,
) -> torch.Tensor:
    """y (M, n_out) = x (M, K) @ W^T + bias for M <= GEMV_MAX_M, W given as raw blocks (n_out, row_bytes)
    of `qtype` or float8_e4m3fn (n_out, K) with `scale` (None, scalar or one per row).

    out_dtype: dtype of y (default x's). Products and sums are float32 whatever the dtypes.
    block_n, block_k: rows of W per program and K step (powers of two, block_k a multiple of 16).
    native_fp8: decode FP8 with the hardware conversion on sm >= 8.9 (opt-in, see native_fp8_ok)."""
    if x.ndim != 2 or not 1 <= x.shape[0] <= GEMV_MAX_M:
        raise ValueError(f"gemv expects x of shape (M, K) with 1 <= M <= {GEMV_MAX_M}, got {tuple(x.shape)}")
    m, k = x.shape
    code, qk, ts, sub = _layout(qtype, raw, n_out, k)
    raw = raw.contiguous().view(torch.uint8)
    x = x if x.stride(-1) == 1 else x.contiguous()
    out_dtype = out_dtype or x.dtype
    if out is None:
        out = torch.empty((m, n_out), dtype=out_dtype, device=x.device)
    elif tuple(out.shape) != (m, n_out) or out.dtype != out_dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {out_dtype} ({m}, {n_out}) with unit column stride")
    scale = _fp8_scale(scale, n_out, x.device)
    _gemv_kernel[(triton.cdiv(n_out, block_n),)](
        x, raw, scale, bias if bias is not None else scale, out, m, n_out, k, x.stride(0), out.stride(0),
        raw.shape[1], QTYPE=code, QK=qk, TS=ts, SUB=sub, HAS_BIAS=bias is not None,
        SCALE_PER_ROW=scale.numel() != 1, NATIVE_FP8=native_fp8_ok(x.device, native_fp8),
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out
