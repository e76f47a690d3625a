"""PyTorch versions of the fused kernels' forward and backward passes: the reference the Triton
kernels are tested against, and the fallback where Triton cannot run.

Each function does what its Triton twin does, in the same precision: load, compute in fp32,
round once at the store. Shapes: a leading `...` is any number of token dimensions (M rows in
all); outputs are new tensors, never views (RoPE may write in place instead).

    rms_norm:   y = w * (x / sqrt(mean(x^2) + eps)).to(x.dtype)                  (Phi-3)
                saved: x, rstd = 1/sqrt(mean(x^2) + eps) per row
                dx = rstd * (dn - n * mean(dn * n)),  n = x * rstd, dn = dy * w
    layer_norm: y = (x - mean) * rstd * w + b                                    (Phi-2)
                saved: x, mean, rstd per row
                dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  xhat = (x - mean) * rstd, g = dy * w
    rope:       over the first R dims of each head, halves x1 = x[:R/2], x2 = x[R/2:R]:
                forward  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2   (c, s = cos, sin (.., R), c1 = c[:R/2], ...)
                backward y1 = x1 c1 + x2 s2,  y2 = x2 c2 - x1 s1   (the transposed rotation)
                dims R.. pass unchanged
    swiglu:     gate, up = gate_up[..., :I], gate_up[..., I:];  h = up * silu(gate)  (Phi-3's MLP)
                d_gate = dh * up * sig * (1 + gate * (1 - sig)),  d_up = dh * gate * sig,  sig = sigmoid(gate)
    gelu_tanh:  y = 0.5 x (1 + tanh(k0 (x + k1 x^3))),  k0 = sqrt(2/pi), k1 = 0.044715  (Phi-2's "gelu_new")
                dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) k0 (1 + 3 k1 x^2),  t = tanh(...)
Norm weights (and biases) get no gradient: they are frozen under LoRA.
"""

from __future__ import annotations

import math

import torch

GELU_K0 = math.sqrt(2.0 / math.pi)
GELU_K1 = 0.044715


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, or float64 when it is float64 (so gradcheck can run the references)."""
    return t if t.dtype == torch.float64 else t.float()


# ----------------------------------------------------------------------------- RMSNorm
def rms_norm_forward_torch(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """x (..., D), weight (D,) -> y (..., D) in promote(x, weight) dtype, rstd (M,) fp32."""
    x32 = _wide(x)
    rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)  # (..., 1)
    n = (x32 * rstd).to(x.dtype)  # the cast Phi-3's norm makes before scaling
    y = (_wide(n) * _wide(weight)).to(torch.promote_types(x.dtype, weight.dtype))
    return y, rstd.reshape(-1)


def rms_norm_backward_torch(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """dy, x (..., D), weight (D,), rstd (M,) -> dx (..., D) in x's dtype."""
    rstd = rstd.view(*x.shape[:-1], 1)
    n = _wide(x) * rstd
    dn = _wide(dy) * _wide(weight)
    dx = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
    return dx.to(x.dtype)


# ----------------------------------------------------------------------------- LayerNorm
def layer_norm_forward_torch(x: torch.Tensor, weight: torch.Tensor, bias, eps: float, out_dtype=None):
    """x (..., D), weight, bias (D,) -> y (..., D) in out_dtype (default x's), mean, rstd (M,) fp32."""
    x32 = _wide(x)
    mean = x32.mean(-1, keepdim=True)  # (..., 1)
    xc = x32 - mean
    rstd = torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
    y = xc * rstd * _wide(weight)
    if bias is not None:
        y = y + _wide(bias)
    return y.to(out_dtype or x.dtype), mean.reshape(-1), rstd.reshape(-1)


def layer_norm_backward_torch(dy, x, weight, mean, rstd):
    """dy, x (..., D), weight (D,), mean, rstd (M,) -> dx (..., D) in x's dtype."""
    mean, rstd = mean.view(*x.shape[:-1], 1), rstd.view(*x.shape[:-1], 1)
    xhat = (_wide(x) - mean) * rstd
    g = _wide(dy) * _wide(weight)
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype)


# ----------------------------------------------------------------------------- RoPE
def rope_torch(q, k, cos, sin, q_out, k_out, backward: bool = False) -> None:
    """Rotate q (B, T, H, d) and k (B, T, KV, d) by cos/sin (B, T, R) into q_out, k_out (which
    may be q and k themselves: in place). Dims R.. are copied when the output is another tensor."""
    R = cos.shape[-1]
    half = R // 2
    c, s = _wide(cos)[:, :, None, :], _wide(sin)[:, :, None, :]  # (B, T, 1, R)
    c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    for x, out in ((q, q_out), (k, k_out)):
        x1, x2 = _wide(x[..., :half]), _wide(x[..., half:R])
        if backward:
            y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
        else:
            y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
        if out is not x and x.shape[-1] > R:
            out[..., R:] = x[..., R:]
        out[..., :half] = y1
        out[..., half:R] = y2


# ----------------------------------------------------------------------------- SwiGLU
def swiglu_forward_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2I) -> h (..., I) = up * silu(gate)."""
    gate, up = _wide(gate_up).chunk(2, dim=-1)
    return (up * gate * torch.sigmoid(gate)).to(gate_up.dtype)


def swiglu_backward_torch(dh: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """dh (..., I), gate_up (..., 2I) -> d_gate_up (..., 2I) = [d_gate | d_up]."""
    gate, up = _wide(gate_up).chunk(2, dim=-1)
    dh32 = _wide(dh)
    sig = torch.sigmoid(gate)
    d_gate = dh32 * up * sig * (1 + gate * (1 - sig))
    d_up = dh32 * gate * sig
    return torch.cat((d_gate, d_up), dim=-1).to(gate_up.dtype)


# ----------------------------------------------------------------------------- gelu_tanh
def gelu_tanh_forward_torch(x: torch.Tensor) -> torch.Tensor:
    x32 = _wide(x)
    t = torch.tanh(GELU_K0 * (x32 + GELU_K1 * x32 * x32 * x32))
    return (0.5 * x32 * (1 + t)).to(x.dtype)


def gelu_tanh_backward_torch(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    x32 = _wide(x)
    t = torch.tanh(GELU_K0 * (x32 + GELU_K1 * x32 * x32 * x32))
    grad = 0.5 * (1 + t) + 0.5 * x32 * (1 - t * t) * GELU_K0 * (1 + 3 * GELU_K1 * x32 * x32)
    return (_wide(dy) * grad).to(x.dtype)
