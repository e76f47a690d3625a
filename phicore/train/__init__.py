"""Training: the run's settings (config.py, `RunConfig`), one run end to end (run.py,
`finetune`), where it starts (resume.py) and the folder it writes (output.py), the loop
(loop.py) with its step (step.py) and state (state.py), the learning-rate schedule
(schedule.py), checkpoints (checkpoint.py), metrics files (metrics.py) and data parallelism
under torchrun (distributed.py)."""

from importlib import import_module

_EXPORTS = {
    "RunConfig": "phicore.train.config",
    "finetune": "phicore.train.run",
    "UsageError": "phicore.train.run",
    "train": "phicore.train.loop",
    "TrainResult": "phicore.train.state",
    "TrainerState": "phicore.train.state",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):  # resolved on first use: `import phicore.train.config` stays light
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'phicore.train' has no attribute {name!r}")
