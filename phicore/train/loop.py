"""The training loop: one readable function, `train`.

Per optimizer step it takes `grad_accum` micro-batches, counts their target tokens first,
and backpropagates each micro-batch's summed token loss divided by that count, so the
gradient equals one big batch's token-mean loss however the step is split. Then it clips,
sets the learning rate from the pure schedule, and steps AdamW over the adapter parameters.
Evaluation, checkpoints and metrics happen between steps, never inside one.

Data parallel (`dist`, from `torchrun`; see distributed.py): each rank takes its share of
every global batch (`BatchPlan(rank=, world_size=)`), the step's target-token count is summed
over the ranks before any backward, each rank backpropagates its summed loss divided by that
global count, and the gradients are summed across ranks: exactly the gradient of one process
with the whole global batch. Only rank 0 writes metrics, best/ and checkpoint files; every
rank saves and restores its own RNG state. Stopping (Ctrl-C, `stop_after`) is agreed by all
ranks at the end of a step.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..data.collate import BatchPlan
from ..loss import causal_lm_loss_sum
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistContext
from .metrics import MetricsLog
from .schedule import lr_at, warmup_steps_for

MAX_BAD_STEPS_IN_A_ROW = 5


@dataclass
class TrainConfig:
    out_dir: str = "out"
    epochs: float = 3
    max_steps: Optional[int] = None  # overrides epochs when set
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_ratio: float = 0.05
    warmup_steps: int = 0  # overrides warmup_ratio when > 0
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    eval_every: Optional[int] = None  # default: once per epoch when there is validation data
    save_every: Optional[int] = None
    keep_last: Optional[int] = 2
    early_stopping_patience: Optional[int] = None
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast for the two halves)
    seed: int = 42
    fsdp: bool = False  # shard base and adapter with FSDP2 (data-parallel runs)
    stop_after: Optional[int] = None  # write a checkpoint and stop once this many steps are done
    log_every: int = 1
    run_config: dict = field(default_factory=dict)  # everything the CLI knows, saved with checkpoints


@dataclass
class TrainResult:
    steps: int
    interrupted: bool = False
    paused: bool = False  # stopped at cfg.stop_after with a checkpoint, to be resumed
    stopped_early: bool = False
    best_val_loss: Optional[float] = None
    final_loss: Optional[float] = None
    tokens: int = 0
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    history: list = field(default_factory=list)


def token_loss_sum(model, batch) -> torch.Tensor:
    """Summed next-token cross-entropy over the target tokens of one batch (fp32 scalar).

    The model computes it in token chunks (phicore.loss), so the (tokens x vocab) logits never
    exist in full; it runs inside the model's forward, where DDP and FSDP2 hooks apply.
    """
    return causal_lm_loss_sum(model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.labels,
                              batch.document_ids)


def autocast_for(device: torch.device, precision: str):
    """(autocast context dtype or None, whether a GradScaler is needed)."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"  # CPUs here have no fast half-precision units
    if precision == "fp32":
        return None, False
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r} (auto, fp32, bf16, fp16)")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return dtype, precision == "fp16" and device.type == "cuda"


@torch.no_grad()
def evaluate(model, plan: BatchPlan, device, autocast_dtype, dist: Optional[DistContext] = None) -> float:
    """Token-mean validation loss over the whole plan (over every rank's share of it)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in plan.batches(epoch=0):
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            total += float(token_loss_sum(model, batch))
        count += batch.num_target_tokens
    model.train(was_training)
    if dist is not None:
        total, count = dist.all_reduce_sum([total, count])
    return total / max(count, 1)


class _StopRequest:
    """Turns Ctrl-C into a flag checked between steps, so the step in flight finishes and a
    checkpoint is written before the loop exits. A second Ctrl-C interrupts at once, unless
    it follows the first within `grace` seconds: under torchrun every rank gets the terminal's
    Ctrl-C and then the same signal again, forwarded by the launcher."""

    def __init__(self, grace: float = 0.0):
        self.requested = False
        self.grace = grace
        self._first = None
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested and time.monotonic() - self._first > self.grace:
                raise KeyboardInterrupt
            if not self.requested:
                self.requested, self._first = True, time.monotonic()

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    except ImportError:
        return 0


def train(model, train_plan: BatchPlan, cfg: TrainConfig, val_plan: Optional[BatchPlan] = None,
          resume_from: Optional[Path] = None, device=None, show_progress: bool = True,
          dist: Optional[DistContext] = None) -> TrainResult:
    """Train the model's trainable (adapter) parameters; write checkpoints, metrics, best/.

    Returns a TrainResult. The final adapter is NOT written here: the caller saves it with
    whatever else belongs next to it (tokenizer, configs); with `dist`, through
    `dist.save_adapter` (after FSDP2 the adapter is sharded across the ranks).
    """
    dist = dist or DistContext()
    main = dist.is_main
    device = torch.device(device) if device is not None else next(model.parameters()).device
    out_dir = Path(cfg.out_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("train: the model has no trainable parameters (apply LoRA first)")
    engine = dist.wrap(model, device, fsdp=cfg.fsdp)  # forward/backward through this
    params = [p for p in model.parameters() if p.requires_grad]  # after wrapping: FSDP2 shards them
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    autocast_dtype, needs_scaler = autocast_for(device, cfg.precision)
    scaler = torch.amp.GradScaler(device.type) if needs_scaler else None

    micro_per_epoch = len(train_plan)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / cfg.grad_accum))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = warmup_steps_for(total_steps, cfg.warmup_ratio, cfg.warmup_steps)
    eval_every = cfg.eval_every or (steps_per_epoch if val_plan is not None else None)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_val_loss": None, "evals_without_gain": 0,
             "tokens_seen": 0}
    torch.manual_seed(cfg.seed + dist.rank)  # dropout: a stream of its own on every rank
    if resume_from is not None:
        state.update(load_checkpoint(resume_from, model, optimizer, dist))
    metrics = MetricsLog(out_dir, resume_step=state["step"]) if main else None
    run_config = {**cfg.run_config, "train": asdict(cfg) | {"run_config": None}, "total_steps": total_steps,
                  "world_size": dist.world_size}
    say = tqdm.write if main else (lambda message: None)

    def micro_batches():
        """Yield (epoch, index, batch) from the saved position on, epoch after epoch."""
        epoch, start = state["epoch"], state["batch_in_epoch"]
        while True:
            for offset, batch in enumerate(train_plan.batches(epoch, start=start)):
                yield epoch, start + offset, batch
            epoch, start = epoch + 1, 0

    saved = {}  # step -> checkpoint path: one write per step however many reasons there are

    def checkpoint():
        if state["step"] not in saved:
            saved[state["step"]] = save_checkpoint(out_dir, state["step"], model, optimizer, state, run_config,
                                                   cfg.keep_last, dist)
        return saved[state["step"]]

    result = TrainResult(steps=state["step"])
    stream = micro_batches()
    engine.train()
    started = time.perf_counter()
    bad_in_a_row = 0
    bar = tqdm(total=total_steps, initial=state["step"], desc="training", unit="step",
               disable=not (show_progress and main), dynamic_ncols=True)
    with _StopRequest(grace=5.0 if dist.enabled else 0.0) as stop:
        while state["step"] < total_steps:
            step_started = time.perf_counter()
            group = [next(stream) for _ in range(cfg.grad_accum)]
            # the step's target tokens on every rank: each loss is divided by the global count
            num_targets = int(dist.all_reduce_sum([sum(b.num_target_tokens for _, _, b in group)])[0])
            num_tokens = sum(b.num_tokens for _, _, b in group)
            optimizer.zero_grad(set_to_none=True)
            loss_total = 0.0
            for i, (_, _, batch) in enumerate(group):
                batch = batch.to(device)
                with dist.no_sync(engine, sync=i == len(group) - 1):
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        loss = token_loss_sum(engine, batch) / max(num_targets, 1)
                    (scaler.scale(loss) if scaler else loss).backward()
                loss_total += float(loss.detach())

            lr = lr_at(state["step"], base_lr=cfg.lr, total_steps=total_steps, warmup_steps=warmup, kind=cfg.scheduler)
            for group_params in optimizer.param_groups:
                group_params["lr"] = lr
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
                grad_norm = grad_norm.full_tensor()
            # the step's loss and tokens over all ranks, and whether any rank was asked to stop
            loss_total, num_tokens, stop_votes = dist.all_reduce_sum([loss_total, num_tokens, float(stop.requested)])
            num_tokens = int(num_tokens)
            finite = math.isfinite(loss_total) and bool(torch.isfinite(grad_norm))
            if scaler:  # fp16: the scaler skips non-finite steps itself and lowers its scale
                scaler.step(optimizer)
                scaler.update()
            elif finite:
                optimizer.step()
            last_epoch, last_index, _ = group[-1]
            state["epoch"], state["batch_in_epoch"] = last_epoch, last_index + 1
            if state["batch_in_epoch"] >= micro_per_epoch:
                state["epoch"], state["batch_in_epoch"] = last_epoch + 1, 0
            if not finite and not scaler:
                bad_in_a_row += 1
                say(f"warning: step {state['step'] + 1}: loss or gradient is {loss_total} / "
                    f"{float(grad_norm)}; step skipped")
                if bad_in_a_row >= MAX_BAD_STEPS_IN_A_ROW:
                    bar.close()
                    checkpoint()  # the adapter is still finite: keep the work done so far
                    raise FloatingPointError(
                        f"{bad_in_a_row} steps in a row had a NaN/inf loss or gradient; stopping. "
                        "Try a lower --lr, --max-grad-norm, or fp32/bf16 instead of fp16."
                    )
            else:
                bad_in_a_row = 0
            state["step"] += 1
            state["tokens_seen"] += num_tokens
            seconds = time.perf_counter() - step_started
            row = {"step": state["step"], "epoch": round(state["epoch"] + state["batch_in_epoch"] / micro_per_epoch, 4),
                   "loss": loss_total, "lr": lr, "grad_norm": float(grad_norm),
                   "tokens_per_s": num_tokens / max(seconds, 1e-9)}
            if metrics is not None and state["step"] % cfg.log_every == 0:
                metrics.log(**row)
            result.history.append(row)
            result.final_loss = loss_total
            bar.update(1)
            bar.set_postfix(loss=f"{loss_total:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")

            if val_plan is not None and eval_every and (state["step"] % eval_every == 0 or state["step"] == total_steps):
                val_loss = evaluate(model, val_plan, device, autocast_dtype, dist)
                if metrics is not None:
                    metrics.log(step=state["step"], epoch=row["epoch"], val_loss=val_loss,
                                val_perplexity=math.exp(min(val_loss, 50)))
                say(f"step {state['step']}: val loss {val_loss:.4f} (perplexity {math.exp(min(val_loss, 50)):.2f})")
                if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
                    state["best_val_loss"], state["evals_without_gain"] = val_loss, 0
                    dist.save_adapter(model, out_dir / "best")
                else:
                    state["evals_without_gain"] += 1
                if cfg.early_stopping_patience and state["evals_without_gain"] >= cfg.early_stopping_patience:
                    say(f"early stopping: no val improvement in {cfg.early_stopping_patience} evaluations")
                    result.stopped_early = True
                    checkpoint()
                    break
            if cfg.save_every and state["step"] % cfg.save_every == 0:
                checkpoint()
            if stop_votes:
                path = checkpoint()
                say(f"interrupted: checkpoint saved to {path}; continue with --resume auto")
                result.interrupted = True
                break
            if cfg.stop_after and state["step"] >= cfg.stop_after and state["step"] < total_steps:
                path = checkpoint()
                say(f"stopped after {state['step']} steps as asked (--stop-after): checkpoint saved to {path}; "
                    "continue with --resume auto")
                result.paused = True
                break
    bar.close()
    result.steps = state["step"]
    result.best_val_loss = state["best_val_loss"]
    result.tokens = state["tokens_seen"]
    result.seconds = time.perf_counter() - started
    result.peak_memory_bytes = max(dist.all_gather_object(_peak_memory(device)))
    if metrics is not None:
        metrics.plot()
    return result
