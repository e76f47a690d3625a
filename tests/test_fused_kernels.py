"""The fused kernels (RMSNorm, LayerNorm, RoPE, SwiGLU, gelu_tanh): PyTorch references against
autograd over the plain modules, Triton kernels against the references, and whole models.

Oracles and tolerances:
- kernels/fused_torch.py against autograd over phicore.layers' plain code / torch.nn.functional:
  fp32 within 1e-5 (rtol) / 1e-6 (atol) (gelu's gradient: 4e-6 atol, its derivative is formed
  from other terms than PyTorch's); float64 gradcheck of every autograd Function.
- Triton (under TRITON_INTERPRET=1 on CPU, in a subprocess: the interpreter must be switched on
  before triton is imported) against the references: fp32 within 1e-5 (one rounding at the end
  in both; sums in another order); fp16 within 2e-3. bf16 is not run in the interpreter (it
  truncates casts); on a GPU bf16 is compared within 2e-2.
- Tiny Phi-2 / Phi-3 (LoRA, dropout, train mode) with every op forced to Triton against the plain
  path: logits within 1e-5, adapter gradients within 1e-5 (rtol) / 1e-7 (atol), also over an
  NF4 base (Phi-2's NF4 output with a bias is a view: RoPE then writes new tensors) and under
  gradient checkpointing.
"""

import textwrap

import pytest
import torch
import torch.nn.functional as F

from phicore import kernels
from phicore.code_paths import current_paths, force_paths, set_paths
from phicore.config import ModelConfig
from phicore.layers import LayerNorm, RMSNorm, apply_rotary
from phicore.model import PhiForCausalLM
from tiny_models import SHAPES
from interpreter import autograd_node_names, interpreter_fixture, needs_cuda_triton

FP32 = dict(rtol=1e-5, atol=1e-6)


def _grad(fn, *inputs, dy):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(dy)
    return out.detach(), inputs[0].grad


# ----------------------------------------------------------------------------- references vs autograd
def test_norm_references_match_autograd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 48, generator=g) * 3 + 1
    dy = torch.randn(2, 5, 48, generator=g)
    rms = RMSNorm(48, 1e-5)
    ln = LayerNorm(48, eps=1e-5)
    with torch.no_grad():
        for p in (rms.weight, ln.weight, ln.bias):
            p.normal_()
            p.requires_grad_(False)  # frozen, as under LoRA
    for module, op, args in ((rms, "rms_norm", (rms.weight, 1e-5)), (ln, "layer_norm", (ln.weight, ln.bias, 1e-5))):
        y_ref, dx_ref = _grad(module, x, dy=dy)
        fn = getattr(kernels, op)
        y, dx = _grad(lambda t: fn(t, *args, backend="torch"), x, dy=dy)
        torch.testing.assert_close(y, y_ref, **FP32)
        torch.testing.assert_close(dx, dx_ref, **FP32)
        assert module.weight.grad is None  # frozen: no weight gradient taken


def test_rope_reference_matches_apply_rotary():
    """Partial rotary (R = 8 of d = 20, Phi-2's 0.4) and full (Phi-3), GQA (4 q heads, 2 kv)."""
    g = torch.Generator().manual_seed(1)
    for R in (8, 20):
        q = torch.randn(2, 6, 4, 20, generator=g)
        k = torch.randn(2, 6, 2, 20, generator=g)
        theta = torch.randn(2, 6, R // 2, generator=g)
        cos, sin = torch.cat((theta, theta), -1).cos() * 1.1, torch.cat((theta, theta), -1).sin() * 1.1
        dq, dk = torch.randn(q.shape, generator=g), torch.randn(k.shape, generator=g)
        refs = [_grad(lambda t: apply_rotary(t.transpose(1, 2), cos, sin).transpose(1, 2), t, dy=d)
                for t, d in ((q, dq), (k, dk))]
        for inplace in (False, True):
            qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
            q_in, k_in = qq * 1, kk * 1  # non-leaf: in place is allowed
            q_out, k_out = kernels.rotary_qk(q_in, k_in, cos, sin, inplace=inplace, backend="torch")
            assert (q_out is q_in) == inplace
            torch.autograd.backward((q_out, k_out), (dq, dk))
            for (y_ref, dx_ref), y, dx in zip(refs, (q_out, k_out), (qq.grad, kk.grad)):
                torch.testing.assert_close(y.detach(), y_ref, **FP32)
                torch.testing.assert_close(dx, dx_ref, **FP32)


def test_activation_references_match_autograd():
    g = torch.Generator().manual_seed(2)
    gate_up = torch.randn(3, 4, 2 * 24, generator=g) * 3
    dh = torch.randn(3, 4, 24, generator=g)

    def swiglu_plain(t):
        gate, up = t.chunk(2, dim=-1)
        return up * F.silu(gate)

    dy_gelu = torch.randn(gate_up.shape, generator=g)
    for plain, op, x, dy in ((swiglu_plain, "swiglu", gate_up, dh),
                             (lambda t: F.gelu(t, approximate="tanh"), "gelu_tanh", gate_up, dy_gelu)):
        y_ref, dx_ref = _grad(plain, x, dy=dy)
        y, dx = _grad(lambda t: getattr(kernels, op)(t, backend="torch"), x, dy=dy)
        torch.testing.assert_close(y, y_ref, **FP32)
        # gelu's derivative is formed from other terms than PyTorch's: a few ulps of the O(1) terms
        torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=4e-6)


def test_functions_pass_gradcheck_in_float64():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w, b = torch.randn(7, dtype=torch.float64, generator=g), torch.randn(7, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda t: kernels.rms_norm(t, w, 1e-5, backend="torch"), (x,))
    assert torch.autograd.gradcheck(lambda t: kernels.layer_norm(t, w, b, 1e-5, backend="torch"), (x,))
    assert torch.autograd.gradcheck(lambda t: kernels.swiglu(t, backend="torch"), (torch.randn(
        3, 8, dtype=torch.float64, generator=g, requires_grad=True),))
    assert torch.autograd.gradcheck(lambda t: kernels.gelu_tanh(t, backend="torch"), (x,))
    q = torch.randn(1, 3, 2, 6, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 3, 1, 6, dtype=torch.float64, generator=g, requires_grad=True)
    cos, sin = torch.randn(1, 3, 4, dtype=torch.float64, generator=g), torch.randn(1, 3, 4, dtype=torch.float64,
                                                                                 generator=g)
    assert torch.autograd.gradcheck(lambda a, c: kernels.rotary_qk(a, c, cos, sin, inplace=False, backend="torch"),
                                    (q, k))


# ----------------------------------------------------------------------------- dispatch
def test_backend_switch_per_op_and_cpu_default_is_plain():
    with pytest.raises(ValueError, match="unknown kernel op 'softmax'"):
        set_paths(kernels={"softmax": "torch"})
    with force_paths(kernels={"rope": "torch"}):
        assert current_paths().kernel_backend("rope") == "torch"
        assert kernels.resolve_backend("rope", "cpu") == "torch"
        assert current_paths().kernel_backend("swiglu") == current_paths().kernels
    assert current_paths().kernel_backend("rope") == "auto"
    if not kernels.triton_available("cpu"):
        assert not kernels.uses_triton("rms_norm", "cpu")  # auto: CPU keeps the plain modules
        with pytest.raises(RuntimeError, match="Triton backend"):
            kernels.rms_norm(torch.randn(2, 4), torch.ones(4), 1e-5, backend="triton")
    model = _tiny_model("phi-3-mini-4k")
    names = autograd_node_names(model(torch.randint(3, 100, (1, 5))))
    assert not any(n.startswith(("RMSNormFunction", "RotaryFunction", "SwiGLUFunction")) for n in names)


def _tiny_model(shape):
    class_name, kwargs = SHAPES[shape]
    config = ModelConfig.from_dict({"model_type": "phi" if class_name == "PhiConfig" else "phi3", **kwargs})
    torch.manual_seed(0)
    return PhiForCausalLM(config)


# ----------------------------------------------------------------------------- Triton under the interpreter
_INTERPRETER_CHECK = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, "tests")
    from phicore import kernels
    from phicore.code_paths import force_paths
    from phicore.kernels import fused_torch as ft
    from phicore.config import ModelConfig
    from phicore.frozen_linear import quantize_model_linears
    from phicore.lora import apply_lora, lora_layers
    from phicore.model import PhiForCausalLM
    from interpreter import autograd_node_names
    from tiny_models import SHAPES
    assert kernels.triton_available("cpu"), "interpreter not active"
    g = torch.Generator().manual_seed(0)
    out = {"kernels": [], "models": []}

    def err(a, b):  # max abs error over max(1, max |b|): a relative measure that tolerates zeros
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1)).item()

    def check(name, dtype, pairs):
        out["kernels"].append([name, str(dtype), max(err(a, b) for a, b in pairs)])

    tri = {op: kernels._triton_impl(op) for op in ("rms_norm", "layer_norm", "rope", "swiglu", "gelu_tanh")}
    ref = kernels._TORCH_IMPLS
    for dtype in (torch.float32, torch.float16):
        for D in (40, 64, 130):  # below, at and above a power of two
            x = (torch.randn(3, 5, D, generator=g) * 2 + 0.5).to(dtype)
            dy = torch.randn(3, 5, D, generator=g).to(dtype)
            w, b = torch.randn(D, generator=g).to(dtype), torch.randn(D, generator=g).to(dtype)
            (y1, r1), (y2, r2) = tri["rms_norm"].forward(x, w, 1e-5), ref["rms_norm"].forward(x, w, 1e-5)
            check(f"rms_norm D={D}", dtype, [(y1, y2), (r1, r2),
                  (tri["rms_norm"].backward(dy, x, w, r1), ref["rms_norm"].backward(dy, x, w, r2))])
            (y1, m1, r1), (y2, m2, r2) = tri["layer_norm"].forward(x, w, b, 1e-5), ref["layer_norm"].forward(x, w, b, 1e-5)
            check(f"layer_norm D={D}", dtype, [(y1, y2), (m1, m2), (r1, r2),
                  (tri["layer_norm"].backward(dy, x, w, m1, r1), ref["layer_norm"].backward(dy, x, w, m2, r2))])
            y1, _, _ = tri["layer_norm"].forward(x, w, None, 1e-5)
            check(f"layer_norm no bias D={D}", dtype, [(y1, ref["layer_norm"].forward(x, w, None, 1e-5)[0])])
        for I in (24, 1000):
            gu = (torch.randn(2, 3, 2 * I, generator=g) * 3).to(dtype)
            dh = torch.randn(2, 3, I, generator=g).to(dtype)
            check(f"swiglu I={I}", dtype, [(tri["swiglu"].forward(gu), ref["swiglu"].forward(gu)),
                                           (tri["swiglu"].backward(dh, gu), ref["swiglu"].backward(dh, gu))])
            x = (torch.randn(3, I, generator=g) * 4).to(dtype)
            dy = torch.randn(3, I, generator=g).to(dtype)
            check(f"gelu_tanh n={3 * I}", dtype, [(tri["gelu_tanh"].forward(x), ref["gelu_tanh"].forward(x)),
                                                  (tri["gelu_tanh"].backward(dy, x), ref["gelu_tanh"].backward(dy, x))])
        for H, KV, d, R in ((4, 4, 20, 8), (6, 2, 24, 18), (4, 2, 12, 12)):  # Phi-2-like, Phi-4-like, full
            B, T = 2, 3
            qkv = torch.randn(B, T, (H + 2 * KV) * d, generator=g).to(dtype)
            q, k = qkv[..., :H * d].view(B, T, H, d), qkv[..., H * d:(H + KV) * d].view(B, T, KV, d)  # strided views
            cos, sin = torch.randn(B, T, R, generator=g).to(dtype), torch.randn(B, T, R, generator=g).to(dtype)
            pairs = []
            for backward in (False, True):
                o1 = torch.empty(B, T, H, d, dtype=dtype), torch.empty(B, T, KV, d, dtype=dtype)
                o2 = torch.empty(B, T, H, d, dtype=dtype), torch.empty(B, T, KV, d, dtype=dtype)
                tri["rope"].rope(q, k, cos, sin, *o1, backward=backward)
                ref["rope"].rope(q, k, cos, sin, *o2, backward=backward)
                pairs += list(zip(o1, o2))
            q1, k1, q2, k2 = q.clone(), k.clone(), q.clone(), k.clone()
            tri["rope"].rope(q1, k1, cos, sin, q1, k1)  # in place
            ref["rope"].rope(q2, k2, cos, sin, q2, k2)
            pairs += [(q1, q2), (k1, k2)]
            check(f"rope H={H} KV={KV} d={d} R={R}", dtype, pairs)

    FUSED = {"RMSNormFunctionBackward", "LayerNormFunctionBackward", "RotaryFunctionBackward",
             "SwiGLUFunctionBackward", "GeluTanhFunctionBackward"}

    # Phi-3's fused qkv through NF4 and the unfused LoRA path, whose q and k are views of one plain
    # tensor (an in-place RoPE there failed on CUDA: autograd refuses it). Checkpointed layers:
    # through torch.utils.checkpoint, whose graph keeps the layers' nodes (so the fused ones are
    # seen), and through phicore's checkpoint node, which shows only its own node per layer.
    for shape, nf4, checkpointing, fused_lora in (("phi-2", False, False, True), ("phi-3-mini-4k", False, False, True),
                                                  ("phi-2", True, False, True), ("phi-3-mini-4k", False, "torch", True),
                                                  ("phi-3-mini-4k", True, False, False),
                                                  ("phi-3-mini-4k", False, "phicore", True)):
        class_name, kw = SHAPES[shape]
        cfg = ModelConfig.from_dict({"model_type": "phi" if class_name == "PhiConfig" else "phi3", **kw})
        torch.manual_seed(0)
        model = PhiForCausalLM(cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n or n.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)
        if nf4:
            quantize_model_linears(model)
        apply_lora(model, r=4, alpha=8, dropout=0.1)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B.weight.normal_(0, 0.1)
        model.train()
        model.gradient_checkpointing = bool(checkpointing)
        ids = torch.randint(3, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
        runs = []
        for backend in ("triton", "torch"):
            with force_paths(kernels=backend, fused_lora=fused_lora, layer_checkpoint=checkpointing or "auto"):
                model.zero_grad(set_to_none=True)
                torch.manual_seed(5)
                logits = model(ids)
                names = sorted(FUSED & autograd_node_names(logits))
                logits.square().mean().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            runs.append((logits.detach(), grads, names))
        (l1, g1, names1), (l2, g2, names2) = runs
        grad_err = max(((g1[n] - g2[n]).abs() / (1e-7 + 1e-5 * g2[n].abs())).max().item() for n in g2)
        out["models"].append({"case": f"{shape} nf4={nf4} checkpointing={checkpointing} fused_lora={fused_lora}",
                              "logit_err": (l1 - l2).abs().max().item(), "grad_err_over_tol": grad_err,
                              "fused_triton": names1, "fused_torch": names2})
    print(json.dumps(out))
    """
)


interpreter_results = interpreter_fixture(_INTERPRETER_CHECK)


def test_triton_kernels_match_references(interpreter_results):
    rows = interpreter_results["kernels"]
    assert len(rows) == 2 * (3 * 3 + 2 * 2 + 3)
    for name, dtype, error in rows:
        tol = 1e-5 if dtype == "torch.float32" else 2e-3
        print(f"{name} {dtype}: {error:.2e}")
        assert error <= tol, f"{name} {dtype}: {error}"


def test_models_with_triton_kernels_match_plain_path(interpreter_results):
    expected = {"phi-2": {"LayerNormFunctionBackward", "RotaryFunctionBackward", "GeluTanhFunctionBackward"},
                "phi-3-mini-4k": {"RMSNormFunctionBackward", "RotaryFunctionBackward", "SwiGLUFunctionBackward"}}
    assert len(interpreter_results["models"]) == 6
    for row in interpreter_results["models"]:
        print(row)
        fused = expected[row["case"].split()[0]]
        if "checkpointing=phicore" in row["case"]:  # the layers' nodes live inside the checkpoint node
            fused = {"RMSNormFunctionBackward"}  # the final norm's, outside the layers
        assert set(row["fused_triton"]) == fused, row  # every op really ran fused
        assert row["fused_torch"] == []  # and the forced-torch run kept the plain modules
        assert row["logit_err"] <= 1e-5, row
        assert row["grad_err_over_tol"] <= 1.0, row


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_cuda_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_references_at_real_sizes(dtype):
    """Phi-3-mini's widths (3072 hidden, 8192 MLP, 32 heads x 96) and Phi-2's (2560, 10240, 32 x 80, R 32)."""
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = dict(device="cuda", dtype=dtype)
    for D in (3072, 2560):
        x, dy = torch.randn(2, 256, D, generator=g, **dev), torch.randn(2, 256, D, generator=g, **dev)
        w, b = torch.randn(D, generator=g, **dev), torch.randn(D, generator=g, **dev)
        for op, args in (("rms_norm", (w, 1e-5)), ("layer_norm", (w, b, 1e-5))):
            y_t, dx_t = _grad(lambda t: getattr(kernels, op)(t, *args, backend="triton"), x, dy=dy)
            y_r, dx_r = _grad(lambda t: getattr(kernels, op)(t, *args, backend="torch"), x, dy=dy)
            torch.testing.assert_close(y_t.float(), y_r.float(), **tol)
            torch.testing.assert_close(dx_t.float(), dx_r.float(), **tol)
    for I, op in ((8192, "swiglu"), (10240, "gelu_tanh")):
        x = torch.randn(2, 256, 2 * I if op == "swiglu" else I, generator=g, **dev)
        dy = torch.randn(2, 256, I, generator=g, **dev)
        y_t, dx_t = _grad(lambda t: getattr(kernels, op)(t, backend="triton"), x, dy=dy)
        y_r, dx_r = _grad(lambda t: getattr(kernels, op)(t, backend="torch"), x, dy=dy)
        torch.testing.assert_close(y_t.float(), y_r.float(), **tol)
        torch.testing.assert_close(dx_t.float(), dx_r.float(), **tol)
    for H, d, R in ((32, 96, 96), (32, 80, 32)):
        qkv = torch.randn(2, 256, 3 * H * d, generator=g, **dev)
        q, k = qkv[..., :H * d].view(2, 256, H, d), qkv[..., H * d:2 * H * d].view(2, 256, H, d)
        cos, sin = torch.randn(2, 256, R, generator=g, **dev), torch.randn(2, 256, R, generator=g, **dev)
        outs = {}
        for backend in ("triton", "torch"):
            outs[backend] = kernels.rotary_qk(q.clone(), k.clone(), cos, sin, inplace=False, backend=backend)
        for a, b_ in zip(outs["triton"], outs["torch"]):
            torch.testing.assert_close(a.float(), b_.float(), **tol)


@pytest.mark.gpu
@needs_cuda_triton
@pytest.mark.parametrize("shape", ["phi-2", "phi-3-mini-4k"])
def test_cuda_model_fused_matches_plain(shape):
    from phicore.lora import apply_lora, lora_layers

    model = _tiny_model(shape).cuda()
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.1)
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (2, 64), device="cuda")
    runs = []
    for backend in ("auto", "torch"):
        with force_paths(kernels=backend):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(5)
            logits = model(ids)
            logits.square().mean().backward()
        runs.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
