"""Compile every Triton kernel for a Hopper GPU without one: registers, spills, shared memory.

    python bench/kernels_codegen.py [--arch 90] [--dtype bf16] [--json PATH]

The interpreter tests (TRITON_INTERPRET=1) check the kernels' arithmetic on CPU, but never run
Triton's GPU compiler: a kernel that does not lower to PTX, or whose tiles are too large for the
register file (spills to local memory, a several-fold slowdown), would first show on a GPU.
This script closes that gap on any machine with triton installed. It calls each kernel's real
launch wrapper (kernels/*_triton.py) with CPU tensors of the real Phi-2 and Phi-3-mini shapes
(hidden 2560 / 3072, intermediate 10240 / 8192, 32 heads of 80 / 96 dims, rotary 32 / 96, NF4
blocks of 64 with double quantisation), while a stand-in Triton driver reports an sm_90 target
and every launch is turned into a compile only (`warmup`): nothing runs, the tensors stay as
allocated. Each compiled kernel's PTX is then assembled again with Triton's own ptxas and
`-v`, whose report gives registers per thread, spill stores/loads and stack; shared memory and
warps come from the compiled kernel's metadata.

What it does not tell: speed (bench/kernels.py --device cuda measures that on a GPU).
Exits 1 when a kernel spills or fails to compile, so it can gate a change.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# bench/ holds a kernels.py: keep it from shadowing phicore's `kernels` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench._measure import DTYPES  # noqa: E402

ROWS = 8  # tokens per launch: the tile configuration depends on the widths, not on the row count
PTXAS_INFO = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_frame_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
}


class CompileOnlyDriver:
    """A Triton driver that answers "an sm_<arch> CUDA device is current" and nothing else:
    enough for JITFunction.run to pick the NVIDIA backend and compile."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextmanager
def compile_only(arch: int, record: list):
    """Inside: every Triton launch compiles for sm_<arch> and appends (kernel name, compiled
    kernel) to `record` instead of running."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    run = JITFunction.run
    previous = getattr(driver, "_active", None)  # not `driver.active`: without a GPU that raises

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        record.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = compile_instead
    driver.set_active(CompileOnlyDriver(arch))
    try:
        yield
    finally:
        JITFunction.run = run
        driver.set_active(previous)


def nf4_state(out_features: int, in_features: int):
    """A real NF4 quantisation (blocks of 64, double quantised) of a random weight."""
    from phicore.nf4 import quantize_nf4

    return quantize_nf4(torch.randn(out_features, in_features), blocksize=64, double_quant=True)


def launches(dtype: torch.dtype) -> list:
    """(label, call) per kernel configuration the models use: each call runs one launch wrapper."""
    from phicore.kernels import gelu_triton, layernorm_triton, nf4_gemv_triton, nf4_triton, rmsnorm_triton, rope_triton
    from phicore.kernels import swiglu_triton

    def t(*shape, dt=dtype):
        return torch.zeros(shape, dtype=dt)

    def rope(heads, d, rotary, in_place, backward, kv_heads=None):
        q, k = t(1, ROWS, heads, d), t(1, ROWS, kv_heads or heads, d)
        cos, sin = t(1, ROWS, rotary), t(1, ROWS, rotary)
        q_out, k_out = (q, k) if in_place else (torch.empty_like(q), torch.empty_like(k))
        return lambda: rope_triton.rope_triton(q, k, cos, sin, q_out, k_out, backward=backward)

    phi3_d, phi3_i, phi2_d, phi2_i = 3072, 8192, 2560, 10240
    phi3_qkv, phi2_fc1 = nf4_state(3 * phi3_d, phi3_d), nf4_state(phi2_i, phi2_d)
    rstd = torch.zeros(ROWS, dtype=torch.float32)
    calls = [
        # Phi-3-mini
        ("phi-3 rms_norm forward", lambda: rmsnorm_triton.rms_norm_forward_triton(t(ROWS, phi3_d), t(phi3_d), 1e-5)),
        ("phi-3 rms_norm backward",
         lambda: rmsnorm_triton.rms_norm_backward_triton(t(ROWS, phi3_d), t(ROWS, phi3_d), t(phi3_d), rstd)),
        ("phi-3 rope forward, in place", rope(32, 96, 96, True, False)),
        ("phi-3 rope backward, in place", rope(32, 96, 96, True, True)),
        ("phi-3 swiglu forward", lambda: swiglu_triton.swiglu_forward_triton(t(ROWS, 2 * phi3_i))),
        ("phi-3 swiglu backward",
         lambda: swiglu_triton.swiglu_backward_triton(t(ROWS, phi3_i), t(ROWS, 2 * phi3_i))),
        ("phi-3 nf4 dequantize qkv_proj", lambda: nf4_triton.dequantize_nf4_triton(*phi3_qkv, dtype)),
        ("phi-3 nf4 gemv qkv_proj, 1 token",
         lambda: nf4_gemv_triton.nf4_matvec_triton(t(1, phi3_d), *phi3_qkv)),
        ("phi-3 nf4 gemv qkv_proj, 8 tokens",
         lambda: nf4_gemv_triton.nf4_matvec_triton(t(8, phi3_d), *phi3_qkv)),
        # Phi-2
        ("phi-2 layer_norm forward", lambda: layernorm_triton.layer_norm_forward_triton(
            t(ROWS, phi2_d), t(phi2_d), t(phi2_d), 1e-5)),
        ("phi-2 layer_norm forward, fp32 out (autocast)", lambda: layernorm_triton.layer_norm_forward_triton(
            t(ROWS, phi2_d), t(phi2_d), t(phi2_d), 1e-5, out_dtype=torch.float32)),
        ("phi-2 layer_norm backward", lambda: layernorm_triton.layer_norm_backward_triton(
            t(ROWS, phi2_d), t(ROWS, phi2_d), t(phi2_d), rstd, rstd)),
        ("phi-2 rope forward, in place", rope(32, 80, 32, True, False)),
        ("phi-2 rope backward, in place", rope(32, 80, 32, True, True)),
        ("phi-2 rope forward, new tensors", rope(32, 80, 32, False, False)),
        ("phi-4-mini rope forward, in place (GQA 24/8 heads, rotary 96 of 128)",
         rope(24, 128, 96, True, False, kv_heads=8)),
        ("phi-2 gelu_tanh forward", lambda: gelu_triton.gelu_tanh_forward_triton(t(ROWS, phi2_i))),
        ("phi-2 gelu_tanh backward",
         lambda: gelu_triton.gelu_tanh_backward_triton(t(ROWS, phi2_i), t(ROWS, phi2_i))),
        ("phi-2 nf4 dequantize fc1", lambda: nf4_triton.dequantize_nf4_triton(*phi2_fc1, dtype)),
        ("phi-2 nf4 gemv fc1 with bias, 1 token",
         lambda: nf4_gemv_triton.nf4_matvec_triton(t(1, phi2_d), *phi2_fc1, bias=t(phi2_i))),
    ]
    return calls


def ptxas_path(arch: int) -> str:
    """The ptxas that Triton itself runs for `arch` (older Triton's `get_ptxas` takes no arch)."""
    from triton.backends.nvidia import compiler

    try:
        return compiler.get_ptxas(arch).path
    except TypeError:
        return compiler.get_ptxas().path


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spills and stack of one kernel: Triton's ptxas run again on its PTX with -v."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        proc = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}",
                               str(source), "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True, check=True)
    report = {}
    for field, pattern in PTXAS_INFO.items():
        match = pattern.search(proc.stderr)
        if match is None:
            raise RuntimeError(f"ptxas -v printed no {field!r}: {proc.stderr.strip()[:500]}")
        report[field] = int(match.group(1))
    return report


def compile_all(arch: int, dtype: torch.dtype) -> list:
    """One row per labelled launch: the compiled kernel's resources."""
    rows = []
    for label, call in launches(dtype):
        record = []
        try:
            with compile_only(arch, record):
                call()
        except Exception as error:  # noqa: BLE001 - reported per kernel, the run goes on
            rows.append({"label": label, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"})
            continue
        for name, kernel in record:
            metadata = kernel.metadata
            rows.append({
                "label": label, "kernel": name, "target": f"{metadata.target.backend} sm_{metadata.target.arch}",
                "num_warps": metadata.num_warps, "shared_bytes": metadata.shared,
                "cubin_bytes": len(kernel.asm["cubin"]), **ptxas_report(kernel.asm["ptx"], arch),
            })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activation dtype")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    try:
        import triton
    except ImportError:
        print("kernels_codegen: triton is not installed", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernels_codegen: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2

    rows = compile_all(args.arch, DTYPES[args.dtype])
    failed = [row for row in rows if "error" in row or row["spill_store_bytes"] or row["spill_load_bytes"]]
    print(f"{'launch':48} {'kernel':26} {'warps':>5} {'regs':>5} {'spill':>6} {'smem':>6}")
    for row in rows:
        if "error" in row:
            print(f"{row['label']:48} FAILED: {row['error']}")
            continue
        print(f"{row['label']:48} {row['kernel']:26} {row['num_warps']:>5} {row['registers']:>5} "
              f"{row['spill_store_bytes'] + row['spill_load_bytes']:>6} {row['shared_bytes']:>6}")
    print(f"{len(rows) - len(failed)} of {len(rows)} launches compiled for sm_{args.arch} without spills")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python bench/kernels_codegen.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": date.today().isoformat(),
            "host": f"{platform.machine()}, no GPU needed",
            "torch": torch.__version__, "triton": triton.__version__,
            "arch": args.arch, "dtype": args.dtype, "launches": rows,
        }, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
