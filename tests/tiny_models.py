"""Tiny random-weight checkpoints with the real architectures' structure, for parity tests.

Each shape keeps what makes its family different (partial rotary, GQA, tied embeddings,
longrope, sliding window) and shrinks widths and depth so a CPU test runs in a second.
Values not shrunk come from the real configs (shared/docs/reference.md, shared/models/).
Checkpoints are written by transformers' own `save_pretrained`, the oracle's format.
"""

from __future__ import annotations

from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _longrope_factors(n: int, top: float) -> list:
    """n increasing factors from 1.0 to `top`, shaped like Phi-3.5's lists."""
    return [1.0 + (top - 1.0) * (i / max(n - 1, 1)) ** 2 for i in range(n)]


# name -> (transformers config class name, config kwargs)
SHAPES = {
    # Phi-2: parallel block, LayerNorm, biases, partial rotary 0.4 (head_dim 20 -> 8 rotary dims)
    "phi-2": ("PhiConfig", dict(
        vocab_size=512, hidden_size=80, intermediate_size=320, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.4, rope_theta=10000.0,
        layer_norm_eps=1e-5, hidden_act="gelu_new", max_position_embeddings=2048, qk_layernorm=False,
        resid_pdrop=0.1, embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False,
        bos_token_id=50, eos_token_id=50,
    )),
    # Phi-3-mini-4k: sliding window (real 2047) shorter than the test sequence
    "phi-3-mini-4k": ("Phi3Config", dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        original_max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
        sliding_window=7, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )),
    # Phi-3.5-mini: longrope, original length shrunk to 16 so tests cross it (factor 32 as real)
    "phi-3.5-mini": ("Phi3Config", dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        original_max_position_embeddings=16, rope_theta=10000.0, rms_norm_eps=1e-5,
        sliding_window=262144, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_scaling={"type": "longrope", "short_factor": _longrope_factors(8, 2.84),
                      "long_factor": _longrope_factors(8, 64.8)},
    )),
    # Phi-4-mini: partial rotary 0.75, tied embeddings, GQA 24/8 -> 6/2, longrope
    "phi-4-mini": ("Phi3Config", dict(
        vocab_size=512, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, partial_rotary_factor=0.75,
        max_position_embeddings=512, original_max_position_embeddings=16, rope_theta=10000.0,
        rms_norm_eps=1e-5, sliding_window=262144, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_scaling={"type": "longrope", "short_factor": _longrope_factors(6, 3.0),
                      "long_factor": _longrope_factors(6, 40.0)},
    )),
    # Phi-3-medium: GQA 40/10 -> 8/2, sliding window 2047
    "phi-3-medium": ("Phi3Config", dict(
        vocab_size=512, hidden_size=128, intermediate_size=224, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
        original_max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
        sliding_window=2047, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )),
}


def hf_model(shape: str, seed: int = 0, **overrides):
    """A transformers model of a tiny shape, random weights (fp32, eval mode)."""
    import transformers

    class_name, kwargs = SHAPES[shape]
    config = getattr(transformers, class_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model_cls = transformers.PhiForCausalLM if class_name == "PhiConfig" else transformers.Phi3ForCausalLM
    model = model_cls(config).eval()
    with torch.no_grad():  # make every parameter matter: norms and biases are not left at 1/0
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def save_hf_checkpoint(shape: str, directory, seed: int = 0, max_shard_size=None, **overrides):
    """Save a tiny transformers model as a Hugging Face folder; return the model."""
    model = hf_model(shape, seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), **kwargs)
    return model


def phicore_model(shape: str, seed: int = 0, lora: bool = True, **overrides):
    """A phicore model of a SHAPES entry (config `overrides` applied) with random weights, biases
    and norms nudged off their defaults, and, with `lora`, r = 4 adapters whose B is random
    (not PEFT's zeros) so the adapters change the output. For tests comparing two code paths."""
    from phicore.config import ModelConfig
    from phicore.lora import apply_lora, lora_layers
    from phicore.model import PhiForCausalLM

    class_name, kwargs = SHAPES[shape]
    config = ModelConfig.from_dict({"model_type": "phi" if class_name == "PhiConfig" else "phi3",
                                    **kwargs, **overrides})
    torch.manual_seed(seed)
    model = PhiForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    if lora:
        apply_lora(model, r=4, alpha=8, dropout=0.0)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B.weight.normal_(0, 0.1)
    return model


def make_adapter(base: Path, out: Path, *, quantize=None, use_dora=False, use_rslora=False, patterns=False,
                 template=None, seed=0, **lora) -> Path:
    """An adapter folder as train.py writes it (PEFT files, tokenizer, run record) over `base`,
    with random non-zero LoRA B (and DoRA magnitudes) so that it changes the model's output.
    `patterns`: per-layer ranks and alphas; `lora`: apply_lora's other arguments."""
    from phicore.lora import apply_lora, lora_layers
    from phicore.peft_io import save_adapter
    from phicore.record import RunRecord
    from phicore.tokenizer import load_tokenizer
    from phicore.weights import load_model

    torch.manual_seed(seed)
    model = load_model(base, device="cpu", quantize=quantize)
    if patterns:
        lora.update(rank_pattern={"fc1": 2, "gate_up_proj": 2}, alpha_pattern={"dense": 3.0, "o_proj": 3.0})
    apply_lora(model, **{"r": 4, "alpha": 8, "dropout": 0.0, "targets": "all-linear", "use_dora": use_dora,
                         "use_rslora": use_rslora, **lora})
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.05)
            if use_dora:
                layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.rand_like(layer.lora_magnitude_vector))
    save_adapter(model, out, base_model_name_or_path=str(base))
    load_tokenizer(base).save(out)
    quantization = {"type": "nf4", "double_quant": True, "compute_dtype": "float32"} if quantize else None
    RunRecord(base_model=str(base), prompt_template=template, quantization=quantization).write(out)
    return out
