"""Offline demo presets: tiny random-weight Phi models with a byte-level tokenizer made in code.

`tiny-phi-2` and `tiny-phi-3` have the real architectures (Phi-2's parallel block and partial
rotary; Phi-3's fused projections, GQA and chat template) at a few hundred thousand
parameters. They know nothing: they exist so the whole pipeline (train, resume, infer,
merge, export) can be tried and tested without downloading anything. Each is written as a
Hugging Face folder (config.json, model.safetensors, tokenizer files), so transformers, PEFT
and phicore's own tools reload it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .config import ModelConfig
from .model import PhiForCausalLM
from .tokenizer import Tokenizer
from .weights import save_model

MARKER = "tiny_preset.json"  # which preset and seed a built folder holds

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

TINY_PRESETS = {
    "tiny-phi-2": dict(
        model_type="phi", vocab_size=320, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, partial_rotary_factor=0.4, max_position_embeddings=2048, hidden_act="gelu_new",
        resid_pdrop=0.1, default_lr=2e-3, special_tokens=["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>",
        pad=None, chat_template=None,
    ),
    "tiny-phi-3": dict(
        model_type="phi3", vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        original_max_position_embeddings=4096, sliding_window=2047, hidden_act="silu", default_lr=2e-3,
        special_tokens=PHI3_SPECIAL_TOKENS, bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>",
        chat_template=PHI3_CHAT_TEMPLATE,
    ),
}


def byte_level_tokenizer(special_tokens, *, bos, eos, pad, chat_template) -> Tokenizer:
    """A tokenizer whose vocabulary is the 256 bytes (GPT-2's byte-to-unicode alphabet, no
    merges) followed by the special tokens: every string round-trips, nothing to download."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as BackendTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    backend = BackendTokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return Tokenizer(
        backend, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=chat_template, add_bos_token=False,
        config_extras={"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048},
    )


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    code = ord(char)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def built_from(directory) -> Optional[dict]:
    """{"preset": name, "seed": seed} of a folder build_tiny wrote (None: not one of those)."""
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
    if built_from(directory) == {"preset": name, "seed": seed} and (directory / "model.safetensors").exists():
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


def _write_tiny(name: str, directory: Path, seed: int) -> None:
    spec = dict(TINY_PRESETS[name])
    spec.pop("default_lr")
    tokenizer = byte_level_tokenizer(
        spec.pop("special_tokens"), bos=spec.pop("bos"), eos=spec.pop("eos"), pad=spec.pop("pad"),
        chat_template=spec.pop("chat_template"),
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
    (directory / MARKER).write_text(json.dumps({"preset": name, "seed": seed}) + "\n", encoding="utf-8")


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
