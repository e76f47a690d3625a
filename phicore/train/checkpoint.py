"""Training checkpoints: everything needed to continue a run exactly.

OUT/checkpoint-STEP/ holds
  adapter_model.safetensors, adapter_config.json   the adapter (PEFT files, usable as is)
  optimizer.pt                                     AdamW state (tensors only: loads with weights_only)
  rng_state.pt                                     torch CPU (and CUDA) generator states; in a
                                                   data-parallel run, every rank's under "ranks"
  trainer_state.json                               TrainerState: step, epoch, batch position, best val loss, ...
  run_config.json                                  the run's RunConfig (a valid train.py --config)
  manifest.json                                    size and sha256 of every other file: written last
A checkpoint is written under a temporary name and renamed when complete, so a crash never
leaves a half-written checkpoint that `--resume auto` would pick; the manifest makes a
checkpoint damaged later (a truncated or edited file, a full disk) recognisable, so
`--resume auto` falls back to the newest intact one (`find_resumable`).

Data-parallel runs (`dist`, a `distributed.DistContext`): every rank calls `save_checkpoint`
(the RNG states are gathered, FSDP2's sharded adapter and optimizer tensors are gathered into
full ones) and rank 0 alone writes the folder, so the files are the same as a one-process
run's. Every rank calls `load_checkpoint` and takes its own RNG state back.
"""

from __future__ import annotations

import hashlib
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
MANIFEST = "manifest.json"
CONFIG_FILE = "run_config.json"
FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "rng_state.pt", CONFIG_FILE, STATE_FILE)


def checkpoint_dir(out_dir, step: int) -> Path:
    return Path(out_dir) / f"{PREFIX}{step}"


def list_checkpoints(out_dir) -> list:
    """Checkpoint folders that were completely written (renamed into place), sorted by step."""
    found = []
    for path in Path(out_dir).glob(f"{PREFIX}*"):
        suffix = path.name[len(PREFIX):]
        if path.is_dir() and suffix.isdigit() and ((path / MANIFEST).exists() or (path / STATE_FILE).exists()):
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def damage(path) -> Optional[str]:
    """What is wrong with a checkpoint folder, in a few words naming the file; None when it is
    intact (every file present with the size and sha256 its manifest gives)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():  # written before checkpoints had manifests: check what can be
        missing = [name for name in FILES if not (path / name).is_file()]
        if missing:
            return f"{path / missing[0]}: missing"
        try:
            json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return f"{path / STATE_FILE}: not valid JSON"
        return None
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return f"{path / MANIFEST}: not valid"
    for name, expected in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{file}: missing"
        if file.stat().st_size != expected["size"]:
            return f"{file}: {file.stat().st_size} bytes, {expected['size']} written (truncated or replaced)"
        if _sha256(file) != expected["sha256"]:
            return f"{file}: contents changed since it was written"
    return None


def find_resumable(out_dir, resume: Optional[str]) -> tuple:
    """(checkpoint to resume from or None, [one-line warnings]). `auto`: the newest intact
    checkpoint in out_dir, each newer damaged one named in a warning; a path: that checkpoint,
    which must be intact (ValueError otherwise; FileNotFoundError when it is not one)."""
    if not resume:
        return None, []
    if resume != "auto":
        path = Path(resume)
        if not ((path / MANIFEST).exists() or (path / STATE_FILE).exists()):
            raise FileNotFoundError(f"{path}: not a complete phicore checkpoint (no {STATE_FILE})")
        problem = damage(path)
        if problem:
            raise ValueError(f"--resume {path}: damaged checkpoint: {problem}")
        return path, []
    warnings = []
    for path in reversed(list_checkpoints(out_dir)):
        problem = damage(path)
        if problem is None:
            return path, warnings
        warnings.append(f"warning: skipping damaged checkpoint {path.name}: {problem}")
    return None, warnings


def saved_state(path) -> dict:
    """A checkpoint's trainer_state.json (TrainerState fields, its world size, total steps)."""
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))


def saved_config(path) -> dict:
    """A checkpoint's run_config.json: the RunConfig's settings (older checkpoints: {} when the
    file held another layout)."""
    try:
        config = json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) and "args" not in config else {}


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
            try:
                _write_folder(tmp, model, optimizer_state, {**rng, "ranks": ranks} if ranks else rng, run_config,
                              {**state.to_dict(), "world_size": dist.world_size})
            except BaseException as err:
                if not isinstance(err, KeyboardInterrupt):  # a full disk, say: no half folder left behind
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            if keep_last:
                for old in list_checkpoints(out_dir)[:-keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # nobody runs ahead of (or resumes from) a checkpoint still being written
    return final


def _write_folder(tmp: Path, model, optimizer_state: dict, rng: dict, run_config: dict, state: dict) -> None:
    tmp.mkdir(parents=True)
    save_adapter(model, tmp)
    _torch_save(optimizer_state, tmp / "optimizer.pt")
    _torch_save(rng, tmp / "rng_state.pt")
    (tmp / CONFIG_FILE).write_text(json.dumps(run_config, indent=2, default=str), encoding="utf-8")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
    files = {name: {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
             for name in sorted(p.name for p in tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=2), encoding="utf-8")  # last


def _torch_save(obj, path: Path) -> None:
    """torch.save through a Python file, so that a write error (a full disk) comes out as the
    OSError it is, naming the file, not as torch's RuntimeError around it."""
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as err:
            if isinstance(err.__context__, OSError):
                raise OSError(err.__context__.errno, err.__context__.strerror, str(path)) from None
            raise


def checkpoint_world_size(path) -> int:
    """How many data-parallel processes wrote the checkpoint (1 for older checkpoints)."""
    return int(saved_state(path).get("world_size", 1))


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
    return saved_state(path)
