"""Fold a LoRA adapter into its base and write a standalone Hugging Face model folder.

The folder is what `transformers.AutoModelForCausalLM.from_pretrained` reads: config.json in
the hub's form (`ModelConfig.to_hf_dict`), `model.safetensors` (or shards plus
`model.safetensors.index.json` above `max_shard_bytes`, 5 GB by default),
generation_config.json and the tokenizer files. Its logits are the base's plus the adapter's,
computed as W' = W + s * B @ A (DoRA: rescaled rows) in fp32 and stored in the model's dtype.

A QLoRA adapter was trained against the NF4-rounded base, not the original weights: merging
it into the original would add a correction meant for other numbers. So its base is loaded in
NF4 as in training, dequantised to the compute dtype (`dequantize_nf4_layers`), merged, and
saved dense, at full size (`QLORA_NOTE`).

The folder is written under DIR.partial and renamed to DIR when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..frozen_linear import FrozenLinear
from ..lora import LoRALinear, lora_layers, merge_and_unload
from ..weights import DEFAULT_SHARD_BYTES, atomic_write_text, save_model
from . import ExportError

QLORA_NOTE = (
    "note: this adapter was trained with QLoRA on a 4-bit NF4 base. The merged model is that NF4 base "
    "dequantised to {dtype} plus the adapter, saved dense: full size on disk and in memory (not 4-bit), "
    "with the outputs of the QLoRA model you trained, not those of the original full-precision base plus "
    "the adapter. Quantise it again to make it small (e.g. --gguf with --gguf-type q8_0)."
)


def dequantize_nf4_layers(model: nn.Module) -> list:
    """Replace every NF4 layer (NF4Linear) by an nn.Linear holding its dequantised weight (compute
    dtype), in place, one layer at a time. Returns the module names replaced."""
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not (isinstance(child, FrozenLinear) and child.is_nf4):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, LoRALinear):
                raise TypeError(f"{name}: dequantise the base before applying an adapter")
            weight = child.dense_weight()  # (out, in) in the compute dtype
            dense = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
            dense.weight = nn.Parameter(weight, requires_grad=False)
            if child.bias is not None:
                dense.bias = nn.Parameter(child.bias.detach().to(weight.dtype), requires_grad=False)
            dense.train(child.training)
            setattr(parent, child_name, dense)
            replaced.append(name)
    return replaced


def check_target_folder(directory) -> Path:
    """The merge target must be new or an empty folder: never overwrite a model."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ExportError(f"{directory}: already exists and is not an empty folder; choose another --merge folder")
    return directory


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    value = str(text).strip().upper()
    number = value.rstrip("KMGIB")
    unit = value[len(number):]
    try:
        size = int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise ExportError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB") from None
    if size < 1:
        raise ExportError(f"--max-shard-size {text!r}: must be positive")
    return size


def generation_config(config, stop_ids: Sequence[int]) -> dict:
    """generation_config.json: stop on every stop token (Phi-3's <|end|> too), as the hub's own
    Phi-3 folders do."""
    eos = sorted(set(stop_ids) | set(config.eos_token_ids))
    out = {"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
    if config.pad_token_id is not None:
        out["pad_token_id"] = config.pad_token_id
    return out


def merge_adapter(model: nn.Module) -> nn.Module:
    """Merge the adapter into the base weights and drop the LoRA layers, in place."""
    if not any(True for _ in lora_layers(model)):
        raise ExportError("the model has no adapter to merge")
    try:
        return merge_and_unload(model)
    except TypeError as err:
        raise ExportError(f"{err} (load the adapter session with dense=True to merge a QLoRA adapter)") from None


def save_merged(model: nn.Module, tokenizer, directory, *, stop_ids: Sequence[int] = (),
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Merge the model's adapter (if it still has one) and write the Hugging Face folder.

    The model is changed in place: afterwards it is the merged model, without LoRA layers.
    """
    directory = check_target_folder(directory)
    if any(True for _ in lora_layers(model)):
        merge_adapter(model)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        save_model(model, partial, max_shard_bytes=max_shard_bytes)
        tokenizer.save(partial)
        atomic_write_text(partial / "generation_config.json",
                          json.dumps(generation_config(model.config, stop_ids), indent=2))
        if directory.exists():
            directory.rmdir()  # empty, checked above
        os.replace(partial, directory)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return directory


def qlora_note(dtype: Optional[torch.dtype]) -> str:
    return QLORA_NOTE.format(dtype=str(dtype).replace("torch.", ""))
