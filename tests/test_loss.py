"""phicore.loss: the chunked linear + cross-entropy against the plain full-logits loss.

Oracle: F.cross_entropy over the whole logits (the function), and
`full_logits_loss_sum` below (the model's full logits, shifted, through F.cross_entropy: the loss
the training loop used before it switched to phicore.loss).
Tolerances (fp32 on CPU): loss and gradients within 1e-5 relative (atol 1e-6 for the small
LoRA gradients); float64 agrees to 1e-12. The memory test measures peak RSS in subprocesses
(VmHWM, Linux) and asserts the chunked loss needs less than half the plain loss's extra memory.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from phicore.data.tokenization import IGNORE_INDEX
from phicore.loss import default_chunk_size, fused_linear_cross_entropy_sum, next_token_loss_sum
from phicore.loss import IGNORE_INDEX as LOSS_IGNORE_INDEX
from tiny_models import phicore_model

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5


def full_logits_loss_sum(model, batch) -> torch.Tensor:
    """The reference: all (B, T, V) logits, position t predicting token t+1, summed CE."""
    logits = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    logits = logits[:, :-1].float()  # (B, T-1, V)
    targets = batch.labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _inputs(N=37, H=16, V=50, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    b = torch.randn(V, generator=g, dtype=dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = IGNORE_INDEX
    return hidden, weight, b, targets


def _grads(fn, tensors):
    for t in tensors:
        if t is not None:
            t.grad = None
            t.requires_grad_(True)
    loss = fn()
    loss.backward()
    return loss.detach(), [None if t is None else t.grad.clone() for t in tensors]


@pytest.mark.parametrize("chunk_size", [1, 8, 37, 1000])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_full_cross_entropy(chunk_size, bias):
    hidden, weight, b, targets = _inputs(bias=bias)
    tensors = [hidden, weight, b]
    ref_loss, ref_grads = _grads(lambda: F.cross_entropy(F.linear(hidden, weight, b).float(), targets,
                                                         ignore_index=IGNORE_INDEX, reduction="sum"), tensors)
    loss, grads = _grads(lambda: fused_linear_cross_entropy_sum(hidden, weight, b, targets,
                                                                chunk_size=chunk_size) * 3.0, tensors)
    torch.testing.assert_close(loss, ref_loss * 3.0, rtol=RTOL, atol=0)
    for got, want in zip(grads, ref_grads):
        if want is not None:
            torch.testing.assert_close(got, want * 3.0, rtol=RTOL, atol=1e-6)  # the scale reaches every grad


def test_float64_is_exact_to_rounding():
    hidden, weight, b, targets = _inputs(dtype=torch.float64)
    tensors = [hidden, weight, b]
    ref_loss, ref_grads = _grads(lambda: F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum"),
                                 tensors)
    loss, grads = _grads(lambda: fused_linear_cross_entropy_sum(hidden, weight, b, targets, chunk_size=5), tensors)
    assert loss.dtype == torch.float64  # logits are at least fp32: float64 stays float64
    assert abs(loss.item() - ref_loss.item()) <= 1e-12 * abs(ref_loss.item())
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_frozen_head_and_no_grad():
    hidden, weight, b, targets = _inputs()
    hidden.requires_grad_(True)
    loss = fused_linear_cross_entropy_sum(hidden, weight, b, targets, chunk_size=4)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None and b.grad is None
    with torch.no_grad():
        value = fused_linear_cross_entropy_sum(hidden, weight, b, targets, chunk_size=4)
    assert not value.requires_grad and torch.equal(value, loss.detach())
    everything_ignored = torch.full_like(targets, IGNORE_INDEX)
    assert fused_linear_cross_entropy_sum(hidden, weight, b, everything_ignored).item() == 0.0
    with pytest.raises(ValueError, match="targets"):
        fused_linear_cross_entropy_sum(hidden, weight, b, targets[:-1])
    assert (default_chunk_size(51200), default_chunk_size(32064)) == (655, 1046)  # ~128 MiB fp32 logits each


def _batch(vocab, B=3, T=11, seed=1):
    """Right padding (row 1), left padding (row 2), prompt tokens without loss in every row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -4:] = 0
    mask[2, :3] = 0
    labels = ids.clone()
    labels[mask == 0] = IGNORE_INDEX
    labels[:, :3] = IGNORE_INDEX  # the prompt
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return SimpleNamespace(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=labels)


@pytest.mark.parametrize("shape", ["phi-2", "phi-3-mini-4k"])
def test_model_loss_matches_full_logits_loss(shape):
    model = phicore_model(shape).train()
    if shape == "phi-2":
        assert model.lm_head.bias is not None  # Phi-2's head has a bias: it must count
    batch = _batch(model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(loss_fn):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # Phi-2's residual dropout draws the same masks in both runs
        loss = loss_fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    assert LOSS_IGNORE_INDEX == IGNORE_INDEX
    ref_loss, ref_grads = run(lambda: full_logits_loss_sum(model, batch))
    for name, fn in (
        ("model(labels=)", lambda: model(batch.input_ids, batch.attention_mask, batch.position_ids,
                                         labels=batch.labels)),
        ("5-token chunks", lambda: next_token_loss_sum(
            model.hidden_states(batch.input_ids, batch.attention_mask, batch.position_ids), model.lm_head,
            batch.labels, chunk_size=5)),
    ):
        loss, grads = run(fn)
        print(f"{shape} {name}: loss {loss.item():.6f} vs {ref_loss.item():.6f}, max grad diff "
              f"{max((a - b).abs().max().item() for a, b in zip(grads, ref_grads)):.2e}")
        torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=0)
        assert any(g.abs().max() > 0 for g in grads)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-6)
    model.eval()
    with torch.no_grad():  # evaluation: same value, nothing saved
        torch.testing.assert_close(model(batch.input_ids, batch.attention_mask, batch.position_ids, labels=batch.labels),
                                   full_logits_loss_sum(model, batch), rtol=RTOL, atol=0)


def test_model_loss_under_bf16_autocast():
    """CPU autocast bf16: the same dtype rules as the plain path (bf16 matmuls, fp32 softmax)."""
    model = phicore_model("phi-3-mini-4k").train()
    batch = _batch(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = full_logits_loss_sum(model, batch)
        got = model(batch.input_ids, batch.attention_mask, batch.position_ids, labels=batch.labels)
    assert got.dtype == torch.float32
    got.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-2, atol=0)  # bf16 logits: rounding-level


def test_model_loss_through_ddp(tmp_path):
    """The training loop hands the loss a DDP wrapper (or an FSDP2-sharded model): the loss runs
    through its forward (`model(..., labels=...)`), so it works as given. One-process gloo group."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = phicore_model("phi-3-mini-4k").train()
    batch = _batch(model.config.vocab_size)
    expected = full_logits_loss_sum(model, batch)
    expected.backward()
    want = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DDP(model)
        loss = ddp(batch.input_ids, batch.attention_mask, batch.position_ids, labels=batch.labels)
        loss.backward()
        # DDP's reducer must go before its process group: freed after destroy_process_group(),
        # gloo's destructor joins its threads while holding the GIL and can deadlock
        del ddp
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=RTOL, atol=0)
    for got, ref in zip([p.grad for p in model.parameters() if p.requires_grad], want):
        torch.testing.assert_close(got, ref, rtol=RTOL, atol=1e-6)


_MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, torch, torch.nn.functional as F
    from phicore.loss import fused_linear_cross_entropy_sum

    def status(field):  # bytes, from /proc/self/status (VmRSS: now, VmHWM: peak since reset)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    mode, N, H, V = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight, bias = torch.randn(V, H, generator=g).mul_(0.02), torch.randn(V, generator=g).mul_(0.02)
    targets = torch.randint(0, V, (N,), generator=g)
    F.linear(hidden[:8].detach(), weight).sum()  # warm the allocator and kernels
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    base = status("VmRSS")
    if mode == "plain":
        loss = F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")
    else:
        loss = fused_linear_cross_entropy_sum(hidden, weight, bias, targets, chunk_size=int(sys.argv[5]))
    loss.backward()
    print(json.dumps({"mode": mode, "extra_peak_bytes": status("VmHWM") - base, "loss": loss.item()}))
    """
)


def _probe(*args):
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_is_a_fraction_of_the_full_logits():
    """512 tokens x Phi-2's vocabulary 51200 (hidden 256 to keep the head small): the plain loss
    holds 105 MB fp32 logits plus their gradient; 64-token chunks hold 13 MB at a time."""
    N, H, V = 512, 256, 51200
    plain = _probe("plain", N, H, V)
    fused = _probe("fused", N, H, V, 64)
    mb = 1 / 2**20
    print(f"extra peak RSS, {N} tokens x vocab {V}: plain {plain['extra_peak_bytes'] * mb:.0f} MiB, "
          f"chunked {fused['extra_peak_bytes'] * mb:.0f} MiB (logits alone: {N * V * 4 * mb:.0f} MiB)")
    assert abs(plain["loss"] - fused["loss"]) <= RTOL * abs(plain["loss"])
    assert plain["extra_peak_bytes"] >= N * V * 4  # the oracle really holds the full logits
    assert fused["extra_peak_bytes"] < 0.5 * plain["extra_peak_bytes"]
