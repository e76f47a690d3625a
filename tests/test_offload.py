"""Offloaded gradient checkpointing (phicore/offload.py) against plain checkpointing and none.

Oracles: the same model, same seed, same batch, run four ways: no checkpointing (autograd
keeps every activation), torch.utils.checkpoint per layer (the path before phicore's node),
phicore's checkpoint node (phicore/layer_checkpoint.py, the default), and the offloaded
checkpoint (the same node, its store in host memory). Loss and every trainable gradient agree within 1e-6 absolute (fp32 on
CPU; bit-identical in practice, as the three run the same ops in the same order), with
dropout on everywhere the config allows (embedding, residual, attention, LoRA), so the RNG
replay in backward is what is being checked; an NF4 base; CPU bf16 autocast (same ops, so the
same tolerance). That the layer inputs really leave is checked on storages: after the forward,
no storage a layer received is still alive (StorageWeakRef), while plain checkpointing keeps
every one; the host copies hold the same values. The CUDA test (skipped without a GPU) checks
max_memory_allocated falls by most of (layers - 2) x N x D x 4 bytes on a tiny-but-wide model.
train.py's flag runs end to end, equal to a run without it; the bad combinations exit 2.
"""

from __future__ import annotations

import gc
import shutil

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import phicore

from phicore.config import ModelConfig
from phicore.layers import KVCache
from phicore.lora import apply_lora
from phicore.model import PhiForCausalLM
from phicore.offload import ActivationOffloader
from phicore.weights import load_model
from tiny_models import SHAPES
from train_runs import adapter, run_main, write_jsonl

TOL = dict(rtol=0.0, atol=1e-6)
MODES = ("none", "torch", "plain", "offload")
FAMILY = {"PhiConfig": "phi", "Phi3Config": "phi3"}


def _tiny(shape: str, dropout: float = 0.1, **overrides) -> PhiForCausalLM:
    """A tiny random model of `shape` with dropout on everywhere, LoRA (dropout too) on all linears,
    B non-zero so every adapter gradient is non-trivial; training mode."""
    class_name, kwargs = SHAPES[shape]
    raw = {**kwargs, "model_type": FAMILY[class_name], "embd_pdrop": dropout, "resid_pdrop": dropout,
           "attention_dropout": dropout, **overrides}
    torch.manual_seed(0)
    return _with_lora(PhiForCausalLM(ModelConfig.from_dict(raw)), dropout)


def _with_lora(model: PhiForCausalLM, dropout: float) -> PhiForCausalLM:
    apply_lora(model, r=4, alpha=8, dropout=dropout)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model.train()


def _step(model, mode: str, ids, seed: int = 123, autocast=None):
    """(loss, {name: grad}) for one forward + backward in `mode` (none | torch | plain | offload)."""
    model.gradient_checkpointing = mode != "none"
    model.checkpoint_offload = mode == "offload"
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with phicore.force_paths(layer_checkpoint="torch" if mode == "torch" else "auto"):
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = model(ids, labels=ids)
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(results):
    loss, grads = results["none"]
    assert grads and all(g.abs().max() > 0 for g in grads.values()), "a trainable parameter got no gradient"
    for mode in MODES[1:]:
        other_loss, other_grads = results[mode]
        torch.testing.assert_close(other_loss, loss, **TOL, msg=f"{mode}: loss")
        assert other_grads.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(other_grads[name], grads[name], **TOL, msg=f"{mode}: {name}")


def _ids(vocab: int = 500, shape=(2, 12), seed: int = 5):
    torch.manual_seed(seed)
    return torch.randint(0, vocab, shape)


# ----------------------------------------------------------------------------- equal results

@pytest.mark.parametrize("shape", ["phi-2", "phi-3-mini-4k"])
def test_offload_equals_plain_and_no_checkpointing(shape):
    """Dropout on everywhere; besides the adapters, a norm (and for Phi-3 the embedding, so the
    first layer's input needs a gradient too) trains: every parameter input of the node is checked."""
    model = _tiny(shape)
    model.model.layers[0].input_layernorm.weight.requires_grad_(True)
    if shape != "phi-2":
        model.model.embed_tokens.weight.requires_grad_(True)
    ids = _ids()
    results = {mode: _step(model, mode, ids) for mode in MODES}
    _assert_same(results)
    other_seed, _ = _step(model, "offload", ids, seed=124)
    assert (other_seed - results["none"][0]).abs() > 1e-3, "dropout is not active: the RNG replay is untested"


@pytest.mark.parametrize("name", ["tiny-phi-2", "tiny-phi-3"])
def test_offload_with_nf4_base(bases, name):
    """QLoRA: an NF4 base loaded by phicore.weights.load_model, dropout on."""
    model = load_model(bases[name], dtype=torch.float32, device="cpu", quantize="nf4")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    for layer in model.model.layers:
        layer.self_attn.dropout = 0.1
    model = _with_lora(model, 0.1)
    ids = _ids(vocab=256)
    _assert_same({mode: _step(model, mode, ids) for mode in MODES})


def test_offload_under_cpu_bf16_autocast():
    """The recompute runs under the autocast state the forward saw (backward itself runs without)."""
    model = _tiny("phi-3-mini-4k")
    ids = _ids()
    results = {mode: _step(model, mode, ids, autocast=torch.bfloat16) for mode in MODES}
    _assert_same(results)
    fp32_loss, _ = _step(model, "offload", ids)
    assert (fp32_loss - results["offload"][0]).abs() > 1e-4, "autocast had no effect"


class _MaskedMix(torch.nn.Module):
    """A stand-in decoder layer (h, cos, sin, mask, cache) -> (B, T, D) whose output depends on a
    flex BlockMask: h + W(h) * (1 + number of allowed key tiles per query tile). It records the
    mask it was given (flex_attention itself has no backward on CPU, so no real layer here)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)
        self.seen = []

    def forward(self, h, cos, sin, mask, cache=None):
        self.seen.append(mask)
        tiles = mask.kv_num_blocks.float().sum()  # (): from the BlockMask's own tensors
        return h + self.proj(h) * (1 + tiles)


def test_offload_carries_a_flex_block_mask():
    """Packed rows on CUDA give every layer a flex BlockMask, which is no tensor: the node keeps it
    as it is and hands the same object to the recompute; gradients equal the layer run directly."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask = create_block_mask(lambda b, h, q, k: k <= q, None, None, 256, 256, device="cpu")
    torch.manual_seed(0)
    layer = _MaskedMix(8)
    h = torch.randn(1, 256, 8, requires_grad=True)
    grad = torch.randn(1, 256, 8)
    layer(h, None, None, mask).backward(grad)
    direct = [h.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    h.grad = None
    layer.zero_grad(set_to_none=True)
    layer.seen.clear()
    ActivationOffloader(torch.device("cpu")).checkpoint(layer, h, None, None, mask).backward(grad)
    offloaded = [h.grad] + [p.grad for p in layer.parameters()]
    assert len(layer.seen) == 2 and all(seen is mask for seen in layer.seen)  # forward, then recompute
    for ours, expected in zip(offloaded, direct):
        torch.testing.assert_close(ours, expected, **TOL)


# ----------------------------------------------------------------------------- the inputs leave

def test_layer_inputs_leave_and_are_fetched_back(monkeypatch):
    """After the forward, no layer input's storage is alive (plain checkpointing keeps them all);
    the host copies hold the inputs' values; backward serves every layer but the last from the
    prefetch that the layer after it started."""
    model = _tiny("phi-2", num_hidden_layers=4)
    ids = _ids()
    seen = []  # (weak ref to the input's storage, a test-owned clone, the record)
    offloaders = []
    original_offload, original_init = ActivationOffloader.offload, ActivationOffloader.__init__

    def spy_offload(self, h):
        record = original_offload(self, h)
        seen.append((StorageWeakRef(h.untyped_storage()), h.detach().clone(), record))
        return record

    def spy_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        offloaders.append(self)

    monkeypatch.setattr(ActivationOffloader, "offload", spy_offload)
    monkeypatch.setattr(ActivationOffloader, "__init__", spy_init)
    model.gradient_checkpointing = model.checkpoint_offload = True
    loss = model(ids, labels=ids)
    gc.collect()
    assert len(seen) == 4 and len(offloaders) == 1
    for i, (storage, value, record) in enumerate(seen):
        assert storage.expired(), f"layer {i}'s input is still alive after the forward"
        assert record.index == i and record.host.device.type == "cpu"
        assert torch.equal(record.host, value)
    loss.backward()
    assert offloaders[0].prefetch_hits == 3

    # the control: torch.utils.checkpoint keeps every layer's input until backward
    kept = []
    hooks = [layer.register_forward_pre_hook(lambda _, args: kept.append(StorageWeakRef(args[0].untyped_storage())))
             for layer in model.model.layers]
    model.checkpoint_offload = False
    loss = model(ids, labels=ids)
    gc.collect()
    assert len(kept) == 4 and not any(ref.expired() for ref in kept)
    del loss
    for hook in hooks:
        hook.remove()


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on CPU needs a C++ compiler")
def test_offload_inside_a_compiled_model_replays_dropout():
    """model.compile() (train.py --compile): the offloaded layers stay eager (torch.compiler.disable),
    so the forward's dropout draws are the recompute's. Compiled, the forward would draw from
    inductor's RNG and the recompute from eager's: a different loss (measured 0.47 apart here, 3e-3
    relative, and unrelated gradients).

    Compared relatively, within 1e-5 (loss, and each gradient in norm): the compiled final norm and
    loss reorder fp32 sums, and how they round depends on inductor's version (its CPU reductions,
    vectorisation and FMA contraction). An absolute 1e-5 was below one ulp of the summed loss
    (~170, ulp 1.5e-5) and a few ulps of the largest gradients: it passed under torch 2.13 by the
    luck of the rounding and failed under 2.11, without any change in the dropout replay it checks."""
    model = _tiny("phi-2", embd_pdrop=0.0)  # no dropout outside the layers, where compiled RNG would differ
    ids = _ids()
    eager_loss, eager_grads = _step(model, "offload", ids)
    model.compile()
    loss, grads = _step(model, "offload", ids)
    _assert_close_norms(loss, grads, eager_loss, eager_grads, 1e-5)


def test_offload_refuses_a_kv_cache():
    model = _tiny("phi-2", dropout=0.0)
    offloader = ActivationOffloader(torch.device("cpu"))
    h, cos = torch.zeros(1, 3, 80), torch.zeros(1, 3, 8)
    cache = KVCache(model.config, 1, 8, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="KV cache"):
        offloader.checkpoint(model.model.layers[0], h, cos, cos, None, cache)


# ----------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_offload_lowers_peak_memory_and_matches():
    """Tiny but wide (D = 1024, 8 layers, 2048 tokens, fp32): offload keeps ~2 layer inputs of 8 MiB
    on the GPU instead of 8, so the peak falls by at least half of (8 - 2) x 8 MiB; loss and
    gradients equal plain checkpointing (phicore's node, which equals torch.utils.checkpoint's)
    within 1e-5 relative (in norm: CUDA kernels, dropout
    replayed), and under bf16 autocast within 2e-2 (bf16 rounding)."""
    device = torch.device("cuda")
    model = _tiny("phi-3-mini-4k", hidden_size=1024, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8, sliding_window=4096).to(device)
    ids = _ids(shape=(1, 2048)).to(device)

    def run(mode, autocast=None):
        model.gradient_checkpointing, model.checkpoint_offload = True, mode == "offload"
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(123)
        with phicore.force_paths(layer_checkpoint="torch" if mode == "torch" else "auto"):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast is not None):
                loss = model(ids, labels=ids)
            loss.backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, torch.cuda.max_memory_allocated()

    run("plain")  # warm-up: kernels, cuBLAS workspaces, the caching allocators
    run("offload")
    plain_loss, plain_grads, plain_peak = run("plain")
    off_loss, off_grads, off_peak = run("offload")
    layer_input = 2048 * 1024 * 4
    assert off_peak <= plain_peak - 3 * layer_input, (plain_peak, off_peak)
    _assert_close_norms(off_loss, off_grads, plain_loss, plain_grads, 1e-5)
    torch_loss, torch_grads, _ = run("torch")  # phicore's checkpoint node against torch.utils.checkpoint
    _assert_close_norms(plain_loss, plain_grads, torch_loss, torch_grads, 1e-5)
    plain_loss, plain_grads, _ = run("plain", autocast=torch.bfloat16)
    off_loss, off_grads, _ = run("offload", autocast=torch.bfloat16)
    _assert_close_norms(off_loss, off_grads, plain_loss, plain_grads, 2e-2)


def _assert_close_norms(loss, grads, ref_loss, ref_grads, rel: float):
    """Relative difference of the loss and of each gradient's norm within `rel` (CUDA attention
    backward sums with atomics, so elements near zero may differ in their last bits)."""
    assert abs(float(loss - ref_loss)) <= rel * abs(float(ref_loss))
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        diff = float((grads[name] - ref_grads[name]).norm())
        assert diff <= rel * float(ref_grads[name].norm()) + 1e-12, (name, diff)


# ----------------------------------------------------------------------------- train.py

def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"{i} plus {i % 7}?", "response": f"{i + i % 7}, says my cat."} for i in range(n)]


def test_train_flag_runs_and_matches_plain_checkpointing(bases, tmp_path):
    """Same seed, dropout on: the adapter trained with --offload-checkpoints is the adapter trained
    without it (plain checkpointing), to 1e-6."""
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(8))
    common = ["--model", bases["tiny-phi-2"], "--data", data, "--max-steps", 2, "--batch-size", 2,
              "--val-split", 0, "--lora-dropout", 0.1, "--lr", 5e-3, "--max-length", 48, "--quiet"]
    assert run_main(*common, "--out", tmp_path / "offload", "--offload-checkpoints") == 0
    assert run_main(*common, "--out", tmp_path / "plain") == 0
    offloaded, plain = adapter(tmp_path / "offload"), adapter(tmp_path / "plain")
    assert offloaded.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(offloaded[name], plain[name], **TOL, msg=name)
    assert any(v.abs().max() > 0 for k, v in plain.items() if "lora_B" in k)


@pytest.mark.parametrize("flags, words", [
    (["--no-grad-checkpointing"], "--grad-checkpointing"),
    (["--fsdp"], "--fsdp"),
])
def test_train_flag_bad_combinations_exit_2(bases, tmp_path, capsys, flags, words):
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(4))
    out = tmp_path / "out"
    capsys.readouterr()
    rc = run_main("--model", bases["tiny-phi-2"], "--data", data, "--out", out, "--offload-checkpoints",
                  "--quiet", *flags)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "--offload-checkpoints" in err and words in err
    assert not out.exists()


def test_ddp_two_ranks_with_offload_equal_one_rank(bases, tmp_path):
    """DDP (2 forked gloo ranks, batch 2 each) with --offload-checkpoints gives the adapter of one
    process with batch 4 and plain checkpointing, to 1e-6 (test_distributed's tolerance): the
    node's parameter gradients reach DDP's reducer like any others."""
    from test_distributed import run_ranks

    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(8))
    common = ["--model", bases["tiny-phi-3"], "--data", data, "--data-cache", tmp_path / "cache", "--val-split", 0,
              "--max-length", 48, "--quiet", "--lora-dropout", 0, "--max-steps", 2, "--lr", 2e-4,
              "--warmup-ratio", 0, "--device", "cpu"]  # forked ranks: no CUDA in the parent
    assert run_main(*common, "--batch-size", 4, "--out", tmp_path / "one") == 0
    log = run_ranks([*common, "--batch-size", 2, "--offload-checkpoints", "--out", tmp_path / "two"], 2,
                    tmp_path / "logs")
    assert "DDP" in log
    one, two = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6, msg=name)
