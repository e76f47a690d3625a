"""The training loop: `train`, a step (step.py) and the work between steps (`BetweenSteps`).

    while steps remain:
        outcome = train_step(next grad_accum micro-batches)      # forward, backward, AdamW
        state.advance(...)                                         # TrainerState: step, data position
        stop = between.after_step(outcome, signal, result)         # metrics, eval + best/, checkpoint, stop?

Between steps, in this order: the metrics row; a non-finite step is skipped with a warning
(five in a row: checkpoint the still-finite adapter and stop); evaluation when due, with
best/ and early stopping; the periodic checkpoint; then stopping on Ctrl-C (every rank
agrees, a checkpoint is written) or at `stop_after` (a checkpoint, to be resumed).

Data parallel (`dist`, from `torchrun`; see distributed.py): each rank takes its share of
every global batch (`BatchPlan(rank=, world_size=)`); only rank 0 writes metrics, best/ and
checkpoint files; every rank saves and restores its own RNG state.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..data.batch_plan import BatchPlan
from .checkpoint import load_checkpoint, save_checkpoint
from .config import RunConfig
from .distributed import DistContext
from .metrics import MetricsLog
from .schedule import lr_at, warmup_steps_for
from .state import TrainerState, TrainResult
from .step import StepOutcome, autocast_for, evaluate, train_step

MAX_BAD_STEPS_IN_A_ROW = 5


def total_steps_for(config: RunConfig, micro_batches_per_epoch: int) -> int:
    """Optimizer steps of the whole run: --max-steps, else --epochs over the data."""
    steps_per_epoch = max(1, math.ceil(micro_batches_per_epoch / config.grad_accum))
    return config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))


def train(model, train_plan: BatchPlan, config: RunConfig, *, val_plan: Optional[BatchPlan] = None,
          resume_from: Optional[Path] = None, device=None, show_progress: bool = True,
          dist: Optional[DistContext] = None, fingerprint: Optional[dict] = None) -> TrainResult:
    """Train the model's trainable (adapter) parameters; write checkpoints, metrics, best/.

    The final adapter is NOT written here: the caller saves it with whatever else belongs next
    to it (tokenizer, run record); with `dist`, through `dist.save_adapter` (after FSDP2 the
    adapter is sharded across the ranks). `fingerprint` (the data files' hashes) is kept in
    the checkpoints, for a resumed run to compare. A run resumed at or past its last step
    trains nothing and returns the checkpoint's result.
    """
    dist = dist or DistContext()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("train: the model has no trainable parameters (apply LoRA first)")
    engine = dist.wrap(model, device, fsdp=config.fsdp)  # forward/backward through this
    params = [p for p in model.parameters() if p.requires_grad]  # after wrapping: FSDP2 shards them
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    autocast_dtype, needs_scaler = autocast_for(device, config.precision)
    scaler = torch.amp.GradScaler(device.type) if needs_scaler else None
    micro_per_epoch = len(train_plan)
    total_steps = total_steps_for(config, micro_per_epoch)
    warmup = warmup_steps_for(total_steps, config.warmup_ratio, config.warmup_steps)

    torch.manual_seed(config.seed + dist.rank)  # dropout: a stream of its own on every rank
    state = TrainerState(fingerprint=dict(fingerprint or {}))
    if resume_from is not None:
        state = TrainerState.from_dict(load_checkpoint(resume_from, model, optimizer, dist))
    state.total_steps = total_steps
    between = BetweenSteps(config, model, optimizer, val_plan, device, autocast_dtype, dist, state,
                           steps_per_epoch=math.ceil(micro_per_epoch / config.grad_accum), total_steps=total_steps,
                           micro_per_epoch=micro_per_epoch)
    if resume_from is not None:
        between.say(f"resuming from {resume_from} (step {state.step} of {total_steps})")
    batches = _micro_batches(train_plan, state.epoch, state.batch_in_epoch)
    result = TrainResult(steps=state.step, final_loss=state.last_loss)
    started = time.perf_counter()
    engine.train()
    bar = tqdm(total=total_steps, initial=state.step, desc="training", unit="step",
               disable=not (show_progress and dist.is_main), dynamic_ncols=True)
    with bar, StopRequest(grace=5.0 if dist.enabled else 0.0) as stop_request:
        while state.step < total_steps:
            step_started = time.perf_counter()
            group = [next(batches) for _ in range(config.grad_accum)]  # (epoch, index, batch)
            lr = lr_at(state.step, base_lr=config.lr, total_steps=total_steps, warmup_steps=warmup,
                       kind=config.scheduler)
            outcome = train_step(engine, [b for _, _, b in group], optimizer=optimizer, params=params, lr=lr,
                                 max_grad_norm=config.max_grad_norm, device=device, autocast_dtype=autocast_dtype,
                                 scaler=scaler, dist=dist)
            state.advance(group[-1][0], group[-1][1], micro_per_epoch, outcome.tokens)
            row = between.log_step(outcome, time.perf_counter() - step_started, result)
            bar.update(1)
            bar.set_postfix(loss=f"{outcome.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            stop = between.after_step(outcome, stop_request.signal, result)
            if stop:
                break
    result.steps, result.best_val_loss, result.tokens = state.step, state.best_val_loss, state.tokens_seen
    result.seconds = time.perf_counter() - started
    result.peak_memory_bytes = max(dist.all_gather_object(_peak_memory(device)))
    between.finish()
    return result


def _micro_batches(plan: BatchPlan, epoch: int, start: int):
    """Yield (epoch, index, batch) from a data position on, epoch after epoch."""
    while True:
        for offset, batch in enumerate(plan.batches(epoch, start=start)):
            yield epoch, start + offset, batch
        epoch, start = epoch + 1, 0


class BetweenSteps:
    """Everything between two optimizer steps: metrics, evaluation and best/, checkpoints, and
    the decision to stop. Only rank 0 writes files; every rank takes part in evaluation and
    checkpoints (collectives)."""

    def __init__(self, config: RunConfig, model, optimizer, val_plan, device, autocast_dtype, dist: DistContext,
                 state: TrainerState, *, steps_per_epoch: int, total_steps: int, micro_per_epoch: int):
        self.config, self.model, self.optimizer, self.val_plan = config, model, optimizer, val_plan
        self.device, self.autocast_dtype, self.dist, self.state = device, autocast_dtype, dist, state
        self.total_steps, self.micro_per_epoch = total_steps, micro_per_epoch
        self.out_dir = Path(config.out)
        if dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.out_dir, resume_step=state.step) if dist.is_main else None
        self.eval_every = config.eval_every or (steps_per_epoch if val_plan is not None else None)
        self.bad_in_a_row = 0
        self._saved = {}  # step -> checkpoint path: one write per step however many reasons there are

    def say(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message)

    def log_step(self, outcome: StepOutcome, seconds: float, result: TrainResult) -> dict:
        """The step's metrics row: written to the metrics files and kept in the result."""
        row = {"step": self.state.step, "epoch": self.state.fractional_epoch(self.micro_per_epoch),
               "loss": outcome.loss, "lr": outcome.lr, "grad_norm": outcome.grad_norm,
               "tokens_per_s": outcome.tokens / max(seconds, 1e-9)}
        if self.metrics is not None:
            self.metrics.log(**row)
        result.history.append(row)
        result.final_loss = outcome.loss
        if math.isfinite(outcome.loss):
            self.state.last_loss = outcome.loss
        return row

    def checkpoint(self) -> Path:
        step = self.state.step
        if step not in self._saved:
            self._saved[step] = save_checkpoint(self.out_dir, self.state, self.model, self.optimizer,
                                                self.config.to_dict(), self.config.keep_last, self.dist)
        return self._saved[step]

    def after_step(self, outcome: StepOutcome, stop_signal: Optional[int], result: TrainResult) -> bool:
        """The work after a step; True when the loop must stop (`result` says why). `stop_signal`:
        the signal (Ctrl-C's SIGINT, a scheduler's SIGTERM) this rank was sent, if any."""
        state, config = self.state, self.config
        self._count_bad_step(outcome)
        self._check_adapter_finite()
        if self.val_plan is not None and self.eval_every and (
                state.step % self.eval_every == 0 or state.step == self.total_steps):
            if self._evaluate():
                self.say(f"early stopping: no val improvement in {config.early_stopping_patience} evaluations")
                result.stopped_early = True
                self.checkpoint()
                return True
        if config.save_every and state.step % config.save_every == 0:
            self.checkpoint()
        signals = self.dist.all_gather_object(stop_signal) if self.dist.enabled else [stop_signal]
        stop_signal = next((s for s in signals if s), None)  # any rank's: all stop together
        if stop_signal:
            name = "Ctrl-C" if stop_signal == signal.SIGINT else signal.Signals(stop_signal).name
            self.say(f"interrupted ({name}): checkpoint saved to {self.checkpoint()}; continue with --resume auto")
            result.interrupted, result.signal = True, stop_signal
            return True
        if config.stop_after and config.stop_after <= state.step < self.total_steps:
            self.say(f"stopped after {state.step} steps as asked (--stop-after): checkpoint saved to "
                     f"{self.checkpoint()}; continue with --resume auto")
            result.paused = True
            return True
        return False

    def _count_bad_step(self, outcome: StepOutcome) -> None:
        """A non-finite step was skipped: warn; too many in a row: keep the (still finite) adapter
        in a checkpoint and stop with FloatingPointError."""
        if outcome.finite:
            self.bad_in_a_row = 0
            return
        self.bad_in_a_row += 1
        self.say(f"warning: step {self.state.step}: loss or gradient is {outcome.loss} / {outcome.grad_norm}; "
                 "step skipped")
        if self.bad_in_a_row >= MAX_BAD_STEPS_IN_A_ROW:
            self.checkpoint()
            raise FloatingPointError(f"{self.bad_in_a_row} steps in a row had a NaN/inf loss or gradient; "
                                     "stopping. Try a lower --lr, --max-grad-norm, or fp32/bf16 instead of fp16.")

    def _check_adapter_finite(self) -> None:
        """An update that made the adapter NaN/inf (a learning rate far too high, say) ends the run
        at once: nothing non-finite is ever saved, the last checkpoint stays the last finite one."""
        if all(bool(torch.isfinite(p.detach()).all()) for p in self.optimizer.param_groups[0]["params"]):
            return
        kept = f"; the last checkpoint, {self._saved[max(self._saved)]}, is finite" if self._saved else ""
        raise FloatingPointError(f"step {self.state.step}: the adapter has NaN/inf values after the update "
                                 f"(--lr {self.config.lr} too high?); stopping without saving it{kept}")

    def _evaluate(self) -> bool:
        """Validation loss, metrics, best/; True when early stopping's patience ran out."""
        state = self.state
        val_loss = evaluate(self.model, self.val_plan, self.device, self.autocast_dtype, self.dist)
        perplexity = math.exp(min(val_loss, 50))
        if self.metrics is not None:
            self.metrics.log(step=state.step, epoch=state.fractional_epoch(self.micro_per_epoch), val_loss=val_loss,
                             val_perplexity=perplexity)
        self.say(f"step {state.step}: val loss {val_loss:.4f} (perplexity {perplexity:.2f})")
        if state.best_val_loss is None or val_loss < state.best_val_loss:
            state.best_val_loss, state.evals_without_gain = val_loss, 0
            self.dist.save_adapter(self.model, self.out_dir / "best")
        else:
            state.evals_without_gain += 1
        patience = self.config.early_stopping_patience
        return bool(patience) and state.evals_without_gain >= patience

    def finish(self) -> None:
        if self.metrics is not None:
            self.metrics.plot()


class StopRequest:
    """Turns Ctrl-C (SIGINT) and a job scheduler's SIGTERM (SLURM, Kubernetes) into a flag checked
    between steps, so the step in flight finishes and a checkpoint is written before the loop
    exits; `signal` says which came. A second signal stops the process at once (exit 128 +
    signal, no traceback): the checkpoint being written, if any, is only a temporary folder
    then, never renamed into place. Under torchrun a second signal within `grace` seconds of the
    first is ignored: every rank gets the terminal's Ctrl-C, then the same signal again,
    forwarded by the launcher."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, grace: float = 0.0):
        self.signal: Optional[int] = None
        self.grace = grace
        self._first = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame):
        if self.signal is None:
            self.signal, self._first = signum, time.monotonic()
        elif time.monotonic() - self._first > self.grace:
            os.write(2, f"\nstopped at once ({signal.Signals(signum).name} again)\n".encode())
            os._exit(128 + signum)

    def __enter__(self):
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave the signals alone
                break
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    except ImportError:
        return 0
