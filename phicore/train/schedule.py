"""Learning-rate schedules as pure functions of the step: nothing to save or restore."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def warmup_steps_for(total_steps: int, warmup_ratio: float = 0.0, warmup_steps: int = 0) -> int:
    """Explicit warmup steps win; otherwise a fraction of the run, rounded up."""
    if warmup_steps:
        return int(warmup_steps)
    return int(math.ceil(total_steps * warmup_ratio))


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, kind: str = "cosine") -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from base_lr/warmup
    to base_lr, then cosine or linear decay to 0 at `total_steps`, or constant."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown scheduler {kind!r} (choose from {', '.join(SCHEDULES)})")
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return base_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return base_lr * (1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
