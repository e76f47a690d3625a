"""The fused LoRA forward/backward: one autograd node for y = base(x) + s * B(A(dropout(x))).

phicore.lora.LoRALinear takes this path while training a plain LoRA adapter over a frozen base
(dense or NF4) with autograd on; DoRA, inference and trainable bases take the reference path of
separate ops (`phicore.force_paths(fused_lora=False)` forces it everywhere).
tests/test_lora_fused.py compares the two paths; tests/test_lora.py compares the reference path
with PEFT.
"""

from __future__ import annotations

from typing import Optional

import torch


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tensor in dtype; no dispatcher call when it already is (a no-op .to() still costs a few
    microseconds of host time, and a training step makes hundreds of these on a GPU that waits)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type == "meta":  # the memory planner's shape-only trace (phicore/memory_plan.py): no autocast
        return None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class LoRALinearFunction(torch.autograd.Function):
    """y = base(x) + s * (drop(x) @ A^T) @ B^T as one autograd node, for a frozen linear base.

    Why: autograd over the separate ops keeps, besides x, dtype-cast copies of x and of the
    frozen weight under autocast (one bf16 W per layer per step when the base is fp32), dropout's
    output and its mask, and sums two (N, in) input gradients. This node keeps one (N, in)
    tensor (x itself; under autocast its half-precision cast, dropped out), the dropout mask
    (1 byte per element, only while dropout is active), x @ A^T (N x r) and A, B. The frozen
    base's backward needs no activation: its weight is a Parameter, or NF4 bytes dequantised
    again in backward, so no dense copy of a quantised weight is ever kept.

    Forward, with x2 = x as (N, in), s the scaling, m the dropout mask, p its rate:
        y  = base(x)                               (the layer's own forward, autocast included)
        xd = x2 * m / (1 - p)                      (or x2 without dropout), in the adapter's dtype
        xa = xd @ A^T                              (N, r): the rank-r product first
        y += s * xa @ B^T                          (addmm_ in place when dtypes agree)
    Backward, g = dL/dy as (N, out), gs = s * g @ B (N, r):
        dL/dB = s * g^T @ xa                       (out, r)
        dL/dA = gs^T @ xd                          (r, in)
        dL/dx = g @ W + (gs @ A) * m / (1 - p)     (W: dense or dequantised; addmm_ in place
                                                    onto g @ W when there is no dropout)
    Dtypes as the reference path: the LoRA matmuls run in the autocast dtype under autocast,
    else in the adapter's; g @ W in the base's compute dtype; results cast back to each input's.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, layer, dropout_p: float):
        # x (..., in), lora_a (r, in), lora_b (out, r)
        out_features = lora_b.shape[0]
        scaling = layer.scaling
        autocast = _autocast_dtype(x.device.type)
        result = layer.base_forward(x)  # (..., out)
        lora_dtype = autocast or lora_a.dtype
        a, b = _cast(lora_a, lora_dtype), _cast(lora_b, lora_dtype)
        x_lora = x.reshape(-1, x.shape[-1])  # (N, in)
        mask = None
        if dropout_p > 0:  # in the adapter's dtype, as the reference path drops out
            x_lora, mask = torch.native_dropout(_cast(x_lora, lora_a.dtype), dropout_p, True)  # F.dropout's draws
        x_lora = _cast(x_lora, lora_dtype)  # (N, in): what multiplies A (a direct cast rounds as two would)
        xa = torch.mm(x_lora, a.t())  # (N, r)
        result_2d = result.reshape(-1, out_features)  # (N, out): a view when result is contiguous
        if result_2d.dtype == lora_dtype:
            result_2d.addmm_(xa, b.t(), alpha=scaling)
        else:  # e.g. a bf16 base under an fp32 adapter: add in the wider dtype, round once
            result_2d = (result_2d + (xa @ b.t()) * scaling).to(result.dtype)
        # dA needs the adapter's input; the frozen base's backward needs no x at all. Without
        # autocast keep x itself (no copy; the dropped-out input is rebuilt exactly from the mask);
        # under autocast keep the half-precision input A multiplied (as autograd would).
        ctx.saved_lora_input = autocast is not None
        ctx.save_for_backward(x_lora if ctx.saved_lora_input else x, mask, xa, a, b)
        del x_lora
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.layer, ctx.dropout_p, ctx.scaling = layer, dropout_p, scaling
        base_dtype = layer.compute_dtype or result.dtype  # NF4: its compute dtype; dense: the output's
        ctx.base_dtype, ctx.lora_a_dtype, ctx.lora_b_dtype = autocast or base_dtype, lora_a.dtype, lora_b.dtype
        return result_2d.view(result.shape)

    @staticmethod
    def backward(ctx, grad_y):
        x, mask, xa, a, b = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        s = ctx.scaling
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (N, out)
        g_lora = _cast(g, a.dtype)
        grad_x = grad_a = grad_b = None
        if need_b:
            grad_b = _cast(torch.mm(g_lora.t(), xa).mul_(s), ctx.lora_b_dtype)  # (out, r)
        gs = torch.mm(g_lora, b).mul_(s)  # (N, r)
        if need_a:
            if ctx.saved_lora_input:
                xd = x  # (N, in), dropped out and cast in forward
            else:
                xd = _cast(x.reshape(-1, x.shape[-1]), ctx.lora_a_dtype)  # (N, in)
                if mask is not None:
                    xd = xd * mask * (1.0 / (1.0 - ctx.dropout_p))
            grad_a = _cast(torch.mm(gs.t(), _cast(xd, a.dtype)), ctx.lora_a_dtype)  # (r, in)
            del xd
        if need_x:
            weight = _cast(ctx.layer.dense_weight(), ctx.base_dtype)  # (out, in), dequantised here for NF4
            grad_x = torch.mm(_cast(g, ctx.base_dtype), weight)  # (N, in)
            del weight
            if mask is None and grad_x.dtype == a.dtype == ctx.x_dtype:
                grad_x.addmm_(gs, a)
            else:
                grad_lora = gs @ a  # (N, in)
                if mask is not None:
                    grad_lora = grad_lora.mul_(mask).mul_(1.0 / (1.0 - ctx.dropout_p))
                grad_x = _cast(grad_x, ctx.x_dtype) + _cast(grad_lora, ctx.x_dtype)
            grad_x = _cast(grad_x, ctx.x_dtype).view(ctx.x_shape)
        return grad_x, grad_a, grad_b, None, None
