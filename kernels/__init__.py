"""Hand-written kernels, each behind one function with a plain-PyTorch fallback.

    dequantize_nf4(packed, state, dtype, backend=None)

backend: "triton" (the Triton kernel: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
"torch" (the PyTorch reference: any device), "auto" (Triton on CUDA when triton imports, PyTorch
otherwise), or None for the process default, which set_default_backend() changes. No environment
variable of ours is read; triton is imported only when the Triton path is asked for.
"""

from __future__ import annotations

import functools

import torch

from .nf4_torch import dequantize_nf4_torch, nf4_absmax

__all__ = [
    "BACKENDS",
    "dequantize_nf4",
    "dequantize_nf4_torch",
    "get_default_backend",
    "nf4_absmax",
    "set_default_backend",
    "triton_available",
]

BACKENDS = ("auto", "triton", "torch")
_default_backend = "auto"


def set_default_backend(backend: str) -> str:
    """Set the backend used when a call passes backend=None; returns the previous one."""
    global _default_backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    previous, _default_backend = _default_backend, backend
    return previous


def get_default_backend() -> str:
    return _default_backend


@functools.cache
def _triton_module():
    """kernels.nf4_triton, or None when triton is not installed."""
    try:
        from . import nf4_triton
    except ImportError:
        return None
    return nf4_triton


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


def _resolve(backend: str | None, device: torch.device) -> str:
    backend = _default_backend if backend is None else backend
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


def dequantize_nf4(
    packed: torch.Tensor, state, dtype: torch.dtype | None = None, backend: str | None = None
) -> torch.Tensor:
    """Dense weight (state.shape, dtype) from packed NF4 bytes [(n+1)//2, 1] and its phicore.nf4.NF4State.

    dtype defaults to state.dtype (the weight's dtype before quantisation).
    """
    dtype = state.dtype if dtype is None else dtype
    if _resolve(backend, packed.device) == "triton":
        return _triton_module().dequantize_nf4_triton(packed, state, dtype)
    return dequantize_nf4_torch(packed, state, dtype)
