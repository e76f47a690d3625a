"""The fused LoRA node (phicore.lora_fused.LoRALinearFunction) against the reference path.

Oracle: the same layer under `force_paths(fused_lora=False)`: autograd over the separate ops, which
tests/test_lora.py checks against PEFT. Same seed, same inputs, both paths:
fp32: outputs and gradients within 1e-5 (rtol) / 1e-6 (atol); dropout masks identical (the
fused node draws them with torch.native_dropout, the op F.dropout runs). bf16 / autocast: the
same dtype rules, so within bf16 rounding (rtol 2e-2). The memory tests count the bytes autograd
keeps (saved_tensors_hooks) and assert the fused node keeps no more, and strictly less where the
reference path keeps dtype-cast copies of x or dropout outputs.
"""


import pytest
import torch
import torch.nn as nn

from phicore.config import ModelConfig
from phicore.frozen_linear import NF4Linear
from phicore.code_paths import current_paths, force_paths, set_paths
from phicore.lora import LoRALinear, apply_lora, lora_layers
from phicore.lora_fused import LoRALinearFunction
from phicore.model import PhiForCausalLM
from tiny_models import SHAPES

FP32 = dict(rtol=1e-5, atol=1e-6)
BF16 = dict(rtol=2e-2, atol=2e-2)


def _layer(in_f=24, out_f=20, bias=True, dropout=0.0, dtype=torch.float32, lora_dtype=None, seed=0, nf4=False):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        if bias:
            base.bias.normal_()
    base = NF4Linear.from_linear(base, compute_dtype=dtype) if nf4 else base.to(dtype)
    layer = LoRALinear(base, r=4, alpha=8, dropout=dropout, dtype=lora_dtype)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.5)
    return layer.train()


def _run(layer, x, grad, fused, seed=7):
    """(y, dx, dA, dB, grad_fn name) for one forward/backward on copies of x."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    with force_paths(fused_lora=fused):
        torch.manual_seed(seed)
        y = layer(x)
        y.backward(grad)
    return (y.detach(), None if x.grad is None else x.grad.clone(), layer.lora_A.weight.grad.clone(),
            layer.lora_B.weight.grad.clone(), type(y.grad_fn).__name__)


def _compare(layer, x, tol, autocast=None):
    grad = torch.randn(*x.shape[:-1], layer.out_features, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        got = _run(layer, x, grad.to(layer(x).dtype), fused=True)
        want = _run(layer, x, grad.to(layer(x).dtype), fused=False)
    assert got[-1] == "LoRALinearFunctionBackward" and want[-1] != got[-1]
    for name, a, b in zip(("y", "dx", "dA", "dB"), got[:-1], want[:-1]):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b.float(), msg=name, **tol)
    return got


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dense_fp32_matches_reference(bias, dropout):
    layer = _layer(bias=bias, dropout=dropout)
    x = torch.randn(2, 5, 24, requires_grad=True)
    y, dx, *_ = _compare(layer, x, FP32)
    assert dx is not None
    if dropout:  # the dropout really acts (else the test would not check the mask handling)
        with force_paths(fused_lora=False), torch.no_grad():
            layer.eval()
            assert not torch.allclose(layer(x), y)
            layer.train()


def test_input_without_grad_and_rslora():
    """The first layer's input needs no gradient: the node skips g @ W (no dequantisation)."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 20), r=4, alpha=8, use_rslora=True).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    _, dx, *_ = _compare(layer, torch.randn(7, 24), FP32)
    assert dx is None


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_nf4_base_matches_reference(dropout):
    layer = _layer(nf4=True, dropout=dropout, in_f=64, out_f=48)
    _compare(layer, torch.randn(3, 4, 64, requires_grad=True), FP32)


def test_bf16_base_fp32_adapter_matches_reference():
    layer = _layer(dtype=torch.bfloat16, dropout=0.1)
    assert layer.lora_A.weight.dtype == torch.float32
    x = torch.randn(3, 24, dtype=torch.bfloat16, requires_grad=True)
    y, *_ = _compare(layer, x, BF16)
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_autocast_bf16_matches_reference(dropout):
    """The training loop's default on GPU: bf16 autocast over fp32 adapters."""
    layer = _layer(dropout=dropout)
    y, *_ = _compare(layer, torch.randn(2, 6, 24, requires_grad=True), BF16, autocast=torch.bfloat16)
    assert y.dtype == torch.bfloat16


def test_reference_path_is_kept_where_the_node_does_not_apply():
    layer = _layer()
    x = torch.randn(3, 24)
    with torch.no_grad():  # inference
        assert layer(x).grad_fn is None
    assert type(layer(x).grad_fn).__name__ == "LoRALinearFunctionBackward"
    layer.weight.requires_grad_(True)  # a trainable base: its gradient needs the reference path
    assert type(layer(x).grad_fn).__name__ != "LoRALinearFunctionBackward"
    layer.weight.requires_grad_(False)
    dora = LoRALinear(nn.Linear(24, 20), r=4, alpha=8, use_dora=True).train()
    assert type(dora(x).grad_fn).__name__ != "LoRALinearFunctionBackward"
    layer.merge()
    assert type(layer(x).grad_fn).__name__ != "LoRALinearFunctionBackward"


def _saved_bytes(fn, params=()):
    """Bytes of distinct storages autograd keeps for backward while fn() builds its graph, not
    counting the storages of `params` (held by the model anyway)."""
    storages = {}
    held = {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        if t.untyped_storage().data_ptr() not in held:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


@pytest.mark.parametrize("case", ["fp32", "fp32-dropout", "bf16-base-fp32-adapter", "autocast", "autocast-dropout"])
def test_fused_node_saves_less(case):
    N, D = 256, 128
    dtype = torch.bfloat16 if case == "bf16-base-fp32-adapter" else torch.float32
    layer = _layer(in_f=D, out_f=D, dropout=0.1 if "dropout" in case else 0.0, dtype=dtype)
    x_leaf = torch.randn(N, D, dtype=dtype, requires_grad=True)
    x = x_leaf * 1  # a model's activations are not leaves (autocast caches casts of leaves only)
    counts = {}
    for fused in (True, False):
        with force_paths(fused_lora=fused), torch.autocast("cpu", dtype=torch.bfloat16, enabled="autocast" in case):
            counts[fused], _ = _saved_bytes(lambda: layer(x), layer.parameters())
    x_bytes = x.numel() * x.element_size()
    print(f"{case}: saved bytes fused {counts[True]}, reference {counts[False]} (x itself: {x_bytes})")
    # fused keeps x (or its bf16 cast), the bool mask with dropout, xa (N x r), A, B's casts
    small = N * 4 * 4 + 2 * (4 * D * 2)
    assert counts[True] <= x_bytes + (N * D if "dropout" in case else 0) + small
    if case == "fp32":  # nothing to save: the reference keeps exactly x, xa (A, B, W are parameters)
        assert counts[True] == counts[False]
    else:  # the reference keeps dtype-cast copies of x, of W and/or dropout outputs besides
        assert counts[True] < counts[False]


def _tiny_model(shape):
    class_name, kwargs = SHAPES[shape]
    config = ModelConfig.from_dict({"model_type": "phi" if class_name == "PhiConfig" else "phi3", **kwargs})
    torch.manual_seed(0)
    model = PhiForCausalLM(config)
    apply_lora(model, r=4, alpha=8, dropout=0.1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.1)
    return model.train()


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("shape", ["phi-2", "phi-3-mini-4k"])
def test_model_training_step_matches_reference(shape, checkpointing):
    """Whole tiny models in train mode (adapter dropout 0.1, Phi-2's residual dropout): the same
    logits and adapter gradients, with and without gradient checkpointing."""
    model = _tiny_model(shape)
    model.gradient_checkpointing = checkpointing
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    results = []
    for fused in (True, False):
        with force_paths(fused_lora=fused):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(5)
            logits = model(ids)
            logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in params.items()}))
    (logits_f, grads_f), (logits_r, grads_r) = results
    torch.testing.assert_close(logits_f, logits_r, **FP32)
    for name in params:
        torch.testing.assert_close(grads_f[name], grads_r[name], msg=name, **FP32)


def test_switch_returns_previous():
    assert set_paths(fused_lora=False).fused_lora is True
    assert set_paths(fused_lora=True).fused_lora is False
    assert current_paths().fused_lora is True
    assert LoRALinearFunction is not None and isinstance(LoRALinear(nn.Linear(4, 4)), LoRALinear)
