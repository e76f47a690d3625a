"""Frozen linear layers whose weight is dense or NF4: the base that LoRA adapts.

    y = x @ W^T + b         W (out, in): a float Parameter, or NF4 bytes dequantised on the fly

`FrozenLinear` is that layer, for both kinds of W. It owns `weight` and `bias` under nn.Linear's
names and, when W is NF4, the quantisation state bitsandbytes' Linear4bit keeps (absmax, code
tables, blocksize, ...), so a model's state-dict keys are the checkpoint's whatever the layer
adds on top. It is the one reader and writer of bitsandbytes' 4-bit entries:

    P.weight (packed uint8 [(out*in+1)//2, 1]), P.bias, P.weight.absmax, P.weight.quant_map,
    P.weight.nested_absmax, P.weight.nested_quant_map, P.weight.quant_state.bitsandbytes__nf4

and it knows how to quantise on load: a dense float `P.weight` arriving for an NF4 layer is
quantised there (on the tensor's device, with the layer's blocksize and double quantisation) and
only the packed bytes are kept, so a dense checkpoint streams into a 4-bit model at the memory
of the 4-bit model plus one dense tensor. A pre-quantised checkpoint's entries are taken as they are.

- `NF4Linear` is the NF4 case (what `quantize_model_linears` installs; the format is phicore.nf4).
- `phicore.lora.LoRALinear(FrozenLinear)` takes over an nn.Linear's or an NF4Linear's tensors
  (the same objects, nothing copied) and adds the adapter.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .kernels import dequantize_nf4
from .nf4 import (
    BLOCKSIZES,
    GEMV_MAX_TOKENS,
    NESTED_BLOCKSIZE,
    QUANT_STATE_KEY,
    NF4MatMul,
    NF4State,
    bnb_entries,
    dynamic_code,
    nf4_code,
    quantize_nf4,
    state_from_bnb_entries,
)

# NF4 state: buffers (follow .to(device), keep their dtypes, non-persistent: the state dict writes
# them under bitsandbytes' names) and plain attributes. None / unset for a dense weight.
_STATE_BUFFERS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_STATE_ATTRS = ("compute_dtype", "blocksize", "quant_dtype", "offset", "nested_blocksize")


class FrozenLinear(nn.Module):
    """A frozen linear layer y = x W^T + b whose W is a dense float Parameter or NF4 bytes.

    weight: dense (out, in), or packed uint8 [(out*in+1)//2, 1] (`is_nf4`), requires_grad=False.
    bias: (out,) or None. NF4 only: buffers absmax, quant_map, nested_absmax, nested_quant_map and
    attributes blocksize, quant_dtype (W's dtype before quantisation, bnb's "dtype"), offset,
    nested_blocksize, compute_dtype (the dtype W is dequantised to and x cast to; None when dense:
    the product runs in x's dtype, as nn.Linear's).

    Not built directly: make an NF4Linear, or a LoRALinear over an nn.Linear or NF4Linear.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)
        for name in _STATE_BUFFERS:
            self.register_buffer(name, None, persistent=False)
        self.compute_dtype: Optional[torch.dtype] = None
        self.blocksize: Optional[int] = None
        self.quant_dtype: Optional[torch.dtype] = None
        self.offset: Optional[float] = None
        self.nested_blocksize = NESTED_BLOCKSIZE

    def _adopt(self, base: nn.Module) -> None:
        """Take over `base`'s weight and bias (the same Parameters) and, when it is NF4, its
        quantisation state (the same tensors): nothing is allocated or copied."""
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        if isinstance(base, FrozenLinear):
            for name in _STATE_BUFFERS:
                self._buffers[name] = base._buffers[name]
            for attr in _STATE_ATTRS:
                setattr(self, attr, getattr(base, attr))

    # -- what the weight is

    @property
    def is_nf4(self) -> bool:
        """Whether W is stored as NF4 bytes (else a dense float Parameter)."""
        return self.quant_map is not None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def quant_state(self) -> NF4State:
        """Everything besides the packed bytes needed to dequantise W (NF4 only)."""
        return NF4State(
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.quant_dtype,
            blocksize=self.blocksize,
            code=self.quant_map,
            nested_absmax=self.nested_absmax,
            nested_code=self.nested_quant_map,
            offset=self.offset,
            nested_blocksize=self.nested_blocksize,
        )

    def dense_weight(self) -> torch.Tensor:
        """W as a dense float tensor (out, in): the Parameter itself, or NF4 dequantised to
        compute_dtype (a fresh tensor). DoRA, the fused LoRA backward and merging use it."""
        if self.is_nf4:
            return dequantize_nf4(self.weight, self.quant_state, self.compute_dtype)
        return self.weight

    def dequantize_(self) -> None:
        """Hold W dense from now on: dequantised once into compute_dtype, the NF4 bytes and state
        dropped. The same numbers every NF4 forward computes with; costs the dense weight's memory
        and saves a dequantise per call (infer.py --dense-base on CPU/MPS)."""
        if not self.is_nf4:
            return
        self.weight = nn.Parameter(self.dense_weight(), requires_grad=False)  # (out, in)
        for name in _STATE_BUFFERS:
            self._buffers[name] = None
        self.compute_dtype = self.blocksize = self.quant_dtype = self.offset = None

    def set_quantized(self, packed: torch.Tensor, state: NF4State, bias: Optional[torch.Tensor] = None) -> None:
        """Take `packed`/`state` (and `bias`, when given) as this layer's frozen weight (no copy)."""
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"NF4 state shape {tuple(state.shape)} != ({self.out_features}, {self.in_features})")
        self.weight = nn.Parameter(packed, requires_grad=False)
        self._take_quant_state(state, assign=True)
        if bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)

    def _take_quant_state(self, state: NF4State, assign: bool) -> None:
        """Install `state`'s tensors as the NF4 buffers: as they are with `assign`, else copied
        into the current buffers where shape and dtype agree (another blocksize or double-quant
        setting than the layer was built with replaces them)."""
        values = (state.absmax, state.code, state.nested_absmax, state.nested_code)
        for name, value in zip(_STATE_BUFFERS, values):
            current = self._buffers[name]
            if value is None or assign or current is None or current.is_meta:
                self._buffers[name] = value if value is None or assign else value.to(self.weight.device)
            elif current.shape == value.shape and current.dtype == value.dtype:
                with torch.no_grad():
                    current.copy_(value)
            else:
                self._buffers[name] = value.to(current.device)
        self.blocksize = state.blocksize
        self.quant_dtype = state.dtype
        self.offset = state.offset
        self.nested_blocksize = state.nested_blocksize

    # -- the product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out). NF4: computed in compute_dtype, returned in x's dtype."""
        if not self.is_nf4:
            return F.linear(x, self.weight, self.bias)
        x_c = x.to(self.compute_dtype)
        if self._use_gemv(x_c):
            y = kernels.nf4_matvec(x_c, self.weight, self.quant_state, self.bias)  # no autograd node
        else:
            y = NF4MatMul.apply(x_c, self.weight, self.quant_state, self.bias)
        return y.to(x.dtype)

    def _use_gemv(self, x: torch.Tensor) -> bool:
        """The 4-bit matrix-vector kernel: where its Triton kernel runs (CUDA by default; CPU keeps
        the dense path bit for bit), for at most GEMV_MAX_TOKENS tokens, when no gradient can flow
        (it records no autograd node, like NF4MatMul would not under no_grad)."""
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (self.bias is not None and self.bias.requires_grad)
        )
        return (
            not needs_grad
            and x.numel() <= GEMV_MAX_TOKENS * self.in_features
            and kernels.uses_triton("nf4_gemv", x.device)
        )

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.is_nf4:
            text += (f", blocksize={self.blocksize}, double_quant={self.double_quant}, "
                     f"compute_dtype={self.compute_dtype}")
        return text

    # -- module plumbing: dtype moves and bitsandbytes-compatible state dicts

    def _apply(self, fn, recurse=True):
        # Quant-state buffers follow device moves but keep their dtypes: model.to(torch.bfloat16)
        # must not round absmax or the code tables.
        before = {name: self._buffers[name] for name in _STATE_BUFFERS if self._buffers[name] is not None}
        super()._apply(fn, recurse)
        for name, tensor in before.items():
            moved = self._buffers[name]
            if moved.dtype != tensor.dtype:
                self._buffers[name] = tensor.to(moved.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight, bias (and a subclass's own)
        if self.is_nf4:
            for name, value in bnb_entries(self.quant_state).items():
                destination[prefix + "weight." + name] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Dense: nn.Module's. NF4: bitsandbytes' entries (`weight.absmax`, ...) are read as they
        are; without them a dense float `weight` is quantised here and its dense copy dropped."""
        if not self.is_nf4:
            return super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        weight_key, entry_prefix = prefix + "weight", prefix + "weight."
        entries = {k[len(entry_prefix):]: v for k, v in state_dict.items() if k.startswith(entry_prefix)}
        rest = {k: v for k, v in state_dict.items() if k.startswith(prefix) and not k.startswith(entry_prefix)}
        state = None
        if entries:  # a 4-bit checkpoint: packed bytes + quant state
            try:
                state = state_from_bnb_entries(entries, entry_prefix)
            except KeyError as absent:
                missing_keys.extend(entry_prefix + name for name in absent.args)
            except ValueError as err:
                error_msgs.append(str(err))
            if state is not None and tuple(state.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{entry_prefix}{QUANT_STATE_KEY}: shape {tuple(state.shape)} != "
                                  f"({self.out_features}, {self.in_features})")
                state = None
        elif weight_key in rest and rest[weight_key].is_floating_point():  # a dense checkpoint
            dense = rest[weight_key].detach()  # (out, in)
            if tuple(dense.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {weight_key}: copying a param with shape {tuple(dense.shape)}, "
                                  f"the shape in the current model is ({self.out_features}, {self.in_features})")
                return
            rest[weight_key], state = quantize_nf4(dense.to(self.compute_dtype), self.blocksize, self.double_quant)
            del dense
        else:
            missing_keys.append(entry_prefix + QUANT_STATE_KEY)
        if state is not None:
            self._take_quant_state(state, local_metadata.get("assign_to_params_buffers", False))
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class NF4Linear(FrozenLinear):
    """A frozen linear layer whose weight is NF4, stored and serialised like bnb's Linear4bit(nf4).

    The constructor allocates uninitialised storage (meta-device friendly): fill it with
    load_state_dict(..., assign=True) (a 4-bit or a dense state dict), or build with from_linear().
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__(in_features, out_features)
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
        self.blocksize = blocksize
        self.compute_dtype = compute_dtype
        self.quant_dtype = compute_dtype
        self.offset = 0.0 if double_quant else None
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device)  # two 4-bit codes a byte
        self.weight = nn.Parameter(packed, requires_grad=False)
        if bias:
            bias_tensor = torch.empty(out_features, dtype=compute_dtype, device=device)
            self.bias = nn.Parameter(bias_tensor, requires_grad=False)
        self.absmax = torch.empty(n_blocks, dtype=torch.uint8 if double_quant else torch.float32, device=device)
        self.quant_map = nf4_code(device)
        if double_quant:
            self.nested_absmax = torch.empty(-(-n_blocks // NESTED_BLOCKSIZE), dtype=torch.float32, device=device)
            self.nested_quant_map = dynamic_code(device)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
    ) -> "NF4Linear":
        """Quantise `linear` on its device. Its dense weight is released (linear.weight becomes None).

        A meta-device `linear` gives an empty meta-device NF4Linear, to be filled by load_state_dict.
        """
        weight = linear.weight
        compute_dtype = weight.dtype if compute_dtype is None else compute_dtype
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, blocksize=blocksize,
                     double_quant=double_quant, compute_dtype=compute_dtype, device="meta")
        if not weight.is_meta:
            packed, state = quantize_nf4(weight.detach(), blocksize, double_quant)
            bias = None if linear.bias is None else linear.bias.detach().to(compute_dtype)
            module.set_quantized(packed, state, bias)
        linear.weight = None
        return module

    def dequantize(self) -> torch.Tensor:
        """The dense weight (out, in) in compute_dtype."""
        return self.dense_weight()


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def dequantize_frozen_linears(model: nn.Module) -> int:
    """Hold every NF4 FrozenLinear of `model` (an NF4Linear, or a LoRALinear over one) dense from
    now on (FrozenLinear.dequantize_), one layer at a time. Returns how many there were."""
    layers = [module for module in model.modules() if isinstance(module, FrozenLinear) and module.is_nf4]
    for layer in layers:
        layer.dequantize_()
    return len(layers)


def quantize_model_linears(
    model: nn.Module,
    skip: Iterable[str] = ("lm_head",),
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: Optional[torch.dtype] = None,
) -> list[str]:
    """Replace every plain nn.Linear in `model` by an NF4Linear, in place, one layer at a time
    (quantised on the layer's device; each dense weight is released as soon as it is quantised).

    `skip` names modules to keep dense: a full module name or its last component(s) ("lm_head").
    Embeddings and norms are not nn.Linear and stay dense. Returns the names replaced.
    """
    skip = tuple(skip)
    replaced, done = [], {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is not nn.Linear or _skipped(name, skip):
                continue
            if id(child) not in done:  # the same Linear reachable twice becomes one NF4Linear
                done[id(child)] = NF4Linear.from_linear(child, blocksize, double_quant, compute_dtype)
                done[id(child)].train(child.training)
            setattr(parent, child_name, done[id(child)])
            replaced.append(name)
    return replaced
