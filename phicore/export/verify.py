"""Every export checks itself: the written file is read back and compared with the model in memory.

`check_gguf` (a merged GGUF of any type the `gguf` package can dequantise), `check_gguf_lora` (an
adapter GGUF) and `check_merged_folder` (a --merge folder, read with safetensors) return a few
lines to print, or raise `VerifyError` (infer.py: exit 1) naming the file and the tensor:

- Weights: every tensor is read back (`gguf.quants.dequantize`; safetensors) and compared with
  the merged weights in memory; the largest error is reported per tensor type, and an error
  above its type's bound (`WEIGHT_BOUNDS`) fails. A tensor missing, unexpected or of the wrong
  shape fails too.
- Tokenizer: the GGUF vocabulary is phicore's (same token at every id, same bos/eos); a few
  strings (`SAMPLE_TEXTS` and a prompt in the training format) tokenised the way llama.cpp does
  it from the file's own vocabulary (GPT-2 BPE over its merges; SentencePiece over its scores
  with byte fallback, its space prefix and its special-token splitting, all as
  src/llama-vocab.cpp) give phicore's ids, and decode to phicore's text. A "gpt2" vocabulary
  without merges fails (llama.cpp refuses it). A merged folder's tokenizer files are loaded with
  phicore.load_tokenizer and must give the same ids and text.
- With `llama=True` (--verify), and llama-cpp-python installed (else one line says the check is
  skipped): llama.cpp loads the file (an adapter over a base GGUF written for the check),
  tokenises the strings to phicore's ids, stops on every phicore stop id (end of generation
  for llama.cpp), gives phicore's logits on a few prompts within the bound of the file's
  weight type (`LOGIT_BOUNDS`), and its greedy answer is phicore's, ending at the same stop
  token (a divergence is accepted only on a near tie: phicore's two candidates within the bound).

Weight bounds: the largest error the format allows, as a fraction of the largest |w| of the
block the format scales together (elementwise for float types). For a block of absmax A:

    f32                0 (exact)
    f16                2^-11 |w| + 2^-24              (round to nearest; subnormals)
    bf16               2^-8 |w|                      (round to nearest)
    q8_0   (32)        A (1/254 + 2^-11)             half a step of A/127, + the f16 scale's rounding
    q4_0   (32)        A (1/8 + 2^-11)               scale max/-8: the opposite extreme clamps a whole step
    q5_0   (32)        A (1/16 + 2^-11)              likewise with max/-16
    q4_1   (32)        A (1/15 + 3 2^-11)            half of (max-min)/15 <= 2A/15, f16 scale and min
    q5_1   (32)        A (1/31 + 3 2^-11)
    q6_K   (256)       A (1/32 + 1/256 + 2^-11)      one step of A/32 (clamp), int8 sub-scale rounding
    q5_K   (256)       A (2/31 + 1/63 + 1/126 + 3 2^-11)  one step of (max-min)/31, 6-bit sub-scales and mins
    q4_K   (256)       A (2/15 + 1/63 + 1/126 + 3 2^-11)
    q3_K   (256)       A (1/4 + 1/64 + 2^-10)        one step of A/4, 6-bit sub-scales
    q2_K   (256)       A (2/3 + 1/15 + 1/30 + 2^-9)  one step of 2A/3, 4-bit sub-scales and mins
    other              A 2^(2 - bits per weight)     two steps of a symmetric grid of that many bits

K-quant quantisers search the scale (llama.cpp's make_qx_quants / make_qkx2_quants move it by up
to about a level), so their bounds allow a whole step, not half of one. Every bound gets 2^-10 of
itself on top for the quantisers' float32 arithmetic. A corrupted byte moves a value by about a
block's range, far above these.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from . import VerifyError
from .gguf import ARCHS, gguf_tensor_name, gguf_tensors, import_gguf
from .gguf_vocabulary import check_gguf_vocabulary, short_ids, short_text

SAMPLE_TEXTS = (
    "Why did the cat sit on the keyboard?",
    "Café ☕, naïve façade — 日本語 🙂",
    "  two  spaces,\ta tab\nand 3.14159 + 2 = 5.14159 ",
)
SAMPLE_PROMPTS = ("Tell me a joke about cats.", "What is the capital of France?", "Explain recursion briefly.")
GREEDY_TOKENS = 24  # new tokens of the greedy answer compared with llama.cpp's


# ----------------------------------------------------------------------------- bounds
@dataclass(frozen=True)
class Bound:
    """|error| <= rel * A + floor, A = max |w| over `block` values (block 1: |w| itself)."""

    block: int
    rel: float
    floor: float = 0.0

    def describe(self) -> str:
        if self.rel == 0:
            return "exact" if self.floor == 0 else f"{self.floor:.3g}"
        return f"{self.rel:.3g} x |w|" if self.block == 1 else f"{self.rel:.3g} x max |w| of each {self.block}"


_F16 = 2.0 ** -11
_SLACK = 2.0 ** -10  # relative: the quantisers' own float32 arithmetic (x * (1/d) rather than x / d)
WEIGHT_BOUNDS = {
    "F32": Bound(1, 0.0),
    "F64": Bound(1, 0.0),
    "F16": Bound(1, _F16, 2.0 ** -24),
    "BF16": Bound(1, 2.0 ** -8, 1e-38),
    "Q8_0": Bound(32, 1 / 254 + _F16),
    "Q8_1": Bound(32, 1 / 254 + 2 * _F16),
    "Q4_0": Bound(32, 1 / 8 + _F16),
    "Q5_0": Bound(32, 1 / 16 + _F16),
    "Q4_1": Bound(32, 1 / 15 + 3 * _F16),
    "Q5_1": Bound(32, 1 / 31 + 3 * _F16),
    "Q6_K": Bound(256, 1 / 32 + 1 / 256 + _F16),
    "Q5_K": Bound(256, 2 / 31 + 1 / 63 + 1 / 126 + 3 * _F16),
    "Q4_K": Bound(256, 2 / 15 + 1 / 63 + 1 / 126 + 3 * _F16),
    "Q3_K": Bound(256, 1 / 4 + 1 / 64 + 2 * _F16),
    "Q2_K": Bound(256, 2 / 3 + 1 / 15 + 1 / 30 + 4 * _F16),
}

# llama.cpp's logits against phicore's (fp32), as a fraction of max(1, max |logit|), by the least
# precise weight type in the file. Not a worst case (that depends on the model): about twice the
# largest difference measured on random tiny Phi-2/Phi-3 models for files of phicore's and of
# llama.cpp's own quantiser (tests/test_gguf_exports.py), llama.cpp's activation rounding included.
LOGIT_BOUNDS = {"F32": 2e-3, "F64": 2e-3, "F16": 1e-2, "BF16": 5e-2, "Q8_0": 5e-2, "Q8_1": 5e-2, "Q6_K": 0.1,
                "Q5_K": 0.2, "Q5_0": 0.2, "Q5_1": 0.2, "Q4_K": 0.35, "Q4_0": 0.35, "Q4_1": 0.35, "Q3_K": 0.6,
                "Q2_K": 1.0}
_OTHER_LOGIT_BOUND = 1.0


def type_label(qtype) -> str:
    """llama.cpp's spelling of a tensor type: f16, q8_0, q4_K."""
    return _label(qtype.name)


def _label(type_name: str) -> str:
    return type_name.lower().replace("_k", "_K")


def weight_bound(gguf, qtype) -> Bound:
    name = qtype.name
    if name in WEIGHT_BOUNDS:
        return WEIGHT_BOUNDS[name]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if block == 1:  # integer types: never weights phicore writes
        return Bound(1, 0.0)
    return Bound(block, 2.0 ** (2 - type_size * 8 / block))


def error_over_bound(original, got, bound: Bound) -> tuple:
    """(max |error|, max of |error| / bound, and the |error| and its bound where that ratio is
    largest); a ratio > 1: out of bounds. NaN or inf read back counts as infinitely wrong.
    float32 torch ops: a few seconds per billion weights on a few cores."""
    original, got = _flat32(original), _flat32(got)
    if not original.numel():
        return 0.0, 0.0, 0.0, 0.0
    err = torch.nan_to_num((got - original).abs_(), nan=math.inf)
    rel = bound.rel * (1 + _SLACK)
    if bound.block == 1:
        allowed = original.abs().mul_(rel).add_(bound.floor)
    else:
        absmax = original.abs().view(-1, bound.block).amax(dim=1, keepdim=True)  # (blocks, 1)
        allowed = absmax.mul_(rel).add_(bound.floor).expand(-1, bound.block).reshape(-1)
    ratio = torch.where(err == 0, torch.zeros_like(err), err / allowed)
    worst = int(torch.argmax(ratio))
    return float(err.max()), float(ratio[worst]), float(err[worst]), float(allowed[worst])


def _flat32(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float32).reshape(-1)
    array = np.asarray(values, dtype=np.float32).reshape(-1)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


@dataclass
class _TypeStats:
    count: int = 0
    max_error: float = 0.0
    worst_ratio: float = 0.0


class WeightReport:
    """Largest errors per tensor type; the first tensor out of its bound raises VerifyError."""

    def __init__(self, path: Path):
        self.path = path
        self.types: dict = defaultdict(_TypeStats)
        self.bounds: dict = {}

    def add(self, name: str, label: str, bound: Bound, original, got) -> None:
        if tuple(np.shape(original)) != tuple(np.shape(got)):
            raise VerifyError(f"{self.path}: tensor {name} reads back with shape {tuple(np.shape(got))}, "
                              f"expected {tuple(np.shape(original))}")
        max_error, ratio, error, allowed = error_over_bound(original, got, bound)
        if ratio > 1:
            raise VerifyError(f"{self.path}: tensor {name} ({label}) reads back wrong: |error| {error:.4g} where its "
                              f"bound is {allowed:.4g} ({bound.describe()}); the file is damaged or was written wrong")
        stats = self.types[label]
        stats.count += 1
        stats.max_error = max(stats.max_error, max_error)
        stats.worst_ratio = max(stats.worst_ratio, ratio)
        self.bounds[label] = bound

    def lines(self, prefix: str) -> list:
        out = []
        for label, stats in sorted(self.types.items()):
            bound = self.bounds[label]
            tail = "exact" if bound.rel == 0 else f"bound {bound.describe()}; worst {stats.worst_ratio:.0%} of it"
            out.append(f"{prefix}{label}: max |error| {stats.max_error:.3g} over {stats.count} tensors ({tail})")
        return out


# ----------------------------------------------------------------------------- reading GGUF
def read_gguf(path):
    """(gguf module, GGUFReader, metadata {key: value}) of a GGUF file; VerifyError if unreadable."""
    gguf = import_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError / struct errors / IndexError on bad files
        raise VerifyError(f"{path}: the gguf package cannot read it back ({type(err).__name__}: {err})") from None
    meta = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    return gguf, reader, meta


def dequantized(gguf, tensor) -> np.ndarray:
    """A GGUF tensor's values as float32 in its logical (rows, ..., row length) shape."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy()


# ----------------------------------------------------------------------------- the checks
@dataclass
class Reference:
    """What an export is checked against: the model in memory (merged for --gguf / --merge; with
    its LoRA layers for --gguf-lora), its tokenizer, stop ids, and sample texts and prompt ids."""

    model: nn.Module
    tokenizer: object
    stop_ids: list
    texts: list = field(default_factory=lambda: list(SAMPLE_TEXTS))
    prompts: list = field(default_factory=list)  # token id lists in the training prompt format


def reference_from_session(session, prompts: Sequence[str] = SAMPLE_PROMPTS) -> Reference:
    """A Reference from an inference Session: the sample texts, and `prompts` in its prompt format
    (as ids, and their text with an answer after it among the texts)."""
    formatted = [session.prompt_text(p) for p in prompts]
    return Reference(session.model, session.tokenizer, list(session.stop_ids),
                     texts=[*SAMPLE_TEXTS, formatted[0] + " Because."],
                     prompts=[session.prompt_ids(p) for p in prompts])


def check_gguf(path, ref: Reference, *, llama: bool = False) -> list:
    """Read a merged GGUF back against the merged model `ref.model`; with `llama`, run it in llama.cpp."""
    path = Path(path)
    gguf, reader, meta = read_gguf(path)
    arch = ARCHS[ref.model.config.model_type].name
    if meta.get("general.architecture") != arch:
        raise VerifyError(f"{path}: architecture {meta.get('general.architecture')!r}, expected {arch!r}")
    expected = gguf_tensors(ref.model)
    report = WeightReport(path)
    weight_types = set()
    for tensor in reader.tensors:
        if tensor.name not in expected:
            raise VerifyError(f"{path}: unexpected tensor {tensor.name}")
        original = _numpy(expected.pop(tensor.name))
        label = type_label(tensor.tensor_type)
        report.add(tensor.name, label, weight_bound(gguf, tensor.tensor_type), original, dequantized(gguf, tensor))
        if original.ndim == 2:
            weight_types.add(tensor.tensor_type.name)
    if expected:
        raise VerifyError(f"{path}: tensor {sorted(expected)[0]} is missing ({len(expected)} missing)")
    lines = report.lines("weights ")
    lines.append(check_gguf_vocabulary(path, gguf, meta, ref.tokenizer, ref.texts))
    if llama:
        from .llama_check import run_in_llama_cpp

        lines += run_in_llama_cpp(path, ref, weight_types=weight_types)
    return lines


def check_gguf_lora(path, ref: Reference, *, llama: bool = False, base_type: str = "f16") -> list:
    """Read an adapter GGUF back against the LoRA layers of `ref.model` (not merged): llama.cpp's
    alpha / r * B @ A of every layer must be phicore's s * B @ A. With `llama`, a base GGUF
    (`base_type`) is written to a temporary folder and llama.cpp runs base + adapter."""
    from ..lora import lora_layers

    path = Path(path)
    gguf, reader, meta = read_gguf(path)
    arch = ARCHS[ref.model.config.model_type].name
    for key, want in (("general.type", "adapter"), ("adapter.type", "lora"), ("general.architecture", arch)):
        if meta.get(key) != want:
            raise VerifyError(f"{path}: {key} is {meta.get(key)!r}, expected {want!r}")
    alpha = meta.get("adapter.lora.alpha")
    if not isinstance(alpha, (int, float)) or alpha == 0 or not math.isfinite(alpha):
        raise VerifyError(f"{path}: adapter.lora.alpha is {alpha!r}; llama.cpp needs a finite non-zero alpha")
    tensors = {t.name: t for t in reader.tensors}
    report = WeightReport(path)
    for module_path, layer in lora_layers(ref.model):
        name = gguf_tensor_name(f"{module_path}.weight")
        pair = [tensors.pop(f"{name}.lora_{x}", None) for x in ("a", "b")]
        if None in pair:
            raise VerifyError(f"{path}: tensor {name}.lora_{'a' if pair[0] is None else 'b'} is missing")
        a, b = (dequantized(gguf, t).astype(np.float64) for t in pair)
        if a.shape != tuple(layer.lora_A.weight.shape) or b.shape != tuple(layer.lora_B.weight.shape):
            raise VerifyError(f"{path}: {name}.lora_a/.lora_b have shapes {a.shape}/{b.shape}, expected "
                              f"{tuple(layer.lora_A.weight.shape)}/{tuple(layer.lora_B.weight.shape)}")
        rank = b.shape[1]  # what llama.cpp divides by: B's ne[0]
        got = float(np.float32(alpha) / np.float32(rank)) * (b @ a)  # llama.cpp's addition to W x
        want = layer.delta_weight().double().cpu().numpy()  # phicore's s * B @ A
        # float32 A, B and alpha: r terms of at most alpha / r * max|B| max|A|, each rounded a few times
        largest = float(np.abs(b).max(initial=0) * np.abs(a).max(initial=0)) * abs(alpha)
        report.add(f"{name}.lora_a/.lora_b", "alpha / r * B @ A", Bound(1, 0.0, 2.0 ** -20 * largest + 1e-30),
                   want, got)
    if tensors:
        raise VerifyError(f"{path}: unexpected tensor {sorted(tensors)[0]}")
    stats = report.types.get("alpha / r * B @ A")
    if stats is None:
        raise VerifyError(f"{path}: the model in memory has no LoRA layers to compare with")
    lines = [f"adapter: alpha {alpha:g}, {stats.count} layers; alpha / r * B @ A equals phicore's scale * B @ A "
             f"within {stats.max_error:.3g} (float32 rounding)"]
    if llama:
        from .llama_check import run_adapter_in_llama_cpp

        lines += run_adapter_in_llama_cpp(path, ref, base_type)
    return lines


def check_merged_folder(folder, ref: Reference) -> list:
    """Read a --merge folder back with safetensors and load its tokenizer with phicore."""
    from safetensors import safe_open

    from ..tokenizer import load_tokenizer
    from ..weights import checkpoint_files

    folder = Path(folder)
    expected = dict(ref.model.state_dict())
    if ref.model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    report = WeightReport(folder)
    for file in checkpoint_files(folder):
        try:
            handle = safe_open(str(file), framework="pt")
        except (OSError, ValueError, RuntimeError) as err:  # safetensors' errors
            raise VerifyError(f"{file}: cannot be read back ({err})") from None
        for key in handle.keys():
            if key not in expected:
                raise VerifyError(f"{file}: unexpected tensor {key}")
            want = expected.pop(key)
            got = handle.get_tensor(key)
            label = str(got.dtype).replace("torch.", "")
            bound = Bound(1, 0.0) if got.dtype == want.dtype else _torch_cast_bound(got.dtype)
            report.add(key, label, bound, _numpy(want), _numpy(got))
    if expected:
        raise VerifyError(f"{folder}: tensor {sorted(expected)[0]} is missing ({len(expected)} missing)")
    lines = report.lines("weights ")
    try:
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError) as err:
        raise VerifyError(f"{folder}: its tokenizer cannot be loaded back ({err})") from None
    for text in ref.texts:
        want = ref.tokenizer.encode(text, add_special_tokens=False)
        got = tokenizer.encode(text, add_special_tokens=False)
        if got != want or tokenizer.decode(got) != ref.tokenizer.decode(want):
            raise VerifyError(f"{folder}: its tokenizer gives {short_ids(got)} for {short_text(text)}, phicore's {short_ids(want)}")
    lines.append(f"tokenizer: ids and text equal phicore's on {len(ref.texts)} strings")
    return lines


def _torch_cast_bound(dtype: torch.dtype) -> Bound:
    return {torch.float16: WEIGHT_BOUNDS["F16"], torch.bfloat16: WEIGHT_BOUNDS["BF16"]}.get(dtype, Bound(1, 0.0))


__all__ = ["VerifyError", "Reference", "reference_from_session", "check_gguf", "check_gguf_lora",
           "check_merged_folder", "WEIGHT_BOUNDS", "LOGIT_BOUNDS"]
