"""gelu with the tanh approximation (Phi-2's "gelu_new") forward and backward as elementwise
Triton kernels.

Reference math (kernels/fused_torch.py; fp32 inside, one rounding at each store),
k0 = sqrt(2/pi), k1 = 0.044715, t = tanh(k0 * (x + k1 x^3)):

    forward   y     = 0.5 x (1 + t)
    backward  dx    = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) k0 (1 + 3 k1 x^2))

tanh(z) is computed as 1 - 2 / (exp(2z) + 1) (exact to fp32 rounding at the magnitudes
reached; saturates correctly). Saved for backward: x, as autograd over F.gelu saves.
Importing this module imports triton; `kernels` imports it only when the Triton path is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
K0 = 0.7978845608028654  # sqrt(2 / pi)
K1 = 0.044715


@triton.jit
def _tanh(z):
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def _gelu_fwd_kernel(x_ptr, y_ptr, n_elements, K0: tl.constexpr, K1: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(K0 * (x + K1 * x * x * x))
    tl.store(y_ptr + idx, (0.5 * x * (1.0 + t)).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(dy_ptr, x_ptr, dx_ptr, n_elements, K0: tl.constexpr, K1: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(K0 * (x + K1 * x * x * x))
    grad = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * K0 * (1.0 + 3.0 * K1 * x * x)
    tl.store(dx_ptr + idx, (dy * grad).to(dx_ptr.dtype.element_ty), mask=mask)


def gelu_tanh_forward_triton(x: torch.Tensor) -> torch.Tensor:
    """Same contract as kernels.fused_torch.gelu_tanh_forward_torch."""
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        _gelu_fwd_kernel[(triton.cdiv(n, BLOCK),)](x, y, n, K0=K0, K1=K1, BLOCK=BLOCK)
    return y


def gelu_tanh_backward_triton(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Same contract as kernels.fused_torch.gelu_tanh_backward_torch."""
    x, dy = x.contiguous(), dy.contiguous()
    dx = torch.empty_like(x)
    n = x.numel()
    if n:
        _gelu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dy, x, dx, n, K0=K0, K1=K1, BLOCK=BLOCK)
    return dx
