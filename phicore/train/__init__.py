"""Training: the loop (loop.py), the learning-rate schedule (schedule.py), checkpoints
(checkpoint.py) and metrics files (metrics.py)."""

from .loop import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
