"""The run's memory: `--plan` (the planner's table for this run) and `--batch-size auto`.

`--batch-size auto` takes the largest micro-batch whose planned peak (phicore/memory_plan.py)
fits the device's free memory less `--memory-margin`, counting the longest row the data really
has (batches pad to their longest row; packed rows are --max-length). With
`--effective-batch-size N` only divisors of N are candidates and `--grad-accum` becomes N / b,
so the optimizer sees the same rows per step on any machine. On CUDA the choice is confirmed by
one forward and backward at that size before training (random token ids, the RNG states put
back afterwards so the run's dropout draws do not change); an out-of-memory steps down to the
next candidate. A resumed run keeps the batch the checkpoint was trained with.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from ..config import ModelConfig
from ..memory_plan import (Budget, MemoryPlan, TrainingShape, batch_candidates, device_budget, fixed_overhead,
                           plan_training)
from ..weights import default_dtype, parse_dtype
from .config import RunConfig, UsageError
from .step import autocast_for

Log = Callable[[str], None]
MAX_AUTO_BATCH = 256  # above this the planner's linear terms are all that grow; no run needs more rows a step


def training_shape(config: RunConfig, model_config: ModelConfig, device: torch.device, batch_size: int,
                   seq_len: int) -> TrainingShape:
    """The planner's view of this run at `batch_size` rows of `seq_len` tokens."""
    weights = parse_dtype(config.dtype) or default_dtype(device)
    autocast, _ = autocast_for(device, config.precision)
    compute = parse_dtype(config.compute_dtype) if config.quantize and config.compute_dtype else weights
    activation = autocast or compute
    return TrainingShape(
        batch_size=batch_size, seq_len=seq_len, weight_bytes=weights.itemsize, activation_bytes=activation.itemsize,
        quantize=config.quantize, double_quant=config.double_quant, lora_r=config.lora_r, targets=config.targets,
        lora_dropout=config.lora_dropout, use_dora=config.use_dora, grad_checkpointing=config.grad_checkpointing,
        offload_checkpoints=config.offload_checkpoints and device.type == "cuda",
        keep_host_memory=config.keep_host_memory and device.type == "cpu",
        dense_mask=(batch_size > 1 and not config.pack) or (config.pack and device.type != "cuda")
        or (model_config.sliding_window is not None and seq_len > model_config.sliding_window and device.type != "cuda"),
        autocast=autocast is not None and autocast.itemsize < weights.itemsize)


def budget_for(config: RunConfig, device: torch.device) -> tuple[Budget, int, str]:
    """(budget, fixed bytes, how): --device-memory or the device's free memory now."""
    budget = device_budget(device, memory_gib=config.device_memory, margin=config.memory_margin)
    fixed, how = fixed_overhead(device, planning_elsewhere=config.device_memory is not None)
    return budget, fixed, how


def run_plan(config: RunConfig, model_config: ModelConfig, device: torch.device, seq_len: int,
             seq_note: str) -> str:
    """The --plan report: the table at the run's batch (or the one auto would choose)."""
    budget, fixed, how = budget_for(config, device)
    batch = config.batch_size
    lines = []
    if batch == "auto":
        found = _largest(config, model_config, device, seq_len, budget, fixed, limit=MAX_AUTO_BATCH)
        if found is None:
            lines.append("--batch-size auto: not even 1 row fits; the table is for batch 1")
            batch = 1
        else:
            batch = found
            lines.append(f"--batch-size auto would choose {batch}" + _accum_note(config, batch))
    plan = plan_training(model_config, training_shape(config, model_config, device, batch, seq_len), fixed=fixed,
                         fixed_how=how, title=f"memory plan: {config.model}, batch {batch} x {seq_len} tokens "
                                               f"({seq_note}), on {device}")
    return "\n".join([plan.table(budget), *lines])


def plan_report(config: RunConfig) -> str:
    """train.py --plan: the model's config.json (a folder, a tiny preset, or a hub model's
    config.json alone: no weights are downloaded), the device, and the table at --max-length."""
    from ..weights import default_device

    try:
        device = torch.device(config.device) if config.device else default_device()
    except RuntimeError as err:
        raise UsageError(f"--device: {err}") from None
    model_config = model_config_for(config.model)
    seq_note = "--max-length; a batch pads to its longest row" + ("" if not config.pack else ", packed rows are full")
    return run_plan(config, model_config, device, config.max_length, seq_note)


def model_config_for(name: str) -> ModelConfig:
    """The ModelConfig of --model without its weights."""
    from pathlib import Path

    from ..hub import hub_id_for
    from ..tiny import TINY_PRESETS, build_tiny, tiny_dir

    try:
        if name in TINY_PRESETS:
            return ModelConfig.from_file(build_tiny(name, tiny_dir(name)) / "config.json")
        folder = Path(name).expanduser()
        if folder.is_dir():
            return ModelConfig.from_file(folder / "config.json")
        from huggingface_hub import hf_hub_download

        return ModelConfig.from_file(hf_hub_download(hub_id_for(name), "config.json"))
    except (OSError, ValueError) as err:  # a missing file, a bad config, the hub out of reach
        raise UsageError(f"--model {name}: cannot read its config.json ({str(err).splitlines()[0]})") from None


def choose_batch(config: RunConfig, model_config: ModelConfig, device: torch.device, seq_len: int,
                 n_examples: int, log: Log, model=None, saved: Optional[dict] = None) -> RunConfig:
    """The config with --batch-size auto replaced by a number (and --grad-accum set from
    --effective-batch-size); unchanged when the batch size was given."""
    if config.batch_size != "auto":
        return config
    if saved and isinstance(saved.get("batch_size"), int):  # a resumed run keeps its batch
        batch, accum = saved["batch_size"], int(saved.get("grad_accum", 1))
        log(f"--batch-size auto: {batch} x {accum} micro-batches, as the run being resumed")
        return dataclasses.replace(config, batch_size=batch, grad_accum=accum)
    budget, fixed, _ = budget_for(config, device)
    limit = max(1, min(MAX_AUTO_BATCH, n_examples))
    candidates = [b for b in batch_candidates(limit, config.effective_batch_size)
                  if _fits(config, model_config, device, b, seq_len, budget, fixed)]
    if device.type == "cuda" and model is not None:
        candidates = _probe(model, candidates, seq_len, device, config, log)
    if not candidates:
        plan = _plan(config, model_config, device, 1, seq_len, fixed)
        raise UsageError(f"--batch-size auto: not even one row of {seq_len} tokens fits in {budget.describe()} "
                         f"(batch 1 needs {plan.peak_bytes / 2**30:.2f} GiB; see --plan): try --quantize nf4, a "
                         f"lower --max-length, or --grad-checkpointing")
    batch = candidates[0]
    accum = config.effective_batch_size // batch if config.effective_batch_size else config.grad_accum
    peak = _plan(config, model_config, device, batch, seq_len, fixed).peak_bytes
    log(f"--batch-size auto: {batch} rows of up to {seq_len} tokens x {accum} micro-batches (planned tensors "
        f"{peak / 2**30:.2f} GiB of {budget.describe()})")
    return dataclasses.replace(config, batch_size=batch, grad_accum=accum)


def _accum_note(config: RunConfig, batch: int) -> str:
    if config.effective_batch_size:
        return f" x {config.effective_batch_size // batch} micro-batches (--effective-batch-size " \
               f"{config.effective_batch_size})"
    return ""


def _plan(config, model_config, device, batch, seq_len, fixed) -> MemoryPlan:
    return plan_training(model_config, training_shape(config, model_config, device, batch, seq_len), fixed=fixed)


def _fits(config, model_config, device, batch, seq_len, budget: Budget, fixed: int) -> bool:
    return _plan(config, model_config, device, batch, seq_len, fixed).peak_bytes <= budget.usable_bytes


def _largest(config, model_config, device, seq_len, budget, fixed, *, limit) -> Optional[int]:
    for batch in batch_candidates(limit, config.effective_batch_size):
        if _fits(config, model_config, device, batch, seq_len, budget, fixed):
            return batch
    return None


def _probe(model, candidates: list, seq_len: int, device: torch.device, config: RunConfig, log: Log) -> list:
    """Drop the candidates (largest first) whose one forward + backward runs out of CUDA memory;
    the first that runs is kept, with every smaller one after it."""
    autocast, _ = autocast_for(device, config.precision)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    was_training = model.training
    model.train()
    try:
        for index, batch in enumerate(candidates):
            ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
            try:
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    loss = model(ids, labels=ids)
                loss.backward()
                return candidates[index:]
            except torch.cuda.OutOfMemoryError:
                log(f"--batch-size auto: {batch} rows ran out of memory in the probe step; trying a smaller batch")
            finally:
                loss = ids = None
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        return []
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
        model.train(was_training)
