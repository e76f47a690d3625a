"""Write a (merged) Phi model as a GGUF file for llama.cpp: architectures phi2 and phi3.

Follows llama.cpp's own converter (convert_hf_to_gguf.py, Phi2Model / Phi3MiniModel) and
shared/docs/reference.md section 6:

- Tensor names: `TENSOR_NAMES` below. Phi-3's fused projections stay fused: qkv_proj is
  `blk.N.attn_qkv` ([Q | K | V] rows) and gate_up_proj is `blk.N.ffn_up` (gate rows first);
  llama.cpp splits them at run time. A tied lm_head is not written (llama.cpp reuses
  token_embd). Longrope models get `rope_factors_long.weight` / `rope_factors_short.weight`
  (f32, rotary_dim / 2 values) and `{arch}.rope.scaling.attn_factor`.
- Types: 2-D weights in the chosen type; 1-D tensors (norms, biases, rope factors) stay f32, as
  the converter keeps them. f16 and bf16 apply to every 2-D weight; q8_0, q6_k, q5_k_m, q4_k_m and
  q4_0 follow `llama-quantize`'s mixture rules and row-length fallbacks (quant_plan.py: which
  tensors get Q6_K, Q5_0 for rows that are not a multiple of 256, ...) and write its
  `general.file_type`. The K-quants and Q4_0 are encoded by kquants.py (llama.cpp's reference
  quantisers in PyTorch, no compiler needed), q8_0 / q5_0 / q5_1 by the gguf package.
- Metadata: `{arch}.context_length`, `.embedding_length`, `.feed_forward_length`,
  `.block_count`, `.attention.head_count(_kv)`, `.attention.layer_norm_epsilon` (LayerNorm,
  phi2) or `.attention.layer_norm_rms_epsilon` (RMSNorm, phi3), `.rope.dimension_count`,
  `.rope.freq_base`; phi3 also `.rope.scaling.original_context_length` and `.attention.sliding_window`
  (0 for none).
- Tokenizer: a byte-level BPE (Phi-2, Phi-4) is written as "gpt2" with its merges; a
  SentencePiece-style BPE with byte fallback (Phi-3, Phi-3.5) as "llama" with scores and token
  types. The scores come from the base folder's `tokenizer.model` when there is one (exactly what
  llama.cpp's converter reads); without it they are derived from the vocabulary order (SPM's
  scores fall with the id), which differs from SentencePiece only for the few pieces SentencePiece
  marks as never-merge (runs of spaces). The vocabulary is padded to the embedding size with
  unused "[PADn]" tokens. Phi-2's pre-tokenizer is GPT-2's regex: written as "gpt-2" (llama.cpp's
  converter writes "phi-2", an alias of the same pre-tokenizer).

The file is written one tensor at a time (memory: the model plus one converted tensor) to
FILE.tmp and renamed when complete. The `gguf` package is optional and imported on use.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn as nn

from ..lora import lora_layers
from . import ExportError, kquants, quant_plan

GGUF_TYPES = tuple(quant_plan.GGUF_TYPES)  # f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0


@dataclass(frozen=True)
class GGUFArch:
    """What llama.cpp's converter writes differently for an architecture."""

    name: str
    writes_original_context: bool  # rope.scaling.original_context_length and attention.sliding_window


# model_type (config.json) -> llama.cpp architecture
ARCHS = {"phi": GGUFArch("phi2", False), "phi3": GGUFArch("phi3", True)}

# Hugging Face module path ({} = block index) -> GGUF tensor name; ".weight"/".bias" follow.
TENSOR_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.final_layernorm": "output_norm",
    "model.norm": "output_norm",
    "lm_head": "output",
    "model.layers.{}.input_layernorm": "blk.{}.attn_norm",
    "model.layers.{}.post_attention_layernorm": "blk.{}.ffn_norm",
    "model.layers.{}.self_attn.q_proj": "blk.{}.attn_q",
    "model.layers.{}.self_attn.k_proj": "blk.{}.attn_k",
    "model.layers.{}.self_attn.v_proj": "blk.{}.attn_v",
    "model.layers.{}.self_attn.qkv_proj": "blk.{}.attn_qkv",
    "model.layers.{}.self_attn.dense": "blk.{}.attn_output",
    "model.layers.{}.self_attn.o_proj": "blk.{}.attn_output",
    "model.layers.{}.mlp.fc1": "blk.{}.ffn_up",
    "model.layers.{}.mlp.gate_up_proj": "blk.{}.ffn_up",
    "model.layers.{}.mlp.fc2": "blk.{}.ffn_down",
    "model.layers.{}.mlp.down_proj": "blk.{}.ffn_down",
}
ROPE_FACTOR_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def import_gguf():
    """The optional gguf package, or an ExportError saying how to get it."""
    try:
        import gguf
    except ImportError:
        raise ExportError("--gguf needs the optional 'gguf' package: pip install gguf") from None
    return gguf


def gguf_tensor_name(key: str) -> str:
    """`model.layers.3.self_attn.qkv_proj.weight` -> `blk.3.attn_qkv.weight`."""
    module, _, leaf = key.rpartition(".")
    match = _LAYER.fullmatch(module)
    template, block = (f"model.layers.{{}}.{match.group(2)}", match.group(1)) if match else (module, None)
    if template not in TENSOR_NAMES:
        raise ExportError(f"{key}: llama.cpp's phi2/phi3 architectures have no tensor for this weight")
    return f"{TENSOR_NAMES[template].format(block)}.{leaf}"


# ----------------------------------------------------------------------------- tokenizer
@dataclass
class GGUFVocab:
    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list
    types: list
    scores: Optional[list]
    merges: Optional[list]


def read_sentencepiece_model(path: Path) -> list:
    """(piece, score, type) per id from a SentencePiece `tokenizer.model` (a protobuf ModelProto:
    field 1 repeated SentencePiece {1: piece, 2: score (float), 3: type (enum, default 1)}),
    read without the sentencepiece package."""
    data = Path(path).read_bytes()

    def varint(buf, i):
        value = shift = 0
        while True:
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, i

    def fields(buf):
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, i = varint(buf, i)
            elif wire == 1:
                value, i = buf[i:i + 8], i + 8
            elif wire == 2:
                size, i = varint(buf, i)
                value, i = buf[i:i + size], i + size
            elif wire == 5:
                value, i = buf[i:i + 4], i + 4
            else:
                raise ValueError(f"{path}: unsupported protobuf wire type {wire}")
            yield number, value

    pieces = []
    for number, value in fields(data):
        if number != 1:
            continue
        piece, score, kind = "", 0.0, 1
        for sub_number, sub_value in fields(value):
            if sub_number == 1:
                piece = bytes(sub_value).decode("utf-8")
            elif sub_number == 2:
                score = struct.unpack("<f", sub_value)[0]
            elif sub_number == 3:
                kind = sub_value
        pieces.append((piece, score, kind))
    return pieces


def _pre_tokenizer_name(pre: Optional[dict]) -> Optional[str]:
    """"gpt-2" for GPT-2's ByteLevel regex pre-tokenizer (Phi-2), None for anything else."""
    pre = pre or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return "gpt-2"
    return None


def gguf_vocab(tokenizer, vocab_size: int, *, sentencepiece_model: Optional[Path] = None,
               warn: Callable[[str], None] = print) -> GGUFVocab:
    """The tokenizer's vocabulary in llama.cpp's terms, padded to the embedding's `vocab_size`."""
    gguf = import_gguf()
    TokenType = gguf.TokenType
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer model {model.get('type')!r}: GGUF export supports BPE tokenizers only")
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)  # token -> id
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())} but the embedding only "
                          f"{vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(TokenType.UNUSED)] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, int(TokenType.NORMAL)
    llama = bool(model.get("byte_fallback"))
    scores = merges = None
    if llama:  # SentencePiece-style: scores and piece types
        scores = [-10000.0] * vocab_size
        pieces = read_sentencepiece_model(sentencepiece_model) if sentencepiece_model else None
        if pieces is not None and any(vocab.get(p) not in (i, None) for i, (p, _, _) in enumerate(pieces)):
            warn(f"warning: {sentencepiece_model} does not match tokenizer.json; deriving scores from the vocabulary")
            pieces = None
        for token, i in vocab.items():
            if pieces is not None and i < len(pieces):
                _, scores[i], types[i] = pieces[i]
            elif _BYTE_PIECE.fullmatch(token):
                scores[i], types[i] = 0.0, int(TokenType.BYTE)
            else:
                scores[i] = -float(i)
        if pieces is None and tokenizer.unk_token_id is not None:
            scores[tokenizer.unk_token_id], types[tokenizer.unk_token_id] = 0.0, int(TokenType.UNKNOWN)
        pre = "default"
    else:  # byte-level BPE: merges
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
        if pre is None:
            warn("warning: unrecognised pre-tokenizer; llama.cpp will use its default one ('default')")
            pre = "default"
    for i, added in tokenizer.backend.get_added_tokens_decoder().items():  # as the converter: added last
        types[i] = int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED)
        if scores is not None:
            scores[i] = -1000.0
    return GGUFVocab("llama" if llama else "gpt2", pre, tokens, types, scores, merges)


def find_sentencepiece_model(folders: Iterable) -> Optional[Path]:
    for folder in folders:
        if folder is not None and (Path(folder) / "tokenizer.model").is_file():
            return Path(folder) / "tokenizer.model"
    return None


# ----------------------------------------------------------------------------- writing
@dataclass
class _PlannedTensor:
    name: str
    source: Callable[[], torch.Tensor]
    qtype: object  # gguf.GGMLQuantizationType
    shape: tuple


def plan_tensor_types(shapes: dict, out_type: str, n_layers: int, warn: Callable[[str], None] = print) -> dict:
    """GGUF name -> GGML type name ("Q4_K", "F32", ...) of each tensor (`shapes`: GGUF name -> torch
    shape), as llama-quantize chooses them (quant_plan.py); one warning per fallback for the tensors
    whose rows do not fit the chosen type's block."""
    tied = "output.weight" not in shapes
    types = {name: quant_plan.tensor_type(name, shape, out_type, n_layers, tied) for name, shape in shapes.items()}
    fallbacks = {}
    for name, chosen in types.items():
        if chosen.ggml_type != chosen.wanted:
            fallbacks.setdefault((chosen.wanted, chosen.ggml_type), []).append(name)
    for (wanted, written), names in fallbacks.items():
        warn(f"warning: {len(names)} tensor(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) have rows "
             f"that are not a multiple of {quant_plan.BLOCK_SIZE[wanted]} values ({wanted}'s block): written as "
             f"{written.lower()}, as llama-quantize falls back")
    return {name: chosen.ggml_type for name, chosen in types.items()}


def _encode(gguf, tensor: torch.Tensor, qtype, name: str) -> np.ndarray:
    """The tensor's bytes in `qtype`: K-quants and Q4_0 by kquants.py, the rest by the gguf package."""
    if qtype.name in kquants.QUANTIZERS:
        try:
            return kquants.quantize(tensor, qtype.name)
        except ValueError as error:  # inf or NaN weights
            raise ExportError(f"{name}: {error}") from None
    array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    return gguf.quants.quantize(array, qtype)


def _nbytes_and_shape(gguf, shape: tuple, qtype) -> tuple:
    """(bytes, shape as add_tensor_info takes it, numpy dtype of the data) for a planned tensor."""
    Q = gguf.GGMLQuantizationType
    if qtype in (Q.F32, Q.F16):
        dtype = np.float32 if qtype == Q.F32 else np.float16
        return int(np.prod(shape)) * np.dtype(dtype).itemsize, shape, dtype
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return int(np.prod(byte_shape)), byte_shape, np.uint8


def gguf_tensors(model: nn.Module) -> dict:
    """{GGUF name: tensor} of a merged model's GGUF file, in writing order: the rope factors of a
    longrope model (f32), then the state dict's tensors, without a tied lm_head (llama.cpp falls
    back to token_embd). The writer and the read-back check (verify.py) share this list."""
    config = model.config
    tensors = {}
    if config.rope_type == "longrope":
        for name, factors in zip(ROPE_FACTOR_TENSORS, (config.rope_long_factor, config.rope_short_factor)):
            tensors[name] = torch.tensor(factors, dtype=torch.float32)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tensors.update((gguf_tensor_name(key), tensor) for key, tensor in state.items())
    return tensors


def gguf_name_for(tokenizer, name: str) -> str:
    """A general.name under which llama.cpp tokenises as phicore: llama.cpp strips the whitespace
    after special tokens (as Phi-3's tokenizer.json declares with rstrip) only for names that
    contain "phi3" or "phi-3"."""
    rstrip = any(t.rstrip for t in tokenizer.backend.get_added_tokens_decoder().values())
    named = "phi3" in name.lower() or "phi-3" in name.lower()
    return f"phi3-{name}" if rstrip and not named else name


def write_gguf(model: nn.Module, tokenizer, path, out_type: str = "f16", *, name: Optional[str] = None,
               sentencepiece_model: Optional[Path] = None, show_progress: bool = False,
               warn: Callable[[str], None] = print) -> Path:
    """Write `model` (no LoRA layers: merge first) and its tokenizer as a GGUF file."""
    gguf = import_gguf()
    if out_type not in GGUF_TYPES:
        raise ExportError(f"GGUF type {out_type!r}: use one of {', '.join(GGUF_TYPES)}")
    if any(True for _ in lora_layers(model)):
        raise ExportError("write_gguf: merge the adapter first (phicore.export.merge.merge_adapter)")
    config = model.config
    if config.model_type not in ARCHS:
        raise ExportError(f"model_type {config.model_type!r} has no GGUF architecture")
    if getattr(config, "qk_layernorm", False):
        raise ExportError("qk_layernorm Phi-2 variants are not supported by llama.cpp's phi2 architecture")
    arch = ARCHS[config.model_type]
    path = Path(path)

    tensors = gguf_tensors(model)
    types = plan_tensor_types({name: tuple(t.shape) for name, t in tensors.items()}, out_type,
                              config.num_hidden_layers, warn)
    plan = [_PlannedTensor(name, lambda t=tensor: t, gguf.GGMLQuantizationType[types[name]], tuple(tensor.shape))
            for name, tensor in tensors.items()]

    vocab = gguf_vocab(tokenizer, config.vocab_size, sentencepiece_model=sentencepiece_model, warn=warn)
    file_type = quant_plan.GGUF_TYPES[out_type].file_type

    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), arch.name)
    try:
        _write_metadata(writer, gguf, config, arch, gguf_name_for(tokenizer, name or path.stem), file_type)
        _write_vocab(writer, tokenizer, vocab)
        for item in plan:
            nbytes, shape, dtype = _nbytes_and_shape(gguf, item.shape, item.qtype)
            raw = None if dtype != np.uint8 else item.qtype
            writer.add_tensor_info(item.name, shape, np.dtype(dtype), nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = None
        if show_progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(int(np.prod(item.shape)) for item in plan), desc=f"writing {path.name} ({out_type})",
                       unit="w", unit_scale=True)
        for item in plan:  # one converted tensor in memory at a time
            writer.write_tensor_data(_encode(gguf, item.source(), item.qtype, item.name))
            if bar is not None:
                bar.update(int(np.prod(item.shape)))
        if bar is not None:
            bar.close()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        try:
            writer.close()
        except OSError:  # closing flushes: on a full disk that fails too, and the first error is the one to report
            pass
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_metadata(writer, gguf, config, arch: GGUFArch, name: str, file_type) -> None:
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    add_eps = {"layernorm": writer.add_layer_norm_eps, "rmsnorm": writer.add_layer_norm_rms_eps}[config.layout.norm]
    add_eps(config.norm_eps)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rope_theta)
    if arch.writes_original_context:
        writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
        writer.add_sliding_window(config.sliding_window or 0)
    if config.rope_type == "longrope":
        writer.add_rope_scaling_attn_factors(config.attention_scaling)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_vocab(writer, tokenizer, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id if tokenizer.pad_token else None)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(tokenizer.add_bos_token)
    writer.add_add_eos_token(tokenizer.add_eos_token)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
