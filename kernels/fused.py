"""Autograd Functions over the fused kernels: each saves only what its backward needs and runs
either implementation (Triton, or the PyTorch reference in kernels/fused_torch.py) for both passes.

    RMSNormFunction    x, w (frozen)         saves x, rstd (M,)           dL/dx only
    LayerNormFunction  x, w, b (frozen)      saves x, mean, rstd (M,)     dL/dx only
    RotaryFunction     q, k, cos, sin        saves cos, sin               in place on q and k (mark_dirty)
    SwiGLUFunction     gate_up (..., 2I)     saves gate_up                d_gate_up in one (..., 2I) tensor
    GeluTanhFunction   x                     saves x

The implementation is picked by kernels/__init__.py (backend dispatch) and handed in as plain
functions; they are remembered on ctx so backward runs the same one as forward.
"""

from __future__ import annotations

import torch


class RMSNormFunction(torch.autograd.Function):
    """y = w * (x * rstd).to(x.dtype); backward: dx = rstd * (dn - n * mean(dn * n)), n = x * rstd, dn = dy * w."""

    @staticmethod
    def forward(ctx, x, weight, eps, impl):
        y, rstd = impl.forward(x, weight, eps)  # (..., D), (M,)
        ctx.save_for_backward(x, weight, rstd)
        ctx.impl = impl
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx = ctx.impl.backward(dy, x, weight, rstd) if ctx.needs_input_grad[0] else None
        return dx, None, None, None


class LayerNormFunction(torch.autograd.Function):
    """y = (x - mean) * rstd * w + b; backward: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype, impl):
        y, mean, rstd = impl.forward(x, weight, bias, eps, out_dtype)  # (..., D), (M,), (M,)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.impl = impl
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx = ctx.impl.backward(dy, x, weight, mean, rstd) if ctx.needs_input_grad[0] else None
        return dx, None, None, None, None, None


class RotaryFunction(torch.autograd.Function):
    """Rotate q (B, T, H, d) and k (B, T, KV, d) by cos/sin (B, T, R): forward with the rotation,
    backward with its transpose (a rotation is orthogonal: the same kernel, the sin terms swapped).
    In place on q and k when `inplace` (no new q/k tensors; the caller guarantees they may be
    overwritten), else into new ones. cos and sin get no gradient (they are functions of positions)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, inplace: bool, impl):
        if inplace:
            q_out, k_out = q, k
            ctx.mark_dirty(q, k)
        else:
            q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        impl.rope(q, k, cos, sin, q_out, k_out, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.impl = impl
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = dq if dq.stride(-1) == 1 else dq.contiguous()
        dk = dk if dk.stride(-1) == 1 else dk.contiguous()
        dq_in = torch.empty(dq.shape, dtype=dq.dtype, device=dq.device)
        dk_in = torch.empty(dk.shape, dtype=dk.dtype, device=dk.device)
        ctx.impl.rope(dq, dk, cos, sin, dq_in, dk_in, backward=True)
        return dq_in, dk_in, None, None, None, None


class SwiGLUFunction(torch.autograd.Function):
    """h = up * silu(gate) from gate_up = [gate | up] (..., 2I); backward writes [d_gate | d_up]."""

    @staticmethod
    def forward(ctx, gate_up, impl):
        ctx.save_for_backward(gate_up)
        ctx.impl = impl
        return impl.forward(gate_up)  # (..., I)

    @staticmethod
    def backward(ctx, dh):
        (gate_up,) = ctx.saved_tensors
        return ctx.impl.backward(dh, gate_up), None


class GeluTanhFunction(torch.autograd.Function):
    """y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); backward from x alone."""

    @staticmethod
    def forward(ctx, x, impl):
        ctx.save_for_backward(x)
        ctx.impl = impl
        return impl.forward(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return ctx.impl.backward(dy, x), None
