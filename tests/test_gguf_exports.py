"""Exports that deploy and check themselves (issue 16, items 1, 3 and 6), each against its oracle.

- Item 1, the tiny presets' tokenizers: real BPEs with merges (byte-level for tiny-phi-2,
  SentencePiece-style with byte fallback for tiny-phi-3). Oracles: the `gguf` package's reader (the
  file carries merges / scores and byte pieces), and llama.cpp (llama-cpp-python, skipped when not
  installed), which loads the file and tokenises strings to phicore's ids.
- Item 3, `--gguf-lora`: the reader sees llama.cpp's adapter layout (metadata, `.lora_a` [in, r] /
  `.lora_b` [r, out] f32 tensors named after the base GGUF's), and base + alpha / r * B @ A from
  the file equals the merged folder's weights (safetensors), for plain LoRA, rsLoRA and rank /
  alpha patterns; llama.cpp with base GGUF + adapter GGUF gives the merged model's logits.
- Item 6, every export checks itself: good files pass (every GGUF type phicore writes, and every
  type llama.cpp's own quantiser writes, read back with `gguf.quants.dequantize`), a corrupted
  tensor exits 1 naming it, the GGUF vocabulary round-trips phicore's ids (also on the real Phi-2
  and Phi-3.5 vocabularies, where llama.cpp's own tokeniser is the oracle), and `--verify` runs
  the file in llama.cpp (logits, and a greedy answer that stops at the stop token).
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

from phicore.config import ModelConfig  # noqa: E402
from phicore.export import gguf as gguf_export  # noqa: E402
from phicore.export.gguf import GGUF_TYPES, write_gguf  # noqa: E402
from phicore.export.gguf_lora import base_only, write_gguf_lora  # noqa: E402
from phicore.export import VerifyError  # noqa: E402
from phicore.export.gguf import gguf_name_for  # noqa: E402
from phicore.export.gguf_vocabulary import GGUFVocabulary, check_gguf_vocabulary  # noqa: E402
from phicore.export.llama_check import llama_cpp_available, llama_cpp_run, run_in_llama_cpp  # noqa: E402
from phicore.export.verify import Reference, check_gguf, read_gguf  # noqa: E402
from phicore.model import PhiForCausalLM  # noqa: E402
from phicore.tiny import PHI3_SPECIAL_TOKENS, TINY_PRESETS, _init_like_transformers, build_tiny  # noqa: E402
from phicore.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from phicore.weights import load_model  # noqa: E402
from tiny_models import make_adapter  # noqa: E402

gguf = pytest.importorskip("gguf")
needs_llama = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")
PRESETS = ("tiny-phi-2", "tiny-phi-3")
MODELS = REPO.parent / "shared" / "models"
TEXTS = ["Why did the cat sit on the keyboard?", "Café ☕, naïve — 日本語 🙂", "  two  spaces,\ta tab\n3.14 + 2 ",
         "<|user|>\nTell me a joke.<|end|>\n<|assistant|>\nNo.<|end|>\n", "Instruct: Hi\nOutput: Hello</s> <s>x"]


def run_infer(*args) -> tuple:
    """(exit code, stderr lines) of infer.py."""
    err = io.StringIO()
    old, sys.stderr = sys.stderr, err
    try:
        rc = infer.main([str(a) for a in args], stdin=io.StringIO(), stdout=io.StringIO())
    finally:
        sys.stderr = old
    return rc, err.getvalue().splitlines()


def wide_model(preset: str, seed: int = 1) -> PhiForCausalLM:
    """The preset's architecture with 256-value rows, so that every K-quant applies; weights exactly
    representable in f16 (an f16 GGUF of it is lossless: llama.cpp's quantiser can start from it)."""
    raw = dict(TINY_PRESETS[preset])
    for key in ("default_lr", "tokenizer", "special_tokens", "bos", "eos", "pad", "chat_template"):
        raw.pop(key)
    raw.update(hidden_size=256, intermediate_size=512, num_attention_heads=8)
    if preset == "tiny-phi-3":
        raw.update(num_key_value_heads=4)
    torch.manual_seed(seed)
    model = PhiForCausalLM(ModelConfig.from_dict(raw))
    _init_like_transformers(model)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())
    return model.eval()


def reference(model, tokenizer) -> Reference:
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in ("Tell me a joke. Sure:", "Why is the sky")]
    return Reference(model, tokenizer, tokenizer.stop_token_ids, texts=TEXTS, prompts=prompts)


def quiet(message: str) -> None:
    pass


def read(path: Path) -> tuple:
    _, reader, meta = read_gguf(path)
    return meta, {t.name: t for t in reader.tensors}


def values(tensor) -> np.ndarray:
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.array(data.reshape(tuple(reversed(tensor.shape.tolist()))))  # a writable copy


def merged_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


# ----------------------------------------------------------------------------- item 1: tiny tokenizers

@pytest.mark.parametrize("preset", PRESETS)
def test_tiny_tokenizers_are_bpes_with_merges(bases, tmp_path, preset):
    tokenizer = load_tokenizer(bases[preset])
    spec = json.loads((bases[preset] / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    config = json.loads((bases[preset] / "config.json").read_text())
    assert spec["model"]["type"] == "BPE" and len(spec["model"]["merges"]) > 20
    assert tokenizer.vocab_size == tokenizer.id_limit == config["vocab_size"] == 320  # the tiny model stays tiny
    if preset == "tiny-phi-2":  # GPT-2 byte level: 256 byte symbols, merges, <|endoftext|> last
        assert not spec["model"].get("byte_fallback") and vocab["Ġ"] == 32 and vocab["<|endoftext|>"] == 319
        assert tokenizer.eos_token_id == config["eos_token_id"] == 319
    else:  # Llama/Phi-3 SentencePiece style: <unk> <s> </s>, <0x00>..<0xFF>, pieces, chat specials last
        assert spec["model"]["byte_fallback"] and [vocab[t] for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
        assert vocab["<0x00>"] == 3 and vocab["<0xFF>"] == 258 and vocab["▁the"] > 258
        assert [vocab[t] for t in PHI3_SPECIAL_TOKENS[3:]] == list(range(315, 320))
        ids = tokenizer.encode("<|user|>\nHi<|end|>\n", add_special_tokens=False)  # as Phi-3: rstrip, then "▁"
        assert [tokenizer.id_to_token(i) for i in ids] == ["<|user|>", "▁", "<0x48>", "i", "<|end|>"]
    for text in TEXTS[:3]:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert len(tokenizer.encode(TEXTS[0], add_special_tokens=False)) < len(TEXTS[0]) * 0.75  # merges do merge
    again = build_tiny(preset, tmp_path / "again", seed=7)  # other weights, the same tokenizer
    assert (again / "tokenizer.json").read_bytes() == (bases[preset] / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("preset", PRESETS)
def test_tiny_gguf_vocabulary_loads_in_llama_cpp(bases, tmp_path, preset):
    model, tokenizer = load_model(bases[preset], device="cpu"), load_tokenizer(bases[preset])
    path = write_gguf(model, tokenizer, tmp_path / f"{preset}.gguf", "f16", warn=quiet)
    meta, _ = read(path)
    spec = json.loads((bases[preset] / "tokenizer.json").read_text(encoding="utf-8"))
    if preset == "tiny-phi-2":
        assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
        assert meta["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m
                                                 for m in spec["model"]["merges"]]
    else:
        types, scores = meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.scores"]
        assert meta["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in meta
        assert all(types[i] == gguf.TokenType.BYTE for i in range(3, 259))
        pieces = range(259, 315)
        assert all(types[i] == gguf.TokenType.NORMAL for i in pieces) and all(
            scores[i] > scores[i + 1] for i in pieces[:-1])  # SentencePiece's order: scores fall with the id
    # llama.cpp's tokenisers re-implemented over the file's own vocabulary give phicore's ids
    assert check_gguf_vocabulary(path, gguf, meta, tokenizer, TEXTS).startswith("vocabulary:")
    if llama_cpp_available():
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        for text in TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(
                text, add_special_tokens=False), text


def test_a_vocabulary_without_merges_is_caught(bases, tmp_path):
    """The bug of the quick start: a byte-level vocabulary with no merges (the old tiny tokenizer)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from phicore.tiny import _byte_of

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    backend = Backend(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    old = Tokenizer(backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", add_bos_token=False)
    model = load_model(bases["tiny-phi-2"], device="cpu")
    path = write_gguf(model, old, tmp_path / "old.gguf", "f16", warn=quiet)
    with pytest.raises(VerifyError, match="no merges; llama.cpp refuses"):
        check_gguf(path, reference(model, old))
    if llama_cpp_available():  # the oracle agrees: llama.cpp refuses the file, and says why
        with pytest.raises(VerifyError, match="cannot load it.*merges"):
            llama_cpp_run(path, prompts=[[1, 2, 3]])


# ----------------------------------------------------------------------------- item 3: --gguf-lora

LORA_CASES = {
    "phi2": ("tiny-phi-2", {}),
    "phi3": ("tiny-phi-3", {}),
    "phi3-rslora": ("tiny-phi-3", {"r": 8, "alpha": 4, "use_rslora": True}),
    "phi2-patterns": ("tiny-phi-2", {"use_rslora": True, "rank_pattern": {"fc2": 2}, "alpha_pattern": {"dense": 3}}),
}


@pytest.mark.parametrize("case", LORA_CASES)
def test_gguf_lora_layout_and_values(bases, tmp_path, case):
    preset, lora = LORA_CASES[case]
    adapter = make_adapter(bases[preset], tmp_path / "adapter", **lora)
    rc, err = run_infer("--adapter", adapter, "--gguf-lora", tmp_path / "a.gguf", "--merge", tmp_path / "merged")
    assert rc == 0, err
    meta, tensors = read(tmp_path / "a.gguf")
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == {"tiny-phi-2": "phi2", "tiny-phi-3": "phi3"}[preset]
    alpha = meta["adapter.lora.alpha"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    expected_alpha = {"phi2": 8, "phi3": 8, "phi3-rslora": 4 * 8 ** 0.5, "phi2-patterns": 8 * 4 ** 0.5}[case]
    assert alpha == pytest.approx(expected_alpha, rel=1e-6)  # the effective alpha: s * r
    assert config["use_rslora"] == bool(lora.get("use_rslora"))
    base = load_model(bases[preset], device="cpu").state_dict()
    merged = merged_state(tmp_path / "merged")
    adapter_state = merge_adapter_tensors(adapter)
    names = set()
    for key in merged:
        if not key.endswith(".weight") or f"{key[:-7]}.lora_A.weight" not in adapter_state:
            continue
        name = gguf_export.gguf_tensor_name(key)
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        names |= {a.name, b.name}
        A, B = adapter_state[f"{key[:-7]}.lora_A.weight"], adapter_state[f"{key[:-7]}.lora_B.weight"]
        r = A.shape[0]
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
        assert a.shape.tolist() == [A.shape[1], r] and b.shape.tolist() == [r, B.shape[0]]  # GGUF: fastest first
        assert np.array_equal(values(a), A.numpy())
        rank, scale = _layer_setting(config, key, "rank_pattern", "r"), None
        layer_alpha = _layer_setting(config, key, "alpha_pattern", "lora_alpha")
        scale = layer_alpha / (rank ** 0.5 if config["use_rslora"] else rank)
        factor = scale * r / alpha  # 1 unless llama.cpp's one alpha cannot give this layer its scale
        assert np.allclose(values(b), B.numpy() * factor, rtol=1e-6, atol=0)
        if case != "phi2-patterns":
            assert factor == pytest.approx(1.0)
        # llama.cpp's W + alpha / r * B @ A is the merged folder's weight
        rebuilt = base[key].double() + alpha / r * torch.from_numpy(values(b)).double() @ torch.from_numpy(values(a)).double()
        assert (rebuilt - merged[key].double()).abs().max().item() < 1e-6, key
    assert names == set(tensors) and len(names) == len(adapter_state)
    if case == "phi2-patterns":
        assert any("pre-multiplied" in line for line in err)
    if preset == "tiny-phi-3":  # fused projections stay fused, as in the base GGUF
        assert {"blk.0.attn_qkv.weight.lora_a", "blk.0.ffn_up.weight.lora_b"} <= set(tensors)


def merge_adapter_tensors(adapter: Path) -> dict:
    from safetensors.torch import load_file

    state = load_file(str(adapter / "adapter_model.safetensors"))
    return {k.removeprefix("base_model.model."): v for k, v in state.items()}


def _layer_setting(config: dict, key: str, pattern: str, default: str):
    from phicore.lora import pattern_value

    return pattern_value(config.get(pattern), key[:-len(".weight")], config[default])


def test_gguf_lora_refuses_dora_in_one_line(bases, tmp_path):
    adapter = make_adapter(bases["tiny-phi-3"], tmp_path / "dora", use_dora=True)
    rc, err = run_infer("--adapter", adapter, "--gguf-lora", tmp_path / "a.gguf", "--quiet")
    assert rc == 2 and len(err) == 1 and "DoRA" in err[0] and "--gguf" in err[0]
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "a.gguf.tmp").exists()


def test_gguf_lora_of_a_qlora_adapter_says_what_it_means(bases, tmp_path):
    adapter = make_adapter(bases["tiny-phi-3"], tmp_path / "qlora", quantize="nf4", seed=2)
    rc, err = run_infer("--adapter", adapter, "--gguf-lora", tmp_path / "a.gguf", "--quiet")
    assert rc == 0 and any("QLoRA" in line and "dense GGUF of the original base" in line for line in err), err
    meta, tensors = read(tmp_path / "a.gguf")
    assert meta["adapter.lora.alpha"] == 8 and len(tensors) == 2 * 2 * 4  # 2 layers x 4 modules x (a, b)


@needs_llama
@pytest.mark.parametrize("preset", PRESETS)
def test_llama_cpp_base_plus_adapter_gives_the_merged_logits(bases, tmp_path, preset, record_property):
    """Oracle: llama.cpp itself, with the base GGUF (f16) and the adapter GGUF (f32)."""
    adapter = make_adapter(bases[preset], tmp_path / "adapter", r=8, alpha=4, use_rslora=True, seed=4)
    from phicore.inference import load_session

    session = load_session(adapter, device="cpu", dense=True)
    tokenizer, model = session.tokenizer, session.model
    write_gguf_lora(model, tmp_path / "a.gguf", warn=quiet)
    with base_only(model):
        write_gguf(model, tokenizer, tmp_path / "base.gguf", "f16", name=gguf_name_for(tokenizer, "base"), warn=quiet)
    prompts = [session.prompt_ids("Tell me a joke about cats."), session.prompt_ids("What is two plus two?")]
    result = llama_cpp_run(tmp_path / "base.gguf", prompts=prompts, lora_path=tmp_path / "a.gguf")
    without = llama_cpp_run(tmp_path / "base.gguf", prompts=prompts)
    diff = effect = 0.0
    with torch.no_grad():
        for prompt, got, base_only_logits in zip(prompts, result["logits"], without["logits"]):
            want = model(torch.tensor([prompt]))[0].numpy()  # phicore: base + adapter (= the merged model)
            diff = max(diff, float(np.abs(got - want).max()))
            effect = max(effect, float(np.abs(base_only_logits - want).max()))
    record_property("max_logit_difference", diff)
    print(f"{preset}: llama.cpp base f16 + adapter vs phicore merged: max |logit difference| {diff:.3g} "
          f"(the adapter moves logits by {effect:.3g})")
    assert effect > 0.05 and diff < 2e-3  # f16 base weights: phicore's f16 GGUFs agree to about 5e-4


# ----------------------------------------------------------------------------- item 6: self-checks

def test_every_export_checks_itself(bases, tmp_path):
    adapter = make_adapter(bases["tiny-phi-3"], tmp_path / "adapter")
    rc, err = run_infer("--adapter", adapter, "--merge", tmp_path / "merged", "--gguf", tmp_path / "m.gguf",
                        "--gguf-type", "q8_0", "--gguf-lora", tmp_path / "a.gguf")
    assert rc == 0, err
    text = "\n".join(err)
    assert "adapter: alpha 8, 8 layers; alpha / r * B @ A equals phicore's" in text
    assert "weights float32: max |error| 0 over 15 tensors (exact)" in text
    assert "tokenizer: ids and text equal phicore's on 4 strings" in text
    assert "weights q8_0: max |error|" in text and "weights f32: max |error| 0 over 5 tensors (exact)" in text
    assert "vocabulary: llama, 320 tokens; ids encode and decode as phicore's on 4 strings" in text
    assert "llama.cpp" not in text  # without --verify, llama.cpp is not run
    meta, _ = read(tmp_path / "m.gguf")
    assert meta["general.name"] == "phi3-m"  # so that llama.cpp strips after <|user|> etc. as phicore does


@pytest.mark.parametrize("out_type", GGUF_TYPES)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_gguf_type_reads_back_within_its_bound(bases, tmp_path, preset, out_type):
    """Oracle: the gguf package's dequantiser, on rows of 256 (every K-quant applies)."""
    model, tokenizer = wide_model(preset), load_tokenizer(bases[preset])
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", out_type, name=gguf_name_for(tokenizer, "m"), warn=quiet)
    lines = check_gguf(path, reference(model, tokenizer))
    _, tensors = read(path)
    types = {t.tensor_type.name for t in tensors.values() if len(t.shape) == 2}
    for qtype in types:
        label = qtype.lower().replace("_k", "_K")
        assert any(line.startswith(f"weights {label}: max |error|") for line in lines), (qtype, lines)


LLAMA_QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q3_K_M", "Q2_K")


@needs_llama
@pytest.mark.parametrize("preset", PRESETS)
def test_bounds_hold_for_llama_cpps_own_quantiser(bases, tmp_path, preset):
    """Oracle: files quantised by llama.cpp itself (llama_model_quantize) pass the same check."""
    import ctypes

    import llama_cpp

    model, tokenizer = wide_model(preset), load_tokenizer(bases[preset])
    source = write_gguf(model, tokenizer, tmp_path / "f16.gguf", "f16", name=gguf_name_for(tokenizer, "m"), warn=quiet)
    ref = reference(model, tokenizer)
    for name in LLAMA_QUANT_TYPES:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
        out = tmp_path / f"{name}.gguf"
        assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) == 0
        lines = check_gguf(out, ref)  # raises if any tensor is out of its bound
        assert any(line.startswith("weights") for line in lines)


def corrupt(path: Path, tensor_name: str) -> None:
    """Flip bytes in the middle of one tensor's data."""
    _, reader, _ = read_gguf(path)
    tensor = next(t for t in reader.tensors if t.name == tensor_name)
    offset, size = tensor.data_offset, tensor.n_bytes
    del reader
    with open(path, "r+b") as handle:
        handle.seek(offset + size // 2)
        chunk = bytearray(handle.read(8))
        handle.seek(offset + size // 2)
        handle.write(bytes(b ^ 0x5A for b in chunk))


@pytest.mark.parametrize("gguf_type, tensor", [("q8_0", "blk.1.ffn_down.weight"), ("q4_k_m", "blk.0.attn_qkv.weight"),
                                               ("f16", "output.weight")])
def test_a_corrupted_gguf_tensor_exits_1_naming_it(bases, tmp_path, monkeypatch, gguf_type, tensor):
    adapter = make_adapter(bases["tiny-phi-3"], tmp_path / "adapter")
    original = gguf_export.write_gguf

    def write_then_damage(*args, **kwargs):
        path = original(*args, **kwargs)
        corrupt(path, tensor)
        return path

    monkeypatch.setattr(gguf_export, "write_gguf", write_then_damage)
    rc, err = run_infer("--adapter", adapter, "--gguf", tmp_path / "m.gguf", "--gguf-type", gguf_type, "--quiet")
    errors = [line for line in err if not line.startswith("warning")]  # q4_k_m: rows of 128 fall back, and say so
    assert rc == 1 and len(errors) == 1, err
    assert errors[0].startswith("error: --gguf: ") and f"tensor {tensor} " in errors[0]
    assert "reads back wrong" in errors[0]


def test_a_corrupted_adapter_or_merged_folder_exits_1_naming_it(bases, tmp_path, monkeypatch):
    import phicore.export.gguf_lora as gguf_lora
    import phicore.export.merge as merge

    adapter = make_adapter(bases["tiny-phi-2"], tmp_path / "adapter")
    write_lora = gguf_lora.write_gguf_lora

    def lora_then_damage(model, path, **kwargs):
        plan = write_lora(model, path, **kwargs)
        corrupt(Path(path), "blk.1.ffn_up.weight.lora_b")
        return plan

    monkeypatch.setattr(gguf_lora, "write_gguf_lora", lora_then_damage)
    rc, err = run_infer("--adapter", adapter, "--gguf-lora", tmp_path / "a.gguf", "--quiet")
    assert rc == 1 and len(err) == 1 and "blk.1.ffn_up.weight.lora_a/.lora_b" in err[0], err

    save_merged = merge.save_merged

    def merged_then_damage(model, tokenizer, directory, **kwargs):
        out = save_merged(model, tokenizer, directory, **kwargs)
        file = Path(out) / "model.safetensors"
        header = 8 + int.from_bytes(file.read_bytes()[:8], "little")
        meta = json.loads(file.read_bytes()[8:header])
        start, _ = meta["model.layers.0.self_attn.dense.weight"]["data_offsets"]
        data = bytearray(file.read_bytes())
        data[header + start + 100: header + start + 104] = b"\x7f\x7f\x7f\x7f"
        file.write_bytes(bytes(data))
        return out

    monkeypatch.setattr(merge, "save_merged", merged_then_damage)
    rc, err = run_infer("--adapter", adapter, "--merge", tmp_path / "merged", "--quiet")
    assert rc == 1 and len(err) == 1 and "model.layers.0.self_attn.dense.weight" in err[0], err


def test_phi3_vocabulary_needs_a_name_llama_cpp_recognises(bases, tmp_path):
    """llama.cpp strips the whitespace after Phi-3's special tokens (as phicore, from tokenizer.json's
    rstrip) only when general.name contains phi3 / phi-3: write_gguf names such a file so itself."""
    model, tokenizer = load_model(bases["tiny-phi-3"], device="cpu"), load_tokenizer(bases["tiny-phi-3"])
    assert gguf_name_for(tokenizer, "demo") == "phi3-demo" and gguf_name_for(tokenizer, "my-phi3") == "my-phi3"
    assert gguf_name_for(load_tokenizer(bases["tiny-phi-2"]), "demo") == "demo"
    path = write_gguf(model, tokenizer, tmp_path / "demo.gguf", "f16", warn=quiet)  # the writer names it so itself
    meta, _ = read(path)
    assert meta["general.name"] == "phi3-demo"
    check_gguf(path, reference(model, tokenizer))
    if llama_cpp_available():  # the oracle: llama.cpp splits the special tokens as phicore does
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        text = "<|user|>\nHi<|end|>\n"
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text, False)


@pytest.mark.parametrize("folder", ["phi-2", "phi-3.5-mini-instruct"])
def test_tokenizer_round_trip_on_the_real_vocabularies(tmp_path, folder):
    """GGUFVocabulary (llama.cpp's BPE / SentencePiece algorithms in Python) on the real vocabularies:
    phicore's ids, and, where llama-cpp-python is installed, llama.cpp's own ids."""
    if not (MODELS / folder).is_dir():
        pytest.skip(f"{MODELS / folder} not present (real tokenizer)")
    from tiny_models import save_hf_checkpoint  # noqa: E402

    tokenizer = load_tokenizer(MODELS / folder)
    shape, vocab_size = {"phi-2": ("phi-2", 51200), "phi-3.5-mini-instruct": ("phi-3.5-mini", 32064)}[folder]
    save_hf_checkpoint(shape, tmp_path / "base", vocab_size=vocab_size)
    model = load_model(tmp_path / "base", device="cpu")
    spm = MODELS / folder / "tokenizer.model"
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", "f16", name=gguf_name_for(tokenizer, folder),
                      sentencepiece_model=spm if spm.exists() else None, warn=quiet)
    meta, _ = read(path)
    texts = TEXTS + ["def f(x):\n    return x  # four spaces\n\n\n", "ÀÉÎÕÜ ﬁ ＡＢＣ 𝔘𝔫𝔦 ½ ¼"]
    line = check_gguf_vocabulary(path, gguf, meta, tokenizer, texts)
    assert "encode and decode as phicore's" in line
    if llama_cpp_available():
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        vocab = GGUFVocabulary(gguf, meta)
        for text in texts:
            ours = vocab.encode(text)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours == tokenizer.encode(text, False)


def test_verify_needs_a_gguf_and_says_when_llama_cpp_is_missing(bases, tmp_path, monkeypatch):
    adapter = make_adapter(bases["tiny-phi-2"], tmp_path / "adapter")
    rc, err = run_infer("--adapter", adapter, "--merge", tmp_path / "merged", "--verify")
    assert rc == 2 and len(err) == 1 and "--verify" in err[0] and "--gguf-lora" in err[0]
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    rc, err = run_infer("--adapter", adapter, "--gguf", tmp_path / "m.gguf", "--verify")
    assert rc == 0 and sum("llama.cpp check skipped: llama-cpp-python is not installed" in line for line in err) == 1


@needs_llama
def test_verify_runs_the_exports_in_llama_cpp(bases, tmp_path):
    adapter = make_adapter(bases["tiny-phi-3"], tmp_path / "adapter", seed=1)
    rc, err = run_infer("--adapter", adapter, "--gguf", tmp_path / "m.gguf", "--gguf-type", "q8_0",
                        "--gguf-lora", tmp_path / "a.gguf", "--verify")
    assert rc == 0, err
    text = "\n".join(err)
    print(text)
    assert text.count("tokenises 4 strings to phicore's ids; ends generation on '<|endoftext|>', '<|end|>'") == 2
    assert text.count("llama.cpp: max |logit difference|") == 2 and text.count("llama.cpp: greedy answer") == 2


@needs_llama
def test_greedy_answer_stops_at_the_stop_token_in_llama_cpp(bases, tmp_path):
    """A tiny Phi-2 whose lm_head bias makes <|endoftext|> the greedy choice after a few tokens:
    llama.cpp's greedy answer is phicore's and ends there."""
    from phicore.generate import generate

    model, tokenizer = load_model(bases["tiny-phi-2"], device="cpu").eval(), load_tokenizer(bases["tiny-phi-2"])
    prompt = tokenizer.encode("Instruct: Tell me a joke.\nOutput:", add_special_tokens=False)
    eos, steps = tokenizer.eos_token_id, 12
    ids, need = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):  # the free greedy path, and the bias each step needs to pick eos
            logits = model(torch.tensor([ids]))[0, -1]
            need.append(float(logits.max() - logits[eos]))
            ids.append(int(logits.argmax()))
    stop_at = next(k for k in range(3, steps) if need[k] < min(need[:k]) - 0.05)
    with torch.no_grad():
        model.lm_head.bias[eos] += (need[stop_at] + min(need[:stop_at])) / 2
    assert len(generate(model, prompt, max_new_tokens=steps, stop_ids=[eos])) == stop_at
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", "f16", warn=quiet)
    lines = run_in_llama_cpp(path, Reference(model, tokenizer, [eos], texts=TEXTS, prompts=[prompt]),
                             weight_types={"F16"})
    assert f"llama.cpp: greedy answer equals phicore's ({stop_at} tokens, stopped at '<|endoftext|>')" in lines, lines
