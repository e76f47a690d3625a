"""`finetune(config)`: one training run from a `RunConfig`, what `train.py` and
`phicore.finetune` both run.

    prepare_run: output folder and resume point checked, device picked, a tiny preset's base
                 built, tokenizer and prompt format, data read (through the tokenised cache),
                 base loaded and LoRA applied, batches planned
    train:       the loop (loop.py): checkpoints, metrics, best/
    save:        the final adapter, the tokenizer files and the run record (RunRecord)

Bad input (the data files, the model folder, the output folder) raises `UsageError`, one line
(train.py exits 2), and is found before the model is loaded where it can be; what this call
wrote into --out before finding bad input (a tiny preset's OUT/base) is removed again.

Under `torchrun` every rank runs all of it: the first rank of each node tokenises on a cache
miss while the others wait for the entry, rank 0 builds a tiny preset's base, and each rank
gets its shard of the batches (see distributed.py).
"""

from __future__ import annotations

import math
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..data import BatchPlan, DataError, prompt_format_for
from ..data.cache import open_or_build
from ..data.batch_plan import split_indices
from ..lora import apply_lora
from ..record import RunRecord
from ..tiny import TINY_PRESETS, build_tiny
from ..tokenizer import load_tokenizer
from ..weights import default_device, default_dtype, load_model, parse_dtype
from .checkpoint import checkpoint_world_size, list_checkpoints, resolve_resume
from .config import RunConfig
from .distributed import DistContext, DistributedSetupError
from .loop import train
from .state import TrainResult

Log = Callable[[str], None]


class UsageError(Exception):
    """Bad input found while preparing a run: printed as one line, exit code 2."""


def finetune(config: RunConfig, *, log: Log = print) -> TrainResult:
    """Run the fine-tuning `config` describes: prepare, train, write the outputs into
    `config.out`. Returns the TrainResult (`.interrupted` after Ctrl-C, `.paused` at
    `stop_after`: a checkpoint was written and the final outputs were not).

    Raises UsageError for bad input, FloatingPointError when training diverged."""
    run = prepare_run(config, log)
    try:
        say = log if run.dist.is_main else (lambda message: None)
        say(run.summary)
        result = train(run.model, run.train_plan, config, val_plan=run.val_plan, resume_from=run.resume_from,
                       device=run.device, show_progress=not config.quiet, dist=run.dist)
        if result.finished:
            run.save_outputs(result)
            ppl = f", val perplexity {math.exp(result.best_val_loss):.2f}" if result.best_val_loss is not None else ""
            say(f"done: {result.steps} steps in {result.seconds:.1f}s, "
                f"{result.tokens / max(result.seconds, 1e-9):.0f} tokens/s, peak memory "
                f"{result.peak_memory_bytes / 2**20:.0f} MiB, final loss {result.final_loss:.4f}{ppl}")
            say(f"adapter written to {run.out_dir}")
        return result
    except BaseException as err:
        if run.dist.enabled:  # free the DDP wrapper (held by the traceback) before its process group:
            traceback.clear_frames(err.__traceback__)  # gloo's destructor can deadlock on the GIL otherwise
        raise
    finally:
        run.dist.shutdown()


@dataclass
class Run:
    """A prepared run: everything `train` needs, and what to write when it is done."""

    model: torch.nn.Module
    tokenizer: object
    train_plan: BatchPlan
    val_plan: Optional[BatchPlan]
    resume_from: Optional[Path]
    device: torch.device
    out_dir: Path
    record: RunRecord
    summary: str
    dist: DistContext = field(default_factory=DistContext)

    def save_outputs(self, result: TrainResult) -> None:
        """Final adapter (PEFT files), tokenizer files and the run record into OUT/.
        Every rank calls it (a sharded adapter is gathered first); rank 0 writes."""
        self.dist.save_adapter(self.model, self.out_dir, base_model_name_or_path=self.record.base_model)
        if not self.dist.is_main:
            return
        self.tokenizer.save(self.out_dir)
        self.record.result = {
            "steps": result.steps, "final_loss": result.final_loss, "best_val_loss": result.best_val_loss,
            "seconds": round(result.seconds, 3), "tokens": result.tokens,
            "peak_memory_bytes": result.peak_memory_bytes, "stopped_early": result.stopped_early,
        }
        self.record.write(self.out_dir)


def prepare_run(config: RunConfig, log: Log = print) -> Run:
    """Check everything and build the run; on a UsageError, remove what this call created in
    --out (a tiny preset's OUT/base is written before the later inputs can be checked)."""
    dist = DistContext.from_env()
    out_dir = Path(config.out)
    created = [path for path in (out_dir, out_dir / "base") if not path.exists()]
    try:
        return _prepare_run(config, dist, log if dist.is_main else (lambda message: None))
    except UsageError:  # raised on every rank alike, or on the one that tokenises (torchrun stops the rest)
        if dist.is_main:
            for path in created:
                shutil.rmtree(path, ignore_errors=True)
        dist.shutdown()
        raise


def _resume_point(config: RunConfig, out_dir: Path, dist: DistContext) -> Optional[Path]:
    """The checkpoint to resume from (None: a fresh run); a fresh run over an earlier run's
    checkpoints is refused (never lose work)."""
    if config.resume is None and out_dir.exists() and list_checkpoints(out_dir):
        raise UsageError(f"{out_dir}: holds checkpoints of an earlier run; continue it with --resume auto "
                         "or choose another --out")
    try:
        resume_from = resolve_resume(out_dir, config.resume)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    if resume_from is not None and checkpoint_world_size(resume_from) != dist.world_size:
        written_by = checkpoint_world_size(resume_from)
        raise UsageError(f"{resume_from}: written by {written_by} process(es); resume it with the same number "
                         f"(torchrun --nproc_per_node={written_by}), not {dist.world_size}")
    return resume_from


def _cached_examples(path, tokenizer, prompt_format, config: RunConfig, dist: DistContext, log: Log):
    """The data file's examples through the cache (tokenised here on a miss by the first rank
    of each node; the node's other ranks wait for the entry)."""
    try:
        examples, _ = open_or_build(
            path, tokenizer, prompt_format, max_length=config.max_length, train_on_prompt=config.train_on_prompt,
            record_format=config.format, cache_dir=config.data_cache, build=dist.local_rank == 0,
            show_progress=not config.quiet and dist.local_rank == 0, log=log)
    except DataError as err:
        raise UsageError(str(err)) from None
    except FileNotFoundError as err:
        raise UsageError(f"{err.filename or err}: no such file") from None
    except IsADirectoryError as err:
        raise UsageError(f"{err.filename or err}: is a folder, not a data file") from None
    except PermissionError as err:
        raise UsageError(f"{err.filename or err}: permission denied (data file, or --data-cache folder)") from None
    return examples


def _prepare_run(config: RunConfig, dist: DistContext, log: Log) -> Run:
    out_dir = Path(config.out)
    resume_from = _resume_point(config, out_dir, dist)
    try:
        device = dist.device_for(config.device, default_device())
    except (RuntimeError, DistributedSetupError) as err:
        raise UsageError(f"--device: {err}") from None
    dist.init(device)

    base = config.model
    if base in TINY_PRESETS:
        if dist.is_main:
            build_tiny(base, out_dir / "base", seed=config.seed)
        dist.barrier()
        base = str(out_dir / "base")
    try:
        tokenizer = load_tokenizer(base)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    try:
        prompt_format = prompt_format_for(tokenizer, template=config.template)
    except ValueError as err:
        raise UsageError(f"--template: {err}") from None

    full = _cached_examples(config.data, tokenizer, prompt_format, config, dist, log)
    lines = [f"data: {config.data}: {full.stats.summary()}"]
    if config.val_data:
        val_examples = _cached_examples(config.val_data, tokenizer, prompt_format, config, dist, log)
        examples = full
        lines.append(f"validation: {config.val_data}: {val_examples.stats.summary()}")
    else:
        train_index, val_index = split_indices(len(full), config.val_split if len(full) > 1 else 0, config.seed)
        examples = full.subset(train_index) if len(val_index) else full
        val_examples = full.subset(val_index)
        lines.append(f"validation: {len(val_examples)} examples held out (--val-split {config.val_split})")
    if not len(examples):
        raise UsageError(f"{config.data}: no training examples left after tokenising (all cut or empty)")

    model = _build_model(config, base, device, dist)
    pad_id = tokenizer.pad_token_id
    shard = {"rank": dist.rank, "world_size": dist.world_size}
    train_plan = BatchPlan(examples, config.batch_size, pad_id, seed=config.seed, pack=config.pack,
                           max_length=config.max_length, **shard)
    val_plan = BatchPlan(val_examples, config.batch_size, pad_id, seed=config.seed, pack=config.pack,
                         max_length=config.max_length, shuffle=False, **shard) if len(val_examples) else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    lines.append(f"model: {base} on {device}, LoRA r={config.lora_r} on {config.targets}: "
                 f"{trainable:,} trainable of {total:,} parameters")
    if config.fsdp and not dist.enabled:
        lines.append("--fsdp: one process, nothing to shard (launch with torchrun --nproc_per_node=N)")
    if dist.enabled:
        lines.append(f"data parallel: {dist.world_size} processes ({'FSDP2' if config.fsdp else 'DDP'}, "
                     f"{dist.backend}); effective batch {config.batch_size} x {config.grad_accum} x "
                     f"{dist.world_size} = {config.batch_size * config.grad_accum * dist.world_size} rows a step")
    quantization = None
    if config.quantize:
        compute = parse_dtype(config.compute_dtype) or model.dtype
        quantization = {"type": config.quantize, "double_quant": config.double_quant,
                        "compute_dtype": str(compute).replace("torch.", "")}
    record = RunRecord(base_model=model.config.source_dir or base, prompt_template=config.template or prompt_format.name,
                       quantization=quantization, config=config.to_dict(), world_size=dist.world_size,
                       data_cache=str(full.folder))
    return Run(model, tokenizer, train_plan, val_plan, resume_from, device, out_dir, record, "\n".join(lines), dist)


def _build_model(config: RunConfig, base: str, device: torch.device, dist: DistContext):
    """The base (dense in --dtype, or NF4 computing in --compute-dtype) with LoRA applied, on the
    device; under --fsdp, sharded across the ranks."""
    dtype = parse_dtype(config.dtype) or default_dtype(device)

    def build(load_device):
        torch.manual_seed(config.seed)  # the same LoRA initialisation on every rank
        try:
            model = load_model(base, dtype=dtype, device=load_device, quantize=config.quantize,
                               double_quant=config.double_quant, compute_dtype=config.compute_dtype)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(str(err)) from None
        try:
            apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                       targets=config.targets, use_rslora=config.use_rslora, use_dora=config.use_dora)
        except ValueError as err:
            raise UsageError(f"--targets: {err}") from None
        return model

    if config.fsdp and dist.enabled:  # FSDP2: each rank loads the base into CPU memory in turn and keeps its shard
        try:
            model = dist.build_sharded(lambda: build("cpu"), device)
        except DistributedSetupError as err:
            raise UsageError(f"--fsdp: {err}") from None
    else:
        model = build(device)
    model.gradient_checkpointing = config.grad_checkpointing
    model.checkpoint_offload = config.offload_checkpoints
    if config.compile:
        model.compile()
    return model
