"""K-quant super-block formats (256 elements), vectorised over all blocks.

Quantizers reproduce ggml's `quantize_row_q{4,5,6}_K_ref` (no importance matrix) byte for byte. ggml runs
its searches one small group at a time with float32 C arithmetic; here every group is a *lane* of a
(group_size, n_groups) tensor, so each C statement becomes one tensor op over all lanes. Two things make
the bytes agree:
- sums are accumulated left to right in float32, one element per step (`_seq_sum`), as the C loops do
  (torch's own reductions reorder them);
- every division is tensor / tensor (`rdiv`): Python's `c / tensor` is `tensor.reciprocal() * c`, which
  rounds twice. `nearest_int` (the 12582912 trick) is round-half-to-even, i.e. `torch.round`.
Dequantizers follow gguf-py's operation order, so they equal `gguf.quants.dequantize` bit for bit.

Byte layouts (ggml-common.h):
  Q2_K (84):  u8 scales[16] (lo nibble scale, hi nibble min) | qs[64] (2-bit) | fp16 d | fp16 dmin
  Q3_K (110): hmask[32] | qs[64] (2 low bits) | scales[12] (6-bit, offset 32) | fp16 d
  Q4_K (144): fp16 d | fp16 dmin | scales[12] (8 6-bit scales + 8 6-bit mins) | qs[128]
  Q5_K (176): fp16 d | fp16 dmin | scales[12] | qh[32] (5th bits) | qs[128]
  Q6_K (210): ql[128] | qh[64] | int8 scales[16] | fp16 d
"""

from __future__ import annotations

import numpy as np
import torch

from zimage_lite.quant.legacy import fp16_at, fp16_bytes, rdiv

QK_K = 256
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a group whose max |x| is below this is all zero
NUMPY_SUM_MIN_LANES = 16  # _seq_sum: fewer lanes (or a GPU) take the add loop


def _seq_sum(terms: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Sum over `dim`, left to right, rounding after each add, as `for (...) s += t;` does in C.

    torch's reductions reorder the adds; numpy's add.reduce over a non-innermost axis of a C-contiguous
    array is a plain sequential loop per output element, so the CPU uses it (one call instead of n). With
    a single lane numpy would make the summed axis the inner loop and sum pairwise: too few lanes loop."""
    if terms.device.type == "cpu" and terms.shape[-1] >= NUMPY_SUM_MIN_LANES and dim != terms.ndim - 1:
        return torch.from_numpy(np.add.reduce(np.ascontiguousarray(terms.numpy()), axis=dim))
    acc = terms.select(dim, 0).clone()
    for i in range(1, terms.shape[dim]):
        acc += terms.select(dim, i)
    return acc


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _where_nonzero(t: torch.Tensor) -> torch.Tensor:
    """t with zeros replaced by ones, to divide by it where the result is masked out anyway."""
    return torch.where(t != 0, t, torch.ones_like(t))


# ---------------------------------------------------------------- group searches (ggml-quants.c)


def make_qkx2_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric search x ~ scale * L - the_min, L in [0, nmax], minimising sum w (x - that)^2.

    x, w: (n, lanes) float32. Returns (L (n, lanes) float32 integers, scale (lanes,), the_min (lanes,)).
    Like ggml, each step's grid uses the min found so far (min and max - min are updated on success)."""
    vmin = x.amin(dim=0).clamp(max=0)
    vmax = x.amax(dim=0)
    flat = vmax == vmin  # ggml returns L = 0, scale 0, the_min = -min for these
    flat_min = vmin
    one = torch.ones_like(vmax)
    sum_w, sum_x = _seq_sum(torch.stack([w, w * x], dim=1))  # (n, 2, lanes) -> (2, lanes)

    def error(scale: torch.Tensor, vmin: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        # ((scale * L + vmin) - x)^2 * w, each op rounded as in C; in place to spare allocations
        diff = L * scale
        diff.add_(vmin).sub_(x)
        return _seq_sum(diff.mul_(diff).mul_(w))

    def levels(grid_min: torch.Tensor, iscale: torch.Tensor) -> torch.Tensor:
        return (x - grid_min).mul_(iscale).round_().clamp_(0, nmax)

    iscale = rdiv(float(nmax), torch.where(flat, one, vmax - vmin))
    scale = rdiv(1.0, iscale)
    best_error = error(scale, vmin, levels(vmin, iscale))
    # L is rebuilt once at the end from the grid (min, iscale) of each lane's best step: a per-step
    # where() over all of L would cost more than a whole step's sums
    best_grid_min, best_iscale = vmin, iscale
    products = torch.empty(x.shape[0], 3, x.shape[1], dtype=x.dtype, device=x.device)
    for step in range(nstep + 1):
        # (rmin + rdelta*is + nmax) in float32, as C evaluates it
        numer = np.float32(np.float32(rmin) + np.float32(rdelta) * np.float32(step)) + np.float32(nmax)
        iscale = torch.div(_f32(float(numer)), torch.where(flat, one, vmax - vmin))
        Laux = levels(vmin, iscale)
        wl = torch.mul(w, Laux, out=products[:, 0])
        torch.mul(wl, Laux, out=products[:, 1])
        torch.mul(wl, x, out=products[:, 2])
        sum_l, sum_l2, sum_xl = _seq_sum(products)
        D = sum_w * sum_l2 - sum_l * sum_l
        D_safe = _where_nonzero(D)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D_safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D_safe
        clip = this_min > 0
        this_min = torch.where(clip, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(clip, sum_xl / _where_nonzero(sum_l2), this_scale)
        cur_error = error(this_scale, this_min, Laux)
        better = (D > 0) & (cur_error < best_error)
        best_grid_min = torch.where(better, vmin, best_grid_min)
        best_iscale = torch.where(better, iscale, best_iscale)
        best_error = torch.where(better, cur_error, best_error)
        scale = torch.where(better, this_scale, scale)
        vmin = torch.where(better, this_min, vmin)
    L = levels(best_grid_min, best_iscale)
    L = torch.where(flat, torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return L, scale, -torch.where(flat, flat_min, vmin)


def make_qx_quants_rmse1(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric search x ~ scale * (L - nmax), L in [0, 2 nmax), weights x^2 (ggml rmse_type 1, no qw).

    x: (n, lanes) float32. Returns (L (n, lanes) float32 integers, scale (lanes,)); all-zero groups give
    L = 0 and scale 0. The scale's sign follows the value of largest magnitude (first one on ties)."""
    imax = x.abs().argmax(dim=0, keepdim=True)
    vmax = torch.gather(x, 0, imax)[0]
    zero = vmax.abs() < GROUP_MAX_EPS
    vmax = torch.where(zero, torch.ones_like(vmax), vmax)
    wx = x * x * x  # w*x with w = x*x, evaluated as C does: (x*x)*x
    w = x * x
    products = torch.empty(x.shape[0], 2, x.shape[1], dtype=x.dtype, device=x.device)

    def fit(numer: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lev = torch.round(torch.div(_f32(numer), vmax) * x).clamp_(-nmax, nmax - 1)
        torch.mul(wx, lev, out=products[:, 0])
        torch.mul(torch.mul(w, lev, out=products[:, 1]), lev, out=products[:, 1])
        sumlx, suml2 = _seq_sum(products)
        return lev, sumlx, suml2

    lev, sumlx, suml2 = fit(float(-nmax))
    L = lev + nmax
    scale = torch.where(suml2 != 0, sumlx / _where_nonzero(suml2), torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lev, sumlx, suml2 = fit(float(-(np.float32(nmax) + np.float32(0.1) * np.float32(step))))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(better, lev + nmax, L)
        scale = torch.where(better, sumlx / _where_nonzero(suml2), scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(zero, torch.zeros_like(L), L), torch.where(zero, torch.zeros_like(scale), scale)


# ---------------------------------------------------------------- Q4_K / Q5_K


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """(n, 8) 6-bit scales and mins -> (n, 12) bytes (get_scale_min_k4's inverse):
    bytes 0-3: scale j low 6 bits | scale j+4 bits 4-5 in bits 6-7; bytes 4-7: same for mins;
    bytes 8-11: scale j+4 low nibble | min j+4 low nibble << 4."""
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([lo, mid, hi], dim=-1)


def _unpack_scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 12) bytes -> (sc (n, 8), m (n, 8)) uint8."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _quantize_qkx(blocks: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """Shared Q4_K/Q5_K body. blocks (n, 256) -> (d/dmin/scales bytes (n, 16), L (n, 8, 32) uint8)."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    # lanes = (block, sub-block). contiguous(): the reshape is a strided view, and every op of the
    # search would inherit its (1, 32) strides (3-10x slower ops, and a copy in each numpy sum)
    x = sub.permute(2, 0, 1).reshape(32, n * 8).contiguous()
    sum_x2 = _seq_sum(x * x)
    av_x = torch.sqrt(sum_x2 / 32)
    L, scales, mins = make_qkx2_quants(x, av_x + x.abs(), nmax, rmin, 0.1, nstep)
    L = L.reshape(32, n, 8).permute(1, 2, 0)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)

    def to_6bit(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vmax = v.amax(dim=-1, keepdim=True)
        vmax = torch.where(vmax > 0, vmax, torch.zeros_like(vmax))  # +0, never -0 (a min of -0.0 is common)
        inv = torch.where(vmax > 0, rdiv(63.0, _where_nonzero(vmax)), torch.zeros_like(vmax))
        # (uint8_t)nearest_int(...) then MIN(63, .)
        q6 = (torch.round(inv * v).to(torch.int32) & 0xFF).clamp_(max=63).to(torch.uint8)
        return q6, vmax / 63

    ls, d = to_6bit(scales)
    lm, dmin = to_6bit(mins)
    d_bytes, dmin_bytes = fp16_bytes(d), fp16_bytes(dmin)
    d_sub = d_bytes.view(torch.float16).float() * ls.float()  # (n, 8)
    dm_sub = dmin_bytes.view(torch.float16).float() * lm.float()
    requant = torch.round((sub + dm_sub[..., None]) / _where_nonzero(d_sub)[..., None]).clamp_(0, nmax)
    L = torch.where(d_sub[..., None] != 0, requant, L).to(torch.uint8)
    return torch.cat([d_bytes, dmin_bytes, _pack_scale_min_k4(ls, lm)], dim=-1), L


def _pack_low_nibbles(L: torch.Tensor) -> torch.Tensor:
    """(n, 8, 32) levels -> (n, 128): byte 32c + l holds sub-block 2c at l (low) and 2c+1 (high)."""
    pairs = (L & 0xF).reshape(L.shape[0], 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(L.shape[0], 128)


def quantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 256) float32 -> (n, 144) uint8, as quantize_row_q4_K_ref."""
    head, L = _quantize_qkx(blocks, nmax=15, rmin=-1.0, nstep=20)
    return torch.cat([head, _pack_low_nibbles(L)], dim=-1)


def quantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 256) float32 -> (n, 176) uint8, as quantize_row_q5_K_ref (qh bit k of byte l = bit 4 of sub-block k)."""
    head, L = _quantize_qkx(blocks, nmax=31, rmin=-0.5, nstep=15)
    shifts = torch.arange(8, device=L.device, dtype=torch.uint8).reshape(1, 8, 1)
    qh = ((L >> 4) << shifts).sum(dim=1, dtype=torch.uint8)  # bits are disjoint: sum == or
    return torch.cat([head, qh, _pack_low_nibbles(L)], dim=-1)


def _dequantize_qkx(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    sc, mn = _unpack_scale_min_k4(blocks[:, 4:16])
    d = (fp16_at(blocks, 0) * sc.float())[..., None]
    dm = (fp16_at(blocks, 2) * mn.float())[..., None]
    return (d * q.float() - dm).reshape(blocks.shape[0], QK_K)


def _low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 128) bytes -> (n, 8, 32), inverse of _pack_low_nibbles."""
    shifts = torch.tensor([0, 4], device=qs.device, dtype=torch.uint8).reshape(1, 1, 2, 1)
    return ((qs.reshape(-1, 4, 1, 32) >> shifts) & 0xF).reshape(-1, 8, 32)


def dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    return _dequantize_qkx(blocks, _low_nibbles(blocks[:, 16:]))


def dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, device=blocks.device, dtype=torch.uint8).reshape(1, 8, 1)
    qh = (blocks[:, 16:48].reshape(-1, 1, 32) >> shifts) & 1
    return _dequantize_qkx(blocks, _low_nibbles(blocks[:, 48:]) | (qh << 4))


# ---------------------------------------------------------------- Q6_K


def quantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 256) float32 -> (n, 210) uint8, as quantize_row_q6_K_ref."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    lanes = sub.permute(2, 0, 1).reshape(16, n * 16).contiguous()  # contiguous: see _quantize_qkx
    L, scales = make_qx_quants_rmse1(lanes, nmax=32)
    L = L.reshape(16, n, 16).permute(1, 2, 0)
    scales = scales.reshape(n, 16)
    imax = scales.abs().argmax(dim=-1, keepdim=True)
    max_scale = torch.gather(scales, -1, imax)
    zero = max_scale.abs() < GROUP_MAX_EPS  # (n, 1): block written as all zero bytes
    iscale = rdiv(-128.0, _where_nonzero(max_scale))
    d_bytes = fp16_bytes(rdiv(1.0, iscale))
    sc = torch.round(iscale * scales).clamp_(max=127)  # in [-128, 127]
    d_sub = d_bytes.view(torch.float16).float() * sc
    requant = torch.round(sub / _where_nonzero(d_sub)[..., None]).clamp_(-32, 31) + 32
    L = torch.where(d_sub[..., None] != 0, requant, L).to(torch.uint8)
    # ql: per 128-half, byte l holds q[l] | q[l+64] << 4, byte 32+l holds q[l+32] | q[l+96] << 4
    quarters = L.reshape(n, 2, 4, 32)
    ql = torch.cat(
        [
            quarters[:, :, 0] & 0xF | (quarters[:, :, 2] & 0xF) << 4,
            quarters[:, :, 1] & 0xF | (quarters[:, :, 3] & 0xF) << 4,
        ],
        dim=-1,
    ).reshape(n, 128)
    shifts = torch.tensor([0, 2, 4, 6], device=L.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = ((quarters >> 4) << shifts).sum(dim=2, dtype=torch.uint8).reshape(n, 64)
    sc_bytes = sc.to(torch.int8).view(torch.uint8)
    out = torch.cat([ql, qh, sc_bytes, d_bytes], dim=-1)
    return torch.where(zero, torch.zeros_like(out), out)


def dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = (fp16_at(blocks, 208) * scales).reshape(n, 16, 1)
    ql_shifts = torch.tensor([0, 4], device=blocks.device, dtype=torch.uint8).reshape(1, 1, 2, 1)
    ql = ((blocks[:, :128].reshape(n, 2, 1, 64) >> ql_shifts) & 0xF).reshape(n, 8, 32)
    qh_shifts = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = ((blocks[:, 128:192].reshape(n, 2, 1, 32) >> qh_shifts) & 3).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (d * q).reshape(n, QK_K)


# ---------------------------------------------------------------- read-only: Q2_K, Q3_K


def dequantize_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, :16]
    dl = (fp16_at(blocks, 80) * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (fp16_at(blocks, 82) * (scales >> 4).float()).reshape(n, 16, 1)
    shifts = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    q = ((blocks[:, 16:80].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def dequantize_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    hmask, qs, packed = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    # 16 6-bit scales: low nibbles from bytes 0-7 (lo then hi nibble), 2 high bits from bytes 8-11
    nib = torch.tensor([0, 4], device=blocks.device, dtype=torch.uint8).reshape(1, 2, 1)
    low = ((packed[:, :8].reshape(n, 1, 8) >> nib) & 0xF).reshape(n, 16)
    two = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.uint8).reshape(1, 4, 1)
    high = ((packed[:, 8:].reshape(n, 1, 4) >> two) & 3).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (fp16_at(blocks, 108) * scales).reshape(n, 16, 1)
    shifts = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    ql = ((qs.reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 16, 16)
    bits = torch.arange(8, device=blocks.device, dtype=torch.uint8).reshape(1, 1, 8, 1)
    hbit = ((hmask.reshape(n, 1, 1, 32) >> bits) & 1).reshape(n, 16, 16)
    # the high bit *clear* means subtract 4 (ggml stores it inverted)
    q = (ql.to(torch.int8) - ((hbit ^ 1) << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)
