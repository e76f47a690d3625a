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

DEQUANT_SLICE_BYTES = 1 << 20  # packed bytes per slice in dequantize_nf4_torch (4 MiB of int32 indices, 8 MiB of fp32 values)


def nf4_absmax(state) -> torch.Tensor:
    """Per-block float32 absmax, undoing the 8-bit double quantisation when there is one."""
    if state.nested_absmax is None:
        return state.absmax.float()
    codes = state.nested_code[state.absmax.long()].float()  # (n_blocks,) fp32, a fresh tensor: scaled in place
    # Two roundings (multiply, then add), exactly as bitsandbytes: no fused multiply-add.
    _scale_whole_blocks(codes, state.nested_absmax.float(), state.nested_blocksize)
    return codes + state.offset


def _code_pairs(code: torch.Tensor) -> torch.Tensor:
    """(256,) int64: entry b holds the fp32 pair (code[b >> 4], code[b & 0xF]) as 8 bytes, so one
    index_select fetches both values of a packed byte (~1.7x faster on CPU than gathering rows of
    two floats, which was ~2x faster than advanced indexing with int64)."""
    byte_values = torch.arange(256, device=code.device)
    pairs = torch.stack((code[byte_values >> 4], code[byte_values & 0xF]), dim=1)  # (256, 2)
    return pairs.float().contiguous().view(torch.int64).view(-1)


def dequantize_nf4_torch(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """Packed uint8 [(n+1)//2, 1] + state -> dense weight of shape state.shape in `dtype`.

    In slices of DEQUANT_SLICE_BYTES packed bytes (whole quantisation blocks), each gathered and
    scaled while it is still in the CPU's cache, then (for another dtype than fp32) rounded into
    the output: one pass over the output's memory instead of three, and int32 indices for one
    slice at a time (not 2 bytes per element of the whole weight)."""
    if state.blocksize % 2:
        raise ValueError(f"NF4 blocksize must be even, got {state.blocksize}")
    n = math.prod(state.shape)
    table = _code_pairs(state.code)  # (256,) int64
    codes = packed.reshape(-1)  # (n_bytes,) uint8
    n_bytes = codes.numel()
    scales = nf4_absmax(state)  # (n_blocks,) fp32
    out = torch.empty(2 * n_bytes, dtype=dtype, device=packed.device)  # (2 n_bytes,): element 2j = high nibble
    block_bytes = state.blocksize // 2  # packed bytes per quantisation block
    step = max(block_bytes, DEQUANT_SLICE_BYTES // block_bytes * block_bytes)
    scratch = None
    if dtype != torch.float32:  # fp32 values of one slice, rounded into `out` after scaling
        scratch = torch.empty(2 * min(step, n_bytes), dtype=torch.float32, device=packed.device)
    for start in range(0, n_bytes, step):
        stop = min(start + step, n_bytes)
        values = out[2 * start:2 * stop] if scratch is None else scratch[:2 * (stop - start)]  # (2 (stop - start),)
        torch.index_select(table, 0, codes[start:stop].int(), out=values.view(torch.int64))
        _scale_whole_blocks(values, scales[start // block_bytes:], state.blocksize)
        if scratch is not None:
            out[2 * start:2 * stop].copy_(values)
    return out[:n].view(state.shape)


def _scale_whole_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> None:
    """values (m,) fp32, in place: values[i] *= scales[i // blocksize]; values starts a block, and
    its last block may be short (the weight's tail)."""
    full_blocks = values.numel() // blocksize
    values[:full_blocks * blocksize].view(full_blocks, blocksize).mul_(scales[:full_blocks].view(full_blocks, 1))
    if values.numel() > full_blocks * blocksize:
        values[full_blocks * blocksize:].mul_(scales[full_blocks])


def nf4_matvec_torch(x: torch.Tensor, packed: torch.Tensor, state, bias=None) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) -> (..., N) in x's dtype, W = dequantize_nf4_torch(packed, state, x.dtype).

    The reference for kernels/nf4_gemv_triton.py: the dense path NF4MatMul takes, on any device.
    """
    weight = dequantize_nf4_torch(packed, state, x.dtype)  # (N, K)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))  # (..., N)
