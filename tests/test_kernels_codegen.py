"""Every Triton kernel compiles for sm_90 (H100/H200) at the real model shapes, without spills.

The interpreter tests check the kernels' arithmetic; this checks what only Triton's GPU compiler
sees: lowering to PTX, ptxas assembling it for sm_90a, and register pressure (a spill to local
memory would cost several times the kernel's time on the GPU). bench/kernels_codegen.py does
the work in a subprocess (it swaps Triton's driver for a compile-only stand-in); no GPU is
needed, only triton with its bundled ptxas.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from interpreter import HAS_TRITON

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel",
           "_rope_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel", "_gelu_fwd_kernel", "_gelu_bwd_kernel",
           "_dequantize_nf4_kernel", "_nf4_gemv_kernel"}
SM90_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90
SM90_REGISTERS = 255  # per thread


def _has_nvidia_backend() -> bool:
    return HAS_TRITON and importlib.util.find_spec("triton.backends.nvidia") is not None


pytestmark = pytest.mark.skipif(not _has_nvidia_backend(),
                                reason="needs triton with its NVIDIA backend (compiler and ptxas)")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("codegen")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")  # compile for real, not from an earlier run's cache
    out = tmp / "codegen.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels_codegen.py"), "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_every_kernel_compiles_for_sm90_without_spills(report):
    proc, record = report
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    launches = record["launches"]
    assert not [row for row in launches if "error" in row]
    assert {row["kernel"] for row in launches} == KERNELS  # each kernel, in every configuration listed
    assert len({row["label"] for row in launches}) == len(launches) == 20
    for row in launches:
        assert row["target"] == "cuda sm_90", row
        assert row["spill_store_bytes"] == row["spill_load_bytes"] == 0, row
        assert 0 < row["registers"] <= SM90_REGISTERS, row
        assert row["shared_bytes"] <= SM90_SHARED_BYTES, row
        assert row["cubin_bytes"] > 0, row
    assert "20 of 20 launches compiled for sm_90 without spills" in proc.stdout


def test_interpreter_is_refused():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels_codegen.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unset TRITON_INTERPRET" in proc.stderr
