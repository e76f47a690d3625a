"""One optimizer step, and the validation loss: the computation of training, nothing around it.

`train_step` takes a step's micro-batches, counts their target tokens first, and backpropagates
each micro-batch's summed token loss divided by that count, so the gradient equals one big
batch's token-mean loss however the step is split. Then it clips, sets the learning rate, and
steps AdamW over the adapter parameters, unless the loss or gradient is not finite. It returns
a `StepOutcome`; what happens next (metrics, evaluation, checkpoints, stopping) is the loop's.

Data parallel (`dist`, see distributed.py): the step's target-token count is summed over the
ranks before any backward, each rank backpropagates its summed loss divided by that global
count, and the gradients are summed across ranks: the gradient of one process with the whole
global batch. The loss and token counts reported are summed over the ranks too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..data.batch_plan import BatchPlan
from .distributed import DistContext


@dataclass
class StepOutcome:
    """What one optimizer step did (summed over data-parallel ranks)."""

    loss: float  # the step's token-mean training loss
    grad_norm: float  # before clipping
    lr: float
    tokens: int  # real (non-padding) tokens in the step's micro-batches
    finite: bool  # loss and gradient were finite, so the optimizer stepped (fp16: the scaler decides)


def autocast_for(device: torch.device, precision: str):
    """(autocast dtype or None, whether a GradScaler is needed) for RunConfig.precision."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"  # CPUs here have no fast half-precision units
    if precision == "fp32":
        return None, False
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return dtype, precision == "fp16" and device.type == "cuda"


def _loss_sum(model, batch, autocast_dtype) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's target tokens (fp32 scalar); the model
    computes it in token chunks, inside its forward, where DDP's and FSDP2's hooks apply."""
    with torch.autocast(batch.input_ids.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        return model(batch.input_ids, labels=batch.labels, **batch.model_inputs())


def train_step(engine, micro_batches: list, *, optimizer, params: list, lr: float, max_grad_norm: float,
               device: torch.device, autocast_dtype, scaler=None, dist: Optional[DistContext] = None) -> StepOutcome:
    """Forward and backward over `micro_batches` (this rank's share of one step), then clip and
    step the optimizer at learning rate `lr`. `engine` is the model as wrapped for data
    parallelism; `max_grad_norm` 0 disables clipping."""
    dist = dist or DistContext()
    # the step's target tokens on every rank: each loss is divided by the global count
    num_targets = int(dist.all_reduce_sum([sum(b.num_target_tokens for b in micro_batches)])[0])
    num_tokens = sum(b.num_tokens for b in micro_batches)
    optimizer.zero_grad(set_to_none=True)
    loss_total = 0.0
    for i, batch in enumerate(micro_batches):
        batch = batch.to(device)
        with dist.no_sync(engine, sync=i == len(micro_batches) - 1):
            loss = _loss_sum(engine, batch, autocast_dtype) / max(num_targets, 1)
            (scaler.scale(loss) if scaler else loss).backward()
        loss_total += float(loss.detach())

    for group in optimizer.param_groups:
        group["lr"] = lr
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    loss_total, num_tokens = dist.all_reduce_sum([loss_total, num_tokens])
    finite = math.isfinite(loss_total) and bool(torch.isfinite(grad_norm))
    if scaler:  # fp16: the scaler skips non-finite steps itself and lowers its scale
        scaler.step(optimizer)
        scaler.update()
    elif finite:
        optimizer.step()
    return StepOutcome(loss_total, float(grad_norm), lr, int(num_tokens), finite or scaler is not None)


@torch.no_grad()
def evaluate(model, plan: BatchPlan, device, autocast_dtype, dist: Optional[DistContext] = None) -> float:
    """Token-mean validation loss over the whole plan (over every rank's share of it)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in plan.batches(epoch=0):
        total += float(_loss_sum(model, batch.to(device), autocast_dtype))
        count += batch.num_target_tokens
    model.train(was_training)
    if dist is not None:
        total, count = dist.all_reduce_sum([total, count])
    return total / max(count, 1)
