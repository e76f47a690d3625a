"""RMSNorm (Phi-3) forward and backward as Triton kernels, one program per row; no weight gradient.

Reference math (kernels/fused_torch.py; fp32 inside, one rounding at each store):

    forward   rstd = 1 / sqrt(mean(x^2) + eps)                      (saved, fp32, one per row)
              n    = (x * rstd).to(x.dtype)                          (Phi-3 casts before scaling)
              y    = n * w                                           (in promote(x, w) dtype)
    backward  n  = x * rstd,  dn = dy * w
              dx = rstd * (dn - n * mean(dn * n))

Saved for backward: x and rstd; w is the module's frozen Parameter. A row of D elements is one
block of next_power_of_2(D) lanes (Phi-3: 3072 -> 4096).
Importing this module imports triton; `kernels` imports it only when the Triton path is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    n = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, (n * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, D, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    n = x * rstd
    dn = dy * w
    dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / D))
    tl.store(dx_ptr + row * D + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _launch_config(D: int):
    block = triton.next_power_of_2(D)
    return block, min(max(block // 256, 1), 16)


def rms_norm_forward_triton(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """Same contract as kernels.fused_torch.rms_norm_forward_torch."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()  # (M, D)
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        block, warps = _launch_config(D)
        _rms_norm_fwd_kernel[(x2.shape[0],)](x2, weight.contiguous(), y, rstd, D, float(eps), BLOCK=block,
                                             num_warps=warps)
    return y, rstd


def rms_norm_backward_triton(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """Same contract as kernels.fused_torch.rms_norm_backward_torch."""
    D = x.shape[-1]
    x2, dy2 = x.reshape(-1, D).contiguous(), dy.reshape(-1, D).contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block, warps = _launch_config(D)
        _rms_norm_bwd_kernel[(x2.shape[0],)](dy2, x2, weight.contiguous(), rstd, dx, D, BLOCK=block, num_warps=warps)
    return dx
