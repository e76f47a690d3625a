"""Turn train.py's arguments into a ready run: data read and checked, base model loaded,
LoRA applied, batches planned; and write the run's outputs at the end.

Everything that can fail on bad input (the data files, the flags, the output folder) is
checked before the model is loaded and before anything in --out is written.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..data import BatchPlan, DataError, prompt_format_for, read_conversations, split_train_val, tokenize_dataset
from ..lora import apply_lora, save_adapter
from ..tiny import TINY_PRESETS, build_tiny
from ..tokenizer import load_tokenizer
from ..weights import default_device, load_model
from .checkpoint import list_checkpoints, resolve_resume
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

    def save_outputs(self, result: TrainResult) -> None:
        """Final adapter (PEFT files), tokenizer files and the run record into OUT/."""
        save_adapter(self.model, self.out_dir, base_model_name_or_path=self.record["base_model"])
        self.tokenizer.save(self.out_dir)
        record = {**self.record, "result": {
            "steps": result.steps, "final_loss": result.final_loss, "best_val_loss": result.best_val_loss,
            "seconds": round(result.seconds, 3), "tokens": result.tokens,
            "peak_memory_bytes": result.peak_memory_bytes, "stopped_early": result.stopped_early,
        }}
        tmp = self.out_dir / (RUN_RECORD + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        tmp.replace(self.out_dir / RUN_RECORD)


def _read_data(args):
    try:
        conversations = read_conversations(args.data, format=args.format)
        val_conversations = read_conversations(args.val_data, format=args.format) if args.val_data else None
    except DataError as err:
        raise UsageError(str(err)) from None
    except FileNotFoundError as err:
        raise UsageError(f"{err.filename or err}: no such file") from None
    return conversations, val_conversations


def _check_flags(args):
    positive = {"--batch-size": args.batch_size, "--grad-accum": args.grad_accum, "--max-length": args.max_length,
                "--lora-r": args.lora_r}
    for flag, value in positive.items():
        if value is None or value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if not 0 <= args.val_split < 1:
        raise UsageError(f"--val-split must be in [0, 1), got {args.val_split}")
    if args.max_steps is None and args.epochs <= 0:
        raise UsageError(f"--epochs must be positive, got {args.epochs}")


def _check_out_dir(out_dir: Path, resume: Optional[str]):
    """Refuse to start a fresh run over an earlier run's checkpoints (never lose work)."""
    if resume is None and out_dir.exists() and list_checkpoints(out_dir):
        raise UsageError(f"{out_dir}: holds checkpoints of an earlier run; continue it with --resume auto "
                         "or choose another --out")


def prepare_run(args) -> Run:
    """Check everything and build the run; on a UsageError, remove what this call created in
    --out (a tiny preset's OUT/base is written before the later flags can be checked)."""
    out_dir = Path(args.out)
    created = [path for path in (out_dir, out_dir / "base") if not path.exists()]
    try:
        return _prepare_run(args)
    except UsageError:
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        raise


def _prepare_run(args) -> Run:
    _check_flags(args)
    out_dir = Path(args.out)
    _check_out_dir(out_dir, args.resume)
    try:
        resume_from = resolve_resume(out_dir, args.resume)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    conversations, val_conversations = _read_data(args)

    base = args.model
    if args.lr is None:
        args.lr = TINY_PRESETS[base]["default_lr"] if base in TINY_PRESETS else DEFAULT_LR
    if base in TINY_PRESETS:
        base = str(build_tiny(base, out_dir / "base", seed=args.seed))
    try:
        tokenizer = load_tokenizer(base)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    try:
        prompt_format = prompt_format_for(tokenizer, template=args.template)
    except ValueError as err:
        raise UsageError(f"--template: {err}") from None
    examples, stats = tokenize_dataset(conversations, prompt_format, tokenizer, args.max_length, args.train_on_prompt)
    lines = [f"data: {args.data}: {stats.summary()}"]
    if val_conversations is not None:
        val_examples, val_stats = tokenize_dataset(val_conversations, prompt_format, tokenizer, args.max_length,
                                                   args.train_on_prompt)
        lines.append(f"validation: {args.val_data}: {val_stats.summary()}")
    else:
        examples, val_examples = split_train_val(examples, args.val_split, args.seed) if len(examples) > 1 else (examples, [])
        lines.append(f"validation: {len(val_examples)} examples held out (--val-split {args.val_split})")
    if not examples:
        raise UsageError(f"{args.data}: no training examples left after tokenising (all cut or empty)")

    try:
        device = torch.device(args.device) if args.device else default_device()
    except RuntimeError as err:
        raise UsageError(f"--device: {err}") from None
    torch.manual_seed(args.seed)
    try:
        model = load_model(base, dtype=args.compute_dtype or args.dtype, device=device, quantize=args.quantize,
                           double_quant=args.double_quant)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    try:
        apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=args.targets,
                   use_rslora=args.use_rslora, use_dora=args.use_dora)
    except ValueError as err:
        raise UsageError(f"--targets: {err}") from None
    model.gradient_checkpointing = args.grad_checkpointing
    if args.compile:
        model.compile()

    pad_id = tokenizer.pad_token_id
    train_plan = BatchPlan(examples, args.batch_size, pad_id, seed=args.seed, pack=args.pack, max_length=args.max_length)
    val_plan = BatchPlan(val_examples, args.batch_size, pad_id, seed=args.seed, pack=args.pack,
                         max_length=args.max_length, shuffle=False) if val_examples else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    lines.append(f"model: {base} on {device}, LoRA r={args.lora_r} on {args.targets}: "
                 f"{trainable:,} trainable of {total:,} parameters")
    record = {
        "base_model": model.config.source_dir or base,
        "prompt_template": args.template or prompt_format.name,
        "quantization": {"type": args.quantize, "double_quant": args.double_quant,
                         "compute_dtype": str(model.dtype).replace("torch.", "")} if args.quantize else None,
        "max_length": args.max_length,
        "args": vars(args),
    }
    train_config = TrainConfig(
        out_dir=str(out_dir), epochs=args.epochs, max_steps=args.max_steps, grad_accum=args.grad_accum,
        lr=args.lr, warmup_ratio=args.warmup_ratio, warmup_steps=args.warmup_steps, scheduler=args.scheduler,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, eval_every=args.eval_every,
        save_every=args.save_every, keep_last=args.keep_last, early_stopping_patience=args.early_stopping_patience,
        precision=args.precision, seed=args.seed, run_config=record,
    )
    return Run(model, tokenizer, train_plan, val_plan, train_config, resume_from, device, out_dir, record,
               "\n".join(lines))
