"""NF4 dequantisation in plain PyTorch: the reference for the Triton kernel and the CPU/MPS path.

Math (fp32 throughout, one cast at the end; bit-identical to bitsandbytes' default backend):

    scale[b] = absmax[b]                                                  (plain)
    scale[b] = nested_code[absmax[b]] * nested_absmax[b // 256] + offset  (double quantisation)
    W.flat[2j]   = code[packed[j] >> 4]  * scale[2j // blocksize]
    W.flat[2j+1] = code[packed[j] & 0xF] * scale[(2j+1) // blocksize]
    W = W.flat[:prod(shape)].view(shape).to(dtype)

`state` is duck-typed (phicore.nf4.NF4State): absmax, shape, blocksize, code, nested_absmax,
nested_code, offset, nested_blocksize. This package does not import phicore.
"""

from __future__ import annotations

import math

import torch

DEQUANT_SLICE_BYTES = 1 << 22  # packed bytes per index_select in dequantize_nf4_torch (16 MiB of int32 indices)


def _blockwise_scale(values: torch.Tensor, scales: torch.Tensor, blocksize: int, inplace: bool = False) -> torch.Tensor:
    """values (n,) fp32 * scales[i // blocksize] -> (n,) fp32; n need not divide by blocksize.
    inplace: multiply `values` itself when no padding is needed (a fresh tensor the caller owns)."""
    n = values.numel()
    n_blocks = scales.numel()
    pad = n_blocks * blocksize - n
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    if inplace or pad:  # a padded copy is ours to scale in place too
        return values.view(n_blocks, blocksize).mul_(scales.view(n_blocks, 1)).view(-1)[:n]
    return (values.view(n_blocks, blocksize) * scales.view(n_blocks, 1)).view(-1)[:n]


def nf4_absmax(state) -> torch.Tensor:
    """Per-block float32 absmax, undoing the 8-bit double quantisation when there is one."""
    if state.nested_absmax is None:
        return state.absmax.float()
    codes = state.nested_code[state.absmax.long()]  # (n_blocks,) fp32
    # Two roundings (multiply, then add), exactly as bitsandbytes: no fused multiply-add.
    return _blockwise_scale(codes, state.nested_absmax.float(), state.nested_blocksize) + state.offset


def dequantize_nf4_torch(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """Packed uint8 [(n+1)//2, 1] + state -> dense weight of shape state.shape in `dtype`."""
    n = math.prod(state.shape)
    # One gather per byte: row b of `pairs` holds (code[b >> 4], code[b & 0xF]).
    byte_values = torch.arange(256, device=packed.device)
    pairs = torch.stack((state.code[byte_values >> 4], state.code[byte_values & 0xF]), dim=1)  # (256, 2)
    # Both codes of a byte in one 8-byte gather: the (256, 2) fp32 table read as (256,) int64, a 1-D
    # index_select with int32 indices, read back as fp32 (the same bits; ~1.7x faster on CPU than
    # gathering rows of two floats, which was ~2x faster than advanced indexing with int64).
    table = pairs.float().contiguous().view(torch.int64).view(-1)  # (256,)
    codes = packed.reshape(-1)  # (n_bytes,) uint8
    n_bytes = codes.numel()
    values = torch.empty(2 * n_bytes, dtype=torch.float32, device=packed.device)  # (2 n_bytes,) fp32, 2j = high
    value_pairs = values.view(torch.int64)  # (n_bytes,)
    # In slices, so the int32 indices never exist for the whole weight (2 bytes per element: 100 MB
    # for Phi-3's gate_up_proj on top of its 201 MB fp32 output); each slice lands in place.
    for start in range(0, n_bytes, DEQUANT_SLICE_BYTES):
        stop = min(start + DEQUANT_SLICE_BYTES, n_bytes)
        torch.index_select(table, 0, codes[start:stop].int(), out=value_pairs[start:stop])
    # scaled in place (values is fresh): no second n-element buffer
    weight = _blockwise_scale(values, nf4_absmax(state), state.blocksize, inplace=True)[:n]
    return weight.view(state.shape).to(dtype)


def nf4_matvec_torch(x: torch.Tensor, packed: torch.Tensor, state, bias=None) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) -> (..., N) in x's dtype, W = dequantize_nf4_torch(packed, state, x.dtype).

    The reference for kernels/nf4_gemv_triton.py: the dense path NF4MatMul takes, on any device.
    """
    weight = dequantize_nf4_torch(packed, state, x.dtype)  # (N, K)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))  # (..., N)
