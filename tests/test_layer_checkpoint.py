"""phicore/layer_checkpoint.py: which checkpointing a decoder layer gets, and that phicore's node
does less host work than torch.utils.checkpoint for the same numbers.

Equal losses and gradients of the node, torch.utils.checkpoint, the offloaded node and no
checkpointing (dropout, NF4, autocast, flex masks) are tests/test_offload.py's; DDP and FSDP2
with checkpointed layers are tests/test_distributed.py's.
"""

from __future__ import annotations

import pytest
import torch

import phicore
import phicore.layer_checkpoint as layer_checkpoint
from bench._measure import OpCount
from phicore.config import ModelConfig
from phicore.layers import KVCache
from phicore.lora import apply_lora
from phicore.model import PhiForCausalLM
from tiny_models import SHAPES


def _tiny(layers: int = 2) -> PhiForCausalLM:
    class_name, kwargs = SHAPES["phi-3-mini-4k"]
    torch.manual_seed(0)
    model = PhiForCausalLM(ModelConfig.from_dict({**kwargs, "model_type": "phi3", "num_hidden_layers": layers}))
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    model.gradient_checkpointing = True
    return model.train()


@pytest.fixture
def taken(monkeypatch):
    """Which checkpointing each layer call took: "node" or "torch"."""
    calls = []
    node, torch_checkpoint = layer_checkpoint.LayerCheckpoint.apply, layer_checkpoint.torch_checkpoint

    def spy_node(*args):
        calls.append("node")
        return node(*args)

    def spy_torch(*args, **kwargs):
        calls.append("torch")
        return torch_checkpoint(*args, **kwargs)

    monkeypatch.setattr(layer_checkpoint.LayerCheckpoint, "apply", spy_node)
    monkeypatch.setattr(layer_checkpoint, "torch_checkpoint", spy_torch)
    return calls


def test_the_node_by_default_and_torch_checkpoint_when_forced(taken):
    model = _tiny()
    ids = torch.randint(0, 500, (1, 8))
    model(ids, labels=ids).backward()
    assert taken == ["node", "node"]
    taken.clear()
    with phicore.force_paths(layer_checkpoint="torch"):
        model(ids, labels=ids).backward()
    assert taken == ["torch", "torch"]
    taken.clear()
    model.gradient_checkpointing = False
    model(ids, labels=ids).backward()
    assert taken == []


def test_torch_checkpoint_where_the_node_cannot_run(taken, monkeypatch):
    """Under torch.compile (dynamo traces torch's checkpoint), for a layer FSDP2 shards (it gathers
    the parameters inside the layer's forward), and with a KV cache (the node runs without one)."""
    model = _tiny(layers=1)
    layer = model.model.layers[0]
    h = torch.randn(1, 4, model.config.hidden_size)
    cos, sin = model.rotary.cos_sin(torch.arange(4)[None], h.dtype)
    cache = KVCache(model.config, 1, 8, torch.float32, torch.device("cpu"))
    layer_checkpoint.checkpoint_layer(layer, h, cos, sin, None, cache)
    assert taken == ["torch"]

    class FSDPModule:  # what torch.distributed.fsdp.fully_shard mixes into the layer's class
        pass

    plain_class = type(layer)
    layer.__class__ = type("FSDPPhi3DecoderLayer", (plain_class, FSDPModule), {})
    try:
        layer_checkpoint.checkpoint_layer(layer, h, cos, sin, None)
    finally:
        layer.__class__ = plain_class
    assert taken == ["torch", "torch"]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    layer_checkpoint.checkpoint_layer(layer, h, cos, sin, None)
    assert taken == ["torch", "torch", "torch"]


def test_the_node_dispatches_fewer_ops_than_torch_checkpoint():
    """Host work (what bound the H200 steps): per layer, torch.utils.checkpoint adds detaches and
    shape checks for every saved tensor; the node recomputes the same layer and no more. Counted
    ops are the same on every machine (`python bench/host_overhead.py` times them)."""
    model = _tiny(layers=4)
    ids = torch.randint(0, 500, (1, 8))

    def count(mode):
        model.zero_grad(set_to_none=True)
        with phicore.force_paths(layer_checkpoint=mode), OpCount() as ops:
            model(ids, labels=ids).backward()
        return sum(ops.ops.values()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    count("phicore")  # warm-up
    node_ops, node_grads = count("phicore")
    torch_ops, torch_grads = count("torch")
    assert node_ops < torch_ops, (node_ops, torch_ops)
    assert all(torch.equal(node_grads[n], torch_grads[n]) for n in node_grads)
