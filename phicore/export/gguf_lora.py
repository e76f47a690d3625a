"""A LoRA adapter alone as a GGUF file for llama.cpp (`infer.py --gguf-lora FILE`): one base GGUF
serves many adapters (`llama-cli -m base.gguf --lora adapter.gguf`, llama-cpp-python's
`Llama(model_path=base, lora_path=adapter)`).

The layout is what llama.cpp's convert_lora_to_gguf.py writes and src/llama-adapter.cpp reads:

- Metadata: `general.architecture` (phi2 / phi3: llama.cpp refuses an adapter whose architecture
  differs from the base GGUF's), `general.type = "adapter"`, `general.name`, `general.file_type`
  (ALL_F32), `adapter.type = "lora"`, `adapter.lora.alpha` (float32).
- Tensors, per adapted layer: `<base tensor>.lora_a` = A (r, in), GGUF shape [in, r], and
  `<base tensor>.lora_b` = B (out, r), GGUF shape [r, out], both f32 (the converter's default
  output type). `<base tensor>` is the name in the base GGUF (`gguf_tensor_name`:
  `blk.0.attn_qkv.weight`): Phi-3's fused qkv_proj and gate_up_proj stay fused, as in the base.
- Scale: llama.cpp adds `alpha / r * B(A x)` (times the user's --lora-scaled factor), with one
  alpha for the whole file and r read off each B. phicore's scale is per layer:
  s = alpha_l / r_l, or alpha_l / sqrt(r_l) with rsLoRA (alpha_l, r_l from alpha_pattern /
  rank_pattern). llama.cpp reproduces it when alpha = s * r for every layer: the "effective
  alpha" alpha_l for plain LoRA (any ranks), alpha_l * sqrt(r_l) for rsLoRA. When all layers
  share one effective alpha (one alpha; rsLoRA with one rank), that is written and A, B are the
  trained ones. When they differ (an alpha_pattern; rsLoRA with a rank_pattern), the most common
  one is written and every other layer's B is multiplied by its effective alpha / the written
  one, so alpha / r * B' @ A = s * B @ A exactly (a note says which layers). llama.cpp reads
  alpha 0 as "unscaled", so a zero effective alpha is never written (its layers get B' = 0).
- Refused, one line each: DoRA (its magnitude vector rescales every row of W + s*B@A by
  m / ||W + s*B@A||, which depends on the base weight: not an addition llama.cpp can apply; use
  --gguf, which merges it), and layers llama.cpp's phi2/phi3 graphs have no tensor for.

A QLoRA adapter was trained on the NF4-rounded base; llama.cpp applies it to the base GGUF it is
given, which has to be a dense GGUF of the original base (f16/bf16/q8_0...; GGUF has no NF4).
Its outputs are then the original base's plus the adapter: close to the QLoRA model you trained,
not equal (`QLORA_ADAPTER_NOTE`); --gguf gives exactly the trained model (merged into the
dequantised NF4 base).

The file is written to FILE.tmp and renamed when complete.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch.nn as nn

from ..lora import lora_layers
from . import ExportError
from .gguf import ARCHS, gguf_tensor_name, import_gguf

QLORA_ADAPTER_NOTE = (
    "note: this adapter was trained with QLoRA on a 4-bit NF4 base. llama.cpp applies it to the base GGUF "
    "you give it, which must be a dense GGUF of the original base (GGUF has no NF4): the outputs are the "
    "original base's plus the adapter, close to but not exactly those of the QLoRA model you trained "
    "(--gguf merges it into the NF4-rounded base and gives exactly those)."
)


@dataclass
class LoraTensors:
    """One adapted layer as llama.cpp stores it: `name` is the base tensor's GGUF name."""

    name: str  # blk.0.attn_qkv.weight
    path: str  # model.layers.0.self_attn.qkv_proj
    a: np.ndarray  # (r, in) float32, as trained
    b: np.ndarray  # (out, r) float32, as written: trained B times `factor`
    scale: float  # phicore's s = alpha / r (alpha / sqrt(r) with rsLoRA)
    factor: float  # 1, or effective alpha / written alpha (folded into b)

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoraPlan:
    alpha: float  # adapter.lora.alpha
    tensors: list  # [LoraTensors]
    rescaled: list  # paths of the layers whose B carries a factor


def effective_alpha(layer) -> float:
    """The alpha llama.cpp needs for this layer: s * r (its scale is alpha / r)."""
    return float(layer.scaling) * layer.r


def plan_gguf_lora(model: nn.Module) -> LoraPlan:
    """The adapter's tensors and the one alpha to write, or an ExportError naming what cannot be
    expressed in llama.cpp's adapter format."""
    layers = list(lora_layers(model))
    if not layers:
        raise ExportError("--gguf-lora: the model has no LoRA adapter")
    for path, layer in layers:
        if layer.use_dora:
            raise ExportError(f"--gguf-lora: {path} is a DoRA layer; llama.cpp adapters are plain LoRA (DoRA rescales "
                              "every row of the merged weight, which is not a low-rank addition): use --gguf to "
                              "export it merged")
        if layer.merged:
            raise ExportError(f"--gguf-lora: {path} is merged into its base weight; export the adapter before merging")
    wanted = {path: np.float32(effective_alpha(layer)) for path, layer in layers}
    counts = Counter(a for a in wanted.values() if a != 0)
    alpha = counts.most_common(1)[0][0] if counts else np.float32(1.0)  # never 0: llama.cpp reads it as "unscaled"
    tensors, rescaled = [], []
    for path, layer in layers:
        factor = 1.0 if wanted[path] == alpha else float(wanted[path]) / float(alpha)
        if factor != 1.0:
            rescaled.append(path)
        a = layer.lora_A.weight.detach().float().cpu().numpy()
        b = layer.lora_B.weight.detach().float().cpu().numpy()
        if factor != 1.0:
            b = (b.astype(np.float64) * factor).astype(np.float32)
        tensors.append(LoraTensors(gguf_tensor_name(f"{path}.weight"), path, np.ascontiguousarray(a),
                                   np.ascontiguousarray(b), float(layer.scaling), factor))
    return LoraPlan(float(alpha), tensors, rescaled)


def write_gguf_lora(model: nn.Module, path, *, name: Optional[str] = None,
                    warn: Callable[[str], None] = print) -> LoraPlan:
    """Write the model's LoRA adapter (unmerged) as a llama.cpp adapter GGUF; returns what was written."""
    gguf = import_gguf()
    config = model.config
    if config.model_type not in ARCHS:
        raise ExportError(f"model_type {config.model_type!r} has no GGUF architecture")
    plan = plan_gguf_lora(model)
    if plan.rescaled:
        warn(f"note: --gguf-lora: llama.cpp has one alpha per adapter file (scale alpha / r); {len(plan.rescaled)} of "
             f"{len(plan.tensors)} layers have another scale (alpha_pattern, or rsLoRA with a rank_pattern), so "
             f"their B is pre-multiplied to keep it (e.g. {plan.rescaled[0]})")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), ARCHS[config.model_type].name)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name or path.stem)
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, plan.alpha)
        for item in plan.tensors:
            writer.add_tensor(f"{item.name}.lora_a", item.a)
            writer.add_tensor(f"{item.name}.lora_b", item.b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        try:
            writer.close()
        except OSError:
            pass
        tmp.unlink(missing_ok=True)
        raise
    return plan


@contextlib.contextmanager
def base_only(model: nn.Module):
    """Within the block the model's LoRA layers are replaced by their base layers (the same weight
    tensors, without the adapter), so the base can be exported; put back afterwards."""
    swaps = []
    try:
        for path, layer in list(lora_layers(model)):
            if layer.merged:
                raise ExportError(f"{path}: the adapter is merged into the base weight; the base alone is gone")
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, layer.base_layer())
            swaps.append((parent, child, layer))
        yield model
    finally:
        for parent, child, layer in reversed(swaps):
            setattr(parent, child, layer)
