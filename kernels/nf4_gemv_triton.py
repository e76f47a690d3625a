"""y = x @ W^T (+ bias) straight from NF4 bytes, for a few rows of x (batch-1 decoding).

The dense path (kernels.dequantize_nf4, then a matmul) writes the whole weight in the compute
dtype and reads it back: per element 0.5 byte read + 2 written + 2 read (bf16), ~4.5 bytes.
This kernel reads the 0.5 byte (+ 1/64 byte of absmax) once and multiplies as it decodes
(bitsandbytes' gemv_4bit idea): ~8x fewer bytes when x has 1..8 rows, where the product is
bound by reading W anyway.

Math (per output row n, fp32 accumulation, one cast at the store):

    scale[b]  = absmax[b]                                                  (plain)
    scale[b]  = nested_code[absmax[b]] * nested_absmax[b // 256] + offset  (double quantisation)
    W[n, 2j]   = code[byte >> 4]  * scale[(n K + 2j) // blocksize]   rounded to x's dtype
    W[n, 2j+1] = code[byte & 0xF] * scale[(n K + 2j) // blocksize]   rounded to x's dtype
    y[m, n]   = sum_k x[m, k] W[n, k] (+ bias[n] rounded to x's dtype), in fp32, cast to x's dtype

W's values are kernels.dequantize_nf4(packed, state, x.dtype)'s (bit for bit in the interpreter;
on CUDA the compiler may fuse the double-quant `code * nested + offset` into one rounding, 1 ulp
of a scale at most: fp fusion stays on for the multiply-adds of the sum, the kernel's arithmetic).
Only the order of the sum differs from the dense path (fp32 within ~1e-6 relative).

Constraint: K (in_features) a multiple of the blocksize (and the blocksize a power of two, as
every blocksize bitsandbytes accepts is). Then each row starts on a byte and on a quantisation
block, and each SUB-element chunk a program reads lies inside one block, so one scale serves it:
the scale is computed once per (row, chunk), never per element. `supports()` says whether a call
qualifies; kernels.nf4_matvec falls back to dequantise + matmul when it does not (K = 80, say).
Every Phi-2 / Phi-3 projection qualifies (K = 2560, 3072, 8192, 10240).

Double quantisation is decoded in the kernel, per (row, chunk): one uint8 absmax, one fp32
nested absmax and one nested-code lookup per 64 weights. Pre-decoding the absmax to fp32 once per
call would read 4 bytes per block instead of 1 (+9 % of the packed bytes) and add a launch and a
write per layer per token; caching it would keep a second copy of every absmax alive.

Tiling: a program owns BLOCK_N output rows and all M (<= MAX_ROWS) rows of x; it walks K in steps
of BLOCK_K elements, each a (BLOCK_N, BLOCK_K / SUB, SUB / 2) tile of bytes (rows contiguous in
memory: coalesced). The M rows of x are unrolled (static_range), each reusing the decoded tile.
BLOCK_N = 4 rows x 512 bytes per step with 4 warps (16 bytes per thread), like bitsandbytes'
kernel (a warp per row, 16 bytes per thread); not tuned on a GPU yet.

Importing this module imports triton; `kernels` imports it only when the Triton path is used.
With TRITON_INTERPRET=1 set before triton is imported the kernel runs on CPU tensors (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .nf4_triton import nf4_block_scale, state_arguments

MAX_ROWS = 16  # rows of x the kernel takes; beyond this a dense matmul wins (reads W once per 16 rows anyway)
BLOCK_N = 4  # output rows per program
INTERPRETER_BLOCK_N = 64  # under TRITON_INTERPRET=1 the cost is per program, not per element
BLOCK_K = 1024  # weight elements per row per loop step (512 bytes)
NUM_WARPS = 4


@triton.jit
def _nf4_gemv_kernel(
    x_ptr,  # (M, K) rows with stride stride_xm, unit column stride; fp32 / fp16 / bf16
    packed_ptr,  # uint8 (N * K / 2,): W row-major, element 2j in the high nibble
    absmax_ptr,  # fp32 (N * K / BLOCKSIZE,), or uint8 when DOUBLE_QUANT
    code_ptr,  # fp32 (16,)
    nested_absmax_ptr,  # fp32 (ceil(n_blocks / NESTED_BLOCKSIZE),); unused without DOUBLE_QUANT
    nested_code_ptr,  # fp32 (256,); unused without DOUBLE_QUANT
    offset,  # fp32 scalar; unused without DOUBLE_QUANT
    bias_ptr,  # (N,) in x's dtype; unused without HAS_BIAS
    y_ptr,  # (M, N) contiguous, x's dtype
    M,
    N,
    K,
    stride_xm,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # next power of two >= M
    BLOCK_N: tl.constexpr,
    N_SUB: tl.constexpr,  # chunks per loop step
    SUB: tl.constexpr,  # elements per chunk: min(BLOCKSIZE, BLOCK_K), inside one quantisation block
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    sub = tl.arange(0, N_SUB)  # (NS,)
    half = tl.arange(0, SUB // 2)  # (HS,) byte within a chunk
    m_idx = tl.arange(0, BLOCK_M)  # (BM,)
    blocks_per_row = K // BLOCKSIZE
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, N_SUB * SUB):
        k_sub = k0 + sub * SUB  # (NS,) first element of each chunk
        sub_ok = k_sub < K
        tile_ok = row_ok[:, None] & sub_ok[None, :]  # (BN, NS)
        block = rows64[:, None] * blocks_per_row + (k_sub // BLOCKSIZE)[None, :]  # (BN, NS)
        scale = nf4_block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, tile_ok,
                                NESTED_BLOCKSIZE, DOUBLE_QUANT)  # (BN, NS)
        scale = tl.where(tile_ok, scale, 0.0)[:, :, None]  # (BN, NS, 1): masked chunks weigh 0
        byte_idx = (rows64[:, None, None] * K + k_sub[None, :, None]) // 2 + half[None, None, :]  # (BN, NS, HS)
        byte = tl.load(packed_ptr + byte_idx, mask=tile_ok[:, :, None], other=0)
        # weights exactly as dequantize_nf4(..., x.dtype) makes them, back in fp32 for the sum
        w_even = (tl.load(code_ptr + (byte >> 4).to(tl.int32)) * scale).to(x_ptr.dtype.element_ty).to(tl.float32)
        w_odd = (tl.load(code_ptr + (byte & 0xF).to(tl.int32)) * scale).to(x_ptr.dtype.element_ty).to(tl.float32)
        x_cols = k_sub[:, None] + 2 * half[None, :]  # (NS, HS) even columns of x
        x_ok = sub_ok[:, None]  # (NS, 1)
        for m in tl.static_range(BLOCK_M):
            if m < M:  # rows of BLOCK_M past M: no work
                x_even = tl.load(x_ptr + m * stride_xm + x_cols, mask=x_ok, other=0.0).to(tl.float32)
                x_odd = tl.load(x_ptr + m * stride_xm + x_cols + 1, mask=x_ok, other=0.0).to(tl.float32)
                prod = w_even * x_even[None, :, :] + w_odd * x_odd[None, :, :]  # (BN, NS, HS)
                part = tl.sum(tl.sum(prod, axis=2), axis=1)  # (BN,)
                acc += tl.where(m_idx[:, None] == m, part[None, :], 0.0)  # into row m of (BM, BN)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    y_idx = m_idx[:, None].to(tl.int64) * N + rows64[None, :]  # (BM, BN)
    tl.store(y_ptr + y_idx, acc.to(y_ptr.dtype.element_ty), mask=(m_idx[:, None] < M) & row_ok[None, :])


# True when TRITON_INTERPRET=1 was set before triton was imported: then the kernel runs on CPU tensors.
INTERPRETED = isinstance(_nf4_gemv_kernel, InterpretedFunction)


def supports(x: torch.Tensor, state) -> bool:
    """Whether the kernel takes this call: a 2-D weight whose in_features K is a multiple of a
    power-of-two blocksize, and at most MAX_ROWS rows of x."""
    if len(state.shape) != 2:
        return False
    in_features = state.shape[1]
    blocksize = state.blocksize
    rows = x.numel() // max(in_features, 1)
    return (
        blocksize >= 2 and blocksize & (blocksize - 1) == 0 and in_features > 0 and in_features % blocksize == 0
        and x.shape[-1] == in_features and 1 <= rows <= MAX_ROWS
    )


def nf4_matvec_triton(x: torch.Tensor, packed: torch.Tensor, state, bias=None, block_n=None) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) -> (..., N) in x's dtype; W = NF4 (packed, state) of shape (N, K).
    Call only when supports(x, state); kernels.nf4_matvec checks that and falls back otherwise.
    block_n: output rows per program, a power of two (default BLOCK_N; INTERPRETER_BLOCK_N in
    the interpreter, where fewer, larger programs run ~10x faster)."""
    out_features, in_features = state.shape
    x2 = x.reshape(-1, in_features)  # (M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)  # (M, N)
    double_quant = state.nested_absmax is not None
    sub = min(state.blocksize, BLOCK_K)
    block_n = block_n or (INTERPRETER_BLOCK_N if INTERPRETED else BLOCK_N)
    grid = (triton.cdiv(out_features, block_n),)
    _nf4_gemv_kernel[grid](
        x2,
        packed.reshape(-1),
        *state_arguments(state),
        bias.to(x.dtype) if bias is not None else y,
        y,
        rows,
        out_features,
        in_features,
        x2.stride(0),
        BLOCKSIZE=state.blocksize,
        NESTED_BLOCKSIZE=state.nested_blocksize if double_quant else 256,
        DOUBLE_QUANT=double_quant,
        HAS_BIAS=bias is not None,
        BLOCK_M=triton.next_power_of_2(rows),
        BLOCK_N=block_n,
        N_SUB=BLOCK_K // sub,
        SUB=sub,
        num_warps=NUM_WARPS,
        enable_fp_fusion=True,  # the sum's multiply-adds as FMAs (Triton 3.10 turns the default off)
    )
    return y.view(*x.shape[:-1], out_features)
