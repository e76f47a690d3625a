"""`finetune(config)`: one training run from a `RunConfig`, what `train.py` and
`phicore.finetune` both run.

    the output folder: locked for this run; where to start (resume.py: a new run, the newest
                 intact checkpoint, or nothing to do); an earlier run set aside (--overwrite)
    prepare_run: device picked, a tiny preset's base built, the model folder checked, tokenizer
                 and prompt format, data read (through the tokenised cache), base loaded and
                 LoRA applied, batches planned
    train:       the loop (loop.py): checkpoints, metrics, best/
    save:        the final adapter, the tokenizer files, the model card (README.md) and the run
                 record (RunRecord)
    push:        with --push-to-hub, the finished run's files to the Hugging Face hub (hub_push.py)

Bad input (the data files, the model folder, the output folder, a checkpoint) raises
`UsageError`, one line (train.py exits 2), found before the model is loaded where it can be;
a refused run leaves --out as it found it (what it created is removed, a set-aside run is put
back). A finished run's files are never replaced by a run that fails or is refused.

Under `torchrun` every rank runs all of it: the first rank of each node tokenises on a cache
miss while the others wait for the entry, rank 0 alone locks and changes the output folder and
builds a tiny preset's base, and each rank gets its shard of the batches (see distributed.py).
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
from ..host_memory import keep_freed_host_memory
from ..weights import check_model_folder, default_device, default_dtype, load_model, parse_dtype
from .config import RunConfig, UsageError
from .batch_size import choose_batch
from .distributed import DistContext, DistributedSetupError
from .loop import total_steps_for, train
from .output import BASE_NAME, OutputFolder
from .resume import StartPoint, data_changes, schedule_note, start_point
from .state import TrainResult

Log = Callable[[str], None]
__all__ = ["UsageError", "finetune", "prepare_run"]  # UsageError: declared in config.py, raised here


def finetune(config: RunConfig, *, log: Log = print) -> TrainResult:
    """Run the fine-tuning `config` describes: prepare, train, write the outputs into
    `config.out`. Returns the TrainResult (`.interrupted` after Ctrl-C or SIGTERM, `.paused` at
    `stop_after`: a checkpoint was written and the final outputs were not; `.already_complete`:
    the run in --out had finished, nothing was trained).

    With `config.push_to_hub` the hub token is looked up before anything else (UsageError
    without one) and the finished run's files are uploaded once it is complete (also when it
    already was); a failed upload raises phicore.hub_push.HubUploadError (an OSError) and
    leaves the finished run as it is.

    Raises UsageError for bad input, FloatingPointError when training diverged."""
    token = _hub_token() if config.push_to_hub else None
    result = _finetune_in_folder(config, log)
    if token is not None and result.finished and DistContext.from_env().is_main:
        _push(config, token, log)
    return result


def _hub_token() -> str:
    from ..hub_push import HubTokenError, hub_token

    try:
        return hub_token()
    except HubTokenError as err:
        raise UsageError(str(err)) from None


def _push(config: RunConfig, token: str, log: Log) -> None:
    """Upload the finished run's shareable files (phicore.hub_push.adapter_files) from --out."""
    from ..hub_push import HubUploadError, adapter_files, push

    files = adapter_files(config.out)
    log(f"--push-to-hub: uploading {len(files)} files of {config.out} to {config.push_to_hub}")
    try:
        url = push(config.push_to_hub, config.out, token=token, private=config.private, files=files,
                   commit_message=f"phicore run {Path(config.out).resolve().name}")
    except HubUploadError as err:
        raise HubUploadError(f"{err}; the finished run in {config.out} is kept: the same command with --resume "
                             "auto pushes it without training again") from err
    log(f"pushed to {url}")


def _finetune_in_folder(config: RunConfig, log: Log) -> TrainResult:
    """finetune without the hub push: the run in its locked output folder."""
    dist = DistContext.from_env()
    say = log if dist.is_main else (lambda message: None)
    folder = OutputFolder(config.out)
    created = [path for path in (folder.path, folder.path / BASE_NAME) if not path.exists()]
    set_aside, run = False, None
    try:
        if dist.is_main:
            folder.lock()
            for note in filter(None, [folder.recover()]):
                say(note)
        start = start_point(config, folder, dist.world_size)
        for note in start.notes:
            say(note)
        if start.complete is not None:
            result = start.complete.result
            say(f"{folder.path}: the run there is complete ({result['steps']} steps); nothing to train")
            return TrainResult(steps=result["steps"], final_loss=result.get("final_loss"),
                               best_val_loss=result.get("best_val_loss"), already_complete=True)
        if dist.is_main:
            set_aside = config.overwrite and folder.set_aside()
            if set_aside:
                say(f"--overwrite: the earlier run in {folder.path} is kept in {folder.path}/.replaced until this "
                    "one finishes")
            if start.checkpoint is None:
                folder.remove_stale_best()
        run = prepare_run(config, start, dist, say)
        say(run.summary)
        result = train(run.model, run.train_plan, run.config, val_plan=run.val_plan, resume_from=start.checkpoint,
                       device=run.device, show_progress=not config.quiet, dist=dist, fingerprint=run.fingerprint)
        if result.finished:
            _check_learnt(result)
            run.save_outputs(result)
            if dist.is_main:
                folder.discard()
            _report(result, run, start, say)
        return result
    except BaseException as err:
        if dist.is_main:
            if set_aside:
                folder.restore()
            if isinstance(err, UsageError):  # a refused run leaves --out as it found it
                folder.unlock()
                for path in created:
                    shutil.rmtree(path, ignore_errors=True)
        if dist.enabled:  # free the DDP wrapper (held by the traceback) before its process group:
            traceback.clear_frames(err.__traceback__)  # gloo's destructor can deadlock on the GIL otherwise
        raise
    finally:
        folder.unlock()
        dist.shutdown()


def _check_learnt(result: TrainResult) -> None:
    """A run whose every step had a NaN/inf loss learnt nothing: no adapter is written as a result."""
    losses = [row["loss"] for row in result.history]
    if losses and not any(math.isfinite(loss) for loss in losses):
        raise FloatingPointError(f"every one of the {len(losses)} steps had a NaN/inf loss: nothing was learnt, "
                                 "no adapter written. Try a lower --lr, or check the data")


def _report(result: TrainResult, run: "Run", start: StartPoint, say: Log) -> None:
    if not result.history and start.checkpoint is not None:
        say(f"{run.out_dir}: the run was complete at step {result.steps} (its checkpoint); its final outputs, "
            "which a stopped run had not written yet, are written now")
        return
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    ppl = f", val perplexity {math.exp(result.best_val_loss):.2f}" if result.best_val_loss is not None else ""
    say(f"done: {result.steps} steps in {result.seconds:.1f}s, {result.tokens / max(result.seconds, 1e-9):.0f} "
        f"tokens/s, peak memory {result.peak_memory_bytes / 2**20:.0f} MiB, final loss {loss}{ppl}")
    say(f"adapter written to {run.out_dir}")


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
    fingerprint: dict = field(default_factory=dict)  # the data files' sha256: compared when resuming
    hub_repo: Optional[str] = None  # --push-to-hub: the model card's snippets load the adapter from there
    config: Optional[RunConfig] = None  # the run's settings with --batch-size auto resolved to a number

    def save_outputs(self, result: TrainResult) -> None:
        """Final adapter (PEFT files), tokenizer files, the model card (README.md) and the run record into OUT/.
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
        from ..export.model_card import write_model_card

        stop_texts = [self.tokenizer.decode([i], skip_special_tokens=False) for i in self.tokenizer.stop_token_ids]
        write_model_card(self.out_dir, self.record, repo_id=self.hub_repo, stop_texts=stop_texts)
        self.record.write(self.out_dir)  # last: a finished run is one with a record that holds a result


def prepare_run(config: RunConfig, start: Optional[StartPoint] = None, dist: Optional[DistContext] = None,
                log: Log = print) -> Run:
    """Check the inputs and build the run: the model with LoRA, the batch plans, the record.
    `start`: where the run starts (resume.start_point; default: a new run); `dist`: the torchrun
    context (default: read from the environment)."""
    dist = dist or DistContext.from_env()
    try:
        return _prepare_run(config, start or StartPoint(), dist, log if dist.is_main else (lambda message: None))
    except UsageError:  # raised on every rank alike, or on the one that tokenises (torchrun stops the rest)
        dist.shutdown()
        raise


def _cached_examples(path, tokenizer, prompt_format, config: RunConfig, dist: DistContext, log: Log):
    """The data file's examples through the cache (tokenised here on a miss by the first rank
    of each node; the node's other ranks wait for the entry)."""
    from ..data import FieldMap  # here, not at the top: the imports are another change's

    try:
        examples, _ = open_or_build(
            path, tokenizer, prompt_format, max_length=config.max_length, train_on_prompt=config.train_on_prompt,
            record_format=config.format, cache_dir=config.data_cache, build=dist.local_rank == 0,
            fields=FieldMap(config.prompt_field, config.response_field, config.text_field),
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


def _data_sources(config: RunConfig):
    """--data / --val-data resolved (phicore.data.hub_data): files, dataset folders, hub datasets."""
    from ..data.hub_data import data_sources
    from ..data.selection import parse_filters

    try:
        return data_sources(config.data, config.val_data, split=config.data_split, config=config.data_config,
                            revision=config.data_revision, filters=parse_filters(config.data_filter),
                            limit=config.data_limit)
    except DataError as err:
        raise UsageError(str(err)) from None


def _prepare_run(config: RunConfig, start: StartPoint, dist: DistContext, log: Log) -> Run:
    out_dir = Path(config.out)
    try:
        device = dist.device_for(config.device, default_device())
    except (RuntimeError, DistributedSetupError) as err:
        raise UsageError(f"--device: {err}") from None
    dist.init(device)

    base = config.model
    if base in TINY_PRESETS:  # built into the run's folder (another preset's or seed's is rebuilt)
        if dist.is_main:
            build_tiny(base, out_dir / BASE_NAME, seed=config.seed)
        dist.barrier()
        base = str((out_dir / BASE_NAME).resolve())  # absolute: the record works from any folder
    try:  # the model folder (config, weights' headers, tokenizer) before any data is tokenised
        check_model_folder(base)
        tokenizer = load_tokenizer(base)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    try:
        prompt_format = prompt_format_for(tokenizer, template=config.template)
    except ValueError as err:  # a bad --template, or the model's own chat template failing (named in err)
        raise UsageError(f"--template: {err}" if config.template else str(err)) from None

    sources = _data_sources(config)  # a hub dataset's split, a dataset folder, or the files as given
    for note in sources.notes:  # what a hub id resolved to, before any tokenising
        log(note)
    full = _cached_examples(sources.train, tokenizer, prompt_format, config, dist, log)
    lines = [f"data: {sources.name(sources.train)}: {full.stats.summary()}"]
    if sources.validation is not None:
        val_examples = _cached_examples(sources.validation, tokenizer, prompt_format, config, dist, log)
        examples = full
        lines.append(f"validation: {sources.name(sources.validation)}: {val_examples.stats.summary()}")
    else:
        train_index, val_index = split_indices(len(full), config.val_split if len(full) > 1 else 0, config.seed)
        examples = full.subset(train_index) if len(val_index) else full
        val_examples = full.subset(val_index)
        lines.append(f"validation: {len(val_examples)} examples held out (--val-split {config.val_split})")
    if not len(examples):
        raise UsageError(f"{config.data}: no training examples left after tokenising (all cut or empty)")
    fingerprint = {"data_sha256": full.meta["key"]["data_sha256"],
                   "val_data_sha256": val_examples.meta["key"]["data_sha256"] if sources.validation is not None else None}
    if sources.describe():  # what a hub id resolved to (revision, files, sha256s), kept with the checkpoints
        fingerprint["data_sources"] = sources.describe()
    if start.checkpoint is not None:
        data_changes(start.saved_state.get("fingerprint", {}), fingerprint)

    model = _build_model(config, base, device, dist)
    if device.type == "cpu" and config.keep_host_memory:  # after the load, whose temporaries go back as before
        keep_freed_host_memory()  # no page-fault churn for the steps' large blocks (phicore/host_memory.py)
    seq_len = config.max_length if config.pack else int(min(config.max_length, examples.lengths.max()))
    config = choose_batch(config, model.config, device, seq_len, len(examples) // dist.world_size or 1, log,
                          model=model, saved=start.saved_config)
    pad_id = tokenizer.pad_token_id
    shard = {"rank": dist.rank, "world_size": dist.world_size}
    train_plan = BatchPlan(examples, config.batch_size, pad_id, seed=config.seed, pack=config.pack,
                           max_length=config.max_length, **shard)
    val_plan = BatchPlan(val_examples, config.batch_size, pad_id, seed=config.seed, pack=config.pack,
                         max_length=config.max_length, shuffle=False, **shard) if len(val_examples) else None
    context = int(model.config.max_position_embeddings)
    if config.max_length > context:
        lines.append(f"warning: --max-length {config.max_length} is above the model's context ({context} positions): "
                     f"rows longer than {context} tokens train on positions the model never saw")
    if start.checkpoint is not None:
        note = schedule_note(config, start.saved_state, total_steps_for(config, len(train_plan)))
        if note:
            lines.append(note)
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
                       data_cache=str(full.folder), data_sources=sources.describe() or None)
    return Run(model, tokenizer, train_plan, val_plan, start.checkpoint, device, out_dir, record, "\n".join(lines),
               dist, fingerprint, hub_repo=config.push_to_hub, config=config)


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
    if config.compile:  # the decoder stack, compiled on the first step (phicore/compile.py)
        from ..compile import compile_model

        compile_model(model, mode=config.compile_mode)
    return model
