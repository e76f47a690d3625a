"""Run a check script under Triton's CPU interpreter (TRITON_INTERPRET=1) in a fresh process.

The variable must be set before triton is first imported, so kernel parity tests run their
checks in a subprocess and read back one JSON line: the last line the script prints.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_cuda_triton = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON),
                                       reason="needs a CUDA device and triton")


def run_under_interpreter(script: str, timeout: int = 600):
    """The JSON value `script` printed last, run with TRITON_INTERPRET=1 and this checkout first
    on the path; fails the test with the script's stderr when it exits non-zero."""
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": pythonpath}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def autograd_node_names(out: torch.Tensor) -> set:
    """Class names of every autograd node behind `out` (which fused Functions a forward used)."""
    seen, stack, names = set(), [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


def interpreter_fixture(script: str, timeout: int = 600):
    """A module-scoped fixture holding run_under_interpreter(script)'s result, run once per test
    module; tests using it skip when triton is not installed."""
    @pytest.fixture(scope="module")
    def results():
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        return run_under_interpreter(script, timeout)

    return results
