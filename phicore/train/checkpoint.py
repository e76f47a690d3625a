"""Training checkpoints: everything needed to continue a run exactly.

OUT/checkpoint-STEP/ holds
  adapter_model.safetensors, adapter_config.json   the adapter (PEFT files, usable as is)
  optimizer.pt                                     AdamW state (tensors only: loads with weights_only)
  rng_state.pt                                     torch CPU (and CUDA) generator states
  trainer_state.json                               step, epoch, batch position, best val loss, ...
  run_config.json                                  the run's full configuration
A checkpoint is written under a temporary name and renamed when complete, so a crash never
leaves a half-written checkpoint that `--resume auto` would pick.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from ..lora import adapter_state_dict, save_adapter

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
PEFT_PREFIX = "base_model.model."


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


def save_checkpoint(out_dir, step: int, model, optimizer, trainer_state: dict, run_config: dict,
                    keep_last: Optional[int] = None) -> Path:
    """Write checkpoint-STEP atomically (temporary folder, then rename); keep the last K."""
    final = checkpoint_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng_state.pt")
    (tmp / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str), encoding="utf-8")
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")  # last: marks complete
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep_last:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path, model, optimizer) -> dict:
    """Restore adapter weights, optimizer and RNG states in place; return the trainer state."""
    path = Path(path)
    saved = load_file(str(path / "adapter_model.safetensors"))
    state = adapter_state_dict(model)
    saved = {key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key: t for key, t in saved.items()}
    if set(saved) != set(state):
        missing = sorted(set(state) - set(saved))[:3]
        raise ValueError(f"{path}: checkpoint adapter does not match this run's LoRA layers (e.g. {missing})")
    with torch.no_grad():
        for key, tensor in saved.items():
            state[key].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = torch.load(path / "rng_state.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
