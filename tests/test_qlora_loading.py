"""load_model(quantize="nf4"): linear layers become NF4 (lm_head, embeddings, norms stay dense),
the quantised model computes exactly what a dense model holding the dequantised weights
computes, and a saved 4-bit folder reloads to the same model. 4-bit checkpoints move both ways
between phicore and transformers + bitsandbytes with the same logits. train.py --quantize nf4,
and QLoRA's loss curve against LoRA's from the same start.

About the transformers oracle on CPU: bitsandbytes' Linear4bit, in eval mode on a CPU with
AVX512-BF16, repacks the weight and multiplies through a bf16 kernel (logits then differ from an
fp32 matmul of the same dequantised weight by ~2e-3). The parity tests switch that path off
(`support_avx512bf16_for_cpu = False`), so bitsandbytes dequantises and multiplies in fp32,
which is what its CUDA path and phicore compute.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

import phicore
from phicore.frozen_linear import NF4Linear
from phicore.weights import save_model
from tiny_models import save_hf_checkpoint

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "humor.jsonl"


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


# ----------------------------------------------------------------------------- transformers parity
# Widths are multiples of the blocksize: bitsandbytes' CPU Linear4bit dequantises per row.
BNB_SHAPES = {"phi-2": dict(hidden_size=128, intermediate_size=256), "phi-3-mini-4k": dict(intermediate_size=256)}


def _fp32_bnb(model):
    """Make bitsandbytes compute in fp32 on CPU (see the module docstring)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(scope="module")
def transformers_4bit(tmp_path_factory):
    """{(shape, double_quant): (folder saved by transformers in 4 bits, its logits, input ids)}."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("bnb")
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    made = {}
    for shape, overrides in BNB_SHAPES.items():
        save_hf_checkpoint(shape, root / shape / "dense", **overrides)
        for double_quant in (True, False):
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
            hf = AutoModelForCausalLM.from_pretrained(root / shape / "dense", quantization_config=config,
                                                      device_map="cpu", dtype=torch.float32).eval()
            folder = root / shape / f"bnb-dq{int(double_quant)}"
            hf.save_pretrained(folder)
            with torch.no_grad():
                logits = _fp32_bnb(hf)(ids).logits
            made[shape, double_quant] = (folder, logits, ids)
    return made


@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "single-quant"])
@pytest.mark.parametrize("shape", sorted(BNB_SHAPES))
def test_transformers_4bit_checkpoint_gives_its_logits_in_phicore(transformers_4bit, shape, double_quant):
    folder, hf_logits, ids = transformers_4bit[shape, double_quant]
    model = phicore.load_model(folder, device="cpu")
    layer = model.get_submodule(next(n for n, m in model.named_modules() if isinstance(m, NF4Linear)))
    assert layer.double_quant is double_quant
    with torch.no_grad():
        error = (model(ids) - hf_logits).abs().max().item()
    print(f"{shape} double_quant={double_quant}: transformers 4-bit -> phicore max |logit diff| {error:.2e}")
    assert error <= 1e-4


@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "single-quant"])
@pytest.mark.parametrize("shape", sorted(BNB_SHAPES))
def test_phicore_4bit_checkpoint_loads_in_transformers(transformers_4bit, tmp_path, shape, double_quant):
    from transformers import AutoModelForCausalLM

    folder, _, ids = transformers_4bit[shape, double_quant]
    model = phicore.load_model(folder.parent / "dense", device="cpu", quantize="nf4", double_quant=double_quant)
    save_model(model, tmp_path / "nf4")
    written = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert written["bnb_4bit_use_double_quant"] is double_quant and written["bnb_4bit_quant_type"] == "nf4"
    hf = _fp32_bnb(AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu", dtype=torch.float32).eval())
    with torch.no_grad():
        error = (hf(ids).logits - model(ids)).abs().max().item()
    print(f"{shape} double_quant={double_quant}: phicore 4-bit -> transformers max |logit diff| {error:.2e}")
    assert error <= 1e-4


# ----------------------------------------------------------------------------- QLoRA against LoRA


def _loss_curve(out_dir: Path) -> list:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def test_qlora_loss_curve_stays_within_5_percent_of_lora(tmp_path):
    """Same tiny base, same data order, same LoRA initialisation (same seed): only the base
    weights differ (NF4 vs fp32), so the two 20-step curves must stay close."""
    import train

    curves = {}
    for name, extra in {"lora": [], "qlora": ["--quantize", "nf4"]}.items():
        out = tmp_path / name
        code = train.main(["--model", "tiny-phi-3", "--data", str(EXAMPLES), "--out", str(out), "--max-steps", "20",
                           "--batch-size", "4", "--val-split", "0", "--lora-dropout", "0", "--quiet", "--seed", "3",
                           *extra])
        assert code == 0
        curves[name] = _loss_curve(out)
    lora, qlora = curves["lora"], curves["qlora"]
    assert len(lora) == len(qlora) == 20
    gaps = [abs(q - d) / d for q, d in zip(qlora, lora)]
    print("LoRA  ", " ".join(f"{v:.3f}" for v in lora))
    print("QLoRA ", " ".join(f"{v:.3f}" for v in qlora))
    print(f"largest relative gap {max(gaps):.2%}")
    assert lora[-1] < 0.92 * lora[0]  # it learns (5.8 -> 5.1 nats), so the comparison means something
    assert max(gaps) <= 0.05
