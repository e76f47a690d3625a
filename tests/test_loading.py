"""Checkpoint loading: config forms, sharding, errors, meta-device streaming, presets."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import phicore
from phicore.config import PRESETS, ModelConfig
from phicore.hub import resolve_model_dir
from phicore.weights import CheckpointError, save_model
from tiny_models import SHARED, save_hf_checkpoint

pytest.importorskip("transformers")


def _legacy_form(v5: dict) -> dict:
    """Rewrite a transformers-5 config.json (rope_parameters) in the hub's legacy form."""
    legacy = {k: v for k, v in v5.items() if k != "rope_parameters"}
    rope = dict(v5["rope_parameters"])
    legacy["rope_theta"] = rope.pop("rope_theta")
    legacy["partial_rotary_factor"] = rope.pop("partial_rotary_factor", 1.0)
    kind = rope.pop("rope_type")
    rope.pop("type", None)
    rope.pop("original_max_position_embeddings", None)
    legacy["rope_scaling"] = {"type": "su" if kind == "longrope" else kind, **rope} if kind != "default" else None
    return legacy


@pytest.mark.parametrize("shape", ["phi-2", "phi-3.5-mini", "phi-4-mini"])
def test_legacy_and_transformers5_configs_give_the_same_model(shape, tmp_path):
    v5_dir, legacy_dir = tmp_path / "v5", tmp_path / "legacy"
    save_hf_checkpoint(shape, v5_dir)
    v5 = json.loads((v5_dir / "config.json").read_text())
    assert "rope_parameters" in v5
    legacy_dir.mkdir()
    (legacy_dir / "config.json").write_text(json.dumps(_legacy_form(v5)))
    (legacy_dir / "model.safetensors").write_bytes((v5_dir / "model.safetensors").read_bytes())
    a = phicore.load_model(v5_dir, device="cpu")
    b = phicore.load_model(legacy_dir, device="cpu")
    fields = ("rope_type", "rope_theta", "partial_rotary_factor", "rope_short_factor", "rope_long_factor",
              "original_max_position_embeddings", "rotary_dim", "attention_scaling", "num_key_value_heads")
    assert {f: getattr(a.config, f) for f in fields} == {f: getattr(b.config, f) for f in fields}
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_real_configs_parse():
    models = SHARED / "models"
    if not models.is_dir():
        pytest.skip("../shared/models is absent")
    phi2 = ModelConfig.from_file(models / "phi-2" / "config.json")
    assert (phi2.rotary_dim, phi2.head_dim, phi2.layout.parallel_block) == (32, 80, True)
    mini = ModelConfig.from_file(models / "phi-3-mini-4k-instruct" / "config.json")
    assert (mini.sliding_window, mini.rope_type, mini.attention_scaling) == (2047, "default", 1.0)
    p35 = ModelConfig.from_file(models / "phi-3.5-mini-instruct" / "config.json")
    assert p35.rope_type == "longrope" and len(p35.rope_long_factor) == 48
    assert abs(p35.attention_scaling - 1.19024) < 1e-5


def test_save_model_round_trip_loads_in_both(tmp_path):
    transformers = pytest.importorskip("transformers")
    save_hf_checkpoint("phi-4-mini", tmp_path / "hf")
    model = phicore.load_model(tmp_path / "hf", device="cpu")
    save_model(model, tmp_path / "ours", max_shard_bytes=40_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    again = phicore.load_model(tmp_path / "ours", device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
        assert (hf(ids).logits - model(ids)).abs().max() <= 1e-4


def test_weights_are_cast_as_read_and_nothing_left_on_meta(tmp_path):
    save_hf_checkpoint("phi-3-medium", tmp_path)
    model = phicore.load_model(tmp_path, dtype="bf16", device="cpu")
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    save_hf_checkpoint("phi-3-mini-4k", tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state.pop("model.layers.1.mlp.down_proj.weight")
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    state["model.norm.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        phicore.load_model(tmp_path, device="cpu")
    msg = str(err.value)
    assert "missing keys: model.layers.1.mlp.down_proj.weight" in msg
    assert "unexpected keys: model.layers.0.extra.weight" in msg
    assert "model.norm.weight (checkpoint [3], model [64])" in msg
    assert "\n" not in msg


def test_pickle_only_folder_is_refused(tmp_path):
    save_hf_checkpoint("phi-2", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match="only pickle weights.*arbitrary code"):
        phicore.load_model(tmp_path, device="cpu")


def test_bad_config_and_unknown_names(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        phicore.load_model(tmp_path, device="cpu")
    with pytest.raises(FileNotFoundError, match="not a preset"):
        resolve_model_dir("./no/such/folder")
    assert set(PRESETS) == {"phi-2", "phi-3-mini-4k", "phi-3-mini-128k", "phi-3.5-mini",
                            "phi-3-medium-4k", "phi-4-mini", "phi-4"}


def test_hub_download_honours_offline_mode(tmp_path, monkeypatch):
    """With HF_HUB_OFFLINE=1 and an empty cache, a hub id fails fast with a clear message."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="microsoft/phi-2: could not download"):
        resolve_model_dir("phi-2")
