"""K-quant GGUF export (phicore/export/kquants.py, quant_plan.py, gguf.py), checked against its oracles.

- Block layouts: the gguf package's dequantiser (`gguf.quants.dequantize`, written from llama.cpp's
  dequantize_row_*) turns phicore's Q4_0 / Q4_K / Q5_K / Q6_K bytes back into exactly the values
  phicore's quantiser says they hold, on random rows, rows of Phi-3-mini's width and hard blocks
  (all zero, constant, outliers, +-a ties, tiny and fp16-overflow-prone magnitudes); phicore's
  Q4_0 bytes equal the gguf package's own Q4_0 quantiser's (a port of quantize_row_q4_0_ref).
- Accuracy: phicore's RMS error is at most llama.cpp's x 1.001 on the same matrices, llama.cpp
  being `ggml_quantize_chunk` from llama-cpp-python's libggml (what llama-quantize runs without an
  importance matrix). Skips without llama-cpp-python.
- Mixtures: the types of every tensor of a Phi-3-mini and a Phi-2 file (real configs) equal
  `expected_type` below, written from llama.cpp's src/llama-quant.cpp (cited there); and
  llama.cpp's own `llama_model_quantize`, run on phicore f16 files, picks the type phicore picks
  for every tensor and writes the same general.file_type (skips without llama-cpp-python).
- End to end: `infer.py --gguf --gguf-type q4_k_m` on the tiny presets (rows of 128: the
  fallback types) writes what `expected_type` says; a q4_k_m file of a Phi-3 shape with rows of
  256 runs in `llama_cpp.Llama` with logits close to phicore's (skips without llama-cpp-python).
"""

from __future__ import annotations

import copy
import ctypes
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from tiny_models import SHARED, phicore_model  # noqa: E402

from phicore.export import ExportError, kquants  # noqa: E402
from phicore.export.gguf import gguf_tensor_name, plan_tensor_types, write_gguf  # noqa: E402

gguf = pytest.importorskip("gguf")

TYPES = ("Q4_0", "Q4_K", "Q5_K", "Q6_K")
MODELS = SHARED / "models"


def llama_cpp_or_skip():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the llama.cpp oracle)")


def dequantize(data: np.ndarray, ggml_type: str, shape) -> np.ndarray:
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[ggml_type]).reshape(shape)


def hard_rows(n: int = 512) -> dict:
    """Rows of n values (two super-blocks, sixteen 32-blocks) that stress the search and the fp16 scales."""
    rng = np.random.default_rng(0)
    outliers = rng.normal(0, 0.02, n)
    outliers[[7, 300]] = [5.0, -3.0]
    one_value = np.zeros(n)
    one_value[33] = 0.7
    half = rng.normal(0, 0.02, n)
    half[: n // 2] = 0
    rows = {
        "zeros": np.zeros(n), "constant+": np.full(n, 0.37), "constant-": np.full(n, -0.37),
        "outliers": outliers, "one value": one_value, "half zeros": half,
        "+-ties": np.tile([0.5, -0.5], n // 2), "-+ties": np.tile([-0.5, 0.5], n // 2),
        "heavy tails": rng.standard_t(2, n) * 0.02, "all negative": -np.abs(rng.normal(0.5, 0.1, n)),
        "tiny 1e-6": rng.normal(0, 1e-6, n), "tiny 1e-9": rng.normal(0, 1e-9, n),  # fp16 subnormal / zero scales
        "large 3e4": rng.normal(0, 3e4, n), "large 1e6": rng.normal(0, 1e6, n),  # Q4_0's d = max/8 overflows fp16
        "large 1e8": rng.normal(0, 1e8, n),  # every type's fp16 d overflows: saturated at 65504, never inf
    }
    return {name: row.astype(np.float32) for name, row in rows.items()}


# ----------------------------------------------------------------------------- block layouts
@pytest.mark.parametrize("ggml_type", TYPES)
def test_bytes_dequantise_to_phicores_values(ggml_type):
    rng = np.random.default_rng(1)
    cases = {"random": rng.normal(0, 0.02, (64, 512)), "phi-3-mini rows": rng.normal(0, 0.02, (3, 3072)),
             **{name: row[None] for name, row in hard_rows().items()}}
    relative = {"Q4_0": 0.095, "Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.02}[ggml_type]  # RMS error / RMS weight
    for name, x in cases.items():
        x = x.astype(np.float32)
        data, values = kquants.quantize(x, ggml_type, values=True)
        assert data.dtype == np.uint8, name
        assert data.shape == gguf.quants.quant_shape_to_byte_shape(x.shape, gguf.GGMLQuantizationType[ggml_type])
        assert np.isfinite(values).all(), name
        assert np.array_equal(dequantize(data, ggml_type, x.shape), values), name
        if name in ("random", "phi-3-mini rows", "large 3e4"):
            assert np.sqrt(np.mean((values - x) ** 2)) <= relative * np.sqrt(np.mean(x ** 2)), name
        exact = ("zeros", "constant+", "constant-") + (("+-ties", "-+ties") if ggml_type in ("Q4_K", "Q5_K") else ())
        if name in exact:  # representable (bar the fp16 scale); Q4_0 / Q6_K have one level more below zero
            assert np.allclose(values, x, rtol=2e-3, atol=0), name
    torch_input = torch.from_numpy(cases["random"].astype(np.float32))
    assert np.array_equal(kquants.quantize(torch_input, ggml_type), kquants.quantize(torch_input.numpy(), ggml_type))


def test_q4_0_bytes_equal_the_gguf_packages_quantiser():
    rng = np.random.default_rng(2)
    rows = [rng.normal(0, 0.02, 4096)] + [r for name, r in hard_rows().items() if not name.startswith("large 1e")]
    for x in rows:
        x = np.asarray(x, dtype=np.float32)[None]
        assert np.array_equal(kquants.quantize(x, "Q4_0"), gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        kquants.quantize(np.zeros((2, 128), np.float32), "Q4_K")
    x = np.zeros((1, 256), np.float32)
    x[0, 3] = np.nan
    with pytest.raises(ValueError, match="inf or NaN"):
        kquants.quantize(x, "Q6_K")


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """The tiny-phi-3 preset's tokenizer (ids < 512, the tiny_models shapes' vocabulary)."""
    from phicore.tiny import build_tiny
    from phicore.tokenizer import load_tokenizer

    return load_tokenizer(build_tiny("tiny-phi-3", tmp_path_factory.mktemp("tiny") / "tiny-phi-3"))


def test_a_non_finite_weight_fails_the_export(tmp_path, tiny_tokenizer):
    model = phicore_model("phi-3-mini-4k", lora=False, hidden_size=256, intermediate_size=256)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(ExportError, match="blk.0.ffn_down.weight: .*inf or NaN"):
        write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "q4_k_m", warn=lambda m: None)
    assert not any(tmp_path.iterdir())  # no partial file left


def _phi3_tokenizer():
    folder = MODELS / "phi-3-mini-4k-instruct"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present (real Phi-3 tokenizer)")
    from phicore.tokenizer import load_tokenizer

    return load_tokenizer(folder)


# ----------------------------------------------------------------------------- accuracy vs llama.cpp
@pytest.mark.parametrize("ggml_type", TYPES)
def test_rms_error_no_worse_than_llama_cpp(ggml_type):
    llama_cpp_or_skip()
    from bench.gguf_quant import llama_cpp_quantize

    rng = np.random.default_rng(3)
    for name, x in (("normal", rng.normal(0, 0.02, (256, 3072))), ("heavy tails", rng.standard_t(4, (128, 3072)) * 0.02)):
        x = x.astype(np.float32)
        mine = dequantize(kquants.quantize(x, ggml_type), ggml_type, x.shape)
        theirs = dequantize(llama_cpp_quantize(x, ggml_type), ggml_type, x.shape)
        rms_mine, rms_theirs = (np.sqrt(np.mean((v.astype(np.float64) - x) ** 2)) for v in (mine, theirs))
        print(f"{ggml_type} {name}: RMS phicore {rms_mine:.6e}, llama.cpp {rms_theirs:.6e}, "
              f"ratio {rms_mine / rms_theirs:.6f}")
        assert rms_mine <= rms_theirs * 1.001, name


# ----------------------------------------------------------------------------- mixtures
# llama.cpp src/llama-quant.cpp at 0c1e570 (the copy llama-cpp-python 0.3.36 vendors):
#   llama_ftype_get_default_type (l. 881-906): the ftype's type for the 2-D weights
DEFAULT = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K", "q4_k_m": "Q4_K",
           "q4_0": "Q4_0"}
#   llama.h enum llama_ftype: general.file_type
FILE_TYPE = {"f16": 1, "bf16": 32, "q8_0": 7, "q6_k": 18, "q5_k_m": 17, "q4_k_m": 15, "q4_0": 2}
BLOCK = {"F16": 1, "BF16": 1, "Q8_0": 32, "Q4_0": 32, "Q5_0": 32, "Q5_1": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
#   output.weight, and token_embd.weight when there is no output.weight (l. 490-511): Q8_0 if the
#   row length is not a multiple of the default type's block, else Q6_K unless the default is Q8_0
#   attn_v and attn_qkv (category_is_attn_v, l. 157, branch l. 567, rule l. 590-591) and
#   ffn_down (l. 624, rules l. 646-651 and 657): Q6_K under Q4_K_M and Q5_K_M in the use_more_bits
#   layers (l. 452): the first and last eighth, and every third layer between, written out here:
MORE_BITS_LAYERS = {
    2: {1},  # n/8 = 0, 7n/8 = 1
    8: {0, 3, 6, 7},
    32: {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31},
}
#   tensor_type_fallback (l. 390-443): rows not a multiple of the block
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # then F16 if still not a multiple


def expected_type(name: str, shape: tuple, ftype: str, n_layers: int, tied: bool) -> str:
    if len(shape) < 2 or "_norm" in name:  # tensor_allows_quantization (l. 287): 2-D, not norms
        return "F32"
    chosen = DEFAULT[ftype]
    if ftype in ("f16", "bf16"):
        return chosen
    rows = shape[-1]
    layer = int(name.split(".")[1]) if name.startswith("blk.") else None
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        chosen = "Q8_0" if rows % BLOCK[chosen] else chosen if chosen == "Q8_0" else "Q6_K"
    elif (ftype in ("q4_k_m", "q5_k_m") and layer in MORE_BITS_LAYERS[n_layers]
          and name.split(".")[2] in ("attn_v", "attn_qkv", "ffn_down")):
        chosen = "Q6_K"
    if rows % BLOCK[chosen]:
        chosen = FALLBACK.get(chosen, chosen)
        chosen = "F16" if rows % BLOCK[chosen] else chosen
    return chosen


def meta_shapes(config_folder: Path) -> tuple:
    """GGUF name -> shape of a real model's tensors (built on the meta device) and its layer count."""
    from phicore.config import ModelConfig
    from phicore.model import PhiForCausalLM

    if not config_folder.is_dir():
        pytest.skip(f"{config_folder} not present (real config)")
    config = ModelConfig.from_dict(json.loads((config_folder / "config.json").read_text()))
    with torch.device("meta"):
        model = PhiForCausalLM(config)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return {gguf_tensor_name(k): tuple(v.shape) for k, v in state.items()}, config.num_hidden_layers


@pytest.mark.parametrize("model", ["phi-3-mini-4k-instruct", "phi-2"])
@pytest.mark.parametrize("ftype", list(DEFAULT))
def test_mixture_of_real_models_follows_llama_quant(model, ftype):
    shapes, n_layers = meta_shapes(MODELS / model)
    got = plan_tensor_types(shapes, ftype, n_layers, warn=pytest.fail)  # rows of 256k: no fallback warning
    tied = "output.weight" not in shapes
    assert got == {name: expected_type(name, shape, ftype, n_layers, tied) for name, shape in shapes.items()}
    q6 = sorted(n for n, t in got.items() if t == "Q6_K")
    if ftype in ("q4_k_m", "q5_k_m"):  # 16 of 32 layers: attn_v (Phi-2) / attn_qkv (Phi-3) and ffn_down; output
        assert len(q6) == 2 * 16 + 1 and "output.weight" in q6 and "blk.6.ffn_down.weight" in q6
        assert "blk.5.ffn_down.weight" not in q6 and got["token_embd.weight"] == DEFAULT[ftype]
    if model == "phi-3-mini-4k-instruct" and ftype == "q4_k_m":
        assert got["blk.0.attn_qkv.weight"] == "Q6_K" and got["blk.4.attn_qkv.weight"] == "Q4_K"
        assert got["blk.0.ffn_up.weight"] == got["blk.0.attn_output.weight"] == "Q4_K"
    if model == "phi-2" and ftype == "q4_k_m":
        assert got["blk.3.attn_v.weight"] == "Q6_K" and got["blk.3.attn_q.weight"] == got["blk.3.attn_k.weight"] == "Q4_K"


LLAMA_CASES = {  # tiny_models shape, overrides: rows of 256 (every rule), tied embeddings, rows of 96 and 80 (fallbacks)
    "phi-3 rows 256": ("phi-3-mini-4k", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                                             sliding_window=2047)),
    "phi-2 rows 256": ("phi-2", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                                     num_attention_heads=8, num_key_value_heads=8)),
    "phi-4-mini tied rows 96": ("phi-4-mini", dict(num_hidden_layers=8)),
    "phi-2 rows 80": ("phi-2", dict(num_hidden_layers=2)),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_quantize_picks_the_same_types(case, tmp_path, tiny_tokenizer):
    """llama.cpp's own llama_model_quantize on phicore's f16 file (it reads no vocabulary): the
    same type for every tensor."""
    llama_cpp = llama_cpp_or_skip()
    shape, overrides = LLAMA_CASES[case]
    tokenizer = tiny_tokenizer
    model = phicore_model(shape, lora=False, **overrides)
    n_layers = model.config.num_hidden_layers
    source = write_gguf(model, tokenizer, tmp_path / "f16.gguf", "f16", warn=lambda m: None)
    for ftype in ("q4_k_m", "q5_k_m", "q6_k", "q4_0", "q8_0"):  # f16 / bf16: no mixture (the table test covers them)
        value = FILE_TYPE[ftype]
        mine = gguf.GGUFReader(write_gguf(model, tokenizer, tmp_path / f"{ftype}.gguf", ftype, warn=lambda m: None))
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = value, 1
        out = tmp_path / f"llama-{ftype}.gguf"
        assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) == 0
        theirs = gguf.GGUFReader(out)
        types = {t.name: t.tensor_type.name for t in mine.tensors}
        assert types == {t.name: t.tensor_type.name for t in theirs.tensors}, ftype
        shapes = {t.name: tuple(reversed(t.shape.tolist())) for t in mine.tensors}
        tied = "output.weight" not in shapes
        assert types == {n: expected_type(n, s, ftype, n_layers, tied) for n, s in shapes.items()}, ftype
        for reader in (mine, theirs):
            assert reader.fields["general.file_type"].contents() == value, ftype


# ----------------------------------------------------------------------------- end to end
def _tiny_adapter(preset: str, root: Path) -> Path:
    """A tiny preset and an adapter folder on it with random LoRA B (as train.py writes one)."""
    from phicore.lora import apply_lora, lora_layers
    from phicore.peft_io import save_adapter
    from phicore.tiny import build_tiny
    from phicore.tokenizer import load_tokenizer
    from phicore.weights import load_model

    base = build_tiny(preset, root / preset)
    torch.manual_seed(0)
    model = load_model(base, device="cpu")
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets="all-linear")
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.05)
    out = root / "adapter"
    save_adapter(model, out, base_model_name_or_path=str(base))
    load_tokenizer(base).save(out)
    (out / "training_config.json").write_text(json.dumps({"base_model": str(base), "prompt_template": None,
                                                          "quantization": None, "max_length": 64}))
    return out


@pytest.mark.parametrize("preset", ["tiny-phi-3", "tiny-phi-2"])
def test_infer_writes_q4_k_m_with_llama_quantize_types(preset, tmp_path):
    import infer
    from phicore.weights import load_model

    adapter = _tiny_adapter(preset, tmp_path)
    path = tmp_path / "out" / "m.gguf"
    merged = tmp_path / "merged"
    rc = infer.main(["--adapter", str(adapter), "--merge", str(merged), "--gguf", str(path), "--gguf-type", "q4_k_m",
                     "--quiet"], stdin=io.StringIO(), stdout=io.StringIO())
    assert rc == 0
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == FILE_TYPE["q4_k_m"]
    tensors = {t.name: t for t in reader.tensors}
    shapes = {n: tuple(reversed(t.shape.tolist())) for n, t in tensors.items()}
    n_layers = reader.fields[f"{reader.fields['general.architecture'].contents()}.block_count"].contents()
    expected = {n: expected_type(n, s, "q4_k_m", n_layers, "output.weight" not in shapes) for n, s in shapes.items()}
    assert {n: t.tensor_type.name for n, t in tensors.items()} == expected
    assert {"Q5_0", "Q8_0"} <= set(expected.values())  # rows of 128: Q4_K -> Q5_0, Q6_K -> Q8_0
    state = load_model(merged, device="cpu").state_dict()  # the file holds the merged weights
    for key, weight in state.items():
        t = tensors[gguf_tensor_name(key)]
        got = dequantize(t.data, t.tensor_type.name, weight.shape)
        step = {"F32": 0, "Q8_0": 1 / 127, "Q5_0": 1 / 15, "Q4_K": 2 / 15, "Q6_K": 1 / 31}[t.tensor_type.name]
        assert np.abs(got - weight.numpy()).max() <= step * np.abs(weight.numpy()).max() + 1e-6, key


def test_llama_cpp_runs_phicores_q4_k_m(tmp_path, monkeypatch):
    """A Phi-3 shape with rows of 256 (every tensor a K-quant) and a merged adapter, in llama.cpp."""
    llama_cpp = llama_cpp_or_skip()
    from phicore.export.merge import merge_adapter

    # AMX tiles trap in some VMs (SIGILL in libggml-cpu's AMX buffer type): plain CPU buffers
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def model_params():
        params = default_params()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", model_params)
    tokenizer = _phi3_tokenizer()
    model = phicore_model("phi-3-mini-4k", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                          vocab_size=32064, sliding_window=2047)
    merge_adapter(model)
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", "q4_k_m", warn=pytest.fail)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert {t.tensor_type.name for t in tensors.values()} == {"F32", "Q4_K", "Q6_K"}
    dequantized = copy.deepcopy(model)  # phicore's model holding the file's (dequantised) weights
    dequantized.load_state_dict({k: torch.tensor(dequantize(tensors[gguf_tensor_name(k)].data,
                                                                tensors[gguf_tensor_name(k)].tensor_type.name, v.shape))
                                 for k, v in model.state_dict().items()})
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog, and then")
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        merged_logits = model(torch.tensor([ids]))[0].numpy()
        file_logits = dequantized(torch.tensor([ids]))[0].numpy()
    vs_file, vs_merged = np.abs(got - file_logits).max(), np.abs(got - merged_logits).max()
    scale = np.abs(merged_logits).max()
    print(f"llama.cpp q4_k_m logits: max |diff| {vs_file:.4f} vs phicore on the file's weights, {vs_merged:.4f} vs "
          f"the merged fp32 model (logits up to {scale:.2f})")
    # llama.cpp quantises activations to 8 bits for K-quant matmuls: a few hundredths (measured 0.031)
    assert vs_file <= 0.08
    # plus the 4-bit weights' own error (measured 0.25 against logits up to 2.6)
    assert vs_merged <= 0.2 * scale
    assert (got.argmax(-1) == file_logits.argmax(-1)).mean() >= 0.9


def test_bench_quick_records_every_type(tmp_path, capsys):
    """bench/gguf_quant.py --quick: a results file with each type's error, bits and rate (no timing asserted)."""
    from bench import gguf_quant

    threads = torch.get_num_threads()
    try:
        assert gguf_quant.main(["--quick", "--threads", "1", "--json", str(tmp_path / "r.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["command"].startswith("python bench/gguf_quant.py --quick")
    assert {r["type"] for r in record["per_type"]} == {"Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0"}
    bits = {r["type"]: r["bits_per_weight"] for r in record["per_type"]}
    assert bits == {"Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5, "Q4_0": 4.5}
    for row in record["per_type"]:
        assert row["phicore_rms"] > 0 and row["phicore_weights_per_s"] > 0
        assert (row["llama_cpp_rms"] is None) == (record["llama_cpp_missing"] is not None)
    model = {m["ftype"]: m for m in record["model"]}
    assert model["q4_k_m"]["weights"] == 3_821_079_552 - 3072 * 65  # Phi-3-mini's 2-D weights (norms are 1-D)
    assert 4.5 < model["q4_k_m"]["bits_per_weight"] < model["q5_k_m"]["bits_per_weight"] < 6
