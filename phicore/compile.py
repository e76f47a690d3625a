"""torch.compile of a phicore model (`train.py --compile`, `infer.py --compile`).

What is compiled: the decoder stack, `PhiForCausalLM.decoder_stack` (every decoder layer, with
gradient checkpointing when it is on, then the final norm): all of the model's arithmetic but
the embedding lookup and the lm_head / loss. One region for the whole stack, so

- the layers become one graph (no graph break anywhere in it; tests/test_compile.py counts),
  and on CUDA one CUDA graph per step with `mode="reduce-overhead"`, where every layer's
  parameters are static inputs of that one graph;
- what depends on the data stays outside, eager and unchanged: the attention mask (padding or
  not, packed rows), the rotary tables (longrope's short/long switch reads the positions), and
  the chunked loss (its rows are the target tokens, a data-dependent count, and its chunk loop
  would recompile at every count). They run once per forward, not once per layer.

How: `torch.compile(..., options=inductor's options for `mode` + fallback_random)`. With
fallback_random the compiled dropout draws from PyTorch's own generator, in the eager order, so
a compiled run reproduces the eager run's masks (the loss agrees to ~1e-6, not to the ~1e-3 that
inductor's own RNG gives) and resumes exactly like one. A batch of another length recompiles
once, after which the token dimension is dynamic (torch.compile's automatic dynamic shapes).

Parts the compiler does not trace are kept out of the graph without breaking it:
- phicore's Triton kernels for norms, RoPE, SwiGLU and GELU are not called inside the compiled
  region (phicore/layers.py `_use_kernel`): inductor generates fused kernels from the plain
  PyTorch code, which is what those kernels replace eagerly;
- NF4 dequantisation and the 4-bit matrix-vector product are opaque custom ops there
  (kernels/__init__.py, `phicore::dequantize_nf4`, `phicore::nf4_matvec`);
- the autograd Functions inside the layers (fused LoRA, NF4MatMul) are traced by dynamo;
- --offload-checkpoints keeps its layers eager (phicore/offload.py: the recompute in backward is
  eager, so the forward must be too, or dropout would differ): with it the stack is not compiled.

Generation (phicore.generate) with a compiled stack uses a static KV cache: keys and values of
every position written in place, attention over the whole preallocated length under a mask, so
each decode step has the same shapes and compiles once.

A compile failure (the backend raising, at the first forward or the first backward) becomes a
`CompileError`, one line naming the part and suggesting a run without --compile (`one_line`).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["COMPILE_MODES", "CompileError", "compile_model", "compile_failure", "graph_counts"]

# torch.compile's modes. "reduce-overhead" adds CUDA graphs (for host-bound GPU steps; no effect
# on CPU); "max-autotune" benchmarks GEMM/conv choices at compile time (minutes).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompileError(RuntimeError):
    """torch.compile failed on a part of the model; the message is one line."""


def inductor_options(mode: str = "default") -> dict:
    """The inductor options of `mode`, plus fallback_random (eager dropout draws).
    torch.compile takes either a mode or options, so the mode is spelt out as its options."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r} (one of {', '.join(COMPILE_MODES)})")
    from torch._inductor import list_mode_options

    return {**list_mode_options(mode), "fallback_random": True}


class _CompiledPart:
    """A compiled callable that turns a compiler failure into a one-line CompileError."""

    def __init__(self, fn, part: str):
        self.fn, self.part = fn, part

    def __call__(self, *args, **kwargs):
        try:
            return self.fn(*args, **kwargs)
        except Exception as err:
            message = compile_failure(err, self.part)
            if message is None:
                raise
            raise CompileError(message) from err


def compile_model(model, mode: str = "default", backend=None):
    """Compile `model`'s decoder stack in place (see the module docstring); returns the model.

    mode: one of COMPILE_MODES. backend: torch.compile's backend (default inductor; tests pass
    "eager" or "aot_eager" to check tracing without code generation). Compiling is lazy: the
    first forward of each shape pays for it."""
    options = inductor_options(mode)
    if backend is None or backend == "inductor":
        fn = torch.compile(model.decoder_stack, options=options)
    else:
        fn = torch.compile(model.decoder_stack, backend=backend)
    model.compiled_stack = _CompiledPart(fn, "the decoder layers (phicore.model.PhiForCausalLM.decoder_stack)")
    model.compile_mode = mode
    return model


def _is_compiler_error(err: BaseException) -> bool:
    from torch._dynamo.exc import TorchDynamoException

    kinds = [TorchDynamoException]
    try:
        from torch._inductor.exc import InductorError

        kinds.append(InductorError)
    except ImportError:  # older torch: inductor's errors reach us as BackendCompilerFailed
        pass
    return isinstance(err, tuple(kinds))


def compile_failure(err: BaseException, part: str = "the model's backward pass") -> Optional[str]:
    """One line for an error torch.compile raised while compiling `part`, or None for any other
    error. The line names the part, the compiler's own first line, and the way out."""
    if isinstance(err, CompileError):
        return str(err)
    if not _is_compiler_error(err):
        return None
    cause = err
    while getattr(cause, "inner_exception", None) is not None:  # BackendCompilerFailed wraps the backend's error
        cause = cause.inner_exception
    first = next((line.strip() for line in str(cause).splitlines() if line.strip()), type(cause).__name__)
    if len(first) > 200:
        first = first[:197] + "..."
    return (f"torch.compile failed on {part}: {type(cause).__name__}: {first}; run without --compile "
            "(--debug shows the compiler's traceback)")


def graph_counts(fn, *args, **kwargs) -> dict:
    """{"graphs", "graph_breaks", "ops"} of one call of fn(*args, **kwargs) under torch._dynamo.explain
    (fn: a model, or a model's decoder_stack); for tests and the --compile numbers in the README."""
    import torch._dynamo

    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    return {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
            "ops": explained.op_count}
