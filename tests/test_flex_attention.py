"""Packed rows through flex_attention (phicore/attention.py) against the dense-mask SDPA path.

Oracles:
- the BlockMask's tile lists: torch's own `create_block_mask` over the same mask function;
- the dense mask: torch's `create_mask`, and collate_packed's own (B, 1, T, T) mask, bit for bit;
- attention outputs, logits and LoRA gradients: the dense-mask SDPA path (the path packed
  batches took before), and each example run alone, unpacked (the model itself, no mask).
Tolerances (fp32, CPU): attention outputs within 1e-5 absolute; logits (|logit| up to ~30 with
tied embeddings) and gradients within 1e-5 absolute + 1e-5 relative; the SDPA path fed document
ids equals the old collate-mask path exactly. CUDA (compiled flex): 1e-4 (fp32).

torch refuses flex_attention's backward on CPU (only forward runs there, eagerly), so the CPU
gradient test runs the higher-order op that flex_attention dispatches to (its dense math
backward) on the same BlockMask: it checks our mask in backward; the compiled kernels'
backward is checked by the CUDA test.
"""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask

from phicore import attention
from phicore.code_paths import current_paths, force_paths, set_paths
from phicore.data.collate import collate, collate_packed
from phicore.data.tokenization import Example
from phicore.layers import build_attention_mask
from tiny_models import phicore_model

ATOL = 1e-5
CLOSE = dict(rtol=1e-5, atol=1e-5)  # logits and gradients
# examples per packed row (lengths); rows end in padding up to a multiple of 16 tokens
ROWS = [[9, 14, 5], [20, 6, 1], [23]]
SMALL_TILE = 8  # tiles in the tests: rows of ~48 tokens cut into skipped / full / partial tiles


def token_loss_sum(model, batch):
    """The summed token loss as the training step computes it (phicore.train): through the
    model's forward with the batch's own inputs, document_ids included when packed."""
    return model(batch.input_ids, labels=batch.labels, **batch.model_inputs())


@pytest.fixture(autouse=True)
def _reset_switch(monkeypatch):
    monkeypatch.setattr(attention, "BLOCK_SIZE", SMALL_TILE)
    with force_paths():  # the packed_attention choice a test sets is undone after it
        yield


def _model(shape, seed=0, lora=True, **overrides):
    return phicore_model(shape, seed, lora, **overrides).eval()


def _examples(rows, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for row in rows:
        out.append([])
        for n in row:
            ids = torch.randint(3, vocab, (n,), generator=g).tolist()
            out[-1].append(Example(ids, [-100] + ids[1:]))
    return out


def _packed(model, rows=ROWS, seed=1):
    return collate_packed(_examples(rows, model.config.vocab_size, seed), pad_id=0, pad_to_multiple_of=16)


def _run(model, batch, mode, capture=None):
    """Logits (B, T, V) with the packed-attention switch at `mode`; attention outputs appended
    to `capture` (one per layer) when given."""
    set_paths(packed_attention=mode)
    hooks = []
    if capture is not None:
        for layer in model.model.layers:
            hooks.append(layer.self_attn.register_forward_hook(lambda m, i, o: capture.append(o)))
    try:
        return model(batch.input_ids, position_ids=batch.position_ids, document_ids=batch.document_ids)
    finally:
        for h in hooks:
            h.remove()


# ----------------------------------------------------------------------------- masks
def _documents(rows, T):
    ids = torch.full((len(rows), T), -1)
    for b, row in enumerate(rows):
        t = 0
        for i, n in enumerate(row):
            ids[b, t:t + n] = i
            t += n
    return ids


@pytest.mark.parametrize("window", [None, 7, 33, 500])
@pytest.mark.parametrize("tile", [8, 16, 128])
def test_block_mask_equals_create_block_mask(window, tile):
    rows, T = [[9, 14, 5, 30], [20, 6, 1, 40], [77], [3]], 100  # last row: almost all padding
    lo = attention.document_bounds(_documents(rows, T), window)

    def mask_mod(b, h, q, k):
        return (k <= q) & (k >= lo[b, q])

    got = attention.document_block_mask(lo, tile)
    ref = create_block_mask(mask_mod, len(rows), None, T, T, device="cpu", BLOCK_SIZE=tile)
    for field in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(got, field), getattr(ref, field)), field
    assert torch.equal(got.to_dense(), ref.to_dense())
    assert torch.equal(attention.document_dense_mask(lo), create_mask(mask_mod, len(rows), 1, T, T, device="cpu"))
    if tile == 8:  # the tiles really are skipped: far fewer than the causal half
        assert int(got.kv_num_blocks.sum() + got.full_kv_num_blocks.sum()) < 0.5 * len(rows) * 13 * 14 / 2


def test_packed_batch_mask_is_block_diagonal_causal():
    """collate_packed carries document ids, no T x T tensor; the dense mask built from them is
    the block-diagonal causal mask built block by block, padding attending only itself."""
    batch = _packed(_model("phi-2", lora=False))
    assert batch.document_ids.tolist()[1][:30] == [0] * 20 + [1] * 6 + [2] + [-1] * 3
    assert batch.attention_mask.shape == batch.input_ids.shape  # (B, T) real tokens only
    B, T = batch.input_ids.shape
    expected = torch.zeros((B, T, T), dtype=torch.bool)
    for b, row in enumerate(ROWS):
        t = 0
        for n in row:
            expected[b, t:t + n, t:t + n] = torch.ones((n, n), dtype=torch.bool).tril_()
            t += n
        expected[b, range(t, T), range(t, T)] = True
    assert torch.equal(batch.dense_attention_mask(), expected[:, None])
    lo = attention.document_bounds(batch.document_ids)
    assert torch.equal(attention.document_dense_mask(lo), expected[:, None])
    assert collate(_examples([[4]], 50)[0], 0).document_ids is None
    moved = batch.to("cpu")
    assert torch.equal(moved.document_ids, batch.document_ids)


# ----------------------------------------------------------------------------- model
# phi-2: MHA, partial rotary; phi-4-mini: GQA 6/2, partial rotary, tied embeddings (its longrope
# original length is raised past the rows: longrope picks one factor set per batch from the
# batch's longest position, so a short example alone would otherwise use the other set);
# phi-3-medium: GQA 8/2; phi-3-mini-4k: sliding window 7, shorter than most examples and every row
@pytest.mark.parametrize("shape, overrides", [
    ("phi-2", {}), ("phi-4-mini", {"original_max_position_embeddings": 64}), ("phi-3-medium", {}),
    ("phi-3-mini-4k", {}),
])
def test_flex_matches_sdpa_and_examples_alone(shape, overrides):
    model = _model(shape, **overrides)
    batch = _packed(model)
    with torch.no_grad():
        attn_flex, attn_sdpa = [], []
        flex = _run(model, batch, "flex", attn_flex)
        sdpa = _run(model, batch, "sdpa", attn_sdpa)
        assert len(attn_flex) == len(attn_sdpa) == model.config.num_hidden_layers
        for a, b in zip(attn_flex, attn_sdpa):
            torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
        torch.testing.assert_close(flex, sdpa, **CLOSE)
        if model.config.sliding_window is None or model.config.sliding_window >= batch.input_ids.shape[1]:
            # the SDPA path is the dense-mask one: the batch's dense mask gives the same bits
            old = model(batch.input_ids, attention_mask=batch.dense_attention_mask(), position_ids=batch.position_ids)
            assert torch.equal(sdpa, old)
        # each example alone, unpacked, is the oracle for its slice of the packed row
        for b, row in enumerate(_examples(ROWS, model.config.vocab_size)):
            t = 0
            for e in row:
                alone = model(torch.tensor([e.input_ids]))[0]  # (n, V)
                n = len(e)
                torch.testing.assert_close(flex[b, t:t + n], alone, **CLOSE)
                torch.testing.assert_close(sdpa[b, t:t + n], alone, **CLOSE)
                t += n
            assert t < batch.input_ids.shape[1] or b == 2  # rows 0 and 1 end in padding
            assert torch.isfinite(flex[b]).all()  # padding rows too


def _flex_hop(q, k, v, block_mask, scale, enable_gqa):
    """flex_attention's higher-order op with its dense math backward (see the module docstring)."""
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    if not hasattr(fa, "flex_attention_hop") or not hasattr(fa, "_apply_kernel_options"):
        pytest.skip("this torch has no flex_attention_hop / _apply_kernel_options")
    options = fa._apply_kernel_options(q, k, v, False, None, None)
    out, _, _ = fa.flex_attention_hop(q, k, v, fa._identity, block_mask.as_tuple(), scale, options)
    return out


@pytest.mark.parametrize("shape, checkpointing", [("phi-2", False), ("phi-3-medium", True), ("phi-3-mini-4k", False)])
def test_lora_gradients_match(shape, checkpointing, monkeypatch):
    model = _model(shape)
    model.gradient_checkpointing = checkpointing  # the BlockMask goes through torch's checkpoint
    model.train(checkpointing)  # checkpointing runs only in training; phi-3-medium has no dropout
    batch = _packed(model)
    calls = []
    monkeypatch.setattr(attention, "_eager_flex", lambda *a, **k: calls.append(1) or _flex_hop(*a, **k))
    params = [p for p in model.parameters() if p.requires_grad]
    grads, losses = {}, {}
    for mode in ("flex", "sdpa"):
        set_paths(packed_attention=mode)
        model.zero_grad(set_to_none=True)
        loss = token_loss_sum(model, batch)  # the training step's call: passes batch.document_ids
        loss.backward()
        grads[mode] = [p.grad.clone() for p in params]
        losses[mode] = loss.detach()
    # flex ran in every layer, once (twice with checkpointing: forward and recompute)
    assert len(calls) == model.config.num_hidden_layers * (2 if checkpointing else 1)
    torch.testing.assert_close(losses["flex"], losses["sdpa"], rtol=1e-6, atol=0)
    assert sum(float(g.abs().sum()) for g in grads["sdpa"]) > 0
    for a, b in zip(grads["flex"], grads["sdpa"]):
        torch.testing.assert_close(a, b, **CLOSE)
    # the packed loss is the sum of the examples' own losses
    with torch.no_grad():
        alone = sum(float(token_loss_sum(model, collate([e], 0)))
                    for row in _examples(ROWS, model.config.vocab_size) for e in row)
    assert float(losses["sdpa"]) == pytest.approx(alone, rel=1e-5)


def test_fp16_upcast_path_runs_flex():
    """Phi-2 upcasts fp16 attention to fp32: flex gets fp32 q/k/v and returns fp16 outputs."""
    model = _model("phi-2", lora=False)
    batch = _packed(model)
    with torch.no_grad():
        ref = _run(model, batch, "sdpa")
        model.half()
        out = _run(model, batch, "flex")
    assert model.model.layers[0].self_attn.upcast and out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.05)


# ----------------------------------------------------------------------------- switch
def test_switch_chooses_the_mask():
    ids = _documents([[3, 4]], 9)
    kw = dict(attention_mask=None, num_queries=9, past_len=0, sliding_window=None, device="cpu", document_ids=ids)
    assert current_paths().packed_attention == "auto"
    assert isinstance(build_attention_mask(**kw), torch.Tensor)  # auto: SDPA off CUDA
    assert attention.uses_flex(torch.device("cuda")) and not attention.uses_flex(torch.device("cpu"))
    set_paths(packed_attention="flex")
    assert isinstance(build_attention_mask(**kw), attention.BlockMask)
    assert isinstance(build_attention_mask(**kw, attention_dropout=0.1), torch.Tensor)  # flex has no dropout
    set_paths(packed_attention="sdpa")
    assert isinstance(build_attention_mask(**kw), torch.Tensor)
    assert not attention.uses_flex(torch.device("cuda"))
    with pytest.raises(ValueError, match="unknown packed_attention mode 'dense'"):
        set_paths(packed_attention="dense")
    with pytest.raises(ValueError, match="KV cache"):
        build_attention_mask(None, 9, 4, None, "cpu", ids)


def test_unpacked_rows_longer_than_the_window_take_flex():
    """Unpacked rows longer than the sliding window (Phi-3-mini-4k at 2048 tokens) go through flex
    when it is on: one row's BlockMask broadcast over the batch, the same logits as SDPA's dense
    window mask (1e-5); no window cut, padding or a KV cache keeps the previous masks."""
    model = _model("phi-3-mini-4k", lora=True, sliding_window=7)
    ids = torch.randint(3, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(5))
    set_paths(packed_attention="flex")
    mask = build_attention_mask(None, 40, 0, 7, "cpu")
    assert isinstance(mask, attention.BlockMask) and mask.kv_num_blocks.shape[0] == 1
    assert build_attention_mask(None, 7, 0, 7, "cpu") is None  # the window cuts nothing: causal
    padded = torch.ones(3, 40, dtype=torch.long)
    padded[0, -5:] = 0
    assert isinstance(build_attention_mask(padded, 40, 0, 7, "cpu"), torch.Tensor)
    assert isinstance(build_attention_mask(None, 1, 39, 7, "cpu"), torch.Tensor)  # decoding with a cache
    with torch.no_grad():
        flex = model(ids)
        set_paths(packed_attention="sdpa")
        assert isinstance(build_attention_mask(None, 40, 0, 7, "cpu"), torch.Tensor)
        dense = model(ids)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_training_with_attention_dropout_takes_sdpa():
    model = _model("phi-3-medium", lora=False, attention_dropout=0.5)
    batch = _packed(model)
    set_paths(packed_attention="flex")
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(lambda m, args: seen.append(args[3]))
    model.train()
    model(batch.input_ids, position_ids=batch.position_ids, document_ids=batch.document_ids)
    model.eval()
    with torch.no_grad():
        model(batch.input_ids, position_ids=batch.position_ids, document_ids=batch.document_ids)
    hook.remove()
    assert isinstance(seen[0], torch.Tensor) and isinstance(seen[1], attention.BlockMask)


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled flex_attention needs CUDA")
@pytest.mark.parametrize("shape", ["phi-2", "phi-3-medium"])
def test_compiled_flex_on_cuda(shape, monkeypatch):
    monkeypatch.setattr(attention, "BLOCK_SIZE", 128)
    model = _model(shape).cuda()
    rows = [[300, 140, 50], [500], [37, 200, 1]]  # several 128-tiles; rows end in padding
    batch = _packed(model, rows).to("cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    out, grads = {}, {}
    for mode in ("flex", "sdpa"):
        set_paths(packed_attention=mode)
        model.zero_grad(set_to_none=True)
        logits = _run(model, batch, mode)
        mask = batch.labels != -100
        (logits[mask].float().logsumexp(-1).sum()).backward()
        out[mode] = logits.detach()
        grads[mode] = [p.grad.clone() for p in params]
    assert attention._compiled_flex is not None
    torch.testing.assert_close(out["flex"], out["sdpa"], rtol=0, atol=1e-4)
    for a, b in zip(grads["flex"], grads["sdpa"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():  # the training dtype
        bf16 = {mode: _run(model, batch, mode).float() for mode in ("flex", "sdpa")}
    torch.testing.assert_close(bf16["flex"], bf16["sdpa"], rtol=0.05, atol=0.05)
