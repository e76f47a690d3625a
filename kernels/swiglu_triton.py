"""SwiGLU (Phi-3's MLP activation) forward and backward as elementwise Triton kernels reading
the fused gate_up projection directly: no chunk copies, no silu(gate) tensor kept for backward.

Reference math (kernels/fused_torch.py; fp32 inside, one rounding at each store), with
gate = gate_up[..., :I], up = gate_up[..., I:], sig = sigmoid(gate):

    forward   h      = up * gate * sig                                   (..., I)
    backward  d_gate = dh * up * sig * (1 + gate * (1 - sig))
              d_up   = dh * gate * sig        written side by side as d_gate_up (..., 2I)

Saved for backward: gate_up only (the projection's output, which autograd over
`up * F.silu(gate)` keeps too, plus silu(gate), an (N, I) tensor this saves).
Importing this module imports triton; `kernels` imports it only when the Triton path is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(gu_ptr, h_ptr, n_elements, I, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    row, col = idx // I, idx % I
    gate = tl.load(gu_ptr + row * 2 * I + col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * 2 * I + I + col, mask=mask, other=0.0).to(tl.float32)
    h = up * gate * tl.sigmoid(gate)
    tl.store(h_ptr + idx, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dh_ptr, gu_ptr, dgu_ptr, n_elements, I, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    row, col = idx // I, idx % I
    gate = tl.load(gu_ptr + row * 2 * I + col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * 2 * I + I + col, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    d_gate = dh * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = dh * gate * sig
    tl.store(dgu_ptr + row * 2 * I + col, d_gate.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgu_ptr + row * 2 * I + I + col, d_up.to(dgu_ptr.dtype.element_ty), mask=mask)


def swiglu_forward_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Same contract as kernels.fused_torch.swiglu_forward_torch."""
    gate_up = gate_up.contiguous()
    I = gate_up.shape[-1] // 2
    h = torch.empty((*gate_up.shape[:-1], I), dtype=gate_up.dtype, device=gate_up.device)
    n = h.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate_up, h, n, I, BLOCK=BLOCK)
    return h


def swiglu_backward_triton(dh: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """Same contract as kernels.fused_torch.swiglu_backward_torch."""
    gate_up, dh = gate_up.contiguous(), dh.contiguous()
    I = gate_up.shape[-1] // 2
    d_gate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    n = dh.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dh, gate_up, d_gate_up, n, I, BLOCK=BLOCK)
    return d_gate_up
