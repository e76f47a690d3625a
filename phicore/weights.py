"""Checkpoint I/O: read Hugging Face safetensors folders into a model, write them back.

Loading builds the model on the meta device (no memory, no random init), checks every key
and shape against the checkpoint headers before reading any data, then reads the tensors one
at a time, casting each to the target dtype and device as it is read and assigning it in
place. Peak memory is the model plus one tensor. Only safetensors are read: pickle files
(`.bin`, `.pt`) can run arbitrary code when loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .hub import hub_id_for, resolve_model_dir
from .model import PhiForCausalLM
from .nf4 import NF4Linear, load_bnb_linear_state, quantize_model_linears, quantize_nf4, read_quant_state

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_SHARD_BYTES = 5 * 1024**3
NF4_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"
DENSE_MODULES = ("lm_head",)  # kept dense under quantisation, as bitsandbytes does


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the keys and shapes involved."""


# ----------------------------------------------------------------------------- devices
def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (no fast half-precision units there) and MPS; bf16 on CUDA where the GPU
    supports it, else fp16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def parse_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r} (use one of {sorted(names)})")
    return names[dtype]


# ----------------------------------------------------------------------------- reading
def checkpoint_files(folder: Path) -> list:
    """The safetensors files of a folder: the shards named by the index, or the single file."""
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index}: shard files missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: holds only pickle weights ({', '.join(pickles)}); phicore reads safetensors only, "
            "because unpickling can run arbitrary code. Convert them to safetensors first."
        )
    raise CheckpointError(f"{folder}: no model.safetensors or {INDEX_NAME} found")


def read_header_shapes(files: Iterable[Path]) -> dict:
    """key -> (file, shape) from the safetensors headers, without reading tensor data."""
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            for key in reader.keys():
                shapes[key] = (file, tuple(reader.get_slice(key).get_shape()))
    return shapes


def check_keys(model: nn.Module, shapes: dict, skip: Iterable[str] = ()) -> None:
    """Raise one CheckpointError listing missing keys, unexpected keys and shape mismatches."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    # a 4-bit layer's quant-state entry is JSON text stored as bytes: its length varies
    expected.update({k: shapes[k][1] for k in expected if k.endswith(NF4_STATE_SUFFIX) and k in shapes})
    skip = set(skip)
    missing = sorted(k for k in expected if k not in shapes and k not in skip)
    unexpected = sorted(k for k in shapes if k not in expected and k not in skip)
    wrong = sorted(
        f"{k} (checkpoint {list(shapes[k][1])}, model {list(expected[k])})"
        for k in shapes
        if k in expected and k not in skip and shapes[k][1] != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {', '.join(wrong)}")
    if problems:
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(problems))


def assign_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the parameter or buffer `name` (dotted path) by `tensor`, keeping its kind."""
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = tensor


def stream_weights(model: nn.Module, shapes: dict, dtype: torch.dtype, device, skip: Iterable[str] = (),
                   blocksize: int = 64, double_quant: bool = True) -> None:
    """Read each tensor once, cast it as it is read, and assign it into the model.

    A dense weight arriving for an NF4Linear is quantised on the device right away and its
    dense copy dropped, so peak memory stays near the packed model plus one dense tensor
    (measured by bench/nf4_load_memory.py).
    Pre-quantised (bitsandbytes) layers are read as a group: packed bytes plus quant state.
    """
    skip = set(skip)
    prequantized = set(prequantized_layers(shapes))
    for key in shapes:
        if key in skip or key.rpartition(".weight")[0] in prequantized or key.rpartition(".")[0] in prequantized:
            continue
        tensor = _read_tensor(shapes, key)
        target_dtype = dtype if tensor.is_floating_point() else tensor.dtype
        tensor = tensor.to(device=device, dtype=target_dtype)
        module_path, _, leaf = key.rpartition(".")
        module = model.get_submodule(module_path)
        if isinstance(module, NF4Linear) and leaf == "weight":
            module.set_quantized(*quantize_nf4(tensor, blocksize, double_quant))
        else:
            assign_tensor(model, key, tensor)
        del tensor
    for prefix in prequantized:
        group = {k: _read_tensor(shapes, k) for k in shapes if k.startswith(prefix + ".")}
        packed, state, bias = load_bnb_linear_state(prefix, group, device=device)
        model.get_submodule(prefix).set_quantized(packed, state, None if bias is None else bias.to(dtype))


def prequantized_layers(shapes: dict) -> list:
    """Module names that a checkpoint stores as bitsandbytes NF4 (`P.weight.quant_state...`)."""
    return sorted(k[: -len(".weight" + NF4_STATE_SUFFIX)] for k in shapes if k.endswith(".weight" + NF4_STATE_SUFFIX))


def prequantized_layout(shapes: dict, prefix: str) -> tuple:
    """(blocksize, double_quant) of a bitsandbytes NF4 checkpoint, read from one layer's
    serialised quant state (bitsandbytes writes every layer of a model the same way)."""
    key = prefix + ".weight" + NF4_STATE_SUFFIX
    meta = read_quant_state(_read_tensor(shapes, key), key)
    return int(meta["blocksize"]), "nested_offset" in meta


def _read_tensor(shapes: dict, key: str) -> torch.Tensor:
    """One tensor, copied out of its file. The file is opened (memory-mapped) for this tensor
    alone: a reader kept open across a whole shard keeps every page it touched mapped into the
    process, and a 5 GB shard then shows up as 5 GB of resident memory."""
    with safe_open(str(shapes[key][0]), framework="pt", device="cpu") as reader:
        return reader.get_tensor(key)


def load_model(name_or_path, *, dtype=None, device=None, quantize: Optional[str] = None,
               double_quant: bool = True, blocksize: int = 64) -> PhiForCausalLM:
    """Load a Phi-2 / Phi-3 family checkpoint (preset name, hub id or local folder).

    Returns the model in eval mode. dtype (the compute dtype) defaults to fp32 on CPU/MPS and
    bf16 (or fp16) on CUDA; device defaults to the best available. `quantize="nf4"` stores
    every linear layer but lm_head as NF4 (bitsandbytes' layout; double quantisation of the
    scales unless `double_quant=False`); a checkpoint saved pre-quantised by bitsandbytes is
    read as such whatever `quantize` says.
    """
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize={quantize!r} is not supported (None or 'nf4')")
    folder = resolve_model_dir(name_or_path)
    config = ModelConfig.from_file(folder / "config.json")
    # Where the base came from, as adapters record it: the folder, or the hub id.
    config.source_dir = str(folder) if Path(str(name_or_path)).expanduser().is_dir() else hub_id_for(str(name_or_path))
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype) or default_dtype(device)
    config.torch_dtype = str(dtype).replace("torch.", "")

    with torch.device("meta"):
        model = PhiForCausalLM(config)
    shapes = read_header_shapes(checkpoint_files(folder))
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    prequantized = prequantized_layers(shapes)
    try:
        if prequantized:  # compare with the 4-bit layout the checkpoint was written in
            blocksize, double_quant = prequantized_layout(shapes, prequantized[0])
            quantize_model_linears(model, skip=DENSE_MODULES, blocksize=blocksize, double_quant=double_quant,
                                   compute_dtype=dtype)
        check_keys(model, shapes, skip=tied)
    except CheckpointError as err:
        raise CheckpointError(f"{folder}: {err}") from None
    if quantize and not prequantized:
        quantize_model_linears(model, skip=DENSE_MODULES, blocksize=blocksize, double_quant=double_quant,
                               compute_dtype=dtype)
    stream_weights(model, shapes, dtype, device, skip=tied, blocksize=blocksize, double_quant=double_quant)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


# ----------------------------------------------------------------------------- writing
def _write_atomic(path: Path, write) -> None:
    """write(tmp) then rename over `path`: readers never see a half-written file, and a failed
    write leaves no temporary file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    _write_atomic(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_save_safetensors(tensors: dict, path: Path, metadata: Optional[dict] = None) -> None:
    _write_atomic(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"}))


def _shards(state: dict, max_shard_bytes: int) -> list:
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    if current:
        shards.append(current)
    return shards


def save_state_dict(state: dict, directory, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write tensors as model.safetensors, or as shards with an index above the size limit."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        atomic_save_safetensors(shards[0], directory / "model.safetensors")
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        atomic_save_safetensors(shard, directory / name)
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_text(directory / INDEX_NAME, json.dumps(index, indent=2))


def bnb_quantization_config(layer: NF4Linear) -> dict:
    """The `quantization_config` transformers needs to read a saved NF4 model with bitsandbytes."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": layer.double_quant,
        "bnb_4bit_compute_dtype": str(layer.compute_dtype).replace("torch.", ""),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": list(DENSE_MODULES),
    }


def save_model(model: PhiForCausalLM, directory, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write a Hugging Face folder: config.json, generation_config.json and the weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_state_dict(state, directory, max_shard_bytes)
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = str(model.dtype).replace("torch.", "")
    nf4_layer = next((m for m in model.modules() if isinstance(m, NF4Linear)), None)
    if nf4_layer is not None:
        hf_config["quantization_config"] = bnb_quantization_config(nf4_layer)
    atomic_write_text(directory / "config.json", json.dumps(hf_config, indent=2))
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if config.pad_token_id is not None:
        generation["pad_token_id"] = config.pad_token_id
    atomic_write_text(directory / "generation_config.json", json.dumps(generation, indent=2))
