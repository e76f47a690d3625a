"""phicore.code_paths: the one switch that forces each fast path or its reference.

Oracles: the CodePaths value itself (what was set is what is read back), and what the modules
that read it answer: kernels.resolve_backend, attention.uses_flex, LoRALinear's fused test.
"""

import pytest
import torch
import torch.nn as nn

import phicore
from phicore import attention, kernels
from phicore.code_paths import CodePaths, current_paths, force_paths, set_paths
from phicore.lora import LoRALinear

DEFAULT = CodePaths()


@pytest.fixture(autouse=True)
def _restore():
    with force_paths():  # whatever a test leaves set is undone after it
        yield


def test_defaults_and_public_api():
    assert current_paths() == DEFAULT
    assert (DEFAULT.kernels, DEFAULT.kernel_ops, DEFAULT.fused_lora, DEFAULT.packed_attention,
            DEFAULT.layer_checkpoint) == ("auto", (), True, "auto", "auto")
    assert phicore.force_paths is force_paths and phicore.set_paths is set_paths
    assert phicore.current_paths is current_paths and phicore.CodePaths is CodePaths
    with pytest.raises(AttributeError):
        current_paths().kernels = "torch"  # frozen: only set_paths changes the choices


def test_force_paths_sets_and_restores():
    cuda = torch.device("cuda")  # the "auto" choices are decided by device, no GPU needed to ask
    with force_paths(kernels="torch", fused_lora=False, packed_attention="sdpa") as paths:
        assert paths == current_paths() == CodePaths("torch", (), False, "sdpa")
        assert all(kernels.resolve_backend(op, "cpu") == "torch" for op in kernels.OPS)
        assert not attention.uses_flex(cuda)
    assert current_paths() == DEFAULT
    assert attention.uses_flex(cuda) and not attention.uses_flex(torch.device("cpu"))


def test_per_op_choices_add_up_and_an_all_ops_choice_replaces_them():
    with force_paths(kernels={"rope": "torch"}):
        with force_paths(kernels={"nf4_gemv": "torch", "rope": "auto"}):  # nested: merged
            assert current_paths().kernel_ops == (("nf4_gemv", "torch"), ("rope", "auto"))
            assert current_paths().kernel_backend("swiglu") == "auto"
        assert current_paths().kernel_ops == (("rope", "torch"),)
        assert current_paths().kernel_backend("rope") == "torch"
        with force_paths(kernels="torch"):
            assert current_paths().kernel_ops == ()
        assert current_paths().kernel_backend("rope") == "torch"
    assert current_paths() == DEFAULT


def test_restores_on_exception_and_undoes_set_paths_inside():
    with pytest.raises(RuntimeError, match="boom"):
        with force_paths(packed_attention="flex"):
            set_paths(fused_lora=False)
            raise RuntimeError("boom")
    assert current_paths() == DEFAULT


def test_set_paths_returns_what_it_replaced():
    previous = set_paths(fused_lora=False)
    assert previous == DEFAULT and current_paths().fused_lora is False
    assert set_paths(packed_attention="sdpa") == CodePaths(fused_lora=False)
    assert set_paths(previous) == CodePaths(fused_lora=False, packed_attention="sdpa")
    assert current_paths() == DEFAULT
    assert set_paths(DEFAULT, kernels={"rope": "torch"}) == DEFAULT  # keywords apply on top of `paths`
    assert current_paths() == CodePaths(kernel_ops=(("rope", "torch"),))


@pytest.mark.parametrize("changes, message", [
    (dict(kernels="cuda"), "unknown kernel backend 'cuda' (one of auto, triton, torch)"),
    (dict(kernels={"softmax": "torch"}), "unknown kernel op 'softmax' (one of nf4, nf4_gemv, rms_norm"),
    (dict(kernels={"rope": "fast"}), "unknown kernel backend for rope 'fast' (one of auto, triton, torch)"),
    (dict(packed_attention="dense"), "unknown packed_attention mode 'dense' (one of auto, flex, sdpa)"),
    (dict(fused_lora="no"), "unknown fused_lora setting 'no' (one of True, False)"),
    (dict(layer_checkpoint="reentrant"), "unknown layer_checkpoint mode 'reentrant' (one of auto, phicore, torch)"),
])
def test_bad_values_are_refused_and_change_nothing(changes, message):
    with force_paths(packed_attention="flex"):
        before = current_paths()
        with pytest.raises(ValueError) as error:
            set_paths(**changes)
        assert message in str(error.value)
        with pytest.raises(ValueError):
            with force_paths(**changes):
                pass
        assert current_paths() == before
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        set_paths(CodePaths(kernels="cuda"))


def test_fused_lora_choice_reaches_the_layer():
    layer = LoRALinear(nn.Linear(8, 6), r=2, alpha=4).train()
    x = torch.randn(3, 8, requires_grad=True)
    assert type(layer(x).grad_fn).__name__ == "LoRALinearFunctionBackward"
    with force_paths(fused_lora=False):
        assert type(layer(x).grad_fn).__name__ != "LoRALinearFunctionBackward"
