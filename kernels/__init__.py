"""Hand-written kernels, each behind one function with a plain-PyTorch fallback.

    dequantize_nf4(packed, state, dtype, backend=None)        NF4 -> dense weight
    nf4_matvec(x, packed, state, bias=None, backend=None)     x @ W^T (+ bias) from NF4 bytes, few rows of x
    rms_norm(x, weight, eps, backend=None)                    Phi-3's RMSNorm, dL/dx only
    layer_norm(x, weight, bias, eps, backend=None)            Phi-2's LayerNorm, dL/dx only
    rotary_qk(q, k, cos, sin, inplace=True, backend=None)     RoPE on q and k (B, T, heads, d)
    swiglu(gate_up, backend=None)                             up * silu(gate) from [gate | up]
    gelu_tanh(x, backend=None)                                gelu, tanh approximation ("gelu_new")

backend: "triton" (the Triton kernel: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
"torch" (the PyTorch reference: any device), "auto" (Triton on CUDA when triton imports, PyTorch
otherwise), or None for the process-wide choice in phicore.code_paths ("auto" unless forced),
for every op or for one (`with phicore.force_paths(kernels={"rope": "torch"}):` measures one
kernel at a time; `kernels="torch"` forces all). No environment variable of ours is read;
triton is imported only when the Triton path is asked for.

The fused ops are autograd Functions (kernels/fused.py) saving only what backward needs; their
PyTorch twins are in kernels/fused_torch.py and each Triton file carries its math in its
docstring. phicore/layers.py calls them only where `uses_triton(op, device)` is true (CUDA by
default), so CPU runs keep the plain PyTorch modules bit for bit. Likewise NF4 layers
(phicore.frozen_linear) call nf4_matvec (op "nf4_gemv", kernels/nf4_gemv_triton.py, reference nf4_torch.nf4_matvec_torch)
only where uses_triton("nf4_gemv", device), for a few tokens and no gradient (decoding).
Under torch.compile the NF4 ops are opaque custom ops (kernels/custom_ops.py) and layers.py
leaves the fused ops to inductor (phicore/compile.py).
"""

from __future__ import annotations

import functools
import importlib
from types import SimpleNamespace

import torch

from phicore.code_paths import current_paths

from . import fused_torch
from .fused import GeluTanhFunction, LayerNormFunction, RMSNormFunction, RotaryFunction, SwiGLUFunction
from .nf4_torch import dequantize_nf4_torch, nf4_absmax, nf4_matvec_torch

__all__ = [
    "BACKENDS",
    "OPS",
    "dequantize_nf4",
    "dequantize_nf4_torch",
    "gelu_tanh",
    "layer_norm",
    "nf4_absmax",
    "nf4_matvec",
    "nf4_matvec_torch",
    "resolve_backend",
    "rms_norm",
    "rotary_qk",
    "swiglu",
    "triton_available",
    "uses_triton",
]

BACKENDS = ("auto", "triton", "torch")
# op -> (Triton module, its function names): forward/backward, or the one rope function
_TRITON_IMPLS = {
    "nf4": ("nf4_triton", {}),
    "nf4_gemv": ("nf4_gemv_triton", {"matvec": "nf4_matvec_triton", "supports": "supports"}),
    "rms_norm": ("rmsnorm_triton", {"forward": "rms_norm_forward_triton", "backward": "rms_norm_backward_triton"}),
    "layer_norm": ("layernorm_triton",
                   {"forward": "layer_norm_forward_triton", "backward": "layer_norm_backward_triton"}),
    "rope": ("rope_triton", {"rope": "rope_triton"}),
    "swiglu": ("swiglu_triton", {"forward": "swiglu_forward_triton", "backward": "swiglu_backward_triton"}),
    "gelu_tanh": ("gelu_triton", {"forward": "gelu_tanh_forward_triton", "backward": "gelu_tanh_backward_triton"}),
}
OPS = tuple(_TRITON_IMPLS)
_TORCH_IMPLS = {
    "rms_norm": SimpleNamespace(forward=fused_torch.rms_norm_forward_torch, backward=fused_torch.rms_norm_backward_torch),
    "layer_norm": SimpleNamespace(forward=fused_torch.layer_norm_forward_torch,
                                  backward=fused_torch.layer_norm_backward_torch),
    "rope": SimpleNamespace(rope=fused_torch.rope_torch),
    "swiglu": SimpleNamespace(forward=fused_torch.swiglu_forward_torch, backward=fused_torch.swiglu_backward_torch),
    "gelu_tanh": SimpleNamespace(forward=fused_torch.gelu_tanh_forward_torch,
                                 backward=fused_torch.gelu_tanh_backward_torch),
}


def _check_op(op):
    if op is not None and op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")


@functools.cache
def _triton_module(name: str = "nf4_triton"):
    """kernels.<name>, or None when triton is not installed."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError:
        return None


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on tensors of `device`.

    CUDA (and ROCm, which torch also calls "cuda") when triton imports; CPU only when triton's
    interpreter was switched on (TRITON_INTERPRET=1 before triton was first imported).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and _triton_module() is not None
    if device.type == "cpu":
        module = _triton_module()
        return module is not None and module.INTERPRETED
    return False


def _resolve(backend: str | None, device: torch.device, op: str | None = None) -> str:
    backend = current_paths().kernel_backend(op) if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if backend == "triton" and not triton_available(device):
        raise RuntimeError(
            f"Triton backend requested for {device} tensors, but it cannot run there "
            "(needs triton and a CUDA device, or TRITON_INTERPRET=1 set before triton is imported for CPU)"
        )
    return backend


def resolve_backend(op: str, device: torch.device | str, backend: str | None = None) -> str:
    """"triton" or "torch": what a call of `op` on `device` tensors would run."""
    _check_op(op)
    return _resolve(backend, torch.device(device), op)


def uses_triton(op: str, device: torch.device | str) -> bool:
    """Whether `op` runs its Triton kernel on `device` under the current defaults (the test
    phicore/layers.py makes before leaving its plain PyTorch path)."""
    return resolve_backend(op, device) == "triton"


@functools.cache
def _triton_impl(op: str) -> SimpleNamespace:
    module_name, names = _TRITON_IMPLS[op]
    module = _triton_module(module_name)
    return SimpleNamespace(**{role: getattr(module, name) for role, name in names.items()})


def _impl(op: str, device: torch.device, backend: str | None) -> SimpleNamespace:
    return _triton_impl(op) if _resolve(backend, device, op) == "triton" else _TORCH_IMPLS[op]


def dequantize_nf4(
    packed: torch.Tensor, state, dtype: torch.dtype | None = None, backend: str | None = None
) -> torch.Tensor:
    """Dense weight (state.shape, dtype) from packed NF4 bytes [(n+1)//2, 1] and its phicore.nf4.NF4State.

    dtype defaults to state.dtype (the weight's dtype before quantisation).
    """
    dtype = state.dtype if dtype is None else dtype
    if torch.compiler.is_compiling():  # one opaque node for torch.compile (kernels/custom_ops.py)
        from .custom_ops import dequantize_nf4_op, state_args

        return dequantize_nf4_op(packed, *state_args(state), dtype)
    if _resolve(backend, packed.device, "nf4") == "triton":
        return _triton_module().dequantize_nf4_triton(packed, state, dtype)
    return dequantize_nf4_torch(packed, state, dtype)


def nf4_matvec(
    x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None = None, backend: str | None = None
) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) -> (..., N) in x's dtype, W the NF4 weight (packed, state) of shape (N, K).

    Triton: kernels/nf4_gemv_triton.py reads the 4-bit bytes once and multiplies as it decodes,
    for up to its MAX_ROWS rows of x and K a multiple of the blocksize; other calls on the Triton
    backend dequantise with the Triton kernel and run a dense matmul (what NF4MatMul's forward
    does). Torch: the reference, dequantise + F.linear. No autograd: callers needing gradients
    use phicore.nf4.NF4MatMul.
    """
    if torch.compiler.is_compiling():  # one opaque node for torch.compile (kernels/custom_ops.py)
        from .custom_ops import nf4_matvec_op, state_args

        return nf4_matvec_op(x, packed, *state_args(state), bias)
    if _resolve(backend, x.device, "nf4_gemv") == "triton":
        impl = _triton_impl("nf4_gemv")
        if impl.supports(x, state):
            return impl.matvec(x, packed, state, bias)
        weight = _triton_module().dequantize_nf4_triton(packed, state, x.dtype)  # (N, K)
        return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
    return nf4_matvec_torch(x, packed, state, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str | None = None) -> torch.Tensor:
    """Phi-3's RMSNorm: weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype); x (..., D), weight (D,) frozen."""
    return RMSNormFunction.apply(x, weight, eps, _impl("rms_norm", x.device, backend))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias, eps: float, backend: str | None = None) -> torch.Tensor:
    """F.layer_norm over the last dim with frozen weight/bias; fp32 out under autocast, as F.layer_norm."""
    out_dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
    return LayerNormFunction.apply(x, weight, bias, eps, out_dtype, _impl("layer_norm", x.device, backend))


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inplace: bool = True,
              backend: str | None = None):
    """RoPE (half-split, the first R dims of each head) on q (B, T, H, d) and k (B, T, KV, d) by
    cos/sin (B, T, R); returns (q, k), the same tensors when `inplace`."""
    return RotaryFunction.apply(q, k, cos, sin, inplace, _impl("rope", q.device, backend))


def swiglu(gate_up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """up * silu(gate) with gate, up = gate_up.chunk(2, -1): (..., 2I) -> (..., I)."""
    return SwiGLUFunction.apply(gate_up, _impl("swiglu", gate_up.device, backend))


def gelu_tanh(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """F.gelu(x, approximate="tanh")."""
    return GeluTanhFunction.apply(x, _impl("gelu_tanh", x.device, backend))
