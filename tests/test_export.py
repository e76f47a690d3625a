"""Merged Hugging Face folders and GGUF files (phicore.export), checked against the oracles.

- `--merge`: transformers' AutoModelForCausalLM loads the folder and its fp32 logits are within
  1e-4 of phicore's base + adapter (unmerged) for Phi-2, Phi-3, a longrope Phi-3.5 shape, a
  tied-embedding Phi-4-mini shape, DoRA, and a QLoRA adapter (against phicore's NF4 base +
  adapter); transformers' greedy `generate` on the folder gives the ids infer.py gives; a small
  shard limit writes shards and an index that load the same.
- `--gguf`: gguf.GGUFReader reads back the tensor names (equal to the gguf package's own HF ->
  GGUF name map), shapes, types (norms and biases f32), values (f16 / bf16 exactly as torch
  rounds them, q8_0 within one quantisation step), the metadata of reference.md section 6, and the
  real Phi-2 ("gpt2", merges) and Phi-3.5 ("llama", SentencePiece scores) vocabularies.

Adapters are made directly (LoRA B drawn at random, so the adapter changes the logits) rather
than trained: training is covered by test_train.py and test_infer.py.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import infer  # noqa: E402
from tiny_models import SHARED, make_adapter, save_hf_checkpoint  # noqa: E402

from phicore.export import ExportError  # noqa: E402
from phicore.export.gguf import gguf_tensor_name, read_sentencepiece_model, write_gguf  # noqa: E402
from phicore.export.merge import check_target_folder, parse_size, save_merged  # noqa: E402
from phicore.inference import GenerationSettings, load_session  # noqa: E402
from phicore.lora import LoRALinear, disable_adapter  # noqa: E402
from phicore.tiny import PHI3_SPECIAL_TOKENS, build_tiny, byte_level_tokenizer  # noqa: E402
from phicore.tokenizer import load_tokenizer  # noqa: E402
from phicore.weights import load_model  # noqa: E402

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

LOGIT_TOL = 1e-4  # fp32, max abs difference
MODELS = SHARED / "models"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Base folders: the two tiny presets, and transformers-written tiny shapes of Phi-3.5
    (longrope) and Phi-4-mini (tied embeddings, partial rotary, GQA) with a byte-level tokenizer."""
    root = tmp_path_factory.mktemp("bases")
    folders = {name: build_tiny(name, root / name) for name in ("tiny-phi-2", "tiny-phi-3")}
    for shape in ("phi-3.5-mini", "phi-4-mini"):
        folder = root / shape
        save_hf_checkpoint(shape, folder)
        byte_level_tokenizer(PHI3_SPECIAL_TOKENS, bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>",
                             chat_template=None).save(folder)
        folders[shape] = folder
    return folders


def ids_for(vocab_size: int, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


# ----------------------------------------------------------------------------- merge

@pytest.mark.parametrize("base_name, dora", [("tiny-phi-2", False), ("tiny-phi-3", False), ("phi-3.5-mini", False),
                                             ("phi-4-mini", False), ("tiny-phi-3", True)])
def test_merged_folder_matches_base_plus_adapter(bases, tmp_path, base_name, dora):
    adapter = make_adapter(bases[base_name], tmp_path / "adapter", use_dora=dora)
    session = load_session(adapter, device="cpu", dense=True)
    ids = ids_for(session.model.config.vocab_size)  # 24 positions: past Phi-3.5's original 16 (long factors)
    with torch.no_grad():
        expected = session.model(ids)  # base + adapter, unmerged
        with disable_adapter(session.model):
            without = session.model(ids)
    assert (expected - without).abs().max() > 1e-2  # the adapter matters
    out = save_merged(session.model, session.tokenizer, tmp_path / "merged", stop_ids=session.stop_ids)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert not (tmp_path / "merged.partial").exists()
    got = hf_logits(out, ids)
    assert (got - expected).abs().max().item() <= LOGIT_TOL
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer("3 plus 3?")["input_ids"] == session.tokenizer.encode("3 plus 3?")
    generation = json.loads((out / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert set(eos if isinstance(eos, list) else [eos]) == set(session.stop_ids)


def test_greedy_answer_equals_transformers_generate(bases, tmp_path):
    adapter = make_adapter(bases["tiny-phi-3"], tmp_path / "adapter", seed=3)
    session = load_session(adapter, device="cpu", dense=True)
    settings = GenerationSettings(max_new_tokens=20)
    prompt_ids = session.prompt_ids("Tell me a joke about cats")
    answer = session.answer("Tell me a joke about cats", settings)
    save_merged(session.model, session.tokenizer, tmp_path / "merged", stop_ids=session.stop_ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=20,
                         pad_token_id=session.tokenizer.pad_token_id)
    new = out[0, len(prompt_ids):].tolist()
    cut = next((i for i, t in enumerate(new) if t in session.stop_ids), len(new))
    assert answer.token_ids == new[:cut] and len(answer.token_ids) > 0


def test_merge_qlora_adapter_through_the_cli(bases, tmp_path, capsys):
    adapter = make_adapter(bases["tiny-phi-3"], tmp_path / "qlora", quantize="nf4", seed=5)
    quantized = load_session(adapter, device="cpu")  # as in training: the NF4 base + adapter
    assert any(isinstance(m, LoRALinear) and m.is_nf4 for m in quantized.model.modules())  # LoRA over NF4
    ids = ids_for(quantized.model.config.vocab_size, seed=1)
    with torch.no_grad():
        expected = quantized.model(ids)
    rc = infer.main(["--adapter", str(adapter), "--merge", str(tmp_path / "merged"), "--quiet"],
                    stdin=io.StringIO(), stdout=io.StringIO())
    err = capsys.readouterr().err
    assert rc == 0 and "note: this adapter was trained with QLoRA" in err and "dense" in err
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "float32"
    assert (hf_logits(tmp_path / "merged", ids) - expected).abs().max().item() <= LOGIT_TOL


def test_sharded_merge(bases, tmp_path):
    adapter = make_adapter(bases["tiny-phi-2"], tmp_path / "adapter")
    session = load_session(adapter, device="cpu", dense=True)
    ids = ids_for(session.model.config.vocab_size)
    with torch.no_grad():
        expected = session.model(ids)
    out = save_merged(session.model, session.tokenizer, tmp_path / "merged", max_shard_bytes=400_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert not (out / "model.safetensors").exists()
    assert (hf_logits(out, ids) - expected).abs().max().item() <= LOGIT_TOL


def test_merge_target_and_size_checks(bases, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="already exists"):
        check_target_folder(taken)
    check_target_folder(tmp_path / "new")
    empty = tmp_path / "empty"
    empty.mkdir()
    check_target_folder(empty)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1000") == 1000
    adapter = make_adapter(bases["tiny-phi-2"], tmp_path / "adapter")
    for args, expected in [(("--merge", taken), "already exists"),
                           (("--merge", empty, "--max-shard-size", "lots"), "--max-shard-size"),
                           (("--merge", empty, "--quantize", "nf4"), "--quantize cannot")]:
        rc = infer.main(["--adapter", str(adapter), *map(str, args)], stdin=io.StringIO(), stdout=io.StringIO())
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and expected in err[0]
    assert (taken / "config.json").read_text() == "{}"


# ----------------------------------------------------------------------------- GGUF

def read_gguf(path: Path):
    reader = gguf.GGUFReader(str(path))
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return meta, tensors


def dequantized(tensor) -> np.ndarray:
    """A GGUF tensor's values in its logical (out, in) shape."""
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))


@pytest.mark.parametrize("base_name", ["tiny-phi-2", "tiny-phi-3", "phi-4-mini"])
def test_gguf_names_follow_the_gguf_package_map(bases, base_name, tmp_path):
    model = load_model(bases[base_name], device="cpu")
    arch = {"phi": gguf.MODEL_ARCH.PHI2, "phi3": gguf.MODEL_ARCH.PHI3}[model.config.model_type]
    name_map = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    for key in model.state_dict():
        assert gguf_tensor_name(key) == name_map.get_name(key, try_suffixes=(".weight", ".bias")), key
    path = write_gguf(model, load_tokenizer(bases[base_name]), tmp_path / "m.gguf", "f16", warn=lambda m: None)
    _, tensors = read_gguf(path)
    assert ("output.weight" in tensors) == (not model.config.tie_word_embeddings)  # tied: llama.cpp reuses token_embd
    with pytest.raises(ExportError, match="no tensor for this weight"):
        gguf_tensor_name("model.layers.0.self_attn.q_layernorm.weight")


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])
def test_gguf_phi2_readback(bases, tmp_path, out_type):
    model = load_model(bases["tiny-phi-2"], device="cpu")
    tokenizer = load_tokenizer(bases["tiny-phi-2"])
    path = write_gguf(model, tokenizer, tmp_path / "phi2.gguf", out_type, name="phi2-test", warn=lambda m: None)
    assert not path.with_name("phi2.gguf.tmp").exists()
    meta, tensors = read_gguf(path)
    c = model.config
    Q = gguf.GGMLQuantizationType
    assert meta["general.architecture"] == "phi2" and meta["general.name"] == "phi2-test"
    expected_meta = {
        "phi2.context_length": c.max_position_embeddings, "phi2.embedding_length": c.hidden_size,
        "phi2.feed_forward_length": c.intermediate_size, "phi2.block_count": c.num_hidden_layers,
        "phi2.attention.head_count": c.num_attention_heads, "phi2.attention.head_count_kv": c.num_key_value_heads,
        "phi2.rope.dimension_count": c.rotary_dim, "general.file_type": {
            "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type],
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id, "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.ggml.add_bos_token": False,
    }
    for key, value in expected_meta.items():
        assert meta[key] == value, key
    assert c.rotary_dim == 12  # partial rotary: int(32 * 0.4)
    assert meta["phi2.attention.layer_norm_epsilon"] == pytest.approx(c.norm_eps)
    assert meta["phi2.rope.freq_base"] == pytest.approx(c.rope_theta)
    assert "phi2.attention.layer_norm_rms_epsilon" not in meta and "tokenizer.ggml.padding_token_id" not in meta
    # tensors: names, shapes (GGUF lists the fastest dimension first), types, values
    state = model.state_dict()
    assert set(tensors) == {gguf_tensor_name(k) for k in state}
    for key, value in state.items():
        t = tensors[gguf_tensor_name(key)]
        assert t.shape.tolist() == list(reversed(value.shape)), key
        original = value.float().numpy()
        got = dequantized(t)
        if value.dim() == 1 or t.name.endswith("_norm.weight"):  # norms and biases stay f32
            assert t.tensor_type == Q.F32 and np.array_equal(got, original), key
        elif out_type == "f16":
            assert t.tensor_type == Q.F16 and np.array_equal(got, value.half().float().numpy()), key
        elif out_type == "bf16":
            assert t.tensor_type == Q.BF16 and np.array_equal(got, value.bfloat16().float().numpy()), key
        else:
            assert t.tensor_type == Q.Q8_0, key
            step = np.abs(original).reshape(-1, 32).max(axis=1) / 127  # one q8_0 step per 32-value block
            err = np.abs(got - original).reshape(-1, 32).max(axis=1)
            # half a step from rounding, plus the scale's own f16 rounding (2^-11) times 127
            assert np.all(err <= step * (0.5 + 127 * 2**-11) + 1e-8), key


def test_gguf_real_phi2_vocabulary(tmp_path):
    """A Phi-2 shape with the real Phi-2 tokenizer (vocab padded to 51200, as the real model's)."""
    folder = MODELS / "phi-2"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present (real Phi-2 tokenizer)")
    base = tmp_path / "base"
    save_hf_checkpoint("phi-2", base, vocab_size=51200)
    model = load_model(base, device="cpu")
    tokenizer = load_tokenizer(folder)
    meta, _ = read_gguf(write_gguf(model, tokenizer, tmp_path / "phi2.gguf", "f16", warn=lambda m: None))
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.bos_token_id"] == meta["tokenizer.ggml.eos_token_id"] == 50256
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == 51200 and all(tokens[i] == t for t, i in vocab.items())
    assert tokens[-1] == "[PAD51199]" and types[-1] == gguf.TokenType.UNUSED
    assert types[50256] == gguf.TokenType.CONTROL and types[vocab["Ġthe"]] == gguf.TokenType.NORMAL
    assert types[50257] == gguf.TokenType.USER_DEFINED  # a run of spaces: added, not special
    merges = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]


def test_gguf_phi3_longrope_with_the_real_tokenizer(tmp_path):
    """A Phi-3.5 shape (longrope) with the real Phi-3.5 tokenizer and its tokenizer.model scores."""
    folder = MODELS / "phi-3.5-mini-instruct"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present (real Phi-3.5 tokenizer)")
    base = tmp_path / "base"
    save_hf_checkpoint("phi-3.5-mini", base, vocab_size=32064)
    model = load_model(base, device="cpu")
    tokenizer = load_tokenizer(folder)
    path = write_gguf(model, tokenizer, tmp_path / "phi35.gguf", "q8_0", sentencepiece_model=folder / "tokenizer.model",
                      warn=lambda m: None)
    meta, tensors = read_gguf(path)
    c = model.config
    assert meta["general.architecture"] == "phi3"
    assert meta["phi3.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps)
    assert meta["phi3.rope.scaling.original_context_length"] == c.original_max_position_embeddings == 16
    assert meta["phi3.attention.sliding_window"] == c.sliding_window
    assert meta["phi3.rope.scaling.attn_factor"] == pytest.approx(c.attention_scaling)
    assert meta["phi3.rope.dimension_count"] == c.rotary_dim and meta["phi3.feed_forward_length"] == c.intermediate_size
    for name, factors in (("rope_factors_long.weight", c.rope_long_factor),
                          ("rope_factors_short.weight", c.rope_short_factor)):
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and t.shape.tolist() == [c.rotary_dim // 2]
        assert np.allclose(dequantized(t), np.array(factors, dtype=np.float32))
    qkv = tensors["blk.0.attn_qkv.weight"]  # fused, [Q | K | V] rows
    assert qkv.shape.tolist() == [c.hidden_size, (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim]
    assert tensors["blk.0.ffn_up.weight"].shape.tolist() == [c.hidden_size, 2 * c.intermediate_size]  # gate_up
    # the vocabulary as llama.cpp's converter writes it from tokenizer.model
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    tokens, scores, types = (meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"],
                             meta["tokenizer.ggml.token_type"])
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    assert len(tokens) == 32064 and all(tokens[i] == t for t, i in vocab.items())
    assert scores[vocab["▁t"]] == -1.0 and scores[vocab["▁▁"]] == -1e9  # SentencePiece's own scores
    assert types[vocab["<0x0A>"]] == gguf.TokenType.BYTE and types[vocab["▁t"]] == gguf.TokenType.NORMAL
    assert types[vocab["<|end|>"]] == gguf.TokenType.CONTROL and scores[vocab["<|end|>"]] == -1000.0
    assert types[32063] == gguf.TokenType.UNUSED and "tokenizer.ggml.merges" not in meta
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    pieces = read_sentencepiece_model(folder / "tokenizer.model")
    assert [p for p, _, _ in pieces] == [tokens[i] for i in range(len(pieces))]


def test_gguf_through_the_cli_with_merge(bases, tmp_path):
    adapter = make_adapter(bases["tiny-phi-3"], tmp_path / "adapter")
    rc = infer.main(["--adapter", str(adapter), "--merge", str(tmp_path / "merged"), "--gguf",
                     str(tmp_path / "out" / "m.gguf"), "--gguf-type", "q8_0", "--quiet"],
                    stdin=io.StringIO(), stdout=io.StringIO())
    assert rc == 0
    meta, tensors = read_gguf(tmp_path / "out" / "m.gguf")
    merged = load_model(tmp_path / "merged", device="cpu")  # the GGUF holds the merged weights
    weight = merged.state_dict()["model.layers.1.mlp.down_proj.weight"].numpy()
    got = dequantized(tensors["blk.1.ffn_down.weight"])
    assert np.abs(got - weight).max() <= np.abs(weight).max() / 127
    # tiny-phi-3's tokenizer is SentencePiece-style with byte fallback, as Phi-3's: llama.cpp's "llama" vocabulary
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.padding_token_id"] == merged.config.pad_token_id


def test_gguf_missing_package_is_one_clear_line(bases, tmp_path, monkeypatch, capsys):
    adapter = make_adapter(bases["tiny-phi-2"], tmp_path / "adapter")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    rc = infer.main(["--adapter", str(adapter), "--gguf", str(tmp_path / "m.gguf")], stdin=io.StringIO(),
                    stdout=io.StringIO())
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install gguf" in err[0]
    assert not (tmp_path / "m.gguf").exists()
