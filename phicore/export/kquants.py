"""llama.cpp's Q4_K, Q5_K, Q6_K and Q4_0 quantisers in PyTorch, vectorised over blocks.

The `gguf` package reads and dequantises these types but only quantises the 32-value ones
(Q4_0, Q5_0, Q5_1, Q8_0), so other engines run a compiled `llama-quantize` for the K-quants.
This module writes the K-quants itself: the block layouts of ggml-common.h byte for byte and the
search of ggml-quants.c's reference quantisers (the ones `llama-quantize` runs without an
importance matrix):

- Q4_K / Q5_K (`quantize_row_q4_K_ref`, `quantize_row_q5_K_ref`): super-blocks of 256 = 8
  sub-blocks of 32, each x ~ d*sc*q - dmin*m with q in 0..15 (0..31). Per sub-block,
  `make_qkx2_quants` picks (scale, min) minimising sum w*(scale*q + min - x)^2, w = rms + |x|,
  over the candidate grids iscale = (nmax + rmin + rdelta*k) / (max - min), k = 0..nstep, each
  refined by weighted least squares. The 8 scales and 8 mins are then quantised to 6 bits against
  fp16 d = max_scale/63 and dmin = max_min/63, and q is recomputed from the rounded scales.
  Block: d, dmin (fp16), scales[12] (6-bit scales/mins, `get_scale_min_k4` packing),
  [Q5_K: qh[32], bit s of qh[j] = high bit of value 32*s + j], qs[128] (value 64*i + j in the low
  nibble of qs[32*i + j], value 64*i + 32 + j in the high one).
- Q6_K (`quantize_row_q6_K_ref`): 16 sub-blocks of 16, x ~ d*sc*(q - 32), q in 0..63; per
  sub-block `make_qx_quants(16, 32, rmse_type=1)` tries iscale = -(32 + 0.1*k)/max, k = -9..9,
  keeping the least-squares scale with the largest sum(w*x*l)^2 / sum(w*l^2), w = x^2; the scales
  become int8 against fp16 d = max_scale/-128. Block: ql[128], qh[64], scales[16] (int8), d.
- Q4_0 (`quantize_row_q4_0_ref`): blocks of 32, d = max/-8 (max: the value of largest
  magnitude), q = min(15, trunc(x/d + 8.5)). Block: d, qs[16] (value j low, j + 16 high nibble).

Arithmetic is float32 as in the C code, rounding half to even as `nearest_int`, fp16 conversion
to nearest even as GGML_FP32_TO_FP16. Two deliberate differences, neither of which lowers accuracy:
candidate errors are compared in float64 from float32 sums (llama.cpp accumulates them one value
at a time in float32), and fp16 scales saturate at 65504 instead of becoming inf (llama.cpp would
write inf/NaN weights). On random weights about 97% of the blocks come out byte-identical to
llama.cpp's; the others differ where two candidates' errors tie to float rounding, and the RMS
error matches llama.cpp's to about 1e-5 relative (tests/test_kquants.py, bench/gguf_quant.py).

`quantize(array, qtype)` returns the bytes as `gguf.quants.quantize` does: uint8, shape
(rows, bytes per row); `quantize(..., values=True)` also returns the dequantised values, which
equal `gguf.quants.dequantize` of those bytes exactly. Work is done in chunks of rows on a few
threads, so the temporaries stay a few MB per thread whatever the tensor size; the packing into
bytes is NumPy.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch

QK_K = 256
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a group whose largest |x| is below this is all zero
FP16_MAX = 65504.0
CHUNK_VALUES = 1 << 19  # values quantised per step: temporaries of a few MB

# name -> (values per block, bytes per block)
BLOCKS = {"Q4_0": (32, 18), "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210)}
F64 = torch.float64


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16 (round to nearest even), saturating instead of overflowing to inf."""
    return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise sum(a * b) of two (n, k) float32 tensors, as float64."""
    return torch.linalg.vecdot(a, b).to(F64)


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per row, the value of largest magnitude, the first one on a tie (the C loops' strict '>')."""
    hi, lo = x.amax(dim=1), x.amin(dim=1)
    top = torch.where(hi >= -lo, hi, lo)
    tie = hi == -lo
    if tie.any():  # +a and -a both present: the first of them wins
        rows = tie.nonzero().squeeze(1)
        sub = x[rows]
        top[rows] = sub.gather(1, sub.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    return top


# ----------------------------------------------------------------------------- searches
def _make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml-quants.c `make_qkx2_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep,
    use_mad=false)` for each row of x (n, 32): (scale (n,), the_min (n,) = -min >= 0). As in the C
    loop, each candidate grid starts from the min of the best fit so far:
    iscale = (nmax + rmin + rdelta*k) / (max - min), l = round(iscale * (x - min))."""
    hi = x.amax(dim=1)
    mn = x.amin(dim=1).clamp(max=0)
    flat = hi == mn  # every value equal (and <= 0): scale 0, the_min = -min
    one = torch.ones_like(hi)
    sum_w = w.sum(dim=1).to(F64)
    wx = w * x
    sum_x = wx.sum(dim=1).to(F64)
    sum_x2 = _dot(wx, x)
    L = torch.empty_like(x)
    wl = torch.empty_like(x)

    def error(scale, m, sum_l, sum_l2, sum_xl):  # sum w*(scale*l + m - x)^2, from the sums
        return (scale * scale * sum_l2 + 2 * scale * m * sum_l + m * m * sum_w
                - 2 * scale * sum_xl - 2 * m * sum_x + sum_x2)

    def sums(numerator):  # levels of one candidate grid -> their weighted sums
        iscale = numerator / torch.where(flat, one, hi - mn)
        torch.sub(x, mn[:, None], out=L).mul_(iscale[:, None]).round_().clamp_(0, nmax)
        torch.mul(w, L, out=wl)
        return iscale, wl.sum(dim=1).to(F64), _dot(wl, L), _dot(wl, x)

    iscale, *first = sums(torch.tensor(float(nmax)))
    scale = 1 / iscale
    best = error(scale.to(F64), mn.to(F64), *first)
    for k in range(nstep + 1):
        numerator = torch.tensor(rmin, dtype=torch.float32) + torch.tensor(rdelta, dtype=torch.float32) * k + nmax
        _, sum_l, sum_l2, sum_xl = sums(numerator)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0  # a positive min is not representable: refit the scale alone
        this_min = torch.where(positive, 0.0, this_min).float()
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale).float()
        cur = error(this_scale.to(F64), this_min.to(F64), sum_l, sum_l2, sum_xl)
        better = (D > 0) & (cur < best)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale[flat] = 0
    return scale, -mn


def _make_qx_quants(x: torch.Tensor, nmax: int) -> torch.Tensor:
    """ggml-quants.c `make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)` for each row of x:
    the scale (n,). Candidates iscale = -(nmax + 0.1*k)/max, k = -9..9; the least-squares scale of
    the candidate with the largest sum(w*x*l)^2 / sum(w*l^2), w = x^2, is kept."""
    top = _signed_absmax(x)
    zero = top.abs() < GROUP_MAX_EPS
    top = torch.where(zero, torch.ones_like(top), top)
    w = x * x
    wx = w * x
    L = torch.empty_like(x)
    wl = torch.empty_like(x)

    def sums(iscale):
        torch.mul(x, iscale[:, None], out=L).round_().clamp_(-nmax, nmax - 1)
        torch.mul(w, L, out=wl)
        return _dot(wx, L), _dot(wl, L)

    sumlx, suml2 = sums(-nmax / top)
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        step = torch.tensor(0.1, dtype=torch.float32) * k
        sumlx, suml2 = sums(-(nmax + step) / top)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    scale = scale.float()
    scale[zero] = 0
    return scale


# ----------------------------------------------------------------------------- block types
def _q4_k_q5_k(x: torch.Tensor, nmax: int):
    """Shared part of Q4_K / Q5_K for x (nb, 256): (d, dmin as fp16 (nb,), ls, lm (nb, 8) uint8,
    levels (nb, 256) uint8, dequantised values (nb, 256))."""
    nb = x.shape[0]
    xs = x.reshape(-1, 32)
    av_x = torch.sqrt(torch.linalg.vecdot(xs, xs) / 32)
    weights = av_x[:, None] + xs.abs()
    if nmax == 15:
        scales, mins = _make_qkx2_quants(xs, weights, 15, -1.0, 0.1, 20)
    else:
        scales, mins = _make_qkx2_quants(xs, weights, 31, -0.5, 0.1, 15)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = scales.amax(dim=1).clamp(min=0)
    max_min = mins.amax(dim=1).clamp(min=0)
    inv_scale = torch.where(max_scale > 0, 63 / max_scale, 0.0)
    inv_min = torch.where(max_min > 0, 63 / max_min, 0.0)
    ls = (inv_scale[:, None] * scales).round_().clamp_(0, 63)
    lm = (inv_min[:, None] * mins).round_().clamp_(0, 63)
    d, dmin = _fp16(max_scale / 63), _fp16(max_min / 63)
    dd = (d.float()[:, None] * ls)[..., None]  # (nb, 8, 1), as dequantize computes them
    dm = (dmin.float()[:, None] * lm)[..., None]
    q = (x.reshape(nb, 8, 32) + dm).div_(dd).round_()
    q = torch.where(dd == 0, 0.0, q).clamp_(0, nmax)
    values = dd * q - dm
    as_u8 = lambda t: t.to(torch.uint8).numpy()  # noqa: E731
    return d, dmin, as_u8(ls), as_u8(lm), as_u8(q.reshape(nb, QK_K)), values.reshape(nb, QK_K)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> 12 bytes (`get_scale_min_k4`'s layout)."""
    return np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                           (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], axis=1)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(nb, 256) levels < 16 -> (nb, 128): value 64*i + j low, 64*i + 32 + j high nibble of byte 32*i + j."""
    q = q.reshape(q.shape[0], 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], 128)


def _half_bytes(a: torch.Tensor) -> np.ndarray:
    return a.numpy().view(np.uint8).reshape(a.shape[0], 2)


def q4_k(x: torch.Tensor):
    d, dmin, ls, lm, q, values = _q4_k_q5_k(x, 15)
    blocks = np.concatenate([_half_bytes(d), _half_bytes(dmin), _pack_scales_k4(ls, lm), _nibbles(q)], axis=1)
    return blocks, values


def q5_k(x: torch.Tensor):
    d, dmin, ls, lm, q, values = _q4_k_q5_k(x, 31)
    high = (q >> 4).reshape(q.shape[0], 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]
    qh = np.bitwise_or.reduce(high, axis=1)
    blocks = np.concatenate([_half_bytes(d), _half_bytes(dmin), _pack_scales_k4(ls, lm), qh, _nibbles(q & 0xF)],
                            axis=1)
    return blocks, values


def q6_k(x: torch.Tensor):
    nb = x.shape[0]
    scales = _make_qx_quants(x.reshape(-1, 16), 32).reshape(nb, 16)
    max_scale = _signed_absmax(scales)
    zero = max_scale.abs() < GROUP_MAX_EPS  # the whole super-block is zero: all bytes 0
    iscale = -128 / torch.where(zero, torch.ones_like(max_scale), max_scale)
    d = torch.where(zero, 0.0, _fp16(1 / iscale).float()).half()
    sc = torch.where(zero[:, None], 0.0, (iscale[:, None] * scales).round_().clamp_(max=127))
    dd = (d.float()[:, None] * sc)[..., None]  # (nb, 16, 1)
    q = (x.reshape(nb, 16, 16) / dd).round_()
    q = torch.where(dd == 0, 0.0, q).clamp_(-32, 31)
    values = (dd * q).reshape(nb, QK_K)
    q = (q + 32).to(torch.uint8).numpy().reshape(nb, 2, 4, 32)  # two halves of 128, four rows of 32
    ql = np.concatenate([q[:, :, 0] & 0xF | ((q[:, :, 2] & 0xF) << 4),
                         q[:, :, 1] & 0xF | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    blocks = np.concatenate([ql, qh, sc.to(torch.int8).numpy().view(np.uint8), _half_bytes(d)], axis=1)
    return blocks, values


def q4_0(x: torch.Tensor):
    """x (nb, 32)."""
    scale = (_signed_absmax(x) / -8).clamp_(-FP16_MAX, FP16_MAX)
    d = scale.half()
    inv = torch.where(scale == 0, 0.0, 1 / scale)
    q = (x * inv[:, None] + 8.5).trunc_().clamp_(0, 15)
    values = d.float()[:, None] * (q - 8)
    q = q.to(torch.uint8).numpy()
    blocks = np.concatenate([_half_bytes(d), q[:, :16] | (q[:, 16:] << 4)], axis=1)
    return blocks, values


QUANTIZERS = {"Q4_0": q4_0, "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}


def quantize(array, qtype: str, *, values: bool = False, threads: Optional[int] = None):
    """Quantise `array` (a tensor or array (..., n), n a multiple of the type's block) to `qtype`
    ("Q4_0", "Q4_K", "Q5_K", "Q6_K"): uint8 bytes of shape (..., n / block * block bytes), as
    `gguf.quants.quantize` returns them, and with `values` also the dequantised float32 values
    (array's shape). Raises ValueError for inf or NaN.

    Chunks of CHUNK_VALUES values go to `threads` worker threads (default: torch's intra-op thread
    count), each running torch single-threaded: the ops are small, and torch's own threading of
    them stalls when the machine is busy."""
    if qtype not in QUANTIZERS:
        raise ValueError(f"{qtype}: kquants writes {', '.join(QUANTIZERS)}")
    block, nbytes = BLOCKS[qtype]
    tensor = torch.as_tensor(array).detach()
    if tensor.dim() == 0 or tensor.shape[-1] % block:
        raise ValueError(f"{qtype}: rows of {tuple(tensor.shape[-1:])} values are not a multiple of {block}")
    shape = tuple(tensor.shape)
    flat = tensor.reshape(-1, block)
    out = np.empty((flat.shape[0], nbytes), dtype=np.uint8)
    got = torch.empty(flat.shape, dtype=torch.float32) if values else None
    step = max(1, CHUNK_VALUES // block)

    def one(start: int) -> None:
        with torch.no_grad():
            chunk = flat[start:start + step].to("cpu", torch.float32).contiguous()
            if not torch.isfinite(chunk).all():
                raise ValueError(f"{qtype}: the values include inf or NaN")
            blocks, dequantised = QUANTIZERS[qtype](chunk)
            out[start:start + step] = blocks
            if values:
                got[start:start + step] = dequantised

    starts = range(0, flat.shape[0], step)
    workers = min(threads or torch.get_num_threads(), len(starts))
    intra_op = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if workers <= 1:
            for start in starts:
                one(start)
        else:
            with ThreadPoolExecutor(workers) as pool:
                for _ in pool.map(one, starts):  # in order: the first error is raised
                    pass
    finally:
        torch.set_num_threads(intra_op)
    out = out.reshape(*shape[:-1], shape[-1] // block * nbytes)
    return (out, got.reshape(shape).numpy()) if values else out
