"""Data parallelism on PyTorch's own machinery: `torchrun` starts the processes, this module
reads where each one stands and wraps the model.

    torchrun --nproc_per_node=N train.py ...       # one process ("rank") per GPU

`DistContext.from_env()` reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun; absent means
one process, and then every method here is a no-op); `init()` joins the process group (NCCL on
CUDA, gloo on CPU). The training loop then asks it to:

- `wrap` the model: DDP over the trainable (adapter) parameters, or FSDP2 (`fully_shard` on
  each decoder layer, then the root) with `fsdp=True`, which shards the frozen base too.
  `build_sharded` loads and shards a base one rank of a node at a time, so host memory
  holds one whole copy of the base at most (FSDP2 then moves each rank's shards to its GPU).
  Gradients are SUMMED across ranks, not averaged: each rank backpropagates its summed token
  loss divided by the step's global target-token count (`all_reduce_sum`), so the sum over
  ranks is exactly one big batch's token-mean gradient, however the tokens fall on the ranks.
- `no_sync` on all but the last micro-batch of an accumulation step (no communication).
- gather and scatter what checkpoints hold: FSDP2 keeps each adapter and optimizer tensor as
  a sharded DTensor; `full_adapter` swaps in full tensors for writing PEFT files, and
  `gather_optimizer_state` / `shard_optimizer_state` turn the optimizer state into plain full
  tensors and back, so checkpoints look the same whichever way a run was launched.

Only rank 0 writes files (`is_main`); every rank takes part in the collectives before that.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..lora import lora_layers
from ..peft_io import save_adapter


class DistributedSetupError(ValueError):
    """A launch this module cannot honour (a backend or base FSDP2 does not support, ...)."""


def _sum_gradients_hook(process_group, bucket):
    """DDP communication hook: all-reduce SUM (DDP's default divides by the world size)."""
    group = process_group if process_group is not None else dist.group.WORLD
    future = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return future.then(lambda fut: fut.value()[0])


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(tensor, DTensor)


@dataclass
class DistContext:
    """Where this process stands in a data-parallel run (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    fsdp: bool = False  # set once the model is sharded with FSDP2
    _device_mesh: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_env(cls) -> "DistContext":
        """Read torchrun's environment; no process group is joined yet."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(rank=int(os.environ.get("RANK", "0")), world_size=world,
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------- setup
    def device_for(self, requested: Optional[str], default: torch.device) -> torch.device:
        """This rank's device: cuda:LOCAL_RANK when training on CUDA data-parallel. A device this
        machine does not have is a DistributedSetupError."""
        device = torch.device(requested) if requested else default
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DistributedSetupError(f"{device}: no CUDA device here (a CPU-only PyTorch build, or no GPU "
                                        "visible); leave --device out to use the best available")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise DistributedSetupError(f"{device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise DistributedSetupError(f"{device}: Apple's MPS is not available here")
        if not self.enabled:
            return device
        if device.type == "cuda":
            if device.index is not None and requested and ":" in requested:
                raise DistributedSetupError(
                    f"{requested}: under torchrun each process uses cuda:LOCAL_RANK; say cuda "
                    "(or leave --device out) and pick GPUs with CUDA_VISIBLE_DEVICES")
            if self.local_rank >= torch.cuda.device_count():
                raise DistributedSetupError(
                    f"local rank {self.local_rank} has no GPU: {torch.cuda.device_count()} visible, "
                    "so start at most that many processes per node")
            return torch.device("cuda", self.local_rank)
        if device.type != "cpu":
            raise DistributedSetupError(f"{device}: data parallelism runs on CUDA (NCCL) or CPU (gloo)")
        return device

    def init(self, device: torch.device) -> None:
        """Join the process group: NCCL for CUDA tensors (gloo for the few CPU ones), or gloo."""
        if not self.enabled or dist.is_initialized():
            if dist.is_initialized():
                self.backend = dist.get_backend()
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
            self.backend = "cpu:gloo,cuda:nccl"
        else:
            self.backend = "gloo"
        dist.init_process_group(backend=self.backend, device_id=device if device.type == "cuda" else None)

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, values: list, device=None) -> list:
        """Sum a few numbers over the ranks (float64 on the collective's device)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device or "cpu")
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def all_gather_object(self, obj: Any) -> list:
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    # ------------------------------------------------------------------------- the model
    def wrap(self, model: nn.Module, device: torch.device, fsdp: bool = False) -> nn.Module:
        """The module to run forward/backward through: the model itself (one process, or
        FSDP2, which shards it in place and moves each rank's shards to `device`), or a DDP
        wrapper around it."""
        if fsdp:
            if self.enabled and not is_sharded(model):
                self.shard(model, device)
            self.fsdp = self.enabled
            return model
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        # the frozen base and the buffers are loaded (or computed) identically on every rank:
        # DDP ignores them, so it neither broadcasts gigabytes at start-up nor buffers each step
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        frozen += [name for name, _ in model.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
        ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None, forward_sync_buffers=False)
        ddp.register_comm_hook(None, _sum_gradients_hook)
        return ddp

    def shard(self, model: nn.Module, device: torch.device) -> nn.Module:
        """FSDP2 in place: `fully_shard` each decoder layer, then the root; each rank keeps its
        shard of every parameter (frozen base and adapter alike) on `device`."""
        check_fsdp_supported(model, self)
        from torch.distributed.fsdp import fully_shard

        mesh = self._mesh(device)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.set_gradient_divide_factor(1.0)  # sum, see the module docstring
        self.fsdp = True
        return model

    def build_sharded(self, build, device: torch.device) -> nn.Module:
        """`build()` a model in CPU memory and shard it with FSDP2, one rank of each node at a
        time: a node's host memory holds one whole base at most, whatever the rank count."""
        self._mesh(device)  # every rank together: creating the mesh may be collective
        model = None
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        for turn in range(local_world):
            if turn == self.local_rank:
                model = self.shard(build(), device)
            self.barrier()
        return model

    def _mesh(self, device: torch.device):
        if self._device_mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._device_mesh = init_device_mesh(device.type, (self.world_size,))
        return self._device_mesh

    def no_sync(self, engine: nn.Module, sync: bool):
        """Context for one micro-batch's backward: skip gradient communication unless `sync`."""
        if not self.enabled or sync:
            if self.fsdp and self.enabled:
                engine.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.fsdp:
            engine.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return engine.no_sync()

    @contextlib.contextmanager
    def full_adapter(self, model: nn.Module):
        """Within the block every adapter parameter is its full (unsharded) tensor, so
        `save_adapter` writes the usual PEFT file. A no-op without FSDP. Every rank must enter."""
        swapped = []
        try:
            for _, layer in lora_layers(model):
                for suffix, param in layer.adapter_parameters().items():
                    if _is_dtensor(param):
                        owner_path, _, leaf = suffix.rpartition(".")
                        owner = layer.get_submodule(owner_path) if owner_path else layer
                        owner._parameters[leaf] = nn.Parameter(param.full_tensor().detach(), requires_grad=False)
                        swapped.append((owner, leaf, param))
            yield model
        finally:
            for owner, leaf, param in swapped:
                owner._parameters[leaf] = param

    def save_adapter(self, model: nn.Module, directory, base_model_name_or_path: Optional[str] = None) -> None:
        """PEFT files of the (possibly sharded) adapter: every rank calls, rank 0 writes."""
        with self.full_adapter(model):
            if self.is_main:
                save_adapter(model, directory, base_model_name_or_path=base_model_name_or_path)

    def gather_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """optimizer.state_dict() with every sharded tensor gathered into a full one."""
        state = optimizer.state_dict()
        if not self.fsdp:
            return state
        for per_param in state["state"].values():
            for key, value in list(per_param.items()):
                if _is_dtensor(value):
                    per_param[key] = value.full_tensor()
        return state

    def shard_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """After `load_state_dict` of full tensors: shard each one like its parameter."""
        if not self.fsdp:
            return
        from torch.distributed.tensor import distribute_tensor

        for param, per_param in optimizer.state.items():
            if not _is_dtensor(param):
                continue
            for key, value in list(per_param.items()):
                if torch.is_tensor(value) and not _is_dtensor(value) and value.shape == param.shape:
                    per_param[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)


def is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """param.copy_(full) where param may be a sharded DTensor (every rank passes the full tensor)."""
    with torch.no_grad():
        if _is_dtensor(param):
            from torch.distributed.tensor import distribute_tensor

            param.copy_(distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements))
        else:
            param.copy_(full)


def check_fsdp_supported(model: nn.Module, ctx: DistContext) -> None:
    """One clear error where FSDP2 cannot shard this run."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        raise DistributedSetupError(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, PyTorch 2.6+); "
                                    f"this PyTorch is {torch.__version__}") from None
    packed = sorted({type(m).__name__ for m in model.modules()
                     if any(not t.is_floating_point() for t in m.parameters(recurse=False))})
    if packed:
        raise DistributedSetupError(
            f"--fsdp cannot shard a quantised base ({', '.join(packed)}): FSDP2 shards floating-point "
            "parameters and a 4-bit base is packed bytes. For QLoRA on several GPUs leave out --fsdp "
            "(data parallel: each GPU holds the whole 4-bit base), or shard a bf16 base with --fsdp")
    if not hasattr(getattr(model, "model", None), "layers"):
        raise DistributedSetupError("--fsdp needs a phicore decoder model (model.model.layers)")
    if ctx.enabled and ctx.backend not in ("gloo", "cpu:gloo,cuda:nccl", "nccl"):
        raise DistributedSetupError(f"--fsdp: backend {ctx.backend!r} is not supported (NCCL or gloo)")
