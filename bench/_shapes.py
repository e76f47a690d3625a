"""Model shapes the benchmarks run, as Hugging Face config.json dicts (legacy form).

The real shapes are written out here (from shared/docs/reference.md and the hub configs) so the
benchmark needs no download and no file outside the repository: weights are random, made on
the device. `tiny` and `small` are CPU-sized Phi-3-layout models (fused qkv_proj, gated MLP,
RMSNorm, sliding window), `small-phi-2` the Phi-2 layout (parallel block, LayerNorm, biases,
partial rotary) at the same size.

Phi-3.5-mini's longrope factor lists are stand-ins with the real length (48) and end points:
below 4096 positions only the short list is read, and its values change no timing.
"""

from __future__ import annotations

_PHI3_COMMON = dict(
    model_type="phi3", architectures=["Phi3ForCausalLM"], hidden_act="silu", rms_norm_eps=1e-5,
    rope_theta=10000.0, partial_rotary_factor=1.0, tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0,
    attention_dropout=0.0, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
)
_PHI2_COMMON = dict(
    model_type="phi", architectures=["PhiForCausalLM"], hidden_act="gelu_new", layer_norm_eps=1e-5,
    rope_theta=10000.0, partial_rotary_factor=0.4, qk_layernorm=False, tie_word_embeddings=False,
    resid_pdrop=0.1, embd_pdrop=0.0, attention_dropout=0.0, bos_token_id=50256, eos_token_id=50256,
)


def _ramp(n: int, first: float, last: float) -> list:
    """n increasing values from `first` to `last` (stand-in longrope factors)."""
    return [round(first + (last - first) * (i / (n - 1)) ** 2, 4) for i in range(n)]


# name -> (config.json dict, default seq_len, default batch_size)
SHAPES = {
    "tiny": (dict(
        _PHI3_COMMON, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        original_max_position_embeddings=4096, sliding_window=2047, eos_token_id=2, pad_token_id=0,
    ), 64, 2),
    # CPU-sized (a step of 512 tokens is about a second on two busy cores)
    "small": (dict(
        _PHI3_COMMON, vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        original_max_position_embeddings=4096, sliding_window=2047, eos_token_id=2, pad_token_id=0,
    ), 256, 2),
    # head_dim 80 as the real Phi-2, so rotary covers 32 of 80 dims
    "small-phi-2": (dict(
        _PHI2_COMMON, vocab_size=4096, hidden_size=320, intermediate_size=1280, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
        bos_token_id=2, eos_token_id=2,
    ), 256, 2),
    # microsoft/phi-2: 2.78e9 parameters
    "phi-2": (dict(
        _PHI2_COMMON, vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
    ), 2048, 1),
    # microsoft/Phi-3-mini-4k-instruct: 3.82e9 parameters
    "phi-3-mini-4k": (dict(
        _PHI3_COMMON, vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        original_max_position_embeddings=4096, sliding_window=2047,
    ), 2048, 1),
    # microsoft/Phi-3.5-mini-instruct: as mini-4k, with longrope to 128k and no effective window
    "phi-3.5-mini": (dict(
        _PHI3_COMMON, vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
        original_max_position_embeddings=4096, sliding_window=262144,
        rope_scaling={"type": "longrope", "short_factor": _ramp(48, 1.0, 2.84),
                      "long_factor": _ramp(48, 1.08, 64.84)},
    ), 2048, 1),
    # microsoft/Phi-4-mini-instruct: 3.84e9 parameters; GQA 24/8 heads of 128, partial rotary 0.75,
    # tied embeddings, a 200k vocabulary (stand-in longrope factors, 48 = rotary dims / 2)
    "phi-4-mini": (dict(
        _PHI3_COMMON, vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, partial_rotary_factor=0.75,
        tie_word_embeddings=True, max_position_embeddings=131072, original_max_position_embeddings=4096,
        sliding_window=262144, bos_token_id=199999, eos_token_id=199999, pad_token_id=199999,
        rope_scaling={"type": "longrope", "short_factor": _ramp(48, 1.0, 2.84),
                      "long_factor": _ramp(48, 1.08, 64.84)},
    ), 2048, 1),
    # microsoft/phi-4: 14.7e9 parameters; GQA 40/10 heads of 128, rope theta 250000, no window
    "phi-4": (dict(
        _PHI3_COMMON, vocab_size=100352, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=10, max_position_embeddings=16384, rope_theta=250000.0,
        sliding_window=None, bos_token_id=100257, eos_token_id=100265, pad_token_id=100349,
    ), 2048, 1),
}


def shape_config(name: str) -> dict:
    """A fresh copy of the shape's config.json dict."""
    if name not in SHAPES:
        raise KeyError(f"unknown shape {name!r} (known: {', '.join(SHAPES)})")
    return dict(SHAPES[name][0])


def _dims(config: dict) -> tuple:
    """(D, I, L, V, H, KV, d): hidden, intermediate, layers, vocab, heads, kv heads, head dim."""
    D, H = config["hidden_size"], config["num_attention_heads"]
    return (D, config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"], H,
            config["num_key_value_heads"], config.get("head_dim") or D // H)


def parameter_count(config: dict) -> int:
    """Parameters of the dense model described by `config` (embeddings and lm_head included)."""
    D, I, L, V, H, KV, d = _dims(config)
    if config["model_type"] == "phi3":
        per_layer = D * (H + 2 * KV) * d + H * d * D + D * 2 * I + I * D + 2 * D
        head = V * D + D
    else:  # biases on every projection, LayerNorm weight + bias
        per_layer = (D + 1) * (H + 2 * KV) * d + (H * d + 1) * D + (D + 1) * I + (I + 1) * D + 2 * D
        head = V * D + V + 2 * D
    return V * D + L * per_layer + head


def matmul_parameter_count(config: dict) -> int:
    """Weights that take part in a matrix product per token: every projection of every layer and
    the lm_head (embeddings are a lookup; norms and biases are elementwise)."""
    D, I, L, V, H, KV, d = _dims(config)
    mlp_in = 2 * I if config["model_type"] == "phi3" else I  # Phi-3's gate_up_proj is one (2I, D) matrix
    per_layer = D * (H + 2 * KV) * d + H * d * D + D * mlp_in + I * D
    return L * per_layer + V * D


def training_flops_per_token(config: dict, seq_len: int) -> dict:
    """Model FLOPs per trained token for LoRA/QLoRA (frozen base: no weight gradients).

    "linear" is the MFU numerator asked for by issue 7: forward 2N + backward-input 2N with
    N = matmul_parameter_count (LoRA's own products, ~1 % at r = 16, and the recomputation under
    gradient checkpointing are not counted: model FLOPs, not hardware FLOPs).
    "attention" is reported beside it: causal scores and weighted sums, on average (T + 1) / 2
    keys per query, 2 x 2 x keys x H x d FLOPs forward per layer, and twice that backward
    (dQ, dK, dV and dP are all input gradients).
    """
    _, _, L, _, H, _, d = _dims(config)
    N = matmul_parameter_count(config)
    mean_keys = (seq_len + 1) / 2
    attention_forward = 4 * mean_keys * H * d * L
    return {"matmul_params": N, "linear": 4 * N, "attention": 3 * attention_forward}


def planned_training(settings: dict, quantize):
    """The memory planner's plan (phicore.memory_plan.plan_training) for a bench/throughput.py
    run's settings on a GPU (bf16 weights and activations): its model_config, batch, length, LoRA
    and checkpointing; `quantize` "nf4" for the QLoRA engines, else None."""
    from phicore.config import ModelConfig
    from phicore.memory_plan import TrainingShape, plan_training

    shape = TrainingShape(batch_size=settings["batch_size"], seq_len=settings["seq_len"], weight_bytes=2,
                          activation_bytes=2, quantize=quantize, lora_r=settings["lora"]["r"],
                          lora_dropout=settings["lora"]["dropout"], grad_checkpointing=settings["grad_checkpointing"])
    return plan_training(ModelConfig.from_dict(settings["model_config"]), shape)
