"""NF4 4-bit weights exactly as bitsandbytes stores them: quantise, serialise, multiply.

The layer holding such a weight is phicore.frozen_linear.NF4Linear (QLoRA's frozen base).

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
from typing import Optional

import torch
import torch.nn.functional as F

from .kernels import dequantize_nf4

__all__ = [
    "NF4_CODE",
    "NF4MatMul",
    "NF4State",
    "bnb_entries",
    "bnb_layout",
    "create_dynamic_map",
    "dynamic_code",
    "nf4_code",
    "quantize_nf4",
    "read_quant_state",
    "state_from_bnb_entries",
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
_STATE_ENTRIES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")  # tensors after "P.weight."


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


# --------------------------------------------------------------------------- bnb serialisation
# One NF4 weight serialises as bitsandbytes' entries, named after "P.weight." in a state dict.
# Only phicore.frozen_linear.FrozenLinear puts them under module keys (its state-dict methods).


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


def bnb_layout(quant_state: torch.Tensor, key: str) -> tuple[int, bool]:
    """(blocksize, double_quant) of a serialised quant state: how a bnb 4-bit checkpoint was written."""
    meta = read_quant_state(quant_state, key)
    return int(meta["blocksize"]), "nested_offset" in meta


def bnb_entries(state: NF4State) -> dict[str, torch.Tensor]:
    """The entries bitsandbytes writes after `P.weight.` for one NF4 weight, in its order."""
    entries = {"absmax": state.absmax, "quant_map": state.code}
    if state.double_quant:
        entries["nested_absmax"] = state.nested_absmax
        entries["nested_quant_map"] = state.nested_code
    entries[QUANT_STATE_KEY] = _quant_state_tensor(state)
    return entries


def state_from_bnb_entries(entries: dict, where: str = "") -> NF4State:
    """The inverse of `bnb_entries`: an NF4State from the entries (names after `P.weight.`).

    Raises ValueError for a quant state that is not NF4, KeyError(*names) for absent entries.
    `where` prefixes the names in messages (e.g. "model.layers.0.mlp.fc1.weight.").
    """
    if QUANT_STATE_KEY not in entries:
        if "quant_state.bitsandbytes__fp4" in entries:
            raise ValueError(f"{where}quant_state.bitsandbytes__fp4: FP4 bitsandbytes weights are not supported, "
                             "only NF4")
        raise KeyError(QUANT_STATE_KEY)
    meta = read_quant_state(entries[QUANT_STATE_KEY], where + QUANT_STATE_KEY)
    nested = "nested_offset" in meta
    names = _STATE_ENTRIES if nested else _STATE_ENTRIES[:2]
    absent = [name for name in names if name not in entries]
    if absent:
        raise KeyError(*absent)
    state = NF4State(
        absmax=entries["absmax"].detach(),
        shape=torch.Size(meta["shape"]),
        dtype=getattr(torch, meta["dtype"]),
        blocksize=int(meta["blocksize"]),
        code=entries["quant_map"].detach(),
    )
    if nested:
        state.nested_absmax = entries["nested_absmax"].detach()
        state.nested_code = entries["nested_quant_map"].detach()
        state.offset = float(meta["nested_offset"])
        state.nested_blocksize = int(meta["nested_blocksize"])
    return state


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
