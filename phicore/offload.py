"""Gradient checkpointing with each layer's saved input offloaded to (pinned) CPU memory.

Why: per-layer checkpointing keeps one tensor per decoder layer alive from forward to backward,
the layer's input h (B, T, D): 32 layers x 2048 tokens x 3072 x 2 B = 0.4 GB for Phi-3-mini in
bf16. Offloading moves those bytes to host memory while the forward goes on, and brings each
back when its layer's backward needs it, so the GPU holds about one layer input at a time
(unsloth's "offloaded gradient checkpointing"). cos, sin and the mask are small and shared by
every layer: they stay on the device.

One autograd node per layer (`OffloadedCheckpoint`):
    forward:  copy h to a host buffer (on CUDA: pinned, non_blocking on a side stream that
              first waits for the compute stream; `record_stream` keeps h's device block from
              being reused before the copy ends; an event marks the copy done), then run the
              layer with every tensor it would save for backward dropped at once
              (`saved_tensors_hooks`), and return its output. Grad mode is on for that run, so
              the layer takes the very code path its recompute will (fused LoRA node, kernels):
              the forward values are the recomputed graph's values exactly.
    backward: bring h back (on CUDA: wait for the offload event, copy host -> device), restore
              the RNG state (CPU and the device's) and the autocast state the forward saw, so
              dropout masks and dtypes match; recompute the layer on h as a fresh leaf; return
              dL/dh and dL/dparam for the layer's trainable parameters through
              `torch.autograd.grad`. The parameters are inputs of the node, so their gradients
              are accumulated by the outer backward like any other (DDP's hooks fire as usual).
    prefetch: layer i's backward first starts layer i-1's host -> device copy on the side
              stream, so it overlaps layer i's recompute; layer i-1 then waits on its event.

On CPU the same path runs (h copied into a separate CPU buffer, the original freed; the copy
back returns that buffer), so tests exercise it; streams, pinning and events are CUDA only.
Training only: no KV cache. Not under FSDP2 (its hooks unshard parameters inside the module's
forward, which this node does not see as inputs); train.py refuses that combination.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import get_device_states, set_device_states


@dataclass
class OffloadedInput:
    """One layer's input held in host memory, and its way back to the device."""

    index: int  # the layer's position in this forward (backward walks them in reverse)
    host: torch.Tensor  # (B, T, D) copy in CPU memory (pinned when the source is CUDA)
    device: torch.device  # where the layer runs
    offloaded: Optional["torch.cuda.Event"] = None  # CUDA: device -> host copy done
    prefetched: Optional[torch.Tensor] = None  # (B, T, D) back on the device, ahead of its backward
    prefetch_done: Optional["torch.cuda.Event"] = None  # CUDA: host -> device prefetch done


class ActivationOffloader:
    """The offloaded layer inputs of one forward pass, in layer order, and the side stream
    their copies run on. Build one per forward (`PhiForCausalLM.hidden_states` does) and call
    `checkpoint(layer, h, ...)` for each layer in order.

    `prefetch_hits` counts backward steps whose input was already fetched by the layer after
    them (a measure of the overlap; every layer but the last-run one, in a full backward)."""

    def __init__(self, device: torch.device, prefetch: bool = True):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self.prefetch = prefetch
        self.records: List[OffloadedInput] = []
        self.prefetch_hits = 0

    @torch.compiler.disable
    def checkpoint(self, layer: nn.Module, h: torch.Tensor, cos, sin, mask, cache=None) -> torch.Tensor:
        """layer(h, cos, sin, mask) (B, T, D) -> (B, T, D), h kept in host memory for backward.

        Always eager, also inside a torch.compile'd model: the recompute in backward runs
        eagerly, so the forward must too, or their dropout draws (compiled RNG vs eager) differ."""
        if cache is not None:
            raise ValueError("offloaded gradient checkpointing is for training: it cannot fill a KV cache")
        params = [p for p in layer.parameters() if p.requires_grad]
        return OffloadedCheckpoint.apply(h, cos, sin, mask, layer, self, *params)

    # -- device -> host (forward)

    def offload(self, h: torch.Tensor) -> OffloadedInput:
        """Copy h into a new host buffer and record it; h itself is no longer needed after this."""
        record = OffloadedInput(index=len(self.records), host=_host_buffer(h), device=h.device)
        if self.cuda:
            compute = torch.cuda.current_stream(h.device)
            self.stream.wait_stream(compute)  # h is written on the compute stream
            with torch.cuda.stream(self.stream):
                record.host.copy_(h, non_blocking=True)
                record.offloaded = torch.cuda.Event()
                record.offloaded.record(self.stream)
            h.record_stream(self.stream)  # the allocator must not hand h's block out before the copy ends
        else:
            record.host.copy_(h)
        self.records.append(record)
        return record

    # -- host -> device (backward)

    def fetch(self, record: OffloadedInput) -> torch.Tensor:
        """record's tensor (B, T, D) on its device, ready for the current stream; and start
        fetching the previous layer's input (it is the next backward)."""
        if record.prefetched is not None:
            h = record.prefetched
            if self.cuda:
                compute = torch.cuda.current_stream(record.device)
                compute.wait_event(record.prefetch_done)
                h.record_stream(compute)  # allocated on the side stream, used and freed on this one
            record.prefetched = record.prefetch_done = None
            self.prefetch_hits += 1
        else:
            if self.cuda:
                torch.cuda.current_stream(record.device).wait_event(record.offloaded)
            h = record.host.to(record.device, non_blocking=True)
        if self.prefetch and record.index > 0:
            self._prefetch(self.records[record.index - 1])
        return h

    def _prefetch(self, record: OffloadedInput) -> None:
        """Start copying record's input back on the side stream (on CPU: the buffer itself)."""
        if record.prefetched is not None:
            return
        if self.cuda:
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(record.offloaded)
                record.prefetched = record.host.to(record.device, non_blocking=True)
                record.prefetch_done = torch.cuda.Event()
                record.prefetch_done.record(self.stream)
        else:
            record.prefetched = record.host.to(record.device)


def _host_buffer(h: torch.Tensor) -> torch.Tensor:
    """An empty CPU tensor shaped like h: pinned when h is on CUDA (asynchronous copies, from
    PyTorch's caching host allocator), a plain new buffer otherwise."""
    return torch.empty(h.shape, dtype=h.dtype, device="cpu", pin_memory=h.is_cuda)


def _drop_saved(tensor: torch.Tensor) -> None:
    """saved_tensors_hooks pack: keep nothing (the recompute in backward rebuilds it)."""
    return None


def _never_unpacked(_) -> torch.Tensor:
    raise RuntimeError("internal: a graph built inside an offloaded checkpoint's forward was differentiated")


def _autocast_states(device_type: str):
    """[(device type, enabled, dtype)] for the layer's device and the CPU, and the cache flag."""
    types = [device_type] + ([] if device_type == "cpu" else ["cpu"])
    states = [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types]
    return states, torch.is_autocast_cache_enabled()


class OffloadedCheckpoint(torch.autograd.Function):
    """y = layer(h, cos, sin, mask) with h kept in host memory and the layer recomputed in
    backward (see the module docstring). The inputs after `layer` and the offloader are the
    layer's trainable parameters, so their gradients leave through this node."""

    @staticmethod
    def forward(ctx, h, cos, sin, mask, layer, offloader, *params):
        # h (B, T, D); cos, sin (B, T, R); mask (B|1, 1, T, S) bool, a flex BlockMask, or None
        ctx.layer, ctx.offloader, ctx.params = layer, offloader, params
        ctx.cpu_rng = torch.get_rng_state()  # dropout draws: replayed exactly by the recompute
        ctx.device_type = h.device.type
        ctx.device_ids, ctx.device_rng = get_device_states(h) if h.device.type != "cpu" else ([], [])
        ctx.autocast, ctx.autocast_cache = _autocast_states(h.device.type)
        ctx.record = offloader.offload(h)
        ctx.mask = None if isinstance(mask, torch.Tensor) else mask  # a BlockMask is no tensor to save
        ctx.save_for_backward(cos, sin, mask if isinstance(mask, torch.Tensor) else None)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop_saved, _never_unpacked):
            out = layer(h.detach().requires_grad_(h.requires_grad), cos, sin, mask, None)  # (B, T, D)
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        # grad_out (B, T, D) -> dL/dh (B, T, D), None for cos/sin/mask/layer/offloader, dL/dparams
        cos, sin, mask = ctx.saved_tensors
        mask = mask if ctx.mask is None else ctx.mask
        h = ctx.offloader.fetch(ctx.record)  # (B, T, D) back on the device
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
