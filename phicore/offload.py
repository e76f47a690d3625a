"""Gradient checkpointing with each layer's saved input offloaded to (pinned) CPU memory.

Why: per-layer checkpointing keeps one tensor per decoder layer alive from forward to backward,
the layer's input h (B, T, D): 32 layers x 2048 tokens x 3072 x 2 B = 0.4 GB for Phi-3-mini in
bf16. Offloading moves those bytes to host memory while the forward goes on, and brings each
back when its layer's backward needs it, so the GPU holds about one layer input at a time
(unsloth's "offloaded gradient checkpointing"). cos, sin and the mask are small and shared by
every layer: they stay on the device.

The layer's node is phicore.layer_checkpoint's `LayerCheckpoint`, with this module's store in
place of plain checkpointing's:
    keep:     copy h to a host buffer (on CUDA: pinned, non_blocking on a side stream that
              first waits for the compute stream; `record_stream` keeps h's device block from
              being reused before the copy ends; an event marks the copy done). h itself is
              not referenced afterwards, so its device memory is freed with the forward's.
    fetch:    in the layer's backward, bring h back (on CUDA: wait for the offload event, copy
              host -> device); the node then recomputes the layer with the forward's RNG and
              autocast state, as plain checkpointing does.
    prefetch: layer i's fetch first starts layer i-1's host -> device copy on the side
              stream, so it overlaps layer i's recompute; layer i-1 then waits on its event.

On CPU the same path runs (h copied into a separate CPU buffer, the original freed; the copy
back returns that buffer), so tests exercise it; streams, pinning and events are CUDA only.
Training only: no KV cache. Not under FSDP2 (its hooks unshard parameters inside the module's
forward, which this node does not see as inputs); train.py refuses that combination.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn

from .layer_checkpoint import KeptInputs


@dataclass
class OffloadedInput:
    """One layer's input held in host memory, and its way back to the device."""

    index: int  # the layer's position in this forward (backward walks them in reverse)
    host: torch.Tensor  # (B, T, D) copy in CPU memory (pinned when the source is CUDA)
    device: torch.device  # where the layer runs
    offloaded: Optional["torch.cuda.Event"] = None  # CUDA: device -> host copy done
    prefetched: Optional[torch.Tensor] = None  # (B, T, D) back on the device, ahead of its backward
    prefetch_done: Optional["torch.cuda.Event"] = None  # CUDA: host -> device prefetch done


class ActivationOffloader(KeptInputs):
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
        return super().checkpoint(layer, h, cos, sin, mask)

    def keep(self, h: torch.Tensor) -> "OffloadedInput":
        """The layer checkpoint's store: h goes to host memory (`offload`)."""
        return self.offload(h)

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
