"""Which GGML type each tensor of a GGUF export gets: llama.cpp's `llama-quantize` mixture rules.

Followed from llama.cpp src/llama-quant.cpp (commit 0c1e570, the one llama-cpp-python 0.3.36
vendors), for the tensors of phicore's phi2 / phi3 files (gguf.py `TENSOR_NAMES`):

- `llama_ftype_get_default_type`: the type of the 2-D weights before the rules (q4_k_m: Q4_K,
  q5_k_m: Q5_K, q6_k: Q6_K, q4_0: Q4_0, q8_0: Q8_0); `general.file_type` is the ftype itself
  (llama.h `llama_ftype`: 15, 17, 18, 2, 7; f16 1, bf16 32).
- `tensor_allows_quantization`: only tensors of 2+ dimensions whose names end in "weight" and are
  not `*_norm.weight`; the others keep their type (f32, as phicore writes them).
- `llama_tensor_get_type_impl`, the branches reached by these ftypes and tensors:
  * `output.weight` and, with tied embeddings (no output.weight), `token_embd.weight`: Q8_0 when
    the row length is not a multiple of the default type's block, else Q6_K unless the default
    is Q8_0;
  * attn_v and the fused attn_qkv (`category_is_attn_v`): Q6_K under q4_k_m / q5_k_m when
    `use_more_bits(i, n)`, i counting these tensors in layer order (= the layer index), n their
    number (= the layer count). The later ATTENTION_QKV branch (q4_k_m -> Q5_K) is never reached
    because category_is_attn_v catches attn_qkv first; llama.cpp's output agrees;
  * ffn_down: Q6_K under q4_k_m / q5_k_m when `use_more_bits(layer, n_layer)`;
  * everything else (attn_q/k, attn_output, ffn_up incl. Phi-3's fused gate_up, token_embd when
    untied) keeps the default type: their rules are for other ftypes, Falcon, or MoE models.
  use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2 (integer division).
- `tensor_type_fallback`: a row length not a multiple of the chosen type's block demotes
  Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; if still not a multiple (or for a 32-block type) F16.

f16 / bf16 are not llama-quantize mixtures: every 2-D weight is written in that type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class GGUFType:
    default: str  # GGML type of the 2-D weights before the mixture rules
    file_type: int  # general.file_type: llama.h `llama_ftype`
    mixture: bool  # llama-quantize's per-tensor rules and fallbacks apply


GGUF_TYPES = {
    "f16": GGUFType("F16", 1, False),
    "bf16": GGUFType("BF16", 32, False),
    "q8_0": GGUFType("Q8_0", 7, True),
    "q6_k": GGUFType("Q6_K", 18, True),
    "q5_k_m": GGUFType("Q5_K", 17, True),
    "q4_k_m": GGUFType("Q4_K", 15, True),
    "q4_0": GGUFType("Q4_0", 2, True),
}
BLOCK_SIZE = {"F32": 1, "F16": 1, "BF16": 1, "Q8_0": 32, "Q4_0": 32, "Q5_0": 32, "Q5_1": 32,
              "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # tensor_type_fallback
MORE_BITS_FTYPES = ("q4_k_m", "q5_k_m")  # attn_v / attn_qkv and ffn_down of use_more_bits layers: Q6_K
_BLOCK = re.compile(r"blk\.(\d+)\.")


class TensorType(NamedTuple):
    ggml_type: str  # the type written
    wanted: str  # the type the rules chose before the row-length fallback


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp's `use_more_bits`: the first and last eighth of the layers and every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def fallback(ggml_type: str, row_length: int) -> str:
    """`tensor_type_fallback`: a type whose block divides the row length."""
    if row_length % BLOCK_SIZE[ggml_type]:
        ggml_type = FALLBACK.get(ggml_type, ggml_type)
        if row_length % BLOCK_SIZE[ggml_type]:
            ggml_type = "F16"
    return ggml_type


def tensor_type(name: str, shape: tuple, out_type: str, n_layers: int, tied_embeddings: bool) -> TensorType:
    """The GGML type of tensor `name` (GGUF name, `shape` as torch gives it: rows last) in a file
    of `out_type`; `tied_embeddings`: the file has no output.weight."""
    plan = GGUF_TYPES[out_type]
    if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return TensorType("F32", "F32")
    chosen = plan.default
    if not plan.mixture:
        return TensorType(chosen, chosen)
    row_length = shape[-1]
    block = _BLOCK.match(name)
    layer = int(block.group(1)) if block else None
    if name == "output.weight" or (tied_embeddings and name == "token_embd.weight"):
        if row_length % BLOCK_SIZE[chosen]:
            chosen = "Q8_0"
        elif chosen != "Q8_0":
            chosen = "Q6_K"
    elif (layer is not None and out_type in MORE_BITS_FTYPES and use_more_bits(layer, n_layers)
          and name.endswith((".attn_v.weight", ".attn_qkv.weight", ".ffn_down.weight"))):
        chosen = "Q6_K"
    return TensorType(fallback(chosen, row_length), chosen)
