"""NF4 dequantisation as one Triton kernel: one pass over the packed bytes, the double-quantised
absmax recovered in the same kernel.

Reference math (kernels/nf4_torch.py; fp32 throughout, one cast at the store):

    scale[b] = absmax[b]                                                  (plain)
    scale[b] = nested_code[absmax[b]] * nested_absmax[b // 256] + offset  (double quantisation)
    out[2j]   = code[packed[j] >> 4]  * scale[2j // blocksize]
    out[2j+1] = code[packed[j] & 0xF] * scale[2j // blocksize]   # blocksize is even: same block

Each program reads BYTES_PER_PROGRAM bytes and writes twice as many elements, interleaved so the
store is contiguous. The launch disables fp fusion so `a * b + offset` rounds twice, like the
PyTorch path: the two backends agree bit for bit.

Importing this module imports triton; `kernels` imports it only when the Triton path is used.
With TRITON_INTERPRET=1 set before triton is imported the kernel runs on CPU tensors (tests).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

BYTES_PER_PROGRAM = 1024


def state_arguments(state) -> tuple:
    """(absmax, code, nested_absmax, nested_code, offset): the NF4 state as the kernels take it.
    Without double quantisation the nested pointers are placeholders (never read) and offset 0."""
    double_quant = state.nested_absmax is not None
    return (state.absmax, state.code,
            state.nested_absmax if double_quant else state.code,
            state.nested_code if double_quant else state.code,
            float(state.offset) if double_quant else 0.0)


@triton.jit
def nf4_block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask,
                    NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 scale of quantisation block(s) `block` (any shape): absmax[block], or with double
    quantisation nested_code[absmax[block]] * nested_absmax[block // NESTED_BLOCKSIZE] + offset.
    Masked-out lanes read nothing (their value is not used). Shared with nf4_gemv_triton."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = tl.load(nested_code_ptr + q) * nested + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def _dequantize_nf4_kernel(
    packed_ptr,  # uint8 (n_bytes,)
    absmax_ptr,  # fp32 (n_blocks,), or uint8 (n_blocks,) when DOUBLE_QUANT
    code_ptr,  # fp32 (16,)
    nested_absmax_ptr,  # fp32 (ceil(n_blocks / NESTED_BLOCKSIZE),); unused without DOUBLE_QUANT
    nested_code_ptr,  # fp32 (256,); unused without DOUBLE_QUANT
    offset,  # fp32 scalar; unused without DOUBLE_QUANT
    out_ptr,  # (n_elements,) in the output dtype
    n_elements,
    n_bytes,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BYTES_PER_PROGRAM: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    byte_idx = pid * BYTES_PER_PROGRAM + tl.arange(0, BYTES_PER_PROGRAM)  # (BPP,)
    mask = byte_idx < n_bytes
    byte = tl.load(packed_ptr + byte_idx, mask=mask, other=0)
    block = (byte_idx * 2) // BLOCKSIZE
    scale = nf4_block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask,
                            NESTED_BLOCKSIZE, DOUBLE_QUANT)
    high = tl.load(code_ptr + (byte >> 4).to(tl.int32)) * scale  # elements 2j
    low = tl.load(code_ptr + (byte & 0xF).to(tl.int32)) * scale  # elements 2j + 1
    values = tl.interleave(high, low)  # (2 * BPP,)
    out_idx = pid * (2 * BYTES_PER_PROGRAM) + tl.arange(0, 2 * BYTES_PER_PROGRAM)
    tl.store(out_ptr + out_idx, values.to(out_ptr.dtype.element_ty), mask=out_idx < n_elements)


# True when TRITON_INTERPRET=1 was set before triton was imported: then the kernel runs on CPU tensors.
INTERPRETED = isinstance(_dequantize_nf4_kernel, InterpretedFunction)


def dequantize_nf4_triton(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """Launch the kernel; same contract as kernels.nf4_torch.dequantize_nf4_torch."""
    n = math.prod(state.shape)
    n_bytes = (n + 1) // 2
    if state.blocksize % 2:
        raise ValueError(f"NF4 blocksize must be even, got {state.blocksize}")
    out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    if n == 0:
        return out
    double_quant = state.nested_absmax is not None
    grid = (triton.cdiv(n_bytes, BYTES_PER_PROGRAM),)
    _dequantize_nf4_kernel[grid](
        packed.reshape(-1),
        *state_arguments(state),
        out,
        n,
        n_bytes,
        BLOCKSIZE=state.blocksize,
        NESTED_BLOCKSIZE=state.nested_blocksize if double_quant else 256,
        DOUBLE_QUANT=double_quant,
        BYTES_PER_PROGRAM=BYTES_PER_PROGRAM,
        enable_fp_fusion=False,
    )
    return out
