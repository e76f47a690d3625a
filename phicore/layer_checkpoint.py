"""Gradient checkpointing of one decoder layer as one autograd node: the layer's input kept, the
layer recomputed in backward.

Why not torch.utils.checkpoint (non-reentrant), which phicore used before: it builds the layer's
graph in the forward and routes every tensor that graph saves (~38 per Phi-3 layer with LoRA)
through a pack hook with its own holder, recomputes lazily from the first unpack hook, and checks
each recomputed tensor's shape and dtype against the forward's. That is host time, and the H200
training steps were bound by host time (bench/NOTES.md: 111 ms of GPU work in a 263-340 ms step).
At negligible compute (32 layers of width 64, 16 tokens, one CPU thread: pure host cost) a LoRA
step of the Phi-3 layout costs 98.7 ms through torch.utils.checkpoint and 81.4 ms through this
node, Phi-2's 118.7 and 91.3 ms (`python bench/host_overhead.py [--shape phi-2]`,
bench/results/host-overhead-cpu-2026-11-26-*.json).

The node (`LayerCheckpoint`), per layer:
    forward:  keep the input h (`store.keep`: the tensor itself here; phicore.offload's store
              copies it to host memory instead), save the RNG states (CPU and h's device) and
              the autocast state, then run the layer with grad mode on and every tensor it would
              save for backward dropped at once (`saved_tensors_hooks`): the forward takes the
              very code path the recompute will (fused LoRA node, kernels), so the forward's
              values are the recomputed graph's values exactly. Return its output, detached.
    backward: fetch h back (`store.fetch`), restore the RNG and autocast states, recompute the
              layer on h as a fresh leaf, and return dL/dh and dL/dparam for the layer's
              trainable parameters through `torch.autograd.grad`. The parameters are inputs of
              the node, so their gradients are accumulated by the outer backward like any other
              (DDP's hooks fire as usual).

`checkpoint_layer` picks the node or torch.utils.checkpoint: torch's under torch.compile (dynamo
traces its checkpoint, not this node), under FSDP2 (it gathers a layer's parameters inside the
layer's forward, out of this node's sight), with a KV cache, and when forced with
`phicore.force_paths(layer_checkpoint="torch")` (tests compare the two; the bench's
`--phicore-option torch-checkpoint` measures the difference).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint
from torch.utils.checkpoint import get_device_states, set_device_states

from .code_paths import current_paths

MODES = ("auto", "phicore", "torch")  # phicore.force_paths(layer_checkpoint=...); auto: phicore's node where it can run


class KeptInputs:
    """The input store of plain checkpointing: each layer's input stays where it is, the tensor
    itself (no copy), until its backward. phicore.offload.ActivationOffloader is the other store."""

    def keep(self, h: torch.Tensor):
        """A record of h for `fetch` (here h, detached: the node's own reference to its storage)."""
        return h.detach()

    def fetch(self, record) -> torch.Tensor:
        """The kept input (B, T, D) back, ready for the recompute."""
        return record

    def checkpoint(self, layer: nn.Module, h: torch.Tensor, cos, sin, mask) -> torch.Tensor:
        """layer(h, cos, sin, mask) (B, T, D) -> (B, T, D), recomputed in backward."""
        params = [p for p in layer.parameters() if p.requires_grad]
        return LayerCheckpoint.apply(h, cos, sin, mask, layer, self, *params)


_KEPT = KeptInputs()


def checkpoint_layer(layer: nn.Module, h: torch.Tensor, cos, sin, mask, cache=None) -> torch.Tensor:
    """One checkpointed decoder layer: phicore's node (`LayerCheckpoint`), or torch.utils.checkpoint
    where the node cannot run or is forced off (the module docstring says where)."""
    mode = current_paths().layer_checkpoint
    if mode == "torch" or cache is not None or torch.compiler.is_compiling() or _sharded(layer):
        return torch_checkpoint(layer, h, cos, sin, mask, cache, use_reentrant=False)
    return _KEPT.checkpoint(layer, h, cos, sin, mask)


def _sharded(layer: nn.Module) -> bool:
    """Whether FSDP2's fully_shard wraps `layer` (its class then derives from FSDPModule); by
    name, so torch.distributed is not imported for the check."""
    return any(cls.__name__ == "FSDPModule" for cls in type(layer).__mro__)


def _drop_saved(tensor: torch.Tensor) -> None:
    """saved_tensors_hooks pack: keep nothing (the recompute in backward rebuilds it)."""
    return None


def _never_unpacked(_) -> torch.Tensor:
    raise RuntimeError("internal: a graph built inside a checkpointed layer's forward was differentiated")


def _autocast_states(device_type: str):
    """[(device type, enabled, dtype)] for the layer's device and the CPU, and the cache flag."""
    types = [device_type] + ([] if device_type == "cpu" else ["cpu"])
    states = [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types]
    return states, torch.is_autocast_cache_enabled()


class LayerCheckpoint(torch.autograd.Function):
    """y = layer(h, cos, sin, mask) with h kept by `store` and the layer recomputed in backward
    (the module docstring). The inputs after `layer` and `store` are the layer's trainable
    parameters, so their gradients leave through this node."""

    @staticmethod
    def forward(ctx, h, cos, sin, mask, layer, store, *params):
        # h (B, T, D); cos, sin (B, T, R); mask (B|1, 1, T, S) bool, a flex BlockMask, or None
        ctx.layer, ctx.store, ctx.params = layer, store, params
        ctx.cpu_rng = torch.get_rng_state()  # dropout draws: replayed exactly by the recompute
        ctx.device_type = h.device.type
        ctx.device_ids, ctx.device_rng = get_device_states(h) if h.device.type != "cpu" else ([], [])
        ctx.autocast, ctx.autocast_cache = _autocast_states(h.device.type)
        ctx.record = store.keep(h)
        ctx.mask = None if isinstance(mask, torch.Tensor) else mask  # a BlockMask is no tensor to save
        ctx.save_for_backward(cos, sin, mask if isinstance(mask, torch.Tensor) else None)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop_saved, _never_unpacked):
            out = layer(h.detach().requires_grad_(h.requires_grad), cos, sin, mask, None)  # (B, T, D)
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        # grad_out (B, T, D) -> dL/dh (B, T, D), None for cos/sin/mask/layer/store, dL/dparams
        cos, sin, mask = ctx.saved_tensors
        mask = mask if ctx.mask is None else ctx.mask
        h = ctx.store.fetch(ctx.record)  # (B, T, D)
        need_h, need_params = ctx.needs_input_grad[0], ctx.needs_input_grad[6:]
        rng_type = ctx.device_type if ctx.device_type != "cpu" else "cuda"
        with torch.random.fork_rng(devices=ctx.device_ids, device_type=rng_type):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.device_ids:
                set_device_states(ctx.device_ids, ctx.device_rng, device_type=ctx.device_type)
            with torch.enable_grad(), contextlib.ExitStack() as stack:
                for device_type, enabled, dtype in ctx.autocast:
                    stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled,
                                                       cache_enabled=ctx.autocast_cache))
                h = h.detach().requires_grad_(need_h)
                out = ctx.layer(h, cos, sin, mask, None)  # (B, T, D), recomputed
        params = [p for p, need in zip(ctx.params, need_params) if need]
        wanted = ([h] if need_h else []) + params
        grads = list(torch.autograd.grad(out, wanted, grad_out, allow_unused=True)) if wanted else []
        del out, h
        grad_h = grads.pop(0) if need_h else None
        grad_params = [grads.pop(0) if need else None for need in need_params]
        return (grad_h, None, None, None, None, None, *grad_params)
