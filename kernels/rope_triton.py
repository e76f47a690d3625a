"""Rotary position embedding (NeoX half-split, partial rotary) on q and k in one Triton launch,
in place or into new tensors; the backward is the same kernel with the rotation transposed.

Reference math (kernels/fused_torch.py rope_torch; fp32 inside, one rounding at the store),
over the first R dims of every head, with x1 = x[:R/2], x2 = x[R/2:R], c = cos, s = sin (R,):

    forward   y1 = x1 * c[:R/2] - x2 * s[:R/2]      y2 = x2 * c[R/2:] + x1 * s[R/2:]
    backward  y1 = x1 * c[:R/2] + x2 * s[R/2:]      y2 = x2 * c[R/2:] - x1 * s[:R/2]
    dims R..d pass unchanged (copied only when writing to another tensor)

Phi-2 rotates 32 of its 80 head dims, Phi-3 all 96. One program per token (b, t): it loads that
token's cos/sin once and rotates every q head and every k head (heads x R/2 tiles). q and k are
(B, T, heads, d) with any strides but a contiguous last dim, e.g. views of the fused qkv output;
cos/sin (B, T, R). Saved for backward: nothing but cos and sin.
Importing this module imports triton; `kernels` imports it only when the Triton path is used.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, o_ptr, b, t, sxb, sxt, sxh, sob, sot, soh, n_heads, c1, c2, s1, s2, R_HALF, HEAD_DIM,
                  BACKWARD: tl.constexpr, COPY_PASS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_P: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
    r = tl.arange(0, BLOCK_R)[None, :]  # (1, BLOCK_R)
    mask = (h < n_heads) & (r < R_HALF)
    x_row = x_ptr + b * sxb + t * sxt + h * sxh
    o_row = o_ptr + b * sob + t * sot + h * soh
    x1 = tl.load(x_row + r, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + R_HALF + r, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(o_row + r, y1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + R_HALF + r, y2.to(o_ptr.dtype.element_ty), mask=mask)
    if COPY_PASS:  # dims R..d unchanged, when the output is another tensor
        p = 2 * R_HALF + tl.arange(0, BLOCK_P)[None, :]
        pmask = (h < n_heads) & (p < HEAD_DIM)
        tl.store(o_row + p, tl.load(x_row + p, mask=pmask, other=0.0), mask=pmask)


@triton.jit
def _rope_kernel(q_ptr, qo_ptr, k_ptr, ko_ptr, cos_ptr, sin_ptr, T,
                 sqb, sqt, sqh, sqob, sqot, sqoh, skb, skt, skh, skob, skot, skoh,
                 HQ, HK, R_HALF, HEAD_DIM,
                 BACKWARD: tl.constexpr, COPY_PASS: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)  # b * T + t
    b = token // T
    t = token % T
    r = tl.arange(0, BLOCK_R)[None, :]
    rmask = r < R_HALF
    cs = token * (2 * R_HALF)  # cos/sin are contiguous (B, T, R)
    c1 = tl.load(cos_ptr + cs + r, mask=rmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cs + R_HALF + r, mask=rmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cs + r, mask=rmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cs + R_HALF + r, mask=rmask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, qo_ptr, b, t, sqb, sqt, sqh, sqob, sqot, sqoh, HQ, c1, c2, s1, s2, R_HALF, HEAD_DIM,
                  BACKWARD, COPY_PASS, BLOCK_HQ, BLOCK_R, BLOCK_P)
    _rotate_heads(k_ptr, ko_ptr, b, t, skb, skt, skh, skob, skot, skoh, HK, c1, c2, s1, s2, R_HALF, HEAD_DIM,
                  BACKWARD, COPY_PASS, BLOCK_HK, BLOCK_R, BLOCK_P)


def rope_triton(q, k, cos, sin, q_out, k_out, backward: bool = False) -> None:
    """Same contract as kernels.fused_torch.rope_torch: q (B, T, H, d), k (B, T, KV, d) -> q_out, k_out
    (q and k themselves for in place). Every one of them needs a contiguous last dim."""
    B, T, HQ, d = q.shape
    HK = k.shape[2]
    R = cos.shape[-1]
    for name, x in (("q", q), ("k", k), ("q_out", q_out), ("k_out", k_out)):
        if x.stride(-1) != 1:
            raise ValueError(f"rope_triton: {name} needs a contiguous last dim, got strides {x.stride()}")
    if B * T == 0:
        return
    cos, sin = cos.contiguous(), sin.contiguous()
    copy_pass = R < d and (q_out.data_ptr() != q.data_ptr() or k_out.data_ptr() != k.data_ptr())
    _rope_kernel[(B * T,)](
        q, q_out, k, k_out, cos, sin, T,
        q.stride(0), q.stride(1), q.stride(2), q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k.stride(0), k.stride(1), k.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        HQ, HK, R // 2, d,
        BACKWARD=backward, COPY_PASS=copy_pass, BLOCK_HQ=triton.next_power_of_2(HQ),
        BLOCK_HK=triton.next_power_of_2(HK), BLOCK_R=triton.next_power_of_2(max(R // 2, 1)),
        BLOCK_P=triton.next_power_of_2(max(d - R, 1)), num_warps=4,
    )
