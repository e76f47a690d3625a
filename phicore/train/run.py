"""Turn train.py's arguments into a ready run: data read and checked, base model loaded,
LoRA applied, batches planned; and write the run's outputs at the end.

Everything that can fail on bad input (the data files, the flags, the output folder) is
checked before the model is loaded; what this call wrote into --out before finding bad input
(a tiny preset's OUT/base) is removed again.

Data comes through the tokenised dataset cache (`phicore.data.cache`): tokenised once,
memory-mapped afterwards. Under `torchrun` every rank runs `prepare_run`: the first rank of
each node tokenises on a cache miss while the others wait for the entry, rank 0 builds a tiny
preset's base, and each rank gets its shard of the batches (see distributed.py).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..data import BatchPlan, DataError, prompt_format_for
from ..data.cache import open_or_build
from ..data.collate import split_indices
from ..lora import apply_lora
from ..tiny import TINY_PRESETS, build_tiny
from ..tokenizer import load_tokenizer
from ..weights import atomic_write_text, default_device, default_dtype, load_model, parse_dtype
from .checkpoint import checkpoint_world_size, list_checkpoints, resolve_resume
from .distributed import DistContext, DistributedSetupError
from .loop import TrainConfig, TrainResult

RUN_RECORD = "training_config.json"
DEFAULT_LR = 2e-4


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


@dataclass
class Run:
    model: torch.nn.Module
    tokenizer: object
    train_plan: BatchPlan
    val_plan: Optional[BatchPlan]
    train_config: TrainConfig
    resume_from: Optional[Path]
    device: torch.device
    out_dir: Path
    record: dict
    summary: str
    dist: DistContext = field(default_factory=DistContext)

    def save_outputs(self, result: TrainResult) -> None:
        """Final adapter (PEFT files), tokenizer files and the run record into OUT/.
        Every rank calls it (a sharded adapter is gathered first); rank 0 writes."""
        self.dist.save_adapter(self.model, self.out_dir, base_model_name_or_path=self.record["base_model"])
        if not self.dist.is_main:
            return
        self.tokenizer.save(self.out_dir)
        record = {**self.record, "result": {
            "steps": result.steps, "final_loss": result.final_loss, "best_val_loss": result.best_val_loss,
            "seconds": round(result.seconds, 3), "tokens": result.tokens,
            "peak_memory_bytes": result.peak_memory_bytes, "stopped_early": result.stopped_early,
        }}
        atomic_write_text(self.out_dir / RUN_RECORD, json.dumps(record, indent=2, default=str))


def _check_flags(args):
    positive = {"--batch-size": args.batch_size, "--grad-accum": args.grad_accum, "--max-length": args.max_length,
                "--lora-r": args.lora_r}
    for flag, value in positive.items():
        if value is None or value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.max_length < 2:
        raise UsageError(f"--max-length must be at least 2, got {args.max_length}")
    if not 0 <= args.val_split < 1:
        raise UsageError(f"--val-split must be in [0, 1), got {args.val_split}")
    if args.max_steps is None and args.epochs <= 0:
        raise UsageError(f"--epochs must be positive, got {args.epochs}")
    if getattr(args, "stop_after", None) is not None and args.stop_after < 1:
        raise UsageError(f"--stop-after must be at least 1, got {args.stop_after}")
    if getattr(args, "offload_checkpoints", False) and not args.grad_checkpointing:
        raise UsageError("--offload-checkpoints needs --grad-checkpointing (it offloads the checkpointed layer inputs)")
    if getattr(args, "offload_checkpoints", False) and getattr(args, "fsdp", False):
        raise UsageError("--offload-checkpoints does not work with --fsdp (FSDP2 gathers each layer's parameters "
                         "inside its forward, out of the offloaded checkpoint's sight); leave out one of them")
    if getattr(args, "fsdp", False) and args.quantize:
        raise UsageError(f"--fsdp cannot shard a quantised base (--quantize {args.quantize}): FSDP2 shards "
                         "floating-point parameters and a 4-bit base is packed bytes. For QLoRA on several GPUs "
                         "leave out --fsdp (data parallel: each GPU holds the whole 4-bit base)")


def _check_out_dir(out_dir: Path, resume: Optional[str]):
    """Refuse to start a fresh run over an earlier run's checkpoints (never lose work)."""
    if resume is None and out_dir.exists() and list_checkpoints(out_dir):
        raise UsageError(f"{out_dir}: holds checkpoints of an earlier run; continue it with --resume auto "
                         "or choose another --out")


def prepare_run(args) -> Run:
    """Check everything and build the run; on a UsageError, remove what this call created in
    --out (a tiny preset's OUT/base is written before the later flags can be checked)."""
    dist = DistContext.from_env()
    out_dir = Path(args.out)
    created = [path for path in (out_dir, out_dir / "base") if not path.exists()]
    try:
        return _prepare_run(args, dist)
    except UsageError:  # raised on every rank alike, or on the one that tokenises (torchrun stops the rest)
        if dist.is_main:
            for path in created:
                shutil.rmtree(path, ignore_errors=True)
        dist.shutdown()
        raise


def _cached_examples(path, tokenizer, prompt_format, args, dist: DistContext):
    """The data file's examples through the cache (tokenised here on a miss by the first rank
    of each node; the node's other ranks wait for the entry)."""
    try:
        examples, _ = open_or_build(
            path, tokenizer, prompt_format, max_length=args.max_length, train_on_prompt=args.train_on_prompt,
            record_format=args.format, cache_dir=getattr(args, "data_cache", None), build=dist.local_rank == 0,
            show_progress=not args.quiet and dist.local_rank == 0, log=print if dist.is_main else (lambda m: None))
    except DataError as err:
        raise UsageError(str(err)) from None
    except FileNotFoundError as err:
        raise UsageError(f"{err.filename or err}: no such file") from None
    except IsADirectoryError as err:
        raise UsageError(f"{err.filename or err}: is a folder, not a data file") from None
    except PermissionError as err:
        raise UsageError(f"{err.filename or err}: permission denied (data file, or --data-cache folder)") from None
    return examples


def _prepare_run(args, dist: DistContext) -> Run:
    _check_flags(args)
    out_dir = Path(args.out)
    _check_out_dir(out_dir, args.resume)
    try:
        resume_from = resolve_resume(out_dir, args.resume)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    if resume_from is not None and checkpoint_world_size(resume_from) != dist.world_size:
        written_by = checkpoint_world_size(resume_from)
        raise UsageError(f"{resume_from}: written by {written_by} process(es); resume it with the same number "
                         f"(torchrun --nproc_per_node={written_by}), not {dist.world_size}")
    try:
        device = dist.device_for(args.device, default_device())
    except (RuntimeError, DistributedSetupError) as err:
        raise UsageError(f"--device: {err}") from None
    dist.init(device)

    base = args.model
    if args.lr is None:
        args.lr = TINY_PRESETS[base]["default_lr"] if base in TINY_PRESETS else DEFAULT_LR
    if base in TINY_PRESETS:
        if dist.is_main:
            build_tiny(base, out_dir / "base", seed=args.seed)
        dist.barrier()
        base = str(out_dir / "base")
    try:
        tokenizer = load_tokenizer(base)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    try:
        prompt_format = prompt_format_for(tokenizer, template=args.template)
    except ValueError as err:
        raise UsageError(f"--template: {err}") from None

    full = _cached_examples(args.data, tokenizer, prompt_format, args, dist)
    lines = [f"data: {args.data}: {full.stats.summary()}"]
    if args.val_data:
        val_examples = _cached_examples(args.val_data, tokenizer, prompt_format, args, dist)
        examples = full
        lines.append(f"validation: {args.val_data}: {val_examples.stats.summary()}")
    else:
        train_index, val_index = split_indices(len(full), args.val_split if len(full) > 1 else 0, args.seed)
        examples = full.subset(train_index) if len(val_index) else full
        val_examples = full.subset(val_index)
        lines.append(f"validation: {len(val_examples)} examples held out (--val-split {args.val_split})")
    if not len(examples):
        raise UsageError(f"{args.data}: no training examples left after tokenising (all cut or empty)")

    fsdp = bool(getattr(args, "fsdp", False))
    try:
        dtype = parse_dtype(args.compute_dtype or args.dtype) or default_dtype(device)
    except ValueError as err:
        raise UsageError(str(err)) from None

    def build_model(load_device):
        torch.manual_seed(args.seed)  # the same LoRA initialisation on every rank
        try:
            model = load_model(base, dtype=dtype, device=load_device, quantize=args.quantize,
                               double_quant=args.double_quant)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(str(err)) from None
        try:
            apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=args.targets,
                       use_rslora=args.use_rslora, use_dora=args.use_dora)
        except ValueError as err:
            raise UsageError(f"--targets: {err}") from None
        return model

    if fsdp and dist.enabled:  # FSDP2: each rank loads the base into CPU memory in turn and keeps its shard
        try:
            model = dist.build_sharded(lambda: build_model("cpu"), device)
        except DistributedSetupError as err:
            raise UsageError(f"--fsdp: {err}") from None
    else:
        model = build_model(device)
    model.gradient_checkpointing = args.grad_checkpointing
    model.checkpoint_offload = getattr(args, "offload_checkpoints", False)
    if args.compile:
        model.compile()

    pad_id = tokenizer.pad_token_id
    shard = {"rank": dist.rank, "world_size": dist.world_size}
    train_plan = BatchPlan(examples, args.batch_size, pad_id, seed=args.seed, pack=args.pack,
                           max_length=args.max_length, **shard)
    val_plan = BatchPlan(val_examples, args.batch_size, pad_id, seed=args.seed, pack=args.pack,
                         max_length=args.max_length, shuffle=False, **shard) if len(val_examples) else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    lines.append(f"model: {base} on {device}, LoRA r={args.lora_r} on {args.targets}: "
                 f"{trainable:,} trainable of {total:,} parameters")
    if fsdp and not dist.enabled:
        lines.append("--fsdp: one process, nothing to shard (launch with torchrun --nproc_per_node=N)")
    if dist.enabled:
        lines.append(f"data parallel: {dist.world_size} processes ({'FSDP2' if fsdp else 'DDP'}, {dist.backend}); "
                     f"effective batch {args.batch_size} x {args.grad_accum} x {dist.world_size} = "
                     f"{args.batch_size * args.grad_accum * dist.world_size} rows a step")
    record = {
        "base_model": model.config.source_dir or base,
        "prompt_template": args.template or prompt_format.name,
        "quantization": {"type": args.quantize, "double_quant": args.double_quant,
                         "compute_dtype": str(model.dtype).replace("torch.", "")} if args.quantize else None,
        "max_length": args.max_length,
        "world_size": dist.world_size,
        "data_cache": str(full.folder),
        "args": vars(args),
    }
    train_config = TrainConfig(
        out_dir=str(out_dir), epochs=args.epochs, max_steps=args.max_steps, grad_accum=args.grad_accum,
        lr=args.lr, warmup_ratio=args.warmup_ratio, warmup_steps=args.warmup_steps, scheduler=args.scheduler,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, eval_every=args.eval_every,
        save_every=args.save_every, keep_last=args.keep_last, early_stopping_patience=args.early_stopping_patience,
        precision=args.precision, seed=args.seed, fsdp=fsdp, stop_after=getattr(args, "stop_after", None),
        run_config=record,
    )
    return Run(model, tokenizer, train_plan, val_plan, train_config, resume_from, device, out_dir, record,
               "\n".join(lines), dist)
