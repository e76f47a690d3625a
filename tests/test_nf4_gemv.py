"""kernels.nf4_matvec: the NF4 matrix-vector Triton kernel against its PyTorch reference, the
reference against bitsandbytes, and NF4Linear's routing to it.

Oracles and tolerances (error = max |a - b| / max |b|, over the whole output):
- PyTorch reference (dequantise + F.linear) against bitsandbytes' `dequantize_4bit` + matmul on
  bitsandbytes' own quantisation of the same weight: the dequantised weights are equal bit for
  bit; the products within 1e-6 (F.linear vs matmul + add may order the bias add differently).
- Triton (under TRITON_INTERPRET=1 on CPU, in a subprocess: the interpreter must be switched on
  before triton is imported) against the reference: fp32 within 1e-5 (the same fp32 weights,
  the sum in another order); fp16 within 2e-3 (both round W to fp16; the reference's CPU fp16
  matmul and the kernel's fp32 sum round differently, then one fp16 rounding of the output,
  ~5e-4). bf16 is not run in the interpreter (it truncates casts); on a GPU within 1e-2.
- NF4Linear takes the kernel only where it runs on the device, with <= GEMV_MAX_TOKENS tokens
  and no gradient to record (counted through a patched kernels.nf4_matvec), and greedy
  generate() on tiny NF4 Phi-3 / Phi-2 models gives the same tokens as the dense path (Triton
  dequantisation + matmul), logits within 1e-5.
"""

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from phicore import kernels
from phicore import nf4 as nf4_module
from phicore.frozen_linear import NF4Linear
from phicore.nf4 import GEMV_MAX_TOKENS, quantize_nf4
from interpreter import interpreter_fixture, needs_cuda_triton

ROOT = Path(__file__).resolve().parents[1]


def _err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()


# ----------------------------------------------------------------------------- reference vs bitsandbytes
@pytest.mark.parametrize("double_quant", [False, True])
def test_reference_matches_bitsandbytes(double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(0)
    for rows, (out_features, in_features), bias in ((1, (130, 192), True), (3, (7, 256), False), (8, (64, 128), True)):
        w = torch.randn(out_features, in_features, generator=g) * 0.05
        b = torch.randn(out_features, generator=g) if bias else None
        x = torch.randn(rows, in_features, generator=g)
        ref_packed, ref_state = bnb.functional.quantize_4bit(
            w, blocksize=64, compress_statistics=double_quant, quant_type="nf4"
        )
        layer = NF4Linear(in_features, out_features, bias=False, double_quant=double_quant, device="meta")
        entries = {"weight." + k: v for k, v in ref_state.as_dict(packed=True).items()}
        layer.load_state_dict({"weight": ref_packed, **entries}, assign=True)  # bnb's bytes, read as they are
        packed, state = layer.weight, layer.quant_state
        dense = bnb.functional.dequantize_4bit(ref_packed, ref_state)  # (out, in) fp32
        assert torch.equal(dense, kernels.dequantize_nf4(packed, state, torch.float32, backend="torch"))
        expected = x @ dense.T + (0 if b is None else b)
        ours = kernels.nf4_matvec(x, packed, state, b, backend="torch")
        assert ours.shape == (rows, out_features) and ours.dtype == torch.float32
        assert _err(ours, expected) <= 1e-6


def test_cpu_default_keeps_the_dense_path(monkeypatch):
    """On CPU (no interpreter asked for) NF4Linear never calls nf4_matvec, and its output is the
    reference's bit for bit (both dequantise and run F.linear)."""
    calls = []
    real = kernels.nf4_matvec
    monkeypatch.setattr(kernels, "nf4_matvec", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(torch.nn.Linear(128, 48))
    x = torch.randn(1, 1, 128)
    with torch.no_grad():
        y = layer(x)
    assert calls == [] and not kernels.uses_triton("nf4_gemv", "cpu")
    assert torch.equal(y, kernels.nf4_matvec(x, layer.weight, layer.quant_state, layer.bias, backend="torch"))
    assert GEMV_MAX_TOKENS == 8


# ----------------------------------------------------------------------------- Triton under the interpreter
_INTERPRETER_CHECK = textwrap.dedent(
    """
    import itertools, json, sys, torch
    sys.path.insert(0, "tests")
    from phicore import kernels
    from phicore.code_paths import force_paths, set_paths
    from phicore.kernels import nf4_gemv_triton
    from phicore import nf4 as nf4_module
    from phicore.config import ModelConfig
    from phicore.generate import generate
    from phicore.model import PhiForCausalLM
    from phicore.frozen_linear import NF4Linear, quantize_model_linears
    from phicore.nf4 import quantize_nf4
    from tiny_models import SHAPES
    assert kernels.triton_available("cpu"), "interpreter not active"
    g = torch.Generator().manual_seed(0)
    out = {"kernels": [], "routing": {}, "generate": []}

    def err(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()

    def case(M, K, N, dq, bias, dtype, blocksize=64, lead=(), block_n=None, strided=False):
        w = torch.randn(N, K, generator=g) * 0.05
        packed, state = quantize_nf4(w, blocksize, dq)
        x = torch.randn(*lead, M, 2 * K if strided else K, generator=g).to(dtype)
        if strided:
            x = x[..., ::2]  # column stride 2: the wrapper makes it contiguous
        b = torch.randn(N, generator=g).to(dtype) if bias else None
        ref = kernels.nf4_matvec(x, packed, state, b, backend="torch")
        if block_n is None:
            tri = kernels.nf4_matvec(x, packed, state, b, backend="triton")
        else:
            tri = nf4_gemv_triton.nf4_matvec_triton(x, packed, state, b, block_n=block_n)
        same_meta = tri.shape == ref.shape and tri.dtype == ref.dtype
        kernel_ran = nf4_gemv_triton.supports(x, state)
        out["kernels"].append([f"M={M} K={K} N={N} dq={dq} bias={bias} bs={blocksize} lead={lead} "
                               f"block_n={block_n} strided={strided}", str(dtype), err(tri, ref), same_meta,
                               kernel_ran])

    # every (M, K, N); the 8 (double quant, bias, dtype) settings taken in turn
    settings = list(itertools.product((False, True), (False, True), (torch.float32, torch.float16)))
    for i, (M, K, N) in enumerate(itertools.product((1, 3, 8), (64, 192, 256), (1, 7, 130))):
        case(M, K, N, *settings[i % 8])
    for dq, bias, dtype in settings:  # all 8 on one shape
        case(2, 128, 9, dq, bias, dtype)
    case(1, 256, 130, True, True, torch.float32, block_n=4)  # the CUDA tile (BLOCK_N = 4)
    case(5, 192, 7, False, False, torch.float16, block_n=4)
    case(3, 2048, 5, True, False, torch.float32)  # K > BLOCK_K: two loop steps, the last partial
    case(2, 256, 6, True, True, torch.float32, blocksize=128)
    case(1, 2048, 3, True, False, torch.float32, blocksize=2048)  # blocksize > BLOCK_K
    case(1, 64, 7, True, True, torch.float32, lead=(2,))  # (2, 1, K): leading dims flattened
    case(3, 64, 7, False, True, torch.float32, strided=True)
    case(2, 80, 7, True, True, torch.float32)  # K % 64 != 0: falls back to dequantise + matmul
    case(17, 64, 7, True, False, torch.float32)  # past MAX_ROWS: falls back

    # NF4Linear routing, counted
    calls = []
    real = kernels.nf4_matvec
    kernels.nf4_matvec = lambda *a, **k: calls.append(a[0].shape) or real(*a, **k)
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(torch.nn.Linear(64, 24))
    dense_ref = lambda x: torch.nn.functional.linear(x, layer.dequantize(), layer.bias)

    def routed(x, grad=False, backend="triton"):
        calls.clear()
        with force_paths(kernels={"nf4_gemv": backend}), torch.set_grad_enabled(grad):
            y = layer(x)
        return {"calls": len(calls), "err": err(y, dense_ref(x.detach())), "requires_grad": y.requires_grad}

    x1 = torch.randn(1, 1, 64, generator=g)
    r = out["routing"]
    r["no_grad_1_token"] = routed(x1)
    r["no_grad_8_tokens"] = routed(torch.randn(2, 4, 64, generator=g))
    r["no_grad_9_tokens"] = routed(torch.randn(1, 9, 64, generator=g))
    r["grad_x_requires_grad"] = routed(x1.clone().requires_grad_(), grad=True)
    r["grad_enabled_x_frozen"] = routed(x1, grad=True)
    layer.bias.requires_grad_(True)
    r["grad_bias_trainable"] = routed(x1, grad=True)
    layer.bias.requires_grad_(False)
    r["torch_backend"] = routed(x1, backend="torch")
    r["auto_backend_cpu"] = routed(x1, backend="auto")

    # greedy generate(): dense path (Triton dequantisation + matmul) vs the gemv kernel
    set_paths(kernels={"nf4": "triton"})
    for shape in ("phi-3-mini-4k", "phi-2"):
        class_name, kw = SHAPES[shape]
        cfg = ModelConfig.from_dict({"model_type": "phi" if class_name == "PhiConfig" else "phi3", **kw})
        torch.manual_seed(0)
        model = PhiForCausalLM(cfg)
        quantize_model_linears(model)
        model.eval()
        prompts = [[5, 17, 99, 3, 42], [7, 8, 9]]
        runs = []
        for gemv in ("torch", "triton"):
            set_paths(kernels={"nf4_gemv": gemv})
            calls.clear()
            tokens = [generate(model, prompts[0], max_new_tokens=5), generate(model, prompts, max_new_tokens=3)]
            n_calls = len(calls)
            with torch.no_grad():
                logits = model(torch.tensor([prompts[0]]))[0, -1]  # 5 tokens: gemv-sized
            runs.append((tokens, n_calls, logits))
        (t1, c1, l1), (t2, c2, l2) = runs
        out["generate"].append({"shape": shape, "same_tokens": t1 == t2, "tokens": t1, "dense_calls": c1,
                                "gemv_calls": c2, "logit_err": err(l2, l1)})
    kernels.nf4_matvec = real
    print(json.dumps(out))
    """
)


interpreter_results = interpreter_fixture(_INTERPRETER_CHECK)


def test_triton_kernel_matches_reference(interpreter_results):
    rows = interpreter_results["kernels"]
    assert len(rows) == 27 + 8 + 9
    for name, dtype, error, same_meta, _ in rows:
        tol = 1e-5 if dtype == "torch.float32" else 2e-3
        assert same_meta, name
        assert error <= tol, (name, dtype, error)
    ran = [kernel_ran for *_, kernel_ran in rows]
    assert sum(ran) == len(rows) - 2 and not ran[-1] and not ran[-2]  # K = 80 and 17 rows fall back


def test_nf4linear_routes_only_small_no_grad_calls(interpreter_results):
    r = interpreter_results["routing"]
    for case in ("no_grad_1_token", "no_grad_8_tokens", "grad_enabled_x_frozen"):
        assert r[case]["calls"] == 1, case
        assert not r[case]["requires_grad"]
    for case in ("no_grad_9_tokens", "grad_x_requires_grad", "grad_bias_trainable", "torch_backend",
                 "auto_backend_cpu"):
        assert r[case]["calls"] == 0, case
    assert r["grad_x_requires_grad"]["requires_grad"] and r["grad_bias_trainable"]["requires_grad"]
    for case, result in r.items():
        assert result["err"] <= 1e-5, case  # every path is the dense product


def test_generate_same_tokens_with_gemv(interpreter_results):
    runs = interpreter_results["generate"]
    assert [run["shape"] for run in runs] == ["phi-3-mini-4k", "phi-2"]
    for run in runs:
        assert run["same_tokens"], run
        assert run["dense_calls"] == 0 and run["gemv_calls"] > 0, run
        assert run["logit_err"] <= 1e-5, run
        assert [len(t) for t in run["tokens"][1]] == [3, 3] and len(run["tokens"][0]) == 5


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@needs_cuda_triton
@pytest.mark.parametrize("double_quant", [False, True])
def test_cuda_kernel_matches_reference(double_quant):
    g = torch.Generator(device="cuda").manual_seed(0)
    for (out_features, in_features), blocksize in (((3072, 3072), 64), ((8192, 3072), 64), ((2560, 10240), 64),
                                                   ((130, 192), 64), ((7, 512), 256)):
        w = torch.randn(out_features, in_features, generator=g, device="cuda") * 0.02
        packed, state = quantize_nf4(w, blocksize, double_quant)
        for rows in (1, 3, 8):
            for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
                x = torch.randn(rows, in_features, generator=g, device="cuda").to(dtype)
                b = torch.randn(out_features, generator=g, device="cuda").to(dtype)
                tri = kernels.nf4_matvec(x, packed, state, b, backend="triton")
                assert tri.dtype == dtype and tri.shape == (rows, out_features)
                # against an fp64 product of the same (dtype-rounded) weights: the kernel's own error
                w_dtype = kernels.dequantize_nf4(packed, state, dtype, backend="torch").double()
                exact = x.double() @ w_dtype.T + b.double()
                assert _err(tri, exact) <= tol, ((out_features, in_features), rows, dtype)
                ref = kernels.nf4_matvec(x, packed, state, b, backend="torch")  # cuBLAS over the same weights
                assert _err(tri, ref) <= tol, ((out_features, in_features), rows, dtype)


@pytest.mark.gpu
@needs_cuda_triton
def test_cuda_nf4linear_routes_decode_to_gemv(monkeypatch):
    calls = []
    real = kernels.nf4_matvec
    monkeypatch.setattr(kernels, "nf4_matvec", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(torch.nn.Linear(512, 384, device="cuda", dtype=torch.bfloat16))
    with torch.no_grad():
        y1 = layer(torch.ones(1, 1, 512, device="cuda", dtype=torch.bfloat16))
        assert len(calls) == 1
        y2 = layer(torch.ones(1, nf4_module.GEMV_MAX_TOKENS + 1, 512, device="cuda", dtype=torch.bfloat16))
        assert len(calls) == 1
    assert _err(y1[0, 0], y2[0, 0]) <= 1e-2


# ----------------------------------------------------------------------------- benchmark
def test_bench_gemv_case(tmp_path):
    """bench/kernels.py's gemv rows on CPU: the dense path and bitsandbytes against the reference
    (same bytes: bit-equal for the dense path), Triton skipped (interpreter only on a CPU)."""
    sys.path.insert(0, str(ROOT))
    from bench import kernels as bench_kernels

    out = tmp_path / "k.json"
    threads = torch.get_num_threads()
    try:
        assert bench_kernels.main(["--device", "cpu", "--shapes", "64x128", "--backends", "torch",
                                   "--gemv-shapes", "96x256,7x64", "--gemv-rows", "2", "--repeats", "1",
                                   "--threads", "1", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    gemv = json.loads(out.read_text())["gemv"]
    assert gemv["rows"] == 2 and gemv["shapes"] == [[96, 256], [7, 64]]
    assert "triton" in gemv["skipped"]
    rows = {(tuple(r["shape"]), r["backend"]): r for r in gemv["results"]}
    for shape in ((96, 256), (7, 64)):
        dense = rows[shape, "dequant+matmul"]
        assert dense["max_rel_diff_vs_torch"] == 0.0 and dense["speedup_vs_dequant_matmul"] == 1.0
        assert dense["gb_per_s"] > 0 and dense["nf4_bytes_read"] > shape[0] * shape[1] // 2
        if (shape, "bitsandbytes") in rows:
            assert rows[shape, "bitsandbytes"]["max_rel_diff_vs_torch"] <= 1e-6
