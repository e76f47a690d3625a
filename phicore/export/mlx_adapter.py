"""The adapter in mlx-lm's format, for Apple Silicon (`infer.py --mlx-adapter DIR`).

    DIR/adapters.safetensors  float32; for each adapted layer, by its module path
                              (model.layers.N.self_attn.qkv_proj, ...):
                                .lora_a  (in, r)    PEFT's lora_A.weight (r, in), transposed
                                .lora_b  (r, out)   PEFT's lora_B.weight (out, r), transposed
                                .m       (out,)     DoRA only: lora_magnitude_vector
    DIR/adapter_config.json   {"fine_tune_type": "lora" | "dora", "num_layers": n,
                               "lora_parameters": {"rank", "scale", "dropout", "keys"}, "model": base}

which is what `mlx_lm.lora` writes and `mlx_lm.utils.load(BASE, adapter_path=DIR)` (and so
`mlx_lm.generate --model BASE --adapter-path DIR`) reads: it wraps the listed `keys` (module
paths inside a decoder layer) of the last `num_layers` layers, then loads the tensors. mlx-lm's
Phi-2 (`phi`) and Phi-3 (`phi3`) models use Hugging Face's module names, as phicore does, so
the paths carry over unchanged.

Scale: mlx-lm computes y = W x + scale * (x @ lora_a) @ lora_b, with one `scale` for all
layers: phicore's per-layer `scaling` (alpha / r, or alpha / sqrt(r) with rsLoRA) when it is
the same everywhere. Adapters whose layers differ (PEFT's rank_pattern / alpha_pattern) are
expressed exactly too: each layer's scaling is folded into its lora_b (scale 1.0), and lower
ranks are padded with zero columns of lora_a and zero rows of lora_b up to the largest rank.
Layers mlx-lm wraps but the adapter does not change keep mlx-lm's initial lora_b = 0 (and, for
DoRA, m = ||W||): they add nothing. DoRA maps to mlx-lm's DoRALinear, which computes PEFT's
m / ||W + s B A|| * (W + s B A). An adapter on a module outside the decoder layers (none that
phicore trains) is refused with one line.

A QLoRA adapter was trained on the NF4-rounded base; mlx-lm applies it to the base given to
`--model` (the full-precision one, or an MLX-quantised one), not to that NF4 base.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..lora import lora_layers
from . import ExportError
from .folders import building, check_new_folder

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
_IN_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")

QLORA_NOTE = ("note: this adapter was trained with QLoRA on a 4-bit NF4 base; mlx-lm applies it to the base you give "
              "--model (full precision or MLX-quantised), whose outputs differ slightly from the NF4 base's")


def mlx_adapter(model: torch.nn.Module, base_model: str) -> tuple:
    """(tensors, adapter_config) of the model's LoRA/DoRA layers in mlx-lm's format."""
    layers = list(lora_layers(model))
    if not layers:
        raise ExportError("--mlx-adapter: the model has no adapter to export")
    blocks, keys = [], set()
    for name, layer in layers:
        match = _IN_BLOCK.fullmatch(name)
        if match is None:
            raise ExportError(f"--mlx-adapter: {name} is not inside a decoder layer (model.layers.N...); mlx-lm "
                              "adapts decoder layers only")
        if layer.merged:
            raise ExportError(f"--mlx-adapter: {name} is merged into its base; export the adapter before merging")
        blocks.append(int(match.group(1)))
        keys.add(match.group(2))
    kinds = {bool(layer.use_dora) for _, layer in layers}
    if len(kinds) > 1:
        raise ExportError("--mlx-adapter: some layers are DoRA and some plain LoRA; mlx-lm's adapter_config.json "
                          "has one fine_tune_type for all of them")
    dora = kinds.pop()
    rank = max(layer.r for _, layer in layers)
    scalings = sorted({float(layer.scaling) for _, layer in layers})
    fold = len(scalings) > 1  # then each layer's own scaling goes into its lora_b, and mlx-lm's scale is 1
    scale = 1.0 if fold else scalings[0]

    tensors = {}
    for name, layer in layers:
        lora_a = layer.lora_A.weight.detach().float().t()  # (in, r)
        lora_b = layer.lora_B.weight.detach().float().t()  # (r, out)
        if fold:
            lora_b = lora_b * float(layer.scaling)
        if layer.r < rank:  # zero-padding adds nothing: (x A) B over the extra rank is 0
            lora_a = torch.nn.functional.pad(lora_a, (0, rank - layer.r))
            lora_b = torch.nn.functional.pad(lora_b, (0, 0, 0, rank - layer.r))
        tensors[f"{name}.lora_a"] = lora_a.contiguous()
        tensors[f"{name}.lora_b"] = lora_b.contiguous()
        if dora:
            tensors[f"{name}.m"] = layer.lora_magnitude_vector.detach().float().contiguous()
    num_blocks = int(model.config.num_hidden_layers)
    config = {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": num_blocks - min(blocks),
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": max(layer.dropout_p for _, layer in layers),
                            "keys": sorted(keys)},
        "model": base_model,
    }
    return tensors, config


def write_mlx_adapter(model: torch.nn.Module, directory, *, base_model: str) -> Path:
    """Write DIR/adapters.safetensors and DIR/adapter_config.json (DIR new or empty)."""
    from safetensors.torch import save_file

    directory = check_new_folder(directory, "--mlx-adapter")
    tensors, config = mlx_adapter(model, base_model)
    with building(directory) as partial:
        save_file(tensors, str(partial / ADAPTER_FILE))
        (partial / CONFIG_FILE).write_text(json.dumps(config, indent=4, sort_keys=True) + "\n", encoding="utf-8")
    return directory
