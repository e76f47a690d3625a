"""phicore.lora against peft 0.21: adapters made by either load in the other with the same logits.

Tiny random-weight Phi-2 / Phi-3 models (tests/tiny_models.py), fp32 on CPU, eval mode unless a
test says otherwise (the training step, the bf16 base).
Tolerance: max abs logit difference <= 1e-5 (PARITY_TOL); merge identities to 1e-5 / 1e-6.
lora_B starts at zero, so every test randomises it (and DoRA's magnitude) before comparing,
and checks that the adapter really moves the logits (so a no-op adapter cannot pass).
"""

import copy
import importlib.util
import json
import re

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from phicore.frozen_linear import NF4Linear, quantize_model_linears
from phicore.lora import (
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    disable_adapter,
    lora_layers,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)
from phicore.peft_io import load_adapter, lora_config, save_adapter
from tiny_models import hf_model, save_hf_checkpoint

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

PARITY_TOL = 1e-5
SHAPES = {"phi-2": "phi-2", "phi-3": "phi-3-mini-4k"}
TARGETS = {
    "phi-2": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi-3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
DORA_TARGETS = {"phi-2": ["q_proj", "v_proj", "fc2"], "phi-3": ["qkv_proj", "down_proj"]}  # fc2: DoRA with a bias
REGEX_TARGETS = {"phi-2": r".*\.(q_proj|fc2)", "phi-3": r"model\.layers\.1\..*_proj"}  # PEFT: a str is a regex
PATTERNS = {  # rank_pattern, alpha_pattern
    "phi-2": ({"fc1": 2}, {"dense": 3}),
    "phi-3": ({"gate_up_proj": 2}, {"o_proj": 3}),
}
# variant -> settings (targets resolved per shape)
VARIANTS = {
    "targets": dict(targets="list", use_rslora=False, use_dora=False),
    "rslora-all-linear": dict(targets="all-linear", use_rslora=True, use_dora=False),
    "dora": dict(targets="dora", use_rslora=False, use_dora=True),
    "dora-all-linear": dict(targets="all-linear", use_rslora=False, use_dora=True),
    "patterns": dict(targets="list", use_rslora=False, use_dora=False, patterns=True),
    "regex": dict(targets="regex", use_rslora=False, use_dora=False),
}
R, ALPHA, DROPOUT = 4, 8, 0.05


def _settings(shape, variant):
    v = VARIANTS[variant]
    targets = {"list": TARGETS[shape], "dora": DORA_TARGETS[shape], "all-linear": "all-linear",
               "regex": REGEX_TARGETS[shape]}[v["targets"]]
    rank_pattern, alpha_pattern = PATTERNS[shape] if v.get("patterns") else ({}, {})
    return dict(targets=targets, use_rslora=v["use_rslora"], use_dora=v["use_dora"],
                rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def _ids(model, seed=1, batch=2, seq=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)


@torch.no_grad()
def _logits(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def _randomise_adapters(model, seed=0):
    """B ~ N(0, 0.1^2) (PEFT inits it to 0) and DoRA magnitudes scaled by 1 + N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if "lora_B" in name:
            param.copy_(torch.randn(param.shape, generator=g) * 0.1)
        elif "lora_magnitude_vector" in name:
            param.mul_(1 + 0.1 * torch.randn(param.shape, generator=g))


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _peft_config(settings):
    return peft.LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=settings["targets"],
        use_rslora=settings["use_rslora"], use_dora=settings["use_dora"],
        rank_pattern=settings["rank_pattern"], alpha_pattern=settings["alpha_pattern"], task_type="CAUSAL_LM",
    )


def _apply_phicore(model, settings, **kwargs):
    targets = settings["targets"]
    if isinstance(targets, str) and targets != "all-linear":
        targets = re.compile(targets)  # phicore's API: a plain string is a comma-separated name list
    return apply_lora(model, r=R, alpha=ALPHA, dropout=DROPOUT, targets=targets,
                      use_rslora=settings["use_rslora"], use_dora=settings["use_dora"],
                      rank_pattern=settings["rank_pattern"], alpha_pattern=settings["alpha_pattern"], **kwargs)


# ----------------------------------------------------------------------------- PEFT parity
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_peft_adapter_loads_into_phicore(shape, variant, tmp_path):
    settings = _settings(shape, variant)
    hf = hf_model(SHAPES[shape])
    fresh = copy.deepcopy(hf)
    ids = _ids(hf)
    base = _logits(hf, ids)

    peft_model = peft.get_peft_model(hf, _peft_config(settings))
    _randomise_adapters(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path))
    expected = _logits(peft_model, ids)

    load_adapter(fresh, tmp_path)
    fresh.eval()
    got = _logits(fresh, ids)
    err = _max_diff(got, expected)
    print(f"PEFT -> phicore {shape} {variant}: max abs logit diff {err:.2e}")
    assert _max_diff(expected, base) > 1e-3, "adapter has no effect: the test would prove nothing"
    assert err <= PARITY_TOL
    n_peft = sum(1 for _, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert len(list(lora_layers(fresh))) == n_peft


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_phicore_adapter_loads_into_peft(shape, variant, tmp_path):
    settings = _settings(shape, variant)
    hf = hf_model(SHAPES[shape])
    fresh = copy.deepcopy(hf)
    ids = _ids(hf)
    base = _logits(hf, ids)

    _apply_phicore(hf, settings)
    _randomise_adapters(hf)
    save_adapter(hf, tmp_path)
    expected = _logits(hf, ids)

    peft_model = peft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    got = _logits(peft_model, ids)
    err = _max_diff(got, expected)
    print(f"phicore -> PEFT {shape} {variant}: max abs logit diff {err:.2e}")
    assert _max_diff(expected, base) > 1e-3, "adapter has no effect: the test would prove nothing"
    assert err <= PARITY_TOL
    # the file holds exactly the tensors PEFT itself would write for this adapter
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        ours = set(f.keys())
    assert ours == set(peft.get_peft_model_state_dict(peft_model))


def _peft_to_phicore_name(name):
    """base_model.model.X.lora_A.default.weight -> X.lora_A.weight (DoRA: X.lora_magnitude_vector)."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector").replace(".default.", ".")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_training_step_matches_peft(use_dora, tmp_path):
    """Train mode, dropout on (adapter 0.1, Phi-2's residual 0.1), same seed: the same logits and
    the same adapter gradients as PEFT (DoRA's detached norm included)."""
    settings = dict(targets=TARGETS["phi-2"], use_rslora=False, use_dora=use_dora, rank_pattern={}, alpha_pattern={})
    hf = hf_model("phi-2")
    fresh = copy.deepcopy(hf)
    config = _peft_config(settings)
    config.lora_dropout = 0.1
    peft_model = peft.get_peft_model(hf, config)
    _randomise_adapters(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    load_adapter(fresh, tmp_path, trainable=True)
    ids = _ids(hf)
    results = []
    for model in (peft_model, fresh):
        model.train()
        torch.manual_seed(5)
        out = model(ids)
        logits = out.logits if hasattr(out, "logits") else out
        logits.square().mean().backward()
        grads = {_peft_to_phicore_name(n): p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((logits.detach(), grads))
    (expected, peft_grads), (got, grads) = results
    print(f"train step {'dora' if use_dora else 'lora'}: max abs logit diff {_max_diff(got, expected):.2e}, "
          f"max abs grad diff {max(_max_diff(grads[k], g) for k, g in peft_grads.items()):.2e}")
    assert _max_diff(got, expected) <= PARITY_TOL
    assert set(grads) == set(peft_grads) == set(adapter_state_dict(fresh))
    for name, grad in peft_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_bf16_base_fp32_adapter_matches_peft(use_dora, tmp_path):
    """A bf16 base under fp32 adapters (PEFT's default autocast): the mixed-dtype path agrees."""
    settings = dict(targets="all-linear", use_rslora=False, use_dora=use_dora, rank_pattern={}, alpha_pattern={})
    hf = hf_model("phi-3-mini-4k").to(torch.bfloat16)
    fresh = copy.deepcopy(hf)
    peft_model = peft.get_peft_model(hf, _peft_config(settings))
    _randomise_adapters(peft_model)
    peft_model.eval().save_pretrained(str(tmp_path))
    load_adapter(fresh, tmp_path)
    assert fresh.model.layers[0].self_attn.qkv_proj.lora_A.weight.dtype == torch.float32
    assert peft_model.base_model.model.model.layers[0].self_attn.qkv_proj.lora_A["default"].weight.dtype \
        == torch.float32
    ids = _ids(hf)
    expected, got = _logits(peft_model, ids), _logits(fresh.eval(), ids)
    assert got.dtype == expected.dtype == torch.bfloat16
    err = _max_diff(got.float(), expected.float())
    print(f"bf16 base {'dora' if use_dora else 'lora'}: max abs logit diff {err:.2e}")
    assert err <= PARITY_TOL


def test_adapter_config_has_peft_fields(tmp_path):
    hf = hf_model("phi-3-mini-4k")
    apply_lora(hf, r=4, alpha=8, targets="qkv_proj, o_proj", use_dora=True)
    save_adapter(hf, tmp_path, base_model_name_or_path="microsoft/Phi-3-mini-4k-instruct")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config) == set(peft.LoraConfig().to_dict())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == ["o_proj", "qkv_proj"]
    assert (config["r"], config["lora_alpha"], config["use_dora"], config["use_rslora"]) == (4, 8, True, False)
    assert config["base_model_name_or_path"] == "microsoft/Phi-3-mini-4k-instruct"
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"
    # PEFT reads it back as the same settings
    loaded = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert (loaded.r, loaded.lora_alpha, loaded.use_dora) == (4, 8, True)
    assert set(loaded.target_modules) == {"o_proj", "qkv_proj"}


def test_all_linear_saves_short_names(tmp_path):
    hf = hf_model("phi-2")
    apply_lora(hf, r=2, alpha=4)
    save_adapter(hf, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(TARGETS["phi-2"])


def test_config_is_read_off_the_layers(tmp_path):
    """No config is kept beside the model: save_adapter reads it off the LoRA layers. Ranks and
    alphas other than the most common go to rank_pattern / alpha_pattern, keyed by the short name
    when every layer of that name agrees, else by the escaped full path; PEFT reads them back."""
    hf = hf_model("phi-3-mini-4k")
    fresh = copy.deepcopy(hf)
    apply_lora(hf, r=4, alpha=8, dropout=0.1, rank_pattern={r"layers\.1\.self_attn\.qkv_proj": 2},
               alpha_pattern={"o_proj": 3})
    assert not hasattr(hf, "lora_config")
    _randomise_adapters(hf)
    save_adapter(hf, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert config["rank_pattern"] == {re.escape("model.layers.1.self_attn.qkv_proj"): 2}
    assert config["alpha_pattern"] == {"o_proj": 3}
    assert config["target_modules"] == sorted(TARGETS["phi-3"])
    peft_model = peft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    layers = peft_model.base_model.model.model.layers
    assert (layers[0].self_attn.qkv_proj.r["default"], layers[1].self_attn.qkv_proj.r["default"]) == (4, 2)
    assert layers[0].self_attn.o_proj.lora_alpha["default"] == 3
    ids = _ids(hf)
    assert _max_diff(_logits(peft_model, ids), _logits(hf.eval(), ids)) <= PARITY_TOL
    # short names that would also select other layers are saved as full paths
    regex = apply_lora(hf_model("phi-3-mini-4k"), r=4, alpha=8, targets=re.compile(r"model\.layers\.1\..*_proj"))
    assert lora_config(regex)["target_modules"] == sorted(path for path, _ in lora_layers(regex))
    assert all(path.startswith("model.layers.1.") for path in lora_config(regex)["target_modules"])


def test_keys_with_adapter_name_load(tmp_path):
    """PEFT's in-memory keys (`.lora_A.default.weight`, `.lora_magnitude_vector.default.weight`) load too."""
    hf = hf_model("phi-3-mini-4k")
    fresh = copy.deepcopy(hf)
    apply_lora(hf, r=4, alpha=8, targets=["qkv_proj"], use_dora=True)
    _randomise_adapters(hf)
    save_adapter(hf, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    renamed = {}
    for key, value in tensors.items():
        if key.endswith("lora_magnitude_vector"):
            renamed[key + ".default.weight"] = value
        else:
            renamed[key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")] = value
    save_file(renamed, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    load_adapter(fresh, tmp_path)
    ids = _ids(hf)
    assert _max_diff(_logits(fresh, ids), _logits(hf, ids)) <= PARITY_TOL


# ----------------------------------------------------------------------------- phicore's own model
_HAVE_LOAD_MODEL = importlib.util.find_spec("phicore.weights") is not None


@pytest.mark.skipif(not _HAVE_LOAD_MODEL, reason="phicore.load_model is not written yet")
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_phicore_model_with_peft_adapter(shape, use_dora, tmp_path):
    import phicore

    settings = dict(targets="all-linear", use_rslora=False, use_dora=use_dora, rank_pattern={}, alpha_pattern={})
    hf = save_hf_checkpoint(SHAPES[shape], tmp_path / "base")
    peft_model = peft.get_peft_model(hf, _peft_config(settings))
    _randomise_adapters(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    ids = _ids(hf)
    expected = _logits(peft_model, ids)

    model = phicore.load_model(tmp_path / "base", dtype=torch.float32, device="cpu")
    load_adapter(model, tmp_path / "adapter")
    err = _max_diff(_logits(model, ids), expected)
    print(f"PEFT -> phicore.load_model {shape} {'dora' if use_dora else 'lora'}: max abs logit diff {err:.2e}")
    assert err <= PARITY_TOL

    # and back: phicore's own save, read by PEFT onto a fresh transformers model
    save_adapter(model, tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == str(tmp_path / "base")
    fresh = hf_model(SHAPES[shape])
    again = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "resaved")).eval()
    assert _max_diff(_logits(again, ids), expected) <= PARITY_TOL


# ----------------------------------------------------------------------------- the layer
def _lora_linear(in_f=16, out_f=24, bias=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(in_f, out_f, bias=bias), **{"r": 4, "alpha": 8, **kwargs})
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.1)
        if layer.use_dora:
            layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(out_f))
    return layer.eval()


def test_conversion_keeps_base_parameters():
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    weight, bias = base.weight, base.bias
    layer = LoRALinear(base, r=4, alpha=8)
    assert type(layer) is LoRALinear and layer.in_features == 16 and layer.out_features == 24
    assert layer.weight is weight and layer.bias is bias  # the base's very Parameters: not re-allocated
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}
    assert layer.lora_A.weight.shape == (4, 16) and layer.lora_B.weight.shape == (24, 4)
    assert torch.count_nonzero(layer.lora_B.weight) == 0  # PEFT init: B = 0, A kaiming-uniform
    assert layer.lora_A.weight.abs().max() <= 1 / 16**0.5 + 1e-7
    assert not weight.requires_grad and layer.lora_A.weight.requires_grad
    with pytest.raises(TypeError, match="already carries"):
        LoRALinear(layer, r=4, alpha=8)
    with pytest.raises(TypeError, match="not a linear layer"):
        LoRALinear(nn.LayerNorm(16), r=4, alpha=8)
    unbiased = LoRALinear(nn.Linear(16, 24, bias=False), r=4, alpha=8)
    assert set(unbiased.state_dict()) == set(layer.state_dict()) - {"bias"} and unbiased.scaling == 2


def test_forward_and_gradients_match_formula():
    """The in-place fused path gives the formula's output and gradients."""
    layer = _lora_linear(use_rslora=True)
    A, B, W, b = (t.detach().clone().requires_grad_() for t in
                  (layer.lora_A.weight, layer.lora_B.weight, layer.weight, layer.bias))
    x = torch.randn(2, 5, 16)
    assert layer.scaling == 8 / 4**0.5
    y = layer(x)
    ref = x @ W.T + b + (x @ A.T @ B.T) * layer.scaling
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=0)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(layer.lora_A.weight.grad, A.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_B.weight.grad, B.grad, atol=1e-5, rtol=1e-5)
    assert layer.weight.grad is None


def test_merge_identities():
    layer = _lora_linear()
    x = torch.randn(3, 16)
    W0 = layer.weight.detach().clone()
    unmerged = layer(x)
    expected = W0 + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    layer.merge()
    torch.testing.assert_close(layer.weight.detach(), expected, atol=1e-6, rtol=0)
    once = layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.weight, once)  # merging twice changes nothing
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.weight.detach(), W0, atol=1e-6, rtol=0)
    layer.unmerge()  # no-op
    torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=0)


def test_dora_merge_identities():
    layer = _lora_linear(use_dora=True)
    x = torch.randn(3, 16)
    W0 = layer.weight.detach().clone()
    unmerged = layer(x)
    delta = layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    expected = (layer.lora_magnitude_vector / (W0 + delta).norm(dim=1)).view(-1, 1) * (W0 + delta)
    layer.merge()
    torch.testing.assert_close(layer.weight.detach(), expected.detach(), atol=1e-6, rtol=0)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.weight.detach(), W0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_model_merge_and_unload(use_dora):
    hf = hf_model("phi-2")
    base_keys = set(hf.state_dict())
    apply_lora(hf, r=4, alpha=8, use_dora=use_dora)
    _randomise_adapters(hf)
    ids = _ids(hf)
    unmerged = _logits(hf, ids)
    merge_lora(hf)
    assert all(layer.merged for _, layer in lora_layers(hf))
    merged = _logits(hf, ids)
    kind = "dora" if use_dora else "lora"
    print(f"merged vs unmerged ({kind}): max abs logit diff {_max_diff(merged, unmerged):.2e}")
    assert _max_diff(merged, unmerged) <= PARITY_TOL
    unmerge_lora(hf)
    assert _max_diff(_logits(hf, ids), unmerged) <= PARITY_TOL
    merge_and_unload(hf)
    assert not list(lora_layers(hf)) and set(hf.state_dict()) == base_keys
    assert type(hf.model.layers[0].self_attn.q_proj) is nn.Linear
    assert _max_diff(_logits(hf, ids), unmerged) <= PARITY_TOL


# ----------------------------------------------------------------------------- model level
def test_only_adapter_trains_and_lm_head_never_targeted():
    hf = hf_model("phi-3-mini-4k")
    apply_lora(hf, r=4, alpha=8, use_dora=True)
    trainable = {n for n, p in hf.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert {n for n in adapter_state_dict(hf)} == trainable
    assert not isinstance(hf.lm_head, LoRALinear)
    assert lora_config(hf)["target_modules"] == sorted(TARGETS["phi-3"])
    for targets in ("lm_head", ["qkv_proj", "lm_head"]):
        with pytest.raises(ValueError, match="never"):
            apply_lora(hf_model("phi-3-mini-4k"), targets=targets)


def test_disable_adapter_gives_base_logits():
    hf = hf_model("phi-2")
    ids = _ids(hf)
    base = _logits(hf, ids)
    apply_lora(hf, r=4, alpha=8)
    _randomise_adapters(hf)
    adapted = _logits(hf, ids)
    assert _max_diff(adapted, base) > 1e-3
    with disable_adapter(hf):
        assert torch.equal(_logits(hf, ids), base)
    assert torch.equal(_logits(hf, ids), adapted)
    merge_lora(hf)
    with disable_adapter(hf):  # unmerges for the block
        assert _max_diff(_logits(hf, ids), base) <= PARITY_TOL
    assert all(layer.merged for _, layer in lora_layers(hf))
    assert _max_diff(_logits(hf, ids), adapted) <= PARITY_TOL


def test_load_adapter_trainable_flag(tmp_path):
    hf = hf_model("phi-2")
    apply_lora(hf, r=4, alpha=8, targets="q_proj,v_proj")
    save_adapter(hf, tmp_path)
    frozen = load_adapter(hf_model("phi-2"), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = load_adapter(hf_model("phi-2"), tmp_path, trainable=True, dtype=torch.float64)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names == set(adapter_state_dict(trainable)) and len(names) == 2 * 2 * 2
    assert trainable.model.layers[0].self_attn.q_proj.lora_A.weight.dtype == torch.float64


# ----------------------------------------------------------------------------- errors
def test_bad_target_name():
    with pytest.raises(ValueError, match=r"'q_prj' matches no module; linear layers in this model: .*q_proj"):
        apply_lora(hf_model("phi-2"), targets="q_prj,v_proj")
    with pytest.raises(ValueError, match="not a linear layer"):
        apply_lora(hf_model("phi-2"), targets=["input_layernorm"])


def test_bad_folder(tmp_path):
    model = hf_model("phi-2")
    with pytest.raises(FileNotFoundError, match="adapter_config.json: not found"):
        load_adapter(model, tmp_path / "nowhere")
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["fc1"]}))
    with pytest.raises(ValueError, match="peft_type is 'IA3'; only 'LORA'"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["fc1"]}))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors: not found"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="adapter_model.safetensors: not a valid safetensors file"):
        load_adapter(model, tmp_path)
    assert not list(lora_layers(model))  # failed loads leave the model untouched


def test_target_absent_and_shape_mismatch(tmp_path):
    phi2 = hf_model("phi-2")
    apply_lora(phi2, r=4, alpha=8, targets="q_proj,fc1")
    save_adapter(phi2, tmp_path)
    with pytest.raises(ValueError, match="'fc1' matches no module"):
        load_adapter(hf_model("phi-3-mini-4k"), tmp_path)
    narrow = hf_model("phi-2", hidden_size=40)  # same names, other widths
    with pytest.raises(ValueError, match=r"base_model\.model\.model\.layers\.0\.mlp\.fc1\.lora_A\.weight has shape "
                                         r"\[4, 80\] in the file but the model needs \[4, 40\]"):
        load_adapter(narrow, tmp_path)
    assert not list(lora_layers(narrow))


# ----------------------------------------------------------------------------- base keys, quantised bases
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_state_dict_is_base_keys_plus_adapter_keys(nf4, use_dora):
    """A LoRA model's state dict is the base model's keys (bitsandbytes' for an NF4 base) plus
    the adapter's; the base Parameters are the very same objects; a base checkpoint loads into
    the LoRA model as it is, with no key remapping."""
    def base(seed):
        model = hf_model("phi-2", seed)
        if nf4:
            quantize_model_linears(model)
        return model.eval()

    model = base(0)
    base_keys = set(model.state_dict())
    params = dict(model.named_parameters())
    apply_lora(model, r=4, alpha=8, use_dora=use_dora)
    adapter_keys = set(adapter_state_dict(model))
    assert adapter_keys and base_keys.isdisjoint(adapter_keys)
    assert set(model.state_dict()) == base_keys | adapter_keys
    assert all(p is params[n] for n, p in model.named_parameters() if n not in adapter_keys)
    if nf4:
        layer = model.model.layers[0].mlp.fc1
        assert layer.is_nf4 and layer.weight.dtype == torch.uint8  # still packed
        assert "model.layers.0.mlp.fc1.weight.absmax" in base_keys

    other = base(1).state_dict()  # another base checkpoint, loaded unchanged
    result = model.load_state_dict(other, strict=False)
    assert set(result.missing_keys) == adapter_keys and not result.unexpected_keys
    state = model.state_dict()
    assert all(torch.equal(state[k], other[k]) for k in other)
    _randomise_adapters(model)
    ids = _ids(model)
    with disable_adapter(model):  # the loaded base computes the other model's logits
        assert torch.equal(_logits(model, ids), _logits(base(1), ids))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_one_state_dict_loads_into_lora_and_qlora(use_dora):
    """QLoRA against LoRA by loading one state dict into both: a LoRA model's full state dict
    (dense base + adapter) loads strictly into a QLoRA model, whose NF4 layers quantise the dense
    weights as they arrive (the bytes NF4Linear.from_linear makes), and computes what a LoRA model
    holding the dequantised weights computes."""
    source = hf_model("phi-3-mini-4k")
    apply_lora(source, r=4, alpha=8, use_dora=use_dora)
    _randomise_adapters(source)
    state = source.state_dict()

    qlora = hf_model("phi-3-mini-4k", seed=1)  # other weights: the load must replace them all
    quantize_model_linears(qlora)
    apply_lora(qlora.eval(), r=4, alpha=8, use_dora=use_dora)
    assert not qlora.load_state_dict(state).missing_keys  # strict: no key is remapped or missing
    dense = hf_model("phi-3-mini-4k", seed=1)
    apply_lora(dense.eval(), r=4, alpha=8, use_dora=use_dora)
    dense.load_state_dict(state)
    with torch.no_grad():
        for path, layer in lora_layers(qlora):
            weight = source.get_submodule(path).weight
            assert layer.is_nf4 and torch.equal(layer.weight, NF4Linear.from_linear(_linear_holding(weight)).weight)
            dense.get_submodule(path).weight.copy_(layer.dense_weight())
    ids = _ids(source)
    assert _max_diff(_logits(source, ids), _logits(dense, ids)) > 1e-4  # NF4 rounding shows
    assert _max_diff(_logits(qlora, ids), _logits(dense, ids)) <= PARITY_TOL


def _linear_holding(weight):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight.detach().clone())
    return linear


def _quantised_vs_dense(make_quantised, use_dora, shape="phi-3-mini-4k"):
    """QLoRA against LoRA: one adapter state dict loaded into a quantised base and into a dense
    model holding the dequantised weights gives the same logits; a training step works."""
    hf = hf_model(shape)
    quantised = copy.deepcopy(hf)
    make_quantised(quantised)
    quantised.eval()  # new layers start in train mode
    dense = copy.deepcopy(hf)
    with torch.no_grad():
        for (name, q), (_, d) in zip(quantised.named_modules(), dense.named_modules()):
            if hasattr(q, "dequantize") and isinstance(d, nn.Linear):
                d.weight.copy_(q.dequantize())
    apply_lora(quantised, r=4, alpha=8, use_dora=use_dora)
    apply_lora(dense, r=4, alpha=8, use_dora=use_dora)
    _randomise_adapters(dense)
    state = adapter_state_dict(dense)
    assert set(state) == set(adapter_state_dict(quantised))
    with torch.no_grad():
        for key, tensor in adapter_state_dict(quantised).items():
            tensor.copy_(state[key])
    ids = _ids(hf)
    assert _max_diff(_logits(quantised, ids), _logits(dense, ids)) <= PARITY_TOL
    quantised.train()
    _logits_loss = quantised(ids).logits.float().square().mean()
    _logits_loss.backward()
    assert all(p.grad is not None for p in adapter_state_dict(quantised).values())
    _, layer = next(lora_layers(quantised))
    with pytest.raises(TypeError, match="cannot merge .* quantised"):
        layer.merge()
    with pytest.raises(TypeError, match="cannot merge"):
        merge_and_unload(quantised)
    assert len(list(lora_layers(quantised))) == len(state) // (3 if use_dora else 2)  # left as it was
    return quantised


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("shape", ["phi-2", "phi-3-mini-4k"])  # Phi-2: NF4 with biases returns a view
def test_nf4_base(shape, use_dora):
    model = _quantised_vs_dense(lambda m: quantize_model_linears(m), use_dora, shape)
    _, layer = next(lora_layers(model))
    assert isinstance(layer, LoRALinear) and layer.is_nf4 and layer.weight.dtype == torch.uint8
    assert type(layer.base_layer()) is NF4Linear and layer.base_layer().weight is layer.weight
