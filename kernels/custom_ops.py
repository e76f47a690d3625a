"""The NF4 kernels as opaque torch.library custom ops, for code under torch.compile.

Inside a compiled region (phicore.compile) `dequantize_nf4` and `nf4_matvec` (kernels/__init__.py)
call these instead of their implementations: the compiler then sees one node with a known
output shape ("fake" implementation) and compiles the rest of the layer around it, without a
graph break, and without tracing into a Triton launcher or the byte-table gathers of the
PyTorch path (which inductor cannot generate better: table lookups on packed bytes). Each op
runs, eagerly, what the same call outside the compiled region runs (the backend chosen by
phicore.code_paths), so compiled and eager results agree bit for bit.

The NF4State (phicore.nf4) is passed as its tensors and numbers: custom ops take no dataclasses.
No autograd formula: the weight is frozen, and NF4MatMul (phicore.nf4) differentiates through
its own backward, which calls dequantize_nf4 again.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch


def _state(absmax, code, nested_absmax, nested_code, shape, state_dtype, blocksize, nested_blocksize, offset):
    return SimpleNamespace(absmax=absmax, shape=torch.Size(shape), dtype=state_dtype, blocksize=blocksize,
                           code=code, nested_absmax=nested_absmax, nested_code=nested_code, offset=offset,
                           nested_blocksize=nested_blocksize)


def state_args(state) -> tuple:
    """An NF4State as the custom ops' arguments after the packed bytes."""
    return (state.absmax, state.code, state.nested_absmax, state.nested_code, list(state.shape), state.dtype,
            int(state.blocksize), int(state.nested_blocksize), None if state.offset is None else float(state.offset))


@torch.library.custom_op("phicore::dequantize_nf4", mutates_args=())
def dequantize_nf4_op(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                      nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor], shape: list[int],
                      state_dtype: torch.dtype, blocksize: int, nested_blocksize: int, offset: Optional[float],
                      dtype: torch.dtype) -> torch.Tensor:
    """packed uint8 [(n+1)//2, 1] + the state's parts -> dense weight (shape) in dtype."""
    from . import dequantize_nf4

    state = _state(absmax, code, nested_absmax, nested_code, shape, state_dtype, blocksize, nested_blocksize, offset)
    return dequantize_nf4(packed, state, dtype)


@dequantize_nf4_op.register_fake
def _(packed, absmax, code, nested_absmax, nested_code, shape, state_dtype, blocksize, nested_blocksize, offset,
      dtype):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.custom_op("phicore::nf4_matvec", mutates_args=())
def nf4_matvec_op(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                  nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor], shape: list[int],
                  state_dtype: torch.dtype, blocksize: int, nested_blocksize: int, offset: Optional[float],
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) -> (..., N) in x's dtype, W (N, K) from the NF4 bytes."""
    from . import nf4_matvec

    state = _state(absmax, code, nested_absmax, nested_code, shape, state_dtype, blocksize, nested_blocksize, offset)
    return nf4_matvec(x, packed, state, bias)


@nf4_matvec_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, shape, state_dtype, blocksize, nested_blocksize, offset,
      bias):
    return x.new_empty((*x.shape[:-1], shape[0]))
