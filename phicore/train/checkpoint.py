"""Training checkpoints: everything needed to continue a run exactly.

OUT/checkpoint-STEP/ holds
  adapter_model.safetensors, adapter_config.json   the adapter (PEFT files, usable as is)
  optimizer.pt                                     AdamW state (tensors only: loads with weights_only)
  rng_state.pt                                     torch CPU (and CUDA) generator states; in a
                                                   data-parallel run, every rank's under "ranks"
  trainer_state.json                               TrainerState: step, epoch, batch position, best val loss, ...
  run_config.json                                  the run's RunConfig (a valid train.py --config)
A checkpoint is written under a temporary name and renamed when complete, so a crash never
leaves a half-written checkpoint that `--resume auto` would pick.

Data-parallel runs (`dist`, a `distributed.DistContext`): every rank calls `save_checkpoint`
(the RNG states are gathered, FSDP2's sharded adapter and optimizer tensors are gathered into
full ones) and rank 0 alone writes the folder, so the files are the same as a one-process
run's. Every rank calls `load_checkpoint` and takes its own RNG state back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from ..lora import adapter_state_dict
from ..peft_io import PEFT_PREFIX, save_adapter
from .distributed import DistContext, copy_full_into
from .state import TrainerState

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


def checkpoint_dir(out_dir, step: int) -> Path:
    return Path(out_dir) / f"{PREFIX}{step}"


def list_checkpoints(out_dir) -> list:
    """Complete checkpoints (those with a trainer state) sorted by step."""
    found = []
    for path in Path(out_dir).glob(f"{PREFIX}*"):
        suffix = path.name[len(PREFIX):]
        if path.is_dir() and suffix.isdigit() and (path / STATE_FILE).exists():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def resolve_resume(out_dir, resume: Optional[str]) -> Optional[Path]:
    """`auto` -> the latest complete checkpoint in out_dir (None if there is none); a path ->
    that checkpoint, which must be complete."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path}: not a complete phicore checkpoint (no {STATE_FILE})")
    return path


def _rng_state() -> dict:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(out_dir, state: TrainerState, model, optimizer, run_config: dict,
                    keep_last: Optional[int] = None, dist: Optional[DistContext] = None) -> Path:
    """Write checkpoint-STEP atomically (temporary folder, then rename); keep the last
    `keep_last` (0 or None: all). With `dist`, every rank must call it (see the module docstring)."""
    dist = dist or DistContext()
    final = checkpoint_dir(out_dir, state.step)
    rng = _rng_state()
    ranks = dist.all_gather_object(rng) if dist.enabled else None
    optimizer_state = dist.gather_optimizer_state(optimizer)
    with dist.full_adapter(model):
        if dist.is_main:
            tmp = final.with_name(final.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_adapter(model, tmp)
            torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save({**rng, "ranks": ranks} if ranks else rng, tmp / "rng_state.pt")
            (tmp / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str), encoding="utf-8")
            saved_state = {**state.to_dict(), "world_size": dist.world_size}
            (tmp / STATE_FILE).write_text(json.dumps(saved_state, indent=2), encoding="utf-8")  # last: marks complete
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            if keep_last:
                for old in list_checkpoints(out_dir)[:-keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # nobody runs ahead of (or resumes from) a checkpoint still being written
    return final


def checkpoint_world_size(path) -> int:
    """How many data-parallel processes wrote the checkpoint (1 for older checkpoints)."""
    return int(json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8")).get("world_size", 1))


def load_checkpoint(path, model, optimizer, dist: Optional[DistContext] = None) -> dict:
    """Restore adapter weights, optimizer and RNG states in place; return the trainer state.
    With `dist`, every rank calls it and gets its own RNG state back."""
    dist = dist or DistContext()
    path = Path(path)
    written_by = checkpoint_world_size(path)
    if written_by != dist.world_size:
        raise ValueError(f"{path}: written by {written_by} process(es); resume it with the same number "
                         f"(torchrun --nproc_per_node={written_by}), not {dist.world_size}")
    saved = load_file(str(path / "adapter_model.safetensors"))
    state = adapter_state_dict(model)
    saved = {key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key: t for key, t in saved.items()}
    if set(saved) != set(state):
        missing = sorted(set(state) - set(saved))[:3]
        raise ValueError(f"{path}: checkpoint adapter does not match this run's LoRA layers (e.g. {missing})")
    for key in state:  # the model's order: every rank scatters the same tensors in turn
        copy_full_into(state[key], saved[key])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    dist.shard_optimizer_state(optimizer)
    rng = torch.load(path / "rng_state.pt", weights_only=True)
    _set_rng_state(rng["ranks"][dist.rank] if "ranks" in rng else rng)
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
