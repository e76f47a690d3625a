"""LayerNorm (Phi-2) forward and backward as Triton kernels, one program per row; no weight or
bias gradient (both frozen under LoRA).

Reference math (kernels/fused_torch.py; fp32 inside, one rounding at each store):

    forward   mean = mean(x),  rstd = 1 / sqrt(mean((x - mean)^2) + eps)   (saved, fp32, per row)
              y    = (x - mean) * rstd * w + b
    backward  xhat = (x - mean) * rstd,  g = dy * w
              dx   = rstd * (g - mean(g) - xhat * mean(g * xhat))

Saved for backward: x, mean, rstd. Phi-2's rows are 2560 wide: one block of 4096 lanes.
Importing this module imports triton; `kernels` imports it only when the Triton path is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, D, eps, HAS_BIAS: tl.constexpr,
                           BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / D + eps)
    y = xc * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, D, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    g = dy * w  # 0 outside the row (dy and w loaded as 0)
    dx = rstd * (g - tl.sum(g, axis=0) / D - xhat * (tl.sum(g * xhat, axis=0) / D))
    tl.store(dx_ptr + row * D + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _launch_config(D: int):
    block = triton.next_power_of_2(D)
    return block, min(max(block // 256, 1), 16)


def layer_norm_forward_triton(x, weight, bias, eps: float, out_dtype=None):
    """Same contract as kernels.fused_torch.layer_norm_forward_torch."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()  # (M, D)
    M = x2.shape[0]
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        block, warps = _launch_config(D)
        w = weight.contiguous()
        _layer_norm_fwd_kernel[(M,)](x2, w, w if bias is None else bias.contiguous(), y, mean, rstd, D, float(eps),
                                     HAS_BIAS=bias is not None, BLOCK=block, num_warps=warps)
    return y, mean, rstd


def layer_norm_backward_triton(dy, x, weight, mean, rstd):
    """Same contract as kernels.fused_torch.layer_norm_backward_torch."""
    D = x.shape[-1]
    x2, dy2 = x.reshape(-1, D).contiguous(), dy.reshape(-1, D).contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block, warps = _launch_config(D)
        _layer_norm_bwd_kernel[(x2.shape[0],)](dy2, x2, weight.contiguous(), mean, rstd, dx, D, BLOCK=block,
                                               num_warps=warps)
    return dx
