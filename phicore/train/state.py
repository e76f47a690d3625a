"""Where a training run stands, typed: `TrainerState` between steps (saved in every checkpoint
as trainer_state.json, so a resumed run continues at the very micro-batch it stopped before)
and `TrainResult` once the loop returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Optional


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the data position of the next micro-batch: epoch, and index within it
    batch_in_epoch: int = 0
    best_val_loss: Optional[float] = None
    evals_without_gain: int = 0  # for early stopping
    tokens_seen: int = 0
    last_loss: Optional[float] = None  # the latest finite step loss (the result of a run resumed at its end)
    total_steps: Optional[int] = None  # the run's length when the state was saved (its schedule's end)
    fingerprint: dict = field(default_factory=dict)  # what the run trains on: data files' sha256, compared on resume

    def advance(self, last_epoch: int, last_index: int, micro_per_epoch: int, tokens: int) -> None:
        """One step done, whose last micro-batch was (last_epoch, last_index)."""
        self.epoch, self.batch_in_epoch = last_epoch, last_index + 1
        if self.batch_in_epoch >= micro_per_epoch:
            self.epoch, self.batch_in_epoch = last_epoch + 1, 0
        self.step += 1
        self.tokens_seen += tokens

    def fractional_epoch(self, micro_per_epoch: int) -> float:
        return round(self.epoch + self.batch_in_epoch / micro_per_epoch, 4)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainerState":
        """From trainer_state.json (which also records, e.g., the world size: ignored here)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class TrainResult:
    steps: int
    interrupted: bool = False  # Ctrl-C: a checkpoint was written
    paused: bool = False  # stopped at RunConfig.stop_after with a checkpoint, to be resumed
    stopped_early: bool = False  # early stopping
    best_val_loss: Optional[float] = None
    final_loss: Optional[float] = None
    tokens: int = 0
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    history: list = field(default_factory=list)  # the metrics rows of the steps run here
    signal: Optional[int] = None  # with `interrupted`: the signal that stopped it (SIGINT, SIGTERM)
    already_complete: bool = False  # resumed a run that had finished: nothing was trained

    @property
    def finished(self) -> bool:
        """The run reached its last step (or stopped early): its final outputs are due."""
        return not (self.interrupted or self.paused)
