"""kernels.dequantize_nf4: the Triton kernel against the PyTorch path, and the backend switch.

Tolerances: Triton vs PyTorch is bit-exact in fp32 and fp16 (the same fp32 products, fp fusion
off, round-to-nearest casts). On CUDA bf16 is compared exactly too. Under TRITON_INTERPRET=1
bf16 is not compared: the interpreter truncates fp32 -> bf16 casts.
"""

import textwrap

import pytest
import torch

from phicore import kernels
from phicore.code_paths import current_paths, force_paths, set_paths
from phicore.frozen_linear import NF4Linear
from phicore.kernels import dequantize_nf4, nf4_absmax, nf4_torch
from phicore.nf4 import nf4_code, quantize_nf4
from interpreter import HAS_TRITON, needs_cuda_triton, run_under_interpreter



def _reference(packed, state, dtype):
    """Element by element from the format description (small tensors only)."""
    n = state.shape.numel()
    absmax = nf4_absmax(state)
    code = nf4_code()
    out = torch.empty(n)
    for i in range(n):
        byte = int(packed.view(-1)[i // 2])
        nibble = byte >> 4 if i % 2 == 0 else byte & 0xF
        out[i] = code[nibble] * absmax[i // state.blocksize]
    return out.view(state.shape).to(dtype)


@pytest.mark.parametrize("slice_bytes", [None, 5])  # one slice, or ceil(130 / 5) = 26 slices, the last short
@pytest.mark.parametrize("double_quant", [False, True])
def test_torch_path_matches_elementwise_reference(double_quant, slice_bytes, monkeypatch):
    if slice_bytes:
        monkeypatch.setattr(nf4_torch, "DEQUANT_SLICE_BYTES", slice_bytes)
    w = torch.randn(7, 37)  # odd element count (130 bytes), partial last block
    packed, state = quantize_nf4(w, blocksize=64, double_quant=double_quant)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize_nf4(packed, state, dtype, backend="torch"), _reference(packed, state, dtype))
    # and the recovered absmax is the dynamic-code formula
    if double_quant:
        expected = state.nested_code[state.absmax.long()] * state.nested_absmax[0] + state.offset
        assert torch.equal(nf4_absmax(state), expected)


def test_backend_switch():
    packed, state = quantize_nf4(torch.randn(16, 64))
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        set_paths(kernels="cuda")
    with pytest.raises(ValueError):
        dequantize_nf4(packed, state, torch.float32, backend="fast")
    previous = current_paths()
    with force_paths(kernels="torch"):
        assert current_paths().kernel_backend("nf4") == "torch"
        assert torch.equal(dequantize_nf4(packed, state), dequantize_nf4(packed, state, backend="auto"))
    assert current_paths() == previous
    assert not kernels.triton_available("meta")
    if not kernels.triton_available("cpu"):  # triton imported here without its interpreter
        with pytest.raises(RuntimeError, match="Triton backend"):
            dequantize_nf4(packed, state, backend="triton")


_INTERPRETER_CHECK = textwrap.dedent(
    """
    import json, torch
    from phicore import kernels
    from phicore.kernels import dequantize_nf4
    from phicore.nf4 import quantize_nf4
    assert kernels.triton_available("cpu"), "interpreter not active"
    g = torch.Generator().manual_seed(0)
    results = []
    for shape, blocksize, double_quant in [((64, 96), 64, True), ((33, 17), 64, False), ((7,), 128, True),
                                           ((300, 257), 256, True), ((40, 96), 128, False)]:
        packed, state = quantize_nf4(torch.randn(shape, generator=g), blocksize, double_quant)
        for dtype in (torch.float32, torch.float16):
            a = dequantize_nf4(packed, state, dtype, backend="torch")
            b = dequantize_nf4(packed, state, dtype, backend="triton")
            same = a.shape == b.shape and bool(torch.equal(a, b))
            results.append([str(shape), blocksize, double_quant, str(dtype), same])
    print(json.dumps(results))
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_interpreter_matches_torch():
    results = run_under_interpreter(_INTERPRETER_CHECK, timeout=300)
    assert len(results) == 10
    assert all(r[-1] for r in results), [r for r in results if not r[-1]]




@pytest.mark.gpu
@needs_cuda_triton
@pytest.mark.parametrize("double_quant", [False, True])
def test_triton_cuda_matches_torch(double_quant):
    assert kernels.triton_available("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape, blocksize in [((3072, 8192), 64), ((1000, 257), 128), ((7,), 64), ((5, 3, 64), 256)]:
        w = torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16)
        packed, state = quantize_nf4(w, blocksize, double_quant)
        cpu_packed, cpu_state = quantize_nf4(w.cpu(), blocksize, double_quant)
        assert torch.equal(packed.cpu(), cpu_packed)  # quantising on CUDA gives the same bytes
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            a = dequantize_nf4(packed, state, dtype, backend="torch")
            b = dequantize_nf4(packed, state, dtype, backend="triton")
            assert torch.equal(a, b), f"{shape} {dtype}: {(a != b).sum().item()} of {a.numel()} differ"
        assert torch.equal(dequantize_nf4(packed, state, backend="auto"), b.to(state.dtype))


@pytest.mark.gpu
@needs_cuda_triton
def test_nf4linear_cuda_backends_agree():
    torch.manual_seed(0)
    dense = torch.nn.Linear(512, 384, device="cuda", dtype=torch.bfloat16)
    layer = NF4Linear.from_linear(dense)
    x = torch.randn(4, 7, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    outputs, grads = [], []
    for backend in ("triton", "torch"):
        with force_paths(kernels=backend):
            x.grad = None
            y = layer(x)
            y.float().square().sum().backward()
        outputs.append(y.detach())
        grads.append(x.grad.clone())
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(grads[0], grads[1])
