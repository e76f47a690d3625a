"""Offline demo presets: tiny random-weight Phi models with small BPE tokenizers made in code.

`tiny-phi-2` and `tiny-phi-3` have the real architectures (Phi-2's parallel block and partial
rotary; Phi-3's fused projections, GQA and chat template) at a few hundred thousand
parameters. They know nothing: they exist so the whole pipeline (train, resume, infer,
merge, export) can be tried and tested without downloading anything. Each is written as a
Hugging Face folder (config.json, model.safetensors, tokenizer files), so transformers, PEFT,
llama.cpp (through the GGUF export) and phicore's own tools reload it.

The tokenizers are the real models' kinds in miniature, so that every exporter meets what it
meets for the real models (llama.cpp refuses a "gpt2" vocabulary without merges):

- tiny-phi-2, `byte_level_tokenizer`: GPT-2's byte-level BPE (Phi-2's): the 256 byte symbols,
  then merges, then the special tokens. Exported to GGUF as "gpt2" with its merges.
- tiny-phi-3, `sentencepiece_tokenizer`: Llama's SentencePiece-style BPE with byte fallback
  (Phi-3's tokenizer.json): <unk> <s> </s>, the 256 <0xXX> byte pieces, merged pieces, the
  single characters they are made of, then the chat special tokens. Spaces become "▁" and one
  "▁" is put before the text and after every special token, as real Phi-3 and llama.cpp's
  "llama" vocabulary do. Exported to GGUF as "llama" with scores falling with the id.

Both learn their merges with plain BPE (`learn_merges`: most frequent pair, ties by the pair's
text) from the fixed `MERGE_TEXT`, so every build gives the same ids, in every version of the
`tokenizers` library, and fill the preset's vocab_size (320) exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from .config import ModelConfig
from .model import PhiForCausalLM
from .tokenizer import Tokenizer
from .weights import save_model

MARKER = "tiny_preset.json"  # which preset, seed and tokenizer version a built folder holds
# Bumped when the tokenizers change: a folder built by an older phicore is rebuilt, not reused.
TOKENIZER_VERSION = 2  # 1: 256 bytes without merges; 2: BPE with merges learned from MERGE_TEXT

# Random weights learn slowly at the usual 2e-4: the demo presets suggest a larger learning
# rate (`default_lr`), which train.py uses unless --lr is given.

# Phi-3's chat format: <|user|>\n...<|end|>\n<|assistant|>\n...<|end|>\n, system turns allowed.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

PHI3_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
# Special tokens that swallow the whitespace after them (rstrip), as in Phi-3's own tokenizer.json:
# "<|user|>\nHi" is <|user|> ▁ H i. llama.cpp does the same for a GGUF whose general.name names Phi-3.
PHI3_RSTRIP_TOKENS = ("</s>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")

TINY_PRESETS = {
    "tiny-phi-2": dict(
        model_type="phi", vocab_size=320, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, partial_rotary_factor=0.4, max_position_embeddings=2048, hidden_act="gelu_new",
        resid_pdrop=0.1, default_lr=2e-3, tokenizer="byte-level", special_tokens=["<|endoftext|>"],
        bos="<|endoftext|>", eos="<|endoftext|>", pad=None, chat_template=None,
    ),
    "tiny-phi-3": dict(
        model_type="phi3", vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        original_max_position_embeddings=4096, sliding_window=2047, hidden_act="silu", default_lr=2e-3,
        tokenizer="sentencepiece", special_tokens=PHI3_SPECIAL_TOKENS, bos="<s>", eos="<|endoftext|>",
        pad="<|endoftext|>", chat_template=PHI3_CHAT_TEMPLATE,
    ),
}


# The text the tiny tokenizers learn their merges from. Fixed: changing it changes every id
# (bump TOKENIZER_VERSION). Plain English in the demo's prompt formats.
MERGE_TEXT = """\
Instruct: Tell me a joke about the cat that sat on the keyboard.
Output: The cat wanted to keep an eye on the mouse. It is the only one in the house that can type.
Instruct: What is the best way to start the day?
Output: Start with a cup of coffee, then think about what you want to do, and do the one thing that matters.
Instruct: Why is the sky blue?
Output: Sunlight is scattered by the air, and the blue light is scattered more than the other colours.
<|user|>
How do I stop thinking about work when I am at home?<|end|>
<|assistant|>
Write down the things you still have to do, then close the notebook. The list will be there in the morning.<|end|>
<|user|>
Can you explain this in one sentence?<|end|>
<|assistant|>
Yes: the answer is in the question, and the question is in the answer, so there is nothing more to say.<|end|>
"""


def learn_merges(words: Counter, budget: int, cost: Callable[[str, str], int] = lambda left, right: 1,
                 on_merge: Callable[[str, str], None] = lambda left, right: None) -> list:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair of symbols (ties: the
    smallest pair text) over `words` ({tuple of symbols: count}), while the merges' `cost`
    (vocabulary entries each one needs; 1 by default) fits in `budget`; `on_merge` is told of each
    merge as it is made. Pairs seen once are never merged. Returns [(left, right)]."""
    words = dict(words)
    merges = []
    while True:
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        ranked = sorted(pairs, key=lambda p: (-pairs[p], p))
        pick = next((p for p in ranked if cost(*p) <= budget), None)
        if pick is None or pairs[pick] < 2:
            return merges
        budget -= cost(*pick)
        merges.append(pick)
        on_merge(*pick)
        left, right = pick
        merged = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
                    out.append(left + right)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged


def _training_text() -> str:
    """MERGE_TEXT without the chat special tokens (they are added tokens, never merged)."""
    return re.sub(r"<\|[a-z]+\|>", "", MERGE_TEXT)


def byte_level_tokenizer(special_tokens, *, bos, eos, pad, chat_template, vocab_size: int = 320) -> Tokenizer:
    """GPT-2's byte-level BPE in miniature (Phi-2's kind): ids 0-255 are the bytes (GPT-2's
    byte-to-unicode alphabet, in byte order), then merges learned from MERGE_TEXT up to
    `vocab_size` ids in all, then the special tokens. Every string round-trips."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as BackendTokenizer

    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    words = Counter(tuple(word) for word, _ in pre_tokenizer.pre_tokenize_str(_training_text()))
    merges = learn_merges(words, vocab_size - len(alphabet) - len(special_tokens))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))  # a token two merges make gets one id
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return Tokenizer(
        backend, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=chat_template, add_bos_token=False,
        config_extras={"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048},
    )


SPACE = "\u2581"  # SentencePiece's "▁", which stands for a space
SPM_CONTROL = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 in every Llama-style vocabulary


def sentencepiece_tokenizer(special_tokens, *, bos, eos, pad, chat_template, vocab_size: int = 320) -> Tokenizer:
    """Llama's SentencePiece-style BPE with byte fallback in miniature (Phi-3's tokenizer.json):
    <unk> <s> </s> (ids 0-2), the 256 byte pieces <0x00>..<0xFF> (3-258), the merged pieces in the
    order they were learned from MERGE_TEXT, the single characters they are made of (by frequency),
    then the other special tokens, `vocab_size` ids in all. A character without a piece is
    written as its UTF-8 bytes, so every string round-trips. Phi-3's turn tokens swallow the
    whitespace after them (PHI3_RSTRIP_TOKENS), as in Phi-3's tokenizer.json.

    The merges list is derived from the pieces as transformers' Llama converter derives it (every
    split of a piece into two pieces, in the piece's order), so this BPE gives exactly the ids of
    llama.cpp's SentencePiece algorithm (merge the adjacent pair whose concatenation is the piece
    with the best score; scores fall with the id) on the GGUF export."""
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as BackendTokenizer

    text = SPACE + _training_text().replace(" ", SPACE)
    words = Counter(tuple(word) for word in re.findall(f"{SPACE}[^{SPACE}]*|[^{SPACE}]+", text))
    chars: set = set()

    def new_chars(left: str, right: str) -> set:
        return {part for part in (left, right) if len(part) == 1 and part not in chars}

    def cost(left: str, right: str) -> int:  # the merged piece, and any character piece it needs first
        return 1 + len(new_chars(left, right))

    budget = vocab_size - len(SPM_CONTROL) - 256 - len([t for t in special_tokens if t not in SPM_CONTROL])
    merges = learn_merges(words, budget, cost, on_merge=lambda left, right: chars.update(new_chars(left, right)))
    frequency = Counter()
    for word, count in words.items():
        for ch in word:
            frequency[ch] += count
    pieces = list(dict.fromkeys(left + right for left, right in merges))  # learned order; one id per piece
    pieces += sorted(chars, key=lambda ch: (-frequency[ch], ch))
    vocab = {token: i for i, token in enumerate([*SPM_CONTROL, *(f"<0x{b:02X}>" for b in range(256)), *pieces])}
    all_merges = [(piece[:k], piece[k:]) for piece in pieces if len(piece) > 1
                  for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=all_merges, unk_token="<unk>", fuse_unk=True,
                                          byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=t in PHI3_RSTRIP_TOKENS)
                                for t in special_tokens])
    return Tokenizer(
        backend, bos_token=bos, eos_token=eos, unk_token="<unk>", pad_token=pad, chat_template=chat_template,
        add_bos_token=False,
        config_extras={"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048},
    )


TOKENIZER_BUILDERS = {"byte-level": byte_level_tokenizer, "sentencepiece": sentencepiece_tokenizer}


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    code = ord(char)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def built_from(directory) -> Optional[dict]:
    """{"preset": name, "seed": seed, "tokenizer": version} of a folder build_tiny wrote (None: not one
    of those; folders of phicore versions before TOKENIZER_VERSION 2 have no "tokenizer")."""
    try:
        marker = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def build_tiny(name: str, directory, seed: int = 0) -> Path:
    """Write the tiny preset `name` with weights drawn from `seed` into `directory`: reused when it
    holds exactly that already, else (re)built. The folder is built under a temporary name and
    renamed into place, so it is complete or absent."""
    if name not in TINY_PRESETS:
        raise ValueError(f"unknown tiny preset {name!r} (known: {', '.join(TINY_PRESETS)})")
    directory = Path(directory)
    if built_from(directory) == _marker(name, seed) and (directory / "model.safetensors").exists():
        return directory
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_tiny(name, tmp, seed)
        shutil.rmtree(directory, ignore_errors=True)  # another preset or seed, or an incomplete folder
        os.replace(tmp, directory)
    except OSError:
        if not (directory / "model.safetensors").exists():  # not another process finishing first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def tiny_dir(name: str) -> Path:
    """Where `load_model("tiny-phi-2")` and friends build a tiny preset (seed 0) once:
    $XDG_CACHE_HOME/phicore/tiny/NAME, else ~/.cache/phicore/tiny/NAME."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "phicore" / "tiny" / name


def _marker(name: str, seed: int) -> dict:
    return {"preset": name, "seed": seed, "tokenizer": TOKENIZER_VERSION}


def _write_tiny(name: str, directory: Path, seed: int) -> None:
    spec = dict(TINY_PRESETS[name])
    spec.pop("default_lr")
    tokenizer = TOKENIZER_BUILDERS[spec.pop("tokenizer")](
        spec.pop("special_tokens"), bos=spec.pop("bos"), eos=spec.pop("eos"), pad=spec.pop("pad"),
        chat_template=spec.pop("chat_template"), vocab_size=spec["vocab_size"],
    )
    config = ModelConfig.from_dict({
        **spec,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id if spec["model_type"] == "phi3" else None,
    })
    assert tokenizer.vocab_size <= config.vocab_size
    torch.manual_seed(seed)
    model = PhiForCausalLM(config)
    _init_like_transformers(model)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(directory)
    save_model(model, directory)
    (directory / MARKER).write_text(json.dumps(_marker(name, seed)) + "\n", encoding="utf-8")


@torch.no_grad()
def _init_like_transformers(model: nn.Module, std: float = 0.02):
    """Normal(0, 0.02) weights, zero biases, unit norms: transformers' initialisation."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif hasattr(module, "weight") and module.weight is not None and module.weight.dim() == 1:
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
