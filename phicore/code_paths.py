"""Which implementation runs where phicore has two: the one place that forces a code path.

Four parts of phicore keep a fast path and a plain reference beside it (style habit 9: tests
run both and compare, benchmarks switch one off to measure it alone):

    kernels           phicore.kernels ops: "triton" kernel or "torch" reference, "auto" = Triton on
                      CUDA when triton imports (kernels/__init__.py). For every op, or per op
                      (ops: phicore.kernels.OPS, e.g. "rope", "rms_norm", "nf4_gemv").
    fused_lora        LoRALinear's training path: one autograd node (phicore/lora_fused.py) when
                      True, autograd over the separate ops when False (phicore/lora.py).
    packed_attention  packed rows: "flex" (BlockMask + flex_attention), "sdpa" (dense bool mask),
                      "auto" = flex on CUDA, SDPA elsewhere (phicore/attention.py).
    layer_checkpoint  gradient checkpointing of a layer: "phicore" (one autograd node,
                      phicore/layer_checkpoint.py), "torch" (torch.utils.checkpoint), "auto" =
                      phicore's node except under torch.compile, FSDP2 or with a KV cache.

The defaults ("auto", fused LoRA on) are what every run takes. To force a path:

    with phicore.force_paths(kernels="torch"): ...                  # every kernel op through PyTorch
    with phicore.force_paths(kernels={"rope": "torch"}): ...        # one op; the others unchanged
    with phicore.force_paths(fused_lora=False, packed_attention="sdpa"): ...
    previous = phicore.set_paths(fused_lora=False)                   # for the rest of the process
    phicore.set_paths(previous)                                      # back to what it replaced

The choices are one frozen `CodePaths`, process-wide (every thread sees it), checked when set:
an unknown op, backend or mode is refused with a ValueError naming it and the valid values.
`current_paths()` is what the modules above read at each call, so a change applies at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Mapping, Optional, Union

__all__ = ["CodePaths", "current_paths", "set_paths", "force_paths"]


@dataclasses.dataclass(frozen=True)
class CodePaths:
    """The current choices. `kernel_ops`: (op, backend) pairs, sorted by op, that override
    `kernels` for those ops (pairs rather than a dict so the value stays immutable)."""

    kernels: str = "auto"
    kernel_ops: tuple[tuple[str, str], ...] = ()
    fused_lora: bool = True
    packed_attention: str = "auto"
    layer_checkpoint: str = "auto"

    def kernel_backend(self, op: Optional[str] = None) -> str:
        """The backend `op` runs on ("auto" | "triton" | "torch"); op=None: the all-ops choice."""
        for name, backend in self.kernel_ops:
            if name == op:
                return backend
        return self.kernels


_current = CodePaths()


def current_paths() -> CodePaths:
    """The choices in force now."""
    return _current


def _one_of(what: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r} (one of {', '.join(map(str, valid))})")


def _check(paths: CodePaths) -> None:
    """Raise ValueError naming the first unknown value in `paths`."""
    # The valid values live with the code they choose; imported here, not at the top, because
    # phicore.kernels and phicore.attention read this module.
    from phicore import attention, kernels, layer_checkpoint

    _one_of("kernel backend", paths.kernels, kernels.BACKENDS)
    for op, backend in paths.kernel_ops:
        _one_of("kernel op", op, kernels.OPS)
        _one_of(f"kernel backend for {op}", backend, kernels.BACKENDS)
    if not isinstance(paths.fused_lora, bool):
        raise ValueError(f"unknown fused_lora setting {paths.fused_lora!r} (one of True, False)")
    _one_of("packed_attention mode", paths.packed_attention, attention.MODES)
    _one_of("layer_checkpoint mode", paths.layer_checkpoint, layer_checkpoint.MODES)


def set_paths(paths: Optional[CodePaths] = None, *, kernels: Union[str, Mapping[str, str], None] = None,
              fused_lora: Optional[bool] = None, packed_attention: Optional[str] = None,
              layer_checkpoint: Optional[str] = None) -> CodePaths:
    """Change the choices for the rest of the process; returns the CodePaths it replaced.

    `paths` (e.g. what an earlier call returned) replaces every choice; the keywords then change
    only the ones given, on top of `paths` or of the current choices:
    - kernels="torch" | "triton" | "auto": every op (per-op choices made before are dropped);
      kernels={"rope": "torch", ...}: those ops only, added to the per-op choices in force;
    - fused_lora=True | False; packed_attention="auto" | "flex" | "sdpa";
      layer_checkpoint="auto" | "phicore" | "torch".
    Nothing changes when a value is refused (ValueError).
    """
    global _current
    new = _current if paths is None else paths
    if isinstance(kernels, str):
        new = dataclasses.replace(new, kernels=kernels, kernel_ops=())
    elif kernels is not None:
        kernel_ops = tuple(sorted({**dict(new.kernel_ops), **kernels}.items(), key=lambda pair: str(pair[0])))
        new = dataclasses.replace(new, kernel_ops=kernel_ops)
    if fused_lora is not None:
        new = dataclasses.replace(new, fused_lora=fused_lora)
    if packed_attention is not None:
        new = dataclasses.replace(new, packed_attention=packed_attention)
    if layer_checkpoint is not None:
        new = dataclasses.replace(new, layer_checkpoint=layer_checkpoint)
    _check(new)
    previous, _current = _current, new
    return previous


@contextlib.contextmanager
def force_paths(paths: Optional[CodePaths] = None, **changes) -> Iterator[CodePaths]:
    """`set_paths(paths, **changes)` for the `with` block, then the previous choices back (also
    when the block raises, and undoing any set_paths inside it). Yields the choices in force."""
    previous = set_paths(paths, **changes)
    try:
        yield _current
    finally:
        set_paths(previous)
