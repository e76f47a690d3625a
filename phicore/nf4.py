"""NF4 4-bit weights exactly as bitsandbytes stores them, and a frozen 4-bit linear for QLoRA.

Format (docs reference §4; bitsandbytes `quantize_4bit(quant_type="nf4")`):

- Flatten the weight row-major, split into blocks of `blocksize` (64) elements, absmax per block
  (float32). scaled = clamp(x * (1 / absmax), -1, 1) in fp32; code = nearest of the 16 NF4
  values, found against the 15 fp32 midpoints. A value exactly on a midpoint takes the LOWER code
  (torch.bucketize, right=False), as bitsandbytes' CPU path and its CUDA decision tree (`x > t`) do.
- Two codes per byte, element 2j in the HIGH nibble; uint8 of shape [(n+1)//2, 1]; an odd n pads
  the last low nibble with code 7 (0.0).
- Double quantisation (bnb `compress_statistics`, on by default): offset = mean(absmax); the
  centred absmax is quantised in blocks of 256 against bnb's signed 8-bit dynamic map, each block
  with its own float32 absmax (`nested_absmax`); absmax becomes uint8.
- Dequantise: code[q] * absmax[block] in fp32, cast to the compute dtype (kernels.dequantize_nf4).

State-dict keys for a 4-bit linear at prefix P: P.weight (packed uint8), P.bias,
P.weight.absmax, P.weight.quant_map, P.weight.nested_absmax, P.weight.nested_quant_map,
P.weight.quant_state.bitsandbytes__nf4 (uint8 tensor of the UTF-8 JSON bnb writes).

Where bitsandbytes' own backends disagree, we follow its PyTorch reference op and its CUDA
kernels (the ones that wrote the hub's "-bnb-4bit" checkpoints):
- NF4 codes: CUDA's decision-tree thresholds are exactly our fp32 midpoints and also send ties
  down, so the bytes agree on every backend. (bnb's CPU op divides instead of multiplying by the
  reciprocal in a partial last block; an off-by-one-ulp tie there is possible in principle.)
- 8-bit absmax codes: we take the nearest code. bnb's native CPU library sometimes returns the
  second nearest for small values (~0.25% of codes in the tests); CUDA breaks exact ties by its
  binary-search path (127 of 255 midpoints go up, which an fp32 absmax hits with odds ~2^-24).
- An all-zero block codes as 7 (0.0) here and in bnb's reference op, as 0 (-1.0) in its
  CUDA kernel (0 * 1/0 is NaN); both dequantise to zero.

bitsandbytes is not imported here; tests compare against it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .kernels import dequantize_nf4

__all__ = [
    "NF4_CODE",
    "NF4Linear",
    "NF4MatMul",
    "NF4State",
    "create_dynamic_map",
    "dynamic_code",
    "is_bnb_4bit_linear",
    "load_bnb_linear_state",
    "nf4_code",
    "nf4_state_dict",
    "quantize_model_linears",
    "quantize_nf4",
]

# bitsandbytes get_4bit_type("nf4"): quantiles of N(0, 1), normalised to [-1, 1].
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bnb accepts
NESTED_BLOCKSIZE = 256  # bnb always double-quantises absmax in blocks of 256
# NF4Linear reads its 4-bit bytes straight into the product (kernels.nf4_matvec) instead of
# dequantising the whole weight when x has at most this many tokens (batch-1 decoding: 1 per
# step); past a few rows the dense matmul reuses each dequantised weight over enough rows to win.
GEMV_MAX_TOKENS = 8
QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
_STATE_BUFFERS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")  # names after "P.weight."


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 values, float32 (a fresh tensor: state dicts must not share storage)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' `functional.create_dynamic_map()`, same float32 arithmetic, same 256 values.

    A dynamic-exponent 8-bit type (Dettmers 2015): for exponent e = 0..6, 2^e (signed) evenly
    spaced fractions in [0.1, 1] (bin midpoints) times 10^(e-6), both signs; plus 0 and 1.
    """
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    data = []

    def add(count: int, scale: float) -> None:
        bounds = torch.linspace(0.1, 1, count, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data.extend((scale * means).tolist())
        if signed:
            data.extend((-scale * means).tolist())

    for i in range(max_exponent_bits):
        extra = 0 if signed else 1
        add(int(2 ** (i + non_sign_bits - max_exponent_bits + extra) + 1), 10.0 ** (-(max_exponent_bits - 1) + i))
    if additional_items > 0:
        add(additional_items + 1, 10.0 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1))
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


_DYNAMIC_MAP = tuple(create_dynamic_map().tolist())


def dynamic_code(device=None) -> torch.Tensor:
    """bnb's signed 8-bit dynamic map, float32 (256,) (a fresh tensor)."""
    return torch.tensor(_DYNAMIC_MAP, dtype=torch.float32, device=device)


@dataclasses.dataclass
class NF4State:
    """Everything besides the packed bytes needed to dequantise one NF4 weight."""

    absmax: torch.Tensor  # float32 (n_blocks,), or uint8 (n_blocks,) when double-quantised
    shape: torch.Size  # the dense weight's shape
    dtype: torch.dtype  # the dense weight's dtype before quantisation (bnb "dtype")
    blocksize: int
    code: torch.Tensor  # float32 (16,)
    nested_absmax: Optional[torch.Tensor] = None  # float32 (ceil(n_blocks / 256),)
    nested_code: Optional[torch.Tensor] = None  # float32 (256,), bnb's dynamic map
    offset: Optional[float] = None  # mean of the absmax before double quantisation (an fp32 value)
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def to(self, device) -> "NF4State":
        def move(t):
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self,
            absmax=move(self.absmax),
            code=move(self.code),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
        )


# --------------------------------------------------------------------------- quantisation


def _quantize_blocks(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax + nearest code, as bnb's default backend does it.

    x: (n,) float32 -> (codes int32 (n,), absmax float32 (ceil(n / blocksize),)).
    Nearest code by bucketize against the fp32 midpoints of the sorted code; ties go to the lower
    code. An all-zero block keeps absmax 0 and codes the zeros as 0.0 (bnb clamps 1/absmax the same way).
    """
    n = x.numel()
    n_blocks = -(-n // blocksize)
    pad = n_blocks * blocksize - n
    blocks = (F.pad(x, (0, pad)) if pad else x).view(n_blocks, blocksize)  # zero padding leaves absmax alone
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).view(-1)[:n]
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True), absmax


def quantize_nf4(
    weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True
) -> tuple[torch.Tensor, NF4State]:
    """weight (any shape, fp32/fp16/bf16, CPU or CUDA) -> (packed uint8 [(n+1)//2, 1], NF4State).

    Byte-identical to bitsandbytes.functional.quantize_4bit(weight, blocksize=blocksize,
    compress_statistics=double_quant, quant_type="nf4") up to exact ties (see module docstring).
    """
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"NF4 quantisation takes float32/float16/bfloat16 weights, got {weight.dtype}")
    device = weight.device
    code = nf4_code(device)
    q, absmax = _quantize_blocks(weight.detach().reshape(-1).float(), code, blocksize)
    if q.numel() % 2:
        q = F.pad(q, (0, 1), value=7)  # pad nibble: code 7 is 0.0, what bnb's zero padding rounds to
    q = q.to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)  # (n_bytes, 1)

    state = NF4State(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code)
    if double_quant:
        offset = absmax.mean()
        nested_code = dynamic_code(device)
        q_absmax, nested_absmax = _quantize_blocks(absmax - offset, nested_code, NESTED_BLOCKSIZE)
        state.absmax = q_absmax.to(torch.uint8)
        state.nested_absmax = nested_absmax
        state.nested_code = nested_code
        state.offset = offset.item()  # an fp32 value held as a Python float; bnb's JSON writes the same
    return packed, state


# --------------------------------------------------------------------------- bnb state dicts


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _quant_state_tensor(state: NF4State) -> torch.Tensor:
    """The `quant_state.bitsandbytes__nf4` entry: UTF-8 JSON bytes, key order and format as bnb."""
    meta = {
        "quant_type": "nf4",
        "blocksize": state.blocksize,
        "dtype": _dtype_name(state.dtype),
        "shape": list(state.shape),
    }
    if state.double_quant:
        meta["nested_blocksize"] = state.nested_blocksize
        meta["nested_dtype"] = _dtype_name(state.nested_absmax.dtype)
        meta["nested_offset"] = state.offset
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


def read_quant_state(tensor: torch.Tensor, key: str) -> dict:
    """The JSON metadata bitsandbytes serialises as a uint8 tensor under `P.weight.quant_state...`."""
    meta = json.loads(bytes(tensor.cpu().tolist()).decode("utf-8"))
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"{key}: only NF4 is supported, found quant_type {meta.get('quant_type')!r}")
    return meta


def _state_extras(state: NF4State) -> dict[str, torch.Tensor]:
    """Entries after `P.weight.`, in bnb's order."""
    extras = {"absmax": state.absmax, "quant_map": state.code}
    if state.double_quant:
        extras["nested_absmax"] = state.nested_absmax
        extras["nested_quant_map"] = state.nested_code
    extras[QUANT_STATE_KEY] = _quant_state_tensor(state)
    return extras


def nf4_state_dict(
    packed: torch.Tensor, state: NF4State, bias: Optional[torch.Tensor] = None, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """The state-dict entries bitsandbytes' Linear4bit writes for one NF4 linear named `prefix`."""
    out = {_key(prefix, "weight"): packed}
    if bias is not None:
        out[_key(prefix, "bias")] = bias
    for name, value in _state_extras(state).items():
        out[_key(prefix, "weight." + name)] = value
    return out


def is_bnb_4bit_linear(prefix: str, state_dict) -> bool:
    """Whether `state_dict` holds a bitsandbytes 4-bit linear (NF4 or FP4) at `prefix`."""
    return any(_key(prefix, f"weight.quant_state.bitsandbytes__{t}") in state_dict for t in ("nf4", "fp4"))


def load_bnb_linear_state(
    prefix: str, state_dict, device=None
) -> tuple[torch.Tensor, NF4State, Optional[torch.Tensor]]:
    """(packed, NF4State, bias or None) for the bnb 4-bit linear at `prefix` (module name, no trailing dot)."""
    qs_key = _key(prefix, "weight." + QUANT_STATE_KEY)
    if qs_key not in state_dict:
        if _key(prefix, "weight.quant_state.bitsandbytes__fp4") in state_dict:
            raise NotImplementedError(f"{prefix}: FP4 bitsandbytes weights are not supported, only NF4")
        raise KeyError(f"{qs_key} not found: {prefix!r} is not a bitsandbytes NF4 linear")
    meta = read_quant_state(state_dict[qs_key], qs_key)

    def get(name: str) -> torch.Tensor:
        key = _key(prefix, name)
        if key not in state_dict:
            raise KeyError(f"{key} missing from the bitsandbytes NF4 state dict")
        return state_dict[key].to(device) if device is not None else state_dict[key]

    state = NF4State(
        absmax=get("weight.absmax"),
        shape=torch.Size(meta["shape"]),
        dtype=getattr(torch, meta["dtype"]),
        blocksize=int(meta["blocksize"]),
        code=get("weight.quant_map"),
    )
    if "nested_offset" in meta:
        state.nested_absmax = get("weight.nested_absmax")
        state.nested_code = get("weight.nested_quant_map")
        state.offset = float(meta["nested_offset"])
        state.nested_blocksize = int(meta["nested_blocksize"])
    bias_key = _key(prefix, "bias")
    bias = get("bias") if bias_key in state_dict else None
    return get("weight"), state, bias


# --------------------------------------------------------------------------- autograd


class NF4MatMul(torch.autograd.Function):
    """y = x @ W^T + b with W = dequantize(packed, state); autograd never holds the dense W.

    Forward: W = code[q] * absmax (fp32, cast to x.dtype), y = x W^T + b; W is dropped at once.
    Backward: y[..., o] = sum_i x[..., i] W[o, i] + b[o], so
        dL/dx[..., i] = sum_o dL/dy[..., o] W[o, i]    i.e. grad_x = grad_y @ W,
    with W dequantised again from the packed bytes (one more pass over 0.5 byte/element instead of
    keeping 2-4 bytes/element alive until backward). W is frozen (integer codes): no dL/dW, so x is
    not saved either. dL/db = sum of dL/dy over all leading dims, only if b requires grad (frozen
    by default). Saved: the packed bytes and the small state tensors.
    """

    @staticmethod
    def forward(ctx, x, packed, state: NF4State, bias):
        weight = dequantize_nf4(packed, state, x.dtype)  # (out, in)
        y = F.linear(x, weight, None if bias is None else bias.to(x.dtype))  # (..., out)
        ctx.save_for_backward(packed, state.absmax, state.code, state.nested_absmax, state.nested_code)
        ctx.state = dataclasses.replace(state, absmax=None, code=None, nested_absmax=None, nested_code=None)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        packed, absmax, code, nested_absmax, nested_code = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            state = dataclasses.replace(
                ctx.state, absmax=absmax, code=code, nested_absmax=nested_absmax, nested_code=nested_code
            )
            grad_x = grad_y @ dequantize_nf4(packed, state, grad_y.dtype)  # (..., out) @ (out, in)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias


# --------------------------------------------------------------------------- module


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is NF4, stored and serialised like bnb's Linear4bit(nf4).

    weight: packed uint8 [(out*in+1)//2, 1] Parameter (requires_grad=False); bias: dense, frozen.
    Quant state lives in non-persistent buffers (absmax, quant_map, nested_absmax, nested_quant_map;
    they follow .to(device) but keep their dtypes) and plain attributes (blocksize, quant_dtype,
    offset); state_dict() writes bitsandbytes' keys and load_state_dict() reads them.

    The constructor allocates uninitialised storage (meta-device friendly): fill it with
    load_state_dict(..., assign=True), or build with from_linear().
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
        super().__init__()
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = blocksize
        self.compute_dtype = compute_dtype
        self.quant_dtype = compute_dtype  # the dense weight's dtype before quantisation (bnb "dtype")
        self.offset = 0.0 if double_quant else None
        self.nested_blocksize = NESTED_BLOCKSIZE
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device)
        self.weight = nn.Parameter(packed, requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        absmax_dtype = torch.uint8 if double_quant else torch.float32
        self.register_buffer("absmax", torch.empty(n_blocks, dtype=absmax_dtype, device=device), persistent=False)
        self.register_buffer("quant_map", nf4_code(device), persistent=False)
        n_nested = -(-n_blocks // NESTED_BLOCKSIZE)
        nested_absmax = torch.empty(n_nested, dtype=torch.float32, device=device) if double_quant else None
        self.register_buffer("nested_absmax", nested_absmax, persistent=False)
        self.register_buffer("nested_quant_map", dynamic_code(device) if double_quant else None, persistent=False)

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
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            device="meta",
        )
        if weight.is_meta:
            linear.weight = None
            return module
        packed, state = quantize_nf4(weight.detach(), blocksize, double_quant)
        bias = None if linear.bias is None else linear.bias.detach().to(compute_dtype)
        module.set_quantized(packed, state, bias)
        linear.weight = None
        return module

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def quant_state(self) -> NF4State:
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

    def set_quantized(self, packed: torch.Tensor, state: NF4State, bias: Optional[torch.Tensor] = None) -> None:
        """Take `packed`/`state` (and `bias`, when given) as this layer's frozen weight (no copy)."""
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"NF4 state shape {tuple(state.shape)} != ({self.out_features}, {self.in_features})")
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.absmax = state.absmax
        self.quant_map = state.code
        self.nested_absmax = state.nested_absmax
        self.nested_quant_map = state.nested_code
        self.offset = state.offset
        self.blocksize = state.blocksize
        self.nested_blocksize = state.nested_blocksize
        self.quant_dtype = state.dtype
        if bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        """The dense weight (out, in) in compute_dtype."""
        return dequantize_nf4(self.weight, self.quant_state, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out), computed in compute_dtype, returned in x's dtype
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
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )

    # -- bitsandbytes-compatible state dict

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
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight, bias
        for name, value in _state_extras(self.quant_state).items():
            destination[prefix + "weight." + name] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        ours = {prefix + "weight." + name for name in (*_STATE_BUFFERS, QUANT_STATE_KEY)}
        qs_key = prefix + "weight." + QUANT_STATE_KEY
        if qs_key in state_dict:
            self._load_quant_state(state_dict, prefix, local_metadata, missing_keys, error_msgs)
        else:
            missing_keys.append(qs_key)
        rest = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k not in ours}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _load_quant_state(self, state_dict, prefix, local_metadata, missing_keys, error_msgs):
        qs_key = prefix + "weight." + QUANT_STATE_KEY
        try:
            meta = read_quant_state(state_dict[qs_key], qs_key)
        except ValueError as e:
            error_msgs.append(str(e))
            return
        if tuple(meta["shape"]) != (self.out_features, self.in_features):
            error_msgs.append(
                f"{qs_key}: shape {tuple(meta['shape'])} != ({self.out_features}, {self.in_features})"
            )
            return
        nested = "nested_offset" in meta
        names = _STATE_BUFFERS if nested else _STATE_BUFFERS[:2]
        absent = [prefix + "weight." + name for name in names if prefix + "weight." + name not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        self.blocksize = int(meta["blocksize"])
        self.quant_dtype = getattr(torch, meta["dtype"])
        self.offset = float(meta["nested_offset"]) if nested else None
        self.nested_blocksize = int(meta["nested_blocksize"]) if nested else NESTED_BLOCKSIZE
        assign = local_metadata.get("assign_to_params_buffers", False)
        for name in _STATE_BUFFERS:
            if name not in names:
                self._buffers[name] = None
                continue
            value = state_dict[prefix + "weight." + name].detach()
            current = self._buffers[name]
            if assign or current is None or current.is_meta:
                self._buffers[name] = value if assign else value.to(self.weight.device)
            elif current.shape == value.shape and current.dtype == value.dtype:
                with torch.no_grad():
                    current.copy_(value)
            else:  # another blocksize or double-quant setting than this layer was built with
                self._buffers[name] = value.to(current.device)


# --------------------------------------------------------------------------- models


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


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
            name = _key(parent_name, child_name)
            if type(child) is not nn.Linear or _skipped(name, skip):
                continue
            if id(child) not in done:  # the same Linear reachable twice becomes one NF4Linear
                done[id(child)] = NF4Linear.from_linear(child, blocksize, double_quant, compute_dtype)
                done[id(child)].train(child.training)
            setattr(parent, child_name, done[id(child)])
            replaced.append(name)
    return replaced
