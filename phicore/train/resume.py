"""Where a training invocation starts: a new run, the newest intact checkpoint, or nothing to
train because the run in --out is complete. Decided from --out and the settings alone, before
the model or the data is loaded, so a refusal costs nothing and touches nothing.

- A new run (no --resume) into a folder that holds a finished run, an adapter or checkpoints
  is refused unless --overwrite (then `OutputFolder.set_aside` keeps the earlier run until the
  new one has finished).
- `--resume auto` takes the newest intact checkpoint (each newer damaged one is named in a
  warning); `--resume PATH` that checkpoint, which must be intact.
- The invocation's settings are compared with the checkpoint's (`RunConfig.changes_from`): a
  change that alters the training is refused, naming each setting with its old and new value;
  the others are accepted and logged. The data files' contents are compared later, once read
  (`data_changes`), and a changed length (--max-steps, --epochs) once the steps are known
  (`schedule_note`).
- A finished run resumed with the length it had is complete: nothing is loaded or written.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..record import RunRecord
from .checkpoint import find_resumable, saved_config, saved_state
from .config import RunConfig, UsageError
from .output import OutputFolder
from .schedule import lr_at, warmup_steps_for


@dataclass
class StartPoint:
    checkpoint: Optional[Path] = None  # resume from it
    complete: Optional[RunRecord] = None  # the finished run: nothing to train or write
    saved_state: dict = field(default_factory=dict)  # the checkpoint's trainer_state.json
    saved_config: dict = field(default_factory=dict)  # the checkpoint's run_config.json
    notes: list = field(default_factory=list)  # lines for the log: warnings, accepted changes


def start_point(config: RunConfig, folder: OutputFolder, world_size: int) -> StartPoint:
    """Decide (see the module docstring); UsageError with one line when the run cannot start."""
    if config.resume is None:
        if folder.holds_a_run() and not config.overwrite:
            raise UsageError(f"{folder.path}: {_describe(folder)}; continue it with --resume auto, replace it with "
                             "--overwrite, or choose another --out")
        return StartPoint()
    try:
        checkpoint, warnings = find_resumable(folder.path, config.resume)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    finished = folder.finished()
    if checkpoint is None:
        if finished is None:  # nothing to continue: a new run, as without --resume
            return StartPoint(notes=[*warnings, f"--resume {config.resume}: no checkpoint in {folder.path}: "
                                                "starting a new run"])
        notes = _compare(config, finished.config, f"{folder.path}'s finished run")
        if _same_length(config, finished.config):
            return StartPoint(complete=finished, notes=[*warnings, *notes])
        raise UsageError(f"{folder.path}: the run there finished at step {finished.result['steps']} and left no "
                         "checkpoint to continue from (train with --save-every to keep one); start over with "
                         "--overwrite")
    state = saved_state(checkpoint)
    written_by = int(state.get("world_size", 1))
    if written_by != world_size:
        raise UsageError(f"{checkpoint}: written by {written_by} process(es); resume it with the same number "
                         f"(torchrun --nproc_per_node={written_by}), not {world_size}")
    saved = saved_config(checkpoint)
    notes = [*warnings, *_compare(config, saved, str(checkpoint))]
    if finished is not None and finished.result["steps"] <= state["step"] and _same_length(config, finished.config):
        return StartPoint(complete=finished, notes=notes)
    return StartPoint(checkpoint=checkpoint, saved_state=state, saved_config=saved, notes=notes)


def _describe(folder: OutputFolder) -> str:
    finished = folder.finished()
    if finished is not None:
        return f"holds a finished run ({finished.result['steps']} steps)"
    checkpoints = folder.checkpoints()
    if checkpoints:
        return f"holds checkpoints of an unfinished run (the latest: {checkpoints[-1].name})"
    return "holds an adapter of an earlier run"


def _same_length(config: RunConfig, saved: dict) -> bool:
    return all(saved.get(name, getattr(config, name)) == getattr(config, name) for name in ("max_steps", "epochs"))


def _compare(config: RunConfig, saved: dict, where: str) -> list:
    """Refuse changed settings that alter the training; the notes for the allowed ones.
    --batch-size auto matches the number the saved run chose (it is reused, not chosen again)."""
    if config.batch_size == "auto" and isinstance(saved.get("batch_size"), int):
        config = dataclasses.replace(config, batch_size=saved["batch_size"], grad_accum=int(saved.get("grad_accum", 1)))
    refused, allowed = config.changes_from(saved)
    if refused:
        changes = ", ".join(f"{flag} {old!r} -> {new!r}" for flag, old, new in refused)
        raise UsageError(f"--resume: {changes} differ from {where}, and change the training; resume with the saved "
                         "values (leave those flags out), or start over with --overwrite")
    return [f"resume: {flag} {old!r} -> {new!r}" for flag, old, new in allowed if flag not in ("--max-steps",
                                                                                             "--epochs")]


def data_changes(saved: dict, now: dict) -> None:
    """Refuse a resume whose data files' contents differ from the checkpoint's (sha256; for a hub
    dataset the digest of its files, revision, split, filters and limit, and the revisions are named)."""
    changed = [name for name in ("data_sha256", "val_data_sha256") if name in saved and saved[name] != now.get(name)]
    if changed:
        which = " and ".join("--data" if name == "data_sha256" else "--val-data" for name in changed)
        before, after = saved.get("data_sources") or {}, now.get("data_sources") or {}
        moved = "".join(dict.fromkeys(  # once per dataset, though --data and --val-data may share one
            f" ({after[role]['dataset']} was at revision {before[role]['revision'][:12]}, now "
            f"{after[role]['revision'][:12]}: pin the old one with --data-revision)" for role in after
            if role in before and "dataset" in after[role]
            and before[role].get("revision") != after[role].get("revision")))
        raise UsageError(f"--resume: the contents of {which} differ from what the checkpoint trained on{moved}; resume "
                         "with the same data, or start over with --overwrite")


def schedule_note(config: RunConfig, state: dict, total_steps: int) -> Optional[str]:
    """What a changed run length does to the schedule (None when the length is the same)."""
    saved_total, step = state.get("total_steps"), int(state["step"])
    if saved_total is None or saved_total == total_steps:
        return None
    if step >= total_steps:
        return (f"resume: the checkpoint is at step {step}, at or past the {total_steps} steps asked for: the run "
                "is complete, nothing more is trained")

    def lr(total: int) -> float:
        warmup = warmup_steps_for(total, config.warmup_ratio, config.warmup_steps)
        return lr_at(step, base_lr=config.lr, total_steps=total, warmup_steps=warmup, kind=config.scheduler)

    return (f"resume: the run now ends at step {total_steps}, not {saved_total}: the {config.scheduler} schedule "
            f"is recomputed for {total_steps} steps (the learning rate at step {step + 1} is {lr(total_steps):.3g}, "
            f"{lr(saved_total):.3g} before)")
