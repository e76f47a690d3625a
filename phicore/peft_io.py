"""PEFT's adapter files: write a model's LoRA adapter as peft 0.21 does, and read one onto a model.

On disk (peft 0.21, adapter name stripped):
    adapter_model.safetensors  metadata {"format": "pt"},
        base_model.model.<module path>.lora_A.weight / .lora_B.weight / .lora_magnitude_vector
    adapter_config.json        LoraConfig's fields, peft_type "LORA", task_type "CAUSAL_LM"

The config is not kept beside the model: `lora_config(model)` reads it off the LoRALinear layers
(each knows its r, alpha, dropout and flags) when the adapter is saved. tests/test_lora.py checks
the files against the installed peft both ways.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from .lora import (
    ALL_LINEAR,
    adapter_state_dict,
    apply_lora,
    lora_layers,
    name_matches,
    pattern_value,
    resolve_targets,
    set_adapter_trainable,
)
from .weights import FLOAT_DTYPES, CheckpointError, atomic_save_safetensors, atomic_write_text, read_safetensors_header

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's PeftModel -> LoraModel -> base model nesting
# The PEFT release whose adapter files these follow (its LoraConfig fields are written below).
PEFT_FORMAT_VERSION = "0.21.2"
ADAPTER_NAME = "default"  # PEFT's adapter name, stripped in files, present in in-memory keys

# LoraConfig's fields that phicore always writes the same way (peft 0.21's defaults, for a
# saved adapter); the others come from the layers (`lora_config`) and the base's name.
_FIXED_FIELDS = {
    "alora_invocation_tokens": None, "arrow_config": None, "auto_mapping": None, "bias": "none",
    "corda_config": None, "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None,
    "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "kasa_config": None,
    "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
    "lora_bias": False, "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
    "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_FORMAT_VERSION,
    "qalora_group_size": 16, "revision": None, "target_parameters": None, "task_type": "CAUSAL_LM",
    "trainable_token_indices": None, "use_bdlora": None, "use_qalora": False, "velora_config": None,
}


# ----------------------------------------------------------------------------- the config, from the layers
def lora_config(model: nn.Module) -> dict:
    """The adapter's LoraConfig settings read off its LoRA layers: r, lora_alpha, lora_dropout,
    use_rslora, use_dora, target_modules, rank_pattern, alpha_pattern.

    r and lora_alpha are the most common values; layers that differ go to rank_pattern /
    alpha_pattern. target_modules are the short module names when they select exactly the
    adapted layers (as PEFT matches them), else the full module paths.
    """
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA adapter (use apply_lora or load_adapter first)")
    shared = {}
    for attr in ("dropout_p", "use_rslora", "use_dora"):
        values = {getattr(layer, attr) for _, layer in layers}
        if len(values) > 1:
            raise ValueError(f"the LoRA layers differ in {attr} ({sorted(values)}); a PEFT adapter has one for all")
        shared[attr] = values.pop()
    r = Counter(layer.r for _, layer in layers).most_common(1)[0][0]
    alpha = Counter(layer.lora_alpha for _, layer in layers).most_common(1)[0][0]
    return {
        "r": r, "lora_alpha": alpha, "lora_dropout": shared["dropout_p"], "use_rslora": shared["use_rslora"],
        "use_dora": shared["use_dora"], "target_modules": _target_modules(model, [path for path, _ in layers]),
        "rank_pattern": _pattern(layers, "r", r), "alpha_pattern": _pattern(layers, "lora_alpha", alpha),
    }


def _target_modules(model: nn.Module, paths: list) -> list:
    """Short names (`q_proj`) when they match exactly these layers among all the model's
    modules, else the full paths (what PEFT itself saves for all-linear)."""
    short = sorted({path.rpartition(".")[2] for path in paths})
    matched = {path for path, _ in model.named_modules() if path and any(name_matches(path, s) for s in short)}
    return short if matched == set(paths) else sorted(paths)


def _pattern(layers: list, attr: str, default) -> dict:
    """{key: value} for the layers whose `attr` differs from `default`, keyed as PEFT matches
    them (`pattern_value`): the short name when every layer of that name shares the value, else
    each layer's full path (escaped)."""
    by_name = {}
    for path, layer in layers:
        by_name.setdefault(path.rpartition(".")[2], []).append((path, getattr(layer, attr)))
    pattern = {}
    for name, items in sorted(by_name.items()):
        values = {value for _, value in items}
        if values == {default}:
            continue
        if len(values) == 1:
            pattern[re.escape(name)] = values.pop()
        else:
            pattern.update({re.escape(path): value for path, value in items if value != default})
    return pattern


def _peft_config(settings: dict, base_model_name_or_path: Optional[str]) -> dict:
    """adapter_config.json as peft 0.21's LoraConfig.save_pretrained writes it (every field)."""
    return {**_FIXED_FIELDS, **settings, "base_model_name_or_path": base_model_name_or_path}


def _default_base_name(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    for attr in ("source_dir", "name_or_path"):
        value = getattr(config, attr, None)
        if value:
            return str(value)
    return None


# ----------------------------------------------------------------------------- writing
def save_adapter(model: nn.Module, directory, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write the adapter as PEFT does: adapter_model.safetensors + adapter_config.json.

    base_model_name_or_path defaults to where the base model came from (`model.config.source_dir`,
    or a transformers config's name_or_path). Each file is written to a temporary name and
    renamed into place. Returns the directory.
    """
    try:
        settings = lora_config(model)
    except ValueError as err:
        raise ValueError(f"save_adapter: {err}") from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = base_model_name_or_path or _default_base_name(model)
    tensors = {PEFT_PREFIX + key: t.detach().to("cpu").contiguous() for key, t in adapter_state_dict(model).items()}
    config = json.dumps(_peft_config(settings, base), indent=2, sort_keys=True)
    atomic_save_safetensors(tensors, directory / WEIGHTS_NAME)
    atomic_write_text(directory / CONFIG_NAME, config)
    return directory


# ----------------------------------------------------------------------------- reading
# adapter_config.json fields whose non-default values change what the adapter computes or
# which tensors it holds, and that phicore does not implement
_UNSUPPORTED_FIELDS = (
    "alora_invocation_tokens", "arrow_config", "exclude_modules", "kasa_config", "layer_replication",
    "layers_pattern", "layers_to_transform", "lora_bias", "modules_to_save", "monteclora_config",
    "target_parameters", "trainable_token_indices", "use_bdlora", "use_qalora", "velora_config",
)
# init_lora_weights values after which the saved A/B apply to the unmodified base weight
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def read_adapter_config(directory: Path) -> dict:
    """adapter_config.json of a PEFT adapter folder, checked (peft_type LORA, the fields phicore reads)."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (not a PEFT adapter folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror or err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); truncated or corrupt?") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}; only 'LORA' adapters are supported")
    for field in ("r", "lora_alpha", "target_modules"):
        if config.get(field) in (None, "", []):
            raise ValueError(f"{path}: missing {field}")
    for field in _UNSUPPORTED_FIELDS:
        if config.get(field) not in (None, False, [], {}, ""):
            raise ValueError(f"{path}: {field}={config[field]!r} is not supported by phicore")
    if config.get("bias", "none") != "none" or config.get("fan_in_fan_out", False):
        raise ValueError(f"{path}: bias={config.get('bias')!r}, fan_in_fan_out={config.get('fan_in_fan_out')!r}; "
                         "phicore supports bias 'none' and fan_in_fan_out false")
    if config.get("init_lora_weights", True) not in _PLAIN_INITS:
        raise ValueError(f"{path}: init_lora_weights={config['init_lora_weights']!r} also changes the base weights; "
                         "convert the adapter to plain LoRA first (PEFT: path_initial_model_for_weight_conversion)")
    _check_config_values(path, config)
    return config


def _check_config_values(path: Path, config: dict) -> None:
    """The types and ranges of the fields load_adapter uses; target_modules and the pattern keys
    are regexes PEFT matches module paths with, so they must compile."""
    def refuse(field: str, why: str):
        raise ValueError(f"{path}: {field} {why}, got {config.get(field)!r:.80}")

    def positive_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    def finite(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def regex(field: str, pattern: str) -> None:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{path}: {field} {pattern!r} is not a valid regular expression ({err})") from None

    if not positive_int(config["r"]):
        refuse("r", "must be a positive integer")
    if not finite(config["lora_alpha"]):
        refuse("lora_alpha", "must be a finite number")
    dropout = config.get("lora_dropout") or 0.0
    if not finite(dropout) or not 0 <= dropout < 1:
        refuse("lora_dropout", "must be a number in [0, 1)")
    for field in ("use_rslora", "use_dora"):
        if not isinstance(config.get(field, False), bool):
            refuse(field, "must be true or false")
    targets = config["target_modules"]
    if isinstance(targets, str):
        if targets.strip().lower() != ALL_LINEAR:
            regex("target_modules", targets)
    elif not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        refuse("target_modules", "must be a regular expression or a list of module names")
    for field, valid, kind in (("rank_pattern", positive_int, "positive integers"),
                               ("alpha_pattern", finite, "finite numbers")):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict) or not all(valid(v) for v in pattern.values()):
            refuse(field, f"must map module-name patterns to {kind}")
        for key in pattern:
            regex(f"{field} key", key)


def _peft_key(key: str) -> str:
    """A saved key in phicore's form: no `base_model.model.` prefix, no adapter name, DoRA's
    magnitude as `...lora_magnitude_vector` (PEFT writes it so; in memory it is `.default.weight`)."""
    for prefix in (PEFT_PREFIX, "base_model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    key = key.replace(f".lora_A.{ADAPTER_NAME}.", ".lora_A.").replace(f".lora_B.{ADAPTER_NAME}.", ".lora_B.")
    for suffix in (f".{ADAPTER_NAME}.weight", f".{ADAPTER_NAME}", ".weight"):
        if key.endswith(".lora_magnitude_vector" + suffix):
            key = key[: -len(suffix)]
            break
    return key


def read_adapter_tensors(directory) -> dict:
    """adapter_model.safetensors of an adapter folder, keys in phicore's form, checked: a
    truncated or corrupt file, integer tensors or non-finite values (an adapter whose training
    diverged) raise ValueError naming the file; a missing file FileNotFoundError."""
    return _read_tensors(Path(directory) / WEIGHTS_NAME)


def _read_tensors(path: Path) -> dict:
    if not path.is_file():
        pickles = sorted(p.name for p in path.parent.glob("adapter_model.*") if p.suffix != ".safetensors")
        hint = f" (found {', '.join(pickles)}: phicore reads safetensors only)" if pickles else ""
        raise FileNotFoundError(f"{path}: not found{hint}")
    try:
        header = read_safetensors_header(path)  # a truncated or corrupt file, found before reading any data
    except CheckpointError as err:
        detail = str(err).removeprefix(f"{path}: ")
        raise ValueError(f"{path}: not a valid safetensors file: {detail}") from None
    odd = next((key for key, (dtype, _) in header.items() if dtype not in FLOAT_DTYPES), None)
    if odd is not None:
        raise ValueError(f"{path}: tensor {odd} is stored as {header[odd][0]}; adapter weights are floating-point")
    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            for key in reader.keys():
                tensors[_peft_key(key)] = reader.get_tensor(key)
    except SafetensorError as err:
        raise ValueError(f"{path}: not a valid safetensors file ({err})") from None
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{path}: {PEFT_PREFIX}{key} holds {bad} non-finite value(s) (NaN or inf): the adapter "
                             "is broken (did its training diverge?); refusing to load it")
    return tensors


def load_adapter(model: nn.Module, directory, *, trainable: bool = False, dtype: Optional[torch.dtype] = None,
                 config: Optional[dict] = None, tensors: Optional[dict] = None) -> nn.Module:
    """Apply a PEFT LoRA adapter folder to the model, in place, and return the model.

    Reads adapter_config.json (r, lora_alpha, lora_dropout, use_rslora, use_dora, target_modules,
    rank_pattern, alpha_pattern; `config`: that file as `read_adapter_config` returned it
    already), checks every tensor of adapter_model.safetensors (`tensors`: as
    `read_adapter_tensors` returned them already) against the layers it targets before
    changing the model, then adds and fills the adapters. Keys are accepted with or
    without the `default` adapter name. Adapter params are in `dtype` (default fp32) and train
    only when `trainable`.
    """
    directory = Path(directory)
    if any(True for _ in lora_layers(model)):
        raise ValueError("load_adapter: the model already has LoRA layers; load the adapter into a fresh model")
    config = read_adapter_config(directory) if config is None else config
    weights_path = directory / WEIGHTS_NAME
    tensors = _read_tensors(weights_path) if tensors is None else tensors

    targets = config["target_modules"]
    if isinstance(targets, str) and targets.strip().lower() != ALL_LINEAR:
        try:
            targets = re.compile(targets)  # PEFT: a string target_modules is a regex on the whole path
        except re.error as err:  # `config` given by the caller, not read (and checked) here
            raise ValueError(f"{directory / CONFIG_NAME}: target_modules {targets!r} is not a valid regular "
                             f"expression ({err})") from None
    try:
        selected = resolve_targets(model, targets)
    except ValueError as err:
        raise ValueError(f"{directory / CONFIG_NAME}: {err}") from None

    r, alpha = config["r"], config["lora_alpha"]
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    use_dora = bool(config.get("use_dora", False))
    expected = {}
    for path, module in selected:
        rank = pattern_value(rank_pattern, path, r)
        expected[f"{path}.lora_A.weight"] = (rank, module.in_features)
        expected[f"{path}.lora_B.weight"] = (module.out_features, rank)
        if use_dora:
            expected[f"{path}.lora_magnitude_vector"] = (module.out_features,)
    _check_tensors(weights_path, tensors, expected)

    apply_lora(model, r=r, alpha=alpha, dropout=config.get("lora_dropout", 0.0) or 0.0, targets=targets,
               use_rslora=bool(config.get("use_rslora", False)), use_dora=use_dora, dtype=dtype,
               rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    state = adapter_state_dict(model)
    with torch.no_grad():
        for key, tensor in tensors.items():
            state[key].copy_(tensor)
    set_adapter_trainable(model, trainable)
    return model


def _check_tensors(path: Path, tensors: dict, expected: dict) -> None:
    """One error naming missing / unexpected keys or the first shape mismatch (file vs model)."""
    def peft(key):
        return PEFT_PREFIX + key

    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{path}: missing {len(missing)} adapter tensor(s) for the targeted layers, "
                         f"e.g. {', '.join(peft(k) for k in missing[:3])}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} tensor(s) for modules the adapter config does not target "
                         f"or this model lacks, e.g. {', '.join(peft(k) for k in unexpected[:3])}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{path}: {peft(key)} has shape {list(tensors[key].shape)} in the file "
                             f"but the model needs {list(shape)}")
