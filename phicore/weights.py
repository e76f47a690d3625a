"""Checkpoint I/O: read Hugging Face safetensors folders into a model, write them back.

Loading builds the model on the meta device in the target dtype (no memory, no random init),
checks every key and shape against the checkpoint headers before reading any data, then reads
the tensors one owning module at a time, casting each to its slot's dtype and moving it to the
device as it is read, and hands them to that module's `load_state_dict(..., assign=True)`.
What a module does with them is its own business: an NF4 layer quantises a dense weight or takes
bitsandbytes' 4-bit entries as they are (phicore.frozen_linear). Peak memory is the model plus
one tensor. Only safetensors are read: pickle files (`.bin`, `.pt`) can run arbitrary code when
loaded.

Every safetensors header is parsed and checked against its file's length before any data is
read (`read_safetensors_header`), so a truncated download, a header that lies about sizes or a
shard named by the index but missing is one `CheckpointError` naming the file, found in
milliseconds. `check_model_folder` runs every check loading would (config.json, weights
headers, keys, shapes and dtypes, tokenizer files) without reading a single weight: call it
before spending time on anything else.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Iterable, NamedTuple, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .json_file import REDOWNLOAD
from .config import ModelConfig
from .frozen_linear import FrozenLinear, quantize_model_linears
from .hub import hub_id_for, resolve_model_dir
from .model import PhiForCausalLM
from .nf4 import QUANT_STATE_KEY, bnb_layout

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_SHARD_BYTES = 5 * 1024**3
NF4_STATE_SUFFIX = "." + QUANT_STATE_KEY  # P.weight.quant_state.bitsandbytes__nf4
DENSE_MODULES = ("lm_head",)  # kept dense under quantisation, as bitsandbytes does


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (missing, truncated or corrupt files, keys, shapes or
    dtypes that do not fit the model): one line naming the file or the keys involved."""


MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit
# safetensors dtype -> bytes per element; the floating ones are what dense weights may be
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = frozenset({"F8_E5M2", "F8_E4M3", "F8_E8M0", "F16", "BF16", "F32", "F64"})
_DTYPE_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
                "U32": "uint32", "I64": "int64", "U64": "uint64"}


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


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "float32": torch.float32,
           "bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16}
DTYPE_NAMES = tuple(_DTYPES)  # what --dtype / --compute-dtype accept


def parse_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (use one of {', '.join(DTYPE_NAMES)})")
    return _DTYPES[dtype]


# ----------------------------------------------------------------------------- reading
def checkpoint_files(folder: Path) -> list:
    """The safetensors files of a folder: the shards named by the index, or the single file."""
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except OSError as err:
            raise CheckpointError(f"{index}: cannot read ({err.strerror or err})") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err}); truncated or corrupt?") from None
        names = weight_map.values() if isinstance(weight_map, dict) else [None]
        if not names or not all(isinstance(n, str) and n and Path(n).name == n for n in names):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names in the folder")
        files = [folder / name for name in sorted(set(names))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard files missing: {', '.join(missing)} ({REDOWNLOAD})")
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


class HeaderEntry(NamedTuple):
    """One tensor as a safetensors header describes it."""

    file: Path
    shape: tuple
    dtype: str  # safetensors' name: F32, BF16, I32, U8, ...


def read_safetensors_header(path: Path) -> dict:
    """key -> (dtype, shape) of one safetensors file, read from its header alone and checked
    against the file's length: a truncated file, a header that is not JSON or describes tensors
    whose sizes, offsets or dtypes do not add up raises CheckpointError naming the file."""
    path = Path(path)

    def corrupt(why: str, truncated: bool = False):
        what = "truncated" if truncated else "truncated or corrupt"
        raise CheckpointError(f"{path}: {what} ({why}; {REDOWNLOAD})")

    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                corrupt(f"{size} bytes, shorter than a safetensors header", truncated=True)
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                corrupt(f"header length field says {header_len} bytes")
            if 8 + header_len > size:
                corrupt(f"{size} bytes, but its header alone needs {8 + header_len}", truncated=True)
            raw = handle.read(header_len)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        corrupt("its header is not valid JSON")
    if not isinstance(header, dict):
        corrupt("its header is not a JSON object")
    data_len = size - 8 - header_len
    entries, spans = {}, []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            corrupt(f"header entry {key!r} lacks dtype, shape or data_offsets")
        if dtype not in _DTYPE_BYTES:
            raise CheckpointError(f"{path}: tensor {key} has dtype {dtype!r}, which phicore cannot read")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            corrupt(f"tensor {key} has shape {shape!r}")
        if not all(isinstance(o, int) and not isinstance(o, bool) for o in (begin, end)) or not 0 <= begin <= end:
            corrupt(f"tensor {key} has data offsets {[begin, end]!r}")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * _DTYPE_BYTES[dtype]:
            corrupt(f"its header gives tensor {key} ({dtype} {shape}) {end - begin} bytes, not "
                    f"{numel * _DTYPE_BYTES[dtype]}")
        entries[key] = (dtype, tuple(shape))
        spans.append((begin, end, key))
    covered = 0
    for begin, end, key in sorted(spans):
        if begin != covered:
            corrupt(f"its header leaves a gap or overlap at tensor {key}")
        covered = end
    if covered > data_len:
        corrupt(f"{size} bytes, but its header describes {8 + header_len + covered}", truncated=True)
    if covered < data_len:
        corrupt(f"{size} bytes, {data_len - covered} more than its header describes")
    return entries


def read_headers(files: Iterable[Path]) -> dict:
    """key -> HeaderEntry(file, shape, dtype) from the checked safetensors headers, without
    reading tensor data."""
    headers = {}
    for file in files:
        for key, (dtype, shape) in read_safetensors_header(file).items():
            headers[key] = HeaderEntry(Path(file), shape, dtype)
    return headers


def read_header_shapes(files: Iterable[Path]) -> dict:
    """key -> (file, shape) from the safetensors headers, without reading tensor data."""
    return {key: (entry.file, entry.shape) for key, entry in read_headers(files).items()}


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


def check_dtypes(model: nn.Module, headers: dict, skip: Iterable[str] = ()) -> None:
    """Raise a CheckpointError naming the first tensor stored as integers (int32, uint8, ...)
    where the model holds floating-point values: casting them would load garbage silently. An
    NF4 layer's packed uint8 weight and quantisation state go to slots of their own dtype."""
    skip = set(skip)
    for name, slot in model.state_dict(keep_vars=True).items():
        entry = headers.get(name)
        if entry is None or name in skip or not slot.dtype.is_floating_point or entry.dtype in FLOAT_DTYPES:
            continue
        stored = _DTYPE_NAMES.get(entry.dtype, entry.dtype)
        raise CheckpointError(f"{entry.file}: tensor {name} is stored as {stored}, but the model needs "
                              "floating-point weights there (F32, F16 or BF16); not a checkpoint phicore can load")


def _owner(key: str, modules: set) -> str:
    """The deepest module path that is a prefix of `key` (`m.layers.0.mlp.fc1.weight.absmax` ->
    `m.layers.0.mlp.fc1`); "" for the root."""
    path = key
    while path:
        path = path.rpartition(".")[0]
        if path in modules:
            return path
    return ""


def stream_weights(model: nn.Module, shapes: dict, device, skip: Iterable[str] = ()) -> None:
    """Read the checkpoint one owning module at a time and hand each group of tensors to its module.

    Each floating tensor is cast, as it is read, to the dtype of the model's slot for it when that
    slot is floating too (so build the model in the target dtype; an NF4 layer's quant-state
    slots keep their own dtypes, and a dense weight arriving for a packed uint8 slot goes through
    as it is, for the layer to quantise), then moved to `device`; the group is loaded with
    `owner.load_state_dict(group, strict=False, assign=True)`. Keys are checked beforehand by
    `check_keys`. Only one module's tensors are in flight at a time.
    """
    skip = set(skip)
    slot_dtypes = {key: t.dtype for key, t in model.state_dict(keep_vars=True).items()}
    modules = {path for path, _ in model.named_modules()}
    groups = {}
    for key in shapes:
        if key not in skip:
            groups.setdefault(_owner(key, modules), []).append(key)
    for owner, keys in groups.items():
        cut = len(owner) + 1 if owner else 0
        group = {}
        for key in keys:
            tensor = _read_tensor(shapes, key)
            slot = slot_dtypes.get(key)
            if slot is not None and slot.is_floating_point and tensor.is_floating_point():
                tensor = tensor.to(slot)
            group[key[cut:]] = tensor.to(device)
            del tensor
        model.get_submodule(owner).load_state_dict(group, strict=False, assign=True)
        del group


def prequantized_layout(shapes: dict) -> Optional[tuple]:
    """(blocksize, double_quant) when bitsandbytes saved the checkpoint in 4 bits (it has
    `P.weight.quant_state.bitsandbytes__nf4` entries, every layer written alike), else None."""
    key = next((k for k in shapes if k.endswith(".weight" + NF4_STATE_SUFFIX)), None)
    return None if key is None else bnb_layout(_read_tensor(shapes, key), key)


def _read_tensor(shapes: dict, key: str) -> torch.Tensor:
    """One tensor, copied out of its file. The file is opened (memory-mapped) for this tensor
    alone: a reader kept open across a whole shard keeps every page it touched mapped into the
    process, and a 5 GB shard then shows up as 5 GB of resident memory."""
    file = shapes[key][0]
    try:
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            return reader.get_tensor(key)
    except SafetensorError as err:  # the header was checked: the file changed, or the library disagrees
        raise CheckpointError(f"{file}: cannot read tensor {key} ({err}; {REDOWNLOAD})") from None
    except OSError as err:
        raise CheckpointError(f"{file}: cannot read tensor {key} ({err.strerror or err})") from None


def load_model(name_or_path, *, dtype=None, device=None, quantize: Optional[str] = None,
               double_quant: bool = True, blocksize: int = 64, compute_dtype=None) -> PhiForCausalLM:
    """Load a Phi-2 / Phi-3 family checkpoint (preset name, hub id or local folder).

    Returns the model in eval mode. dtype (of the weights, and what dense layers compute in)
    defaults to fp32 on CPU/MPS and bf16 (or fp16) on CUDA; device defaults to the best
    available. `quantize="nf4"` stores every linear layer but lm_head as NF4 (bitsandbytes'
    layout; double quantisation of the scales unless `double_quant=False`), computing in
    `compute_dtype` (default: dtype); a checkpoint saved pre-quantised by bitsandbytes is read
    as such whatever `quantize` says.
    """
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize={quantize!r} is not supported (None or 'nf4')")
    folder = resolve_model_dir(name_or_path)
    config = ModelConfig.from_file(folder / "config.json")
    # Where the base came from, as adapters record it: the folder, or the hub id.
    config.source_dir = str(folder) if Path(str(name_or_path)).expanduser().is_dir() else hub_id_for(str(name_or_path))
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype) or default_dtype(device)
    compute_dtype = parse_dtype(compute_dtype) or dtype
    config.torch_dtype = str(dtype).replace("torch.", "")

    model, shapes, layout = _checked_meta_model(folder, config, dtype, compute_dtype)
    if quantize and not layout:  # the NF4 layers quantise the dense weights as they arrive
        quantize_model_linears(model, skip=DENSE_MODULES, blocksize=blocksize, double_quant=double_quant,
                               compute_dtype=compute_dtype)
    stream_weights(model, shapes, device, skip=_tied(config))
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _tied(config: ModelConfig) -> set:
    return {"lm_head.weight"} if config.tie_word_embeddings else set()


def _checked_meta_model(folder: Path, config: ModelConfig, dtype, compute_dtype) -> tuple:
    """(model on the meta device, key -> (file, shape), prequantized layout or None), with every
    header, key, shape and dtype of the checkpoint checked against the model; nothing read but
    the headers (and one small quant-state entry of a bitsandbytes 4-bit checkpoint)."""
    with torch.device("meta"):
        model = PhiForCausalLM(config).to(dtype)  # the slots' dtypes are what the tensors are cast to
    headers = read_headers(checkpoint_files(folder))
    shapes = {key: (entry.file, entry.shape) for key, entry in headers.items()}
    tied = _tied(config)
    layout = prequantized_layout(shapes)
    try:
        if layout:  # compare with the 4-bit layout the checkpoint was written in
            quantize_model_linears(model, skip=DENSE_MODULES, blocksize=layout[0], double_quant=layout[1],
                                   compute_dtype=compute_dtype)
        check_keys(model, shapes, skip=tied)
    except CheckpointError as err:
        raise CheckpointError(f"{folder}: {err}") from None
    check_dtypes(model, headers, skip=tied)
    return model, shapes, layout


def check_model_folder(name_or_path) -> Path:
    """Resolve a model (preset, hub id or folder) to its local folder and check that it loads,
    without reading any weights: config.json (`ModelConfig`), the safetensors files' presence,
    headers and lengths (a truncated download is found here), their keys, shapes and dtypes
    against the model config.json describes, and the tokenizer files (including a vocabulary
    that fits the model's embedding). Returns the folder.

    Raises FileNotFoundError (no such folder or file) or a ValueError subclass (ConfigError,
    CheckpointError, TokenizerError) with one line naming the file and what is wrong. Takes
    milliseconds plus the tokenizer's parse: call it before tokenising data or loading weights.
    """
    from .tokenizer import load_tokenizer  # imported on use: weights does not need the tokenizer otherwise

    folder = resolve_model_dir(name_or_path)
    config = ModelConfig.from_file(folder / "config.json")
    _checked_meta_model(folder, config, torch.float32, torch.float32)
    load_tokenizer(folder)
    return folder


# ----------------------------------------------------------------------------- writing
def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() gives a new file; safetensors' writer makes 0600 files


def _write_atomic(path: Path, write) -> None:
    """write(tmp) then rename over `path`: readers never see a half-written file, and a failed
    write leaves no temporary file behind. The file gets the user's umask, whatever the writer."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    _write_atomic(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_save_safetensors(tensors: dict, path: Path, metadata: Optional[dict] = None) -> None:
    """save_file, atomically; a failed write (disk full, read-only folder) is an OSError naming
    `path`, as for any other file (safetensors reports it as a SafetensorError)."""
    def write(tmp):
        try:
            save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"})
        except SafetensorError as err:
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            number = int(code.group(1))
            raise OSError(number, os.strerror(number), str(path)) from None

    _write_atomic(Path(path), write)


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


def bnb_quantization_config(layer: FrozenLinear) -> dict:
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
    nf4_layer = next((m for m in model.modules() if isinstance(m, FrozenLinear) and m.is_nf4), None)
    if nf4_layer is not None:
        hf_config["quantization_config"] = bnb_quantization_config(nf4_layer)
    atomic_write_text(directory / "config.json", json.dumps(hf_config, indent=2))
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if config.pad_token_id is not None:
        generation["pad_token_id"] = config.pad_token_id
    atomic_write_text(directory / "generation_config.json", json.dumps(generation, indent=2))
