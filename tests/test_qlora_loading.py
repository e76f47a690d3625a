"""load_model(quantize="nf4"): linear layers become NF4 (lm_head, embeddings, norms stay dense),
the quantised model computes exactly what a dense model holding the dequantised weights
computes, and a saved 4-bit folder reloads to the same model. Also train.py --quantize nf4."""

import sys
from pathlib import Path

import pytest
import torch

import phicore
from phicore.nf4 import NF4Linear
from phicore.weights import save_model
from tiny_models import save_hf_checkpoint

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def test_nf4_load_equals_dense_with_dequantised_weights_and_round_trips(tmp_path):
    save_hf_checkpoint("phi-2", tmp_path / "hf")
    q = phicore.load_model(tmp_path / "hf", device="cpu", quantize="nf4")
    assert isinstance(q.model.layers[0].self_attn.q_proj, NF4Linear)
    assert isinstance(q.model.layers[0].mlp.fc2, NF4Linear)
    assert type(q.lm_head) is torch.nn.Linear
    dense = phicore.load_model(tmp_path / "hf", device="cpu")
    with torch.no_grad():
        for name, module in q.named_modules():
            if isinstance(module, NF4Linear):
                dense.get_submodule(name).weight.copy_(module.dequantize())
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert (q(ids) - dense(ids)).abs().max() <= 1e-5
    save_model(q, tmp_path / "nf4")
    again = phicore.load_model(tmp_path / "nf4", device="cpu")
    assert isinstance(again.model.layers[1].self_attn.dense, NF4Linear)
    with torch.no_grad():
        assert torch.equal(again(ids), q(ids))


def test_train_cli_qlora_writes_a_plain_adapter(tmp_path):
    import train

    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"prompt": "q{i}", "response": "answer {i}"}}\n' for i in range(8)))
    out = tmp_path / "out"
    code = train.main(["--model", "tiny-phi-3", "--data", str(data), "--out", str(out), "--max-steps", "2",
                       "--quantize", "nf4", "--quiet", "--batch-size", "2", "--val-split", "0"])
    assert code == 0
    model = phicore.load_model(out / "base", device="cpu")
    phicore.load_adapter(model, out)  # an ordinary PEFT adapter on the dense base
    assert (out / "adapter_model.safetensors").exists()
