"""phicore's models give transformers' logits: five tiny shapes of the real architectures,
random weights saved by transformers, loaded by phicore.load_model. fp32 on CPU.
Tolerance: max abs logit difference <= 1e-4 over every non-padding position."""

import pytest
import torch

import phicore
from tiny_models import SHAPES, save_hf_checkpoint

transformers = pytest.importorskip("transformers")

TOL = 1e-4


def _batch(vocab, seq_len, seed=1):
    """Two rows; the second left-padded by 3 and the third right-padded by 2 (a 3-row batch)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, seq_len), generator=g)
    mask = torch.ones(3, seq_len, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, -2:] = 0
    return ids, mask


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_match_transformers(shape, tmp_path):
    # one of the five is saved sharded, to load through model.safetensors.index.json
    shard = "20KB" if shape == "phi-3-medium" else None
    hf = save_hf_checkpoint(shape, tmp_path, max_shard_size=shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    model = phicore.load_model(tmp_path, dtype=torch.float32, device="cpu")
    cfg = model.config
    # longer than the sliding window / the shrunk original length, where a shape has them
    for seq_len in (12, 24):
        ids, mask = _batch(cfg.vocab_size, seq_len)
        with torch.no_grad():
            expected = hf(ids, attention_mask=mask).logits
            got = model(ids, attention_mask=mask)
        assert got.shape == expected.shape
        err = (got - expected)[mask.bool()].abs().max().item()
        print(f"{shape} seq {seq_len}: max abs logit error {err:.2e}")
        assert err <= TOL, f"{shape} seq {seq_len}: {err}"


def test_test_shapes_exercise_their_features(tmp_path):
    """Guard against the tiny shapes silently losing what they are meant to test."""
    from phicore.config import ModelConfig

    cfgs = {}
    for name, (_, kwargs) in SHAPES.items():
        model_type = "phi" if name == "phi-2" else "phi3"
        cfgs[name] = ModelConfig.from_dict({"model_type": model_type, **kwargs})
    assert cfgs["phi-2"].rotary_dim < cfgs["phi-2"].head_dim
    assert cfgs["phi-3-mini-4k"].sliding_window < 24
    assert cfgs["phi-3.5-mini"].rope_type == "longrope" and cfgs["phi-3.5-mini"].original_max_position_embeddings < 24
    assert cfgs["phi-4-mini"].tie_word_embeddings and cfgs["phi-4-mini"].kv_groups == 3
    assert cfgs["phi-4-mini"].rotary_dim == int(cfgs["phi-4-mini"].head_dim * 0.75)
    assert cfgs["phi-3-medium"].kv_groups == 4


def test_phi2_qk_layernorm_matches(tmp_path):
    hf = save_hf_checkpoint("phi-2", tmp_path, qk_layernorm=True)
    model = phicore.load_model(tmp_path, dtype=torch.float32, device="cpu")
    ids, mask = _batch(model.config.vocab_size, 10)
    with torch.no_grad():
        err = (model(ids, attention_mask=mask) - hf(ids, attention_mask=mask).logits)[mask.bool()].abs().max()
    assert err <= TOL


def test_training_mode_dropout_and_eval_determinism(tmp_path):
    """Phi-2 applies resid dropout (0.1) in training; eval is deterministic."""
    save_hf_checkpoint("phi-2", tmp_path)
    model = phicore.load_model(tmp_path, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        a, b = model(ids), model(ids)
        assert torch.equal(a, b)
        model.train()
        torch.manual_seed(0)
        c = model(ids)
    assert not torch.allclose(a, c)


def test_phi2_fp16_attention_does_not_overflow(tmp_path):
    """Scaled-up q/k make QK^T exceed fp16's 65504 (a naive fp16 matmul gives inf); phicore
    attends in fp32 for Phi-2, so fp16 logits stay finite and close to the fp32 model's."""
    save_hf_checkpoint("phi-2", tmp_path)
    ids = torch.randint(0, 512, (1, 16))
    logits = {}
    for dtype in (torch.float32, torch.float16):
        model = phicore.load_model(tmp_path, dtype=dtype, device="cpu")
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(400)
                layer.self_attn.k_proj.weight.mul_(400)
            logits[dtype] = model(ids).float()
            if dtype == torch.float16:
                layer = model.model.layers[0]
                x = layer.input_layernorm(model.model.embed_tokens(ids))
                naive = layer.self_attn.q_proj(x) @ layer.self_attn.k_proj(x).transpose(-1, -2)
                assert not torch.isfinite(naive).all(), "the test must provoke an fp16 overflow"
    assert torch.isfinite(logits[torch.float16]).all()
    rel = (logits[torch.float16] - logits[torch.float32]).abs().max() / logits[torch.float32].abs().max()
    assert rel < 2e-2


def test_gradient_checkpointing_gives_same_gradients(tmp_path):
    save_hf_checkpoint("phi-3-medium", tmp_path)
    model = phicore.load_model(tmp_path, dtype=torch.float32, device="cpu").train()
    ids = torch.randint(0, 512, (2, 10))
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        model(ids).float().logsumexp(-1).mean().backward()
        grads.append(model.model.layers[0].self_attn.qkv_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
