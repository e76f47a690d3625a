"""Next-token cross-entropy without materialising the (tokens x vocab) logits.

The plain loss, `F.cross_entropy(lm_head(h).float(), targets, reduction="sum")`, keeps the
whole logits tensor alive, in fp32, and its backward makes another one (the softmax) before
the lm_head's backward turns it into a (tokens x hidden) gradient. At Phi-2's vocabulary of
51200 that is 200 kB per token per copy: 16k tokens make 3.3 GB of fp32 logits, more than the
whole NF4 base.

`fused_linear_cross_entropy_sum` walks the tokens in chunks instead. For each chunk it makes
the chunk's logits, its loss, and right away the gradient of the loss with respect to the
chunk's hidden states (and to the lm_head's weight/bias, only when they train), then drops
the logits. What survives the forward pass is one (tokens x hidden) gradient; backward only
scales it by the incoming gradient. Peak extra memory: one chunk's logits (a few of them
while its softmax is formed), instead of several full ones.

Math, per token with logits z (V,), target t, lse = log(sum_v exp z_v):
    loss        = lse - z_t
    dloss/dz_v  = softmax(z)_v - [v == t]           (rows whose target is ignored: 0)
    dloss/dh    = dloss/dz @ W                      (W: (V, H) lm_head weight)
    dloss/dW   += dloss/dz^T @ h,  dloss/db += sum over tokens of dloss/dz

Dtypes follow the plain path: the matmuls run in the compute dtype (the autocast dtype when
autocast is on, else the weight's), the logits are upcast to fp32 for the softmax, and the
hidden-state gradient is returned in the hidden states' dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # "no loss here": F.cross_entropy's default, the label value phicore.data writes

# Default chunk: as many tokens as make 2^25 logits (128 MiB in fp32): 655 tokens at Phi-2's
# vocabulary of 51200, 1046 at Phi-3's 32064. Each chunk's GEMM is still ~100 GFLOP.
CHUNK_LOGITS = 2**25


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so one chunk's fp32 logits are about CHUNK_LOGITS elements."""
    return max(1, CHUNK_LOGITS // max(vocab_size, 1))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(hidden, weight) would compute in here (autocast's when it is on)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_loss_and_logit_grad(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, need_grad: bool):
    """logits (n, V) fp32 (overwritten when need_grad), targets (n,) -> (summed loss, dloss/dlogits (n, V) | None)."""
    valid = targets != ignore_index  # (n,)
    safe = torch.where(valid, targets, torch.zeros_like(targets))[:, None]  # (n, 1)
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    target_logit = logits.gather(1, safe).squeeze(1)  # (n,)
    loss = torch.where(valid, lse - target_logit, torch.zeros_like(lse)).sum()
    if not need_grad:
        return loss, None
    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place over the logits
    grad.scatter_add_(1, safe, torch.full_like(target_logit[:, None], -1.0))  # - one-hot(target)
    grad.mul_(valid[:, None])  # ignored tokens contribute nothing
    return loss, grad


class LinearCrossEntropySum(torch.autograd.Function):
    """sum over tokens of cross_entropy(hidden @ weight^T + bias, targets), chunked over tokens.

    Forward computes the loss and every requested gradient (see the module docstring), saving
    only those gradients; backward multiplies them by dL/dloss (a scalar).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int, chunk_size: int, needs: tuple):
        # hidden (N, H), weight (V, H), bias (V,) | None, targets (N,) int64
        need_h, need_w, need_b = needs
        dtype = _compute_dtype(hidden, weight)
        N = hidden.shape[0]
        w = weight.to(dtype)  # (V, H)
        b = None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None  # (N, H)
        acc_dtype = torch.promote_types(dtype, torch.float32)  # logits, loss, head gradients: fp32 or fp64
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_b else None
        need_grad = need_h or need_w or need_b
        loss = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, N, chunk_size):
                h = hidden[start : start + chunk_size].to(dtype)  # (n, H)
                logits = F.linear(h, w, b).to(acc_dtype)  # (n, V) fp32
                chunk_loss, grad_z = _chunk_loss_and_logit_grad(
                    logits, targets[start : start + chunk_size], ignore_index, need_grad
                )
                loss += chunk_loss
                if grad_z is None:
                    continue
                if need_b:
                    grad_b += grad_z.sum(0)
                grad_z = grad_z.to(dtype)  # (n, V)
                if need_h:
                    grad_h[start : start + chunk_size] = grad_z @ w  # (n, V) @ (V, H)
                if need_w:
                    grad_w += (grad_z.t() @ h).to(acc_dtype)  # (V, n) @ (n, H)
                del logits, grad_z
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_loss).to(ctx.weight_dtype)
        if grad_b is not None:
            grad_b = (grad_b * grad_loss).to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def fused_linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight^T + bias` against `targets`, an fp32 scalar
    (float64 for float64 inputs).

    hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) with `ignore_index` for
    tokens that do not count. Equal to
    `F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=..., reduction="sum")`
    while holding at most `chunk_size` tokens' logits at a time (default: default_chunk_size(V)).
    Gradients flow to whichever of hidden, weight, bias require them.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy_sum: hidden {tuple(hidden.shape)} and weight "
                         f"{tuple(weight.shape)} must be (N, H) and (V, H)")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"fused_linear_cross_entropy_sum: targets {tuple(targets.shape)} != ({hidden.shape[0]},)")
    chunk_size = default_chunk_size(weight.shape[0]) if chunk_size is None else int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"fused_linear_cross_entropy_sum: chunk_size must be >= 1, got {chunk_size}")
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    return LinearCrossEntropySum.apply(hidden, weight, bias, targets, ignore_index, chunk_size, needs)


def next_token_loss_sum(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Summed next-token cross-entropy from final hidden states (fp32 scalar).

    hidden (B, T, D), labels (B, T) aligned with the inputs (unshifted, `ignore_index` where no
    loss is taken): position t predicts labels[:, t + 1]. Only positions with a real target
    reach the head, so prompt and padding tokens cost no vocabulary matmul at all (eagerly: under
    torch.compile every position does, ignored ones adding 0, since a data-dependent number of
    rows would break the graph and recompile for every count; the sum is the same). A plain
    nn.Linear head goes through the chunked fused loss; any other head (quantised, adapted)
    through its own forward and the plain loss.
    """
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), D): position t predicts t+1
    targets = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    if not torch.compiler.is_compiling():  # n depends on the data: under torch.compile every row stays
        keep = (targets != ignore_index).nonzero().squeeze(1)  # (n,)
        hidden, targets = hidden.index_select(0, keep), targets.index_select(0, keep)  # (n, D), (n,)
    if type(head) is nn.Linear:
        return fused_linear_cross_entropy_sum(hidden, head.weight, head.bias, targets, ignore_index, chunk_size)
    logits = head(hidden).float()  # (n, V)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
