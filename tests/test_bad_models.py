"""Every failure a user can cause with a model folder, an adapter folder or infer.py's flags ends
in one line naming the file, field or flag (issue 15): exit 2 for bad input, 1 for an output
that cannot be written, no traceback (unless --debug). Unexpected exceptions keep theirs.

Each case damages a copy of a tiny random-weight folder the way a user's folder gets damaged
(an interrupted download, a hand-edited config.json, a tokenizer of another model, a diverged
adapter) and runs it through `train.main` (the loaders train.py shares) or `infer.main`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import infer  # noqa: E402  (infer.py at the repo root)
from phicore.config import ModelConfig  # noqa: E402
from phicore.lora import apply_lora  # noqa: E402
from phicore.model import PhiForCausalLM  # noqa: E402
from phicore.peft_io import save_adapter  # noqa: E402
from phicore.tokenizer import load_tokenizer  # noqa: E402
from phicore.weights import CheckpointError, check_model_folder, load_model, save_model  # noqa: E402
from train_runs import run_infer, run_main, write_jsonl  # noqa: E402

WEIGHTS = "model.safetensors"


# ----------------------------------------------------------------------------- damaging a folder
def copy_of(base: Path, root: Path, name: str) -> Path:
    folder = root / name
    shutil.copytree(base, folder)
    return folder


def edit_json(path: Path, edit) -> None:
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw = edit(raw) or raw
    path.write_text(json.dumps(raw), encoding="utf-8")


def truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])


def rewrite_header(path: Path, edit) -> None:
    """Change a safetensors header in place, leaving the data as it is."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def as_int32(path: Path, key: str) -> None:
    tensors = load_file(str(path))
    tensors[key] = (tensors[key] * 1000).to(torch.int32)
    save_file(tensors, str(path), metadata={"format": "pt"})


def small_vocab_model(base: Path, folder: Path, vocab_size: int) -> Path:
    """A consistent model folder (config and weights agree) whose embedding has fewer rows than
    the tokenizer copied into it has ids."""
    raw = json.loads((base / "config.json").read_text(encoding="utf-8"))
    ids = {key: 0 for key in ("bos_token_id", "eos_token_id", "pad_token_id") if raw.get(key) is not None}
    save_model(PhiForCausalLM(ModelConfig.from_dict({**raw, **ids, "vocab_size": vocab_size})), folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(base / name, folder / name)
    return folder


def sharded(base: Path, folder: Path) -> Path:
    """The base written as three shards plus an index."""
    model = load_model(base, device="cpu")
    save_model(model, folder, max_shard_bytes=400_000)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(base / name, folder / name)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def _first_shard(folder: Path) -> Path:
    return sorted(folder.glob("model-*.safetensors"))[0]


# name -> (damage(folder), substrings of the one-line error)
MODEL_DAMAGE = {
    "weights-truncated": (lambda f: truncate(f / WEIGHTS, -1000), [WEIGHTS, "truncated", "download again"]),
    "weights-header-cut": (lambda f: truncate(f / WEIGHTS, 40), [WEIGHTS, "truncated", "download again"]),
    "weights-empty": (lambda f: truncate(f / WEIGHTS, 0), [WEIGHTS, "truncated"]),
    "weights-garbage": (lambda f: (f / WEIGHTS).write_bytes(b"\x10\x00" * 600), [WEIGHTS, "corrupt"]),
    "header-lies-about-shape": (
        lambda f: rewrite_header(f / WEIGHTS, lambda h: h["model.embed_tokens.weight"].update(shape=[320, 256])),
        [WEIGHTS, "corrupt", "model.embed_tokens.weight"]),
    "header-lies-about-offsets": (
        lambda f: rewrite_header(f / WEIGHTS, lambda h: h["lm_head.bias"].update(
            data_offsets=[h["lm_head.bias"]["data_offsets"][0], h["lm_head.bias"]["data_offsets"][1] + 4096])),
        [WEIGHTS, "corrupt", "lm_head.bias"]),
    "int32-weights": (lambda f: as_int32(f / WEIGHTS, "model.layers.0.mlp.fc1.weight"),
                      [WEIGHTS, "model.layers.0.mlp.fc1.weight", "int32", "floating-point"]),
    "config-heads-0": (lambda f: edit_json(f / "config.json", lambda c: c.update(num_attention_heads=0)),
                       ["config.json", "num_attention_heads", "positive integer", "0"]),
    "config-hidden-string": (lambda f: edit_json(f / "config.json", lambda c: c.update(hidden_size="128")),
                             ["config.json", "hidden_size", "'128'"]),
    "config-list": (lambda f: (f / "config.json").write_text("[1, 2, 3]"), ["config.json", "JSON object", "list"]),
    "config-null-field": (lambda f: edit_json(f / "config.json", lambda c: c.update(vocab_size=None)),
                          ["config.json", "vocab_size"]),
    "config-not-divisible": (lambda f: edit_json(f / "config.json", lambda c: c.update(num_attention_heads=3)),
                             ["config.json", "hidden_size 128", "num_attention_heads 3"]),
    "config-negative": (lambda f: edit_json(f / "config.json", lambda c: c.update(num_hidden_layers=-2)),
                        ["config.json", "num_hidden_layers", "-2"]),
    "config-model-type-list": (lambda f: edit_json(f / "config.json", lambda c: c.update(model_type=["phi"])),
                               ["config.json", "model_type"]),
    "config-eps-string": (lambda f: edit_json(f / "config.json", lambda c: c.update(layer_norm_eps="1e-5")),
                          ["config.json", "layer_norm_eps"]),
    "config-truncated": (lambda f: truncate(f / "config.json", 30), ["config.json", "not valid JSON"]),
    "tokenizer-truncated": (lambda f: truncate(f / "tokenizer.json", 500), ["tokenizer.json", "truncated or corrupt"]),
    "tokenizer-config-truncated": (lambda f: truncate(f / "tokenizer_config.json", 40),
                                   ["tokenizer_config.json", "truncated or corrupt"]),
    "tokenizer-config-list": (lambda f: (f / "tokenizer_config.json").write_text("[]"),
                              ["tokenizer_config.json", "JSON object"]),
    "tokenizer-added-tokens-bad": (
        lambda f: edit_json(f / "tokenizer_config.json", lambda c: c.update(added_tokens_decoder={"x": {}})),
        ["tokenizer_config.json"]),
    "generation-config-bad-eos": (
        lambda f: (f / "generation_config.json").write_text('{"eos_token_id": "</s>"}'),
        ["generation_config.json", "eos_token_id"]),
    "oversized-tokenizer": (lambda f: (shutil.rmtree(f), small_vocab_model(f.parent / "_src", f, 200)),
                            ["tokenizer.json", "320", "200", "vocab_size"]),
    "shard-missing": (lambda f: (shutil.rmtree(f), sharded(f.parent / "_src", f), _first_shard(f).unlink()),
                      ["model.safetensors.index.json", "missing", "model-00001-of-"]),
    "shard-truncated": (lambda f: (shutil.rmtree(f), sharded(f.parent / "_src", f), truncate(_first_shard(f), -10)),
                        ["model-00001-of-", "truncated"]),
}


@pytest.fixture(scope="module")
def damaged(bases, tmp_path_factory):
    """name -> a tiny-phi-2 folder damaged that way (built once for the module)."""
    root = tmp_path_factory.mktemp("damaged")
    shutil.copytree(bases["tiny-phi-2"], root / "_src")
    folders = {}
    for name, (damage, _) in MODEL_DAMAGE.items():
        folder = copy_of(bases["tiny-phi-2"], root, name)
        damage(folder)
        folders[name] = folder
    return folders


def one_error_line(err: str, expected) -> str:
    """The stderr of a failed run: exactly one line, an error naming everything expected."""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert all(s in err for s in expected), (expected, err)
    return err


# ----------------------------------------------------------------------------- the check, alone
@pytest.mark.parametrize("case", sorted(MODEL_DAMAGE))
def test_check_model_folder_names_the_damage(case, damaged):
    with pytest.raises((ValueError, FileNotFoundError)) as caught:
        check_model_folder(damaged[case])
    message = str(caught.value)
    assert "\n" not in message and all(s in message for s in MODEL_DAMAGE[case][1]), message


def test_check_model_folder_accepts_good_folders_without_reading_weights(bases, tmp_path, monkeypatch):
    import phicore.weights as weights

    def no_data(*args, **kwargs):
        raise AssertionError("check_model_folder read tensor data")

    shards = sharded(bases["tiny-phi-3"], tmp_path / "sharded")
    monkeypatch.setattr(weights, "_read_tensor", no_data)
    for preset, folder in bases.items():
        assert check_model_folder(folder) == folder
    assert check_model_folder(shards) == shards


def test_check_model_folder_without_weights(bases, tmp_path):
    folder = copy_of(bases["tiny-phi-3"], tmp_path, "no-weights")
    (folder / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        check_model_folder(folder)


def test_real_configs_and_tokenizers_pass_the_checks():
    shared = REPO.parent / "shared" / "models"
    if not shared.is_dir():
        pytest.skip(f"{shared} not present")
    for name in ("phi-2", "phi-3-mini-4k-instruct", "phi-3.5-mini-instruct"):
        config = ModelConfig.from_file(shared / name / "config.json")
        assert load_tokenizer(shared / name).id_limit <= config.vocab_size


# ----------------------------------------------------------------------------- train.py
TRAIN_CASES = ["weights-truncated", "header-lies-about-shape", "int32-weights", "config-heads-0",
               "config-hidden-string", "config-list", "config-not-divisible", "config-negative",
               "tokenizer-truncated", "tokenizer-config-truncated", "oversized-tokenizer", "shard-missing"]


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_exits_2_with_one_line(case, damaged, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "response": "hello"}] * 4)
    capsys.readouterr()
    rc = run_main("--model", damaged[case], "--data", data, "--out", tmp_path / "out", "--max-steps", 1,
                  "--max-length", 64, "--quiet", "--no-grad-checkpointing")
    captured = capsys.readouterr()
    assert rc == 2, captured
    one_error_line(captured.err, MODEL_DAMAGE[case][1])


# ----------------------------------------------------------------------------- infer.py
@pytest.fixture(scope="module")
def adapter(bases, tmp_path_factory):
    """A LoRA adapter folder (random B, so it changes answers) over the tiny-phi-3 base, which
    has a chat template; its base is recorded as the absolute folder."""
    base = bases["tiny-phi-3"]
    model = load_model(base, device="cpu")
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=["qkv_proj", "o_proj"])
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(model, folder, base_model_name_or_path=str(base))
    return folder


@pytest.fixture
def adapter_copy(adapter, tmp_path):
    return copy_of(adapter, tmp_path, "adapter")


def infer_error(capsys, *args, rc=2, stdin="", expected=()) -> str:
    capsys.readouterr()
    code, out = run_infer(*args, stdin=stdin)
    err = capsys.readouterr().err
    assert code == rc, err
    return one_error_line(err, expected)


def test_infer_answers_with_the_good_adapter(adapter, capsys):
    rc, out = run_infer("--adapter", adapter, "--prompt", "hi", "--max-new-tokens", 4, "--quiet")
    assert rc == 0 and out.endswith("\n") and capsys.readouterr().err == ""


@pytest.mark.parametrize("case", ["weights-truncated", "int32-weights", "config-hidden-string",
                                  "tokenizer-truncated", "header-lies-about-offsets"])
def test_infer_bad_base_exits_2(case, adapter, damaged, capsys):
    infer_error(capsys, "--adapter", adapter, "--base", damaged[case], "--prompt", "hi", "--quiet",
                expected=MODEL_DAMAGE[case][1])


def test_infer_tokenizer_larger_than_the_base_vocabulary(adapter_copy, bases, tmp_path, capsys):
    base = small_vocab_model(bases["tiny-phi-3"], tmp_path / "small", 200)
    (base / "tokenizer.json").unlink()  # the adapter folder's own tokenizer (320 ids) is the one used
    load_tokenizer(bases["tiny-phi-3"]).save(adapter_copy)
    infer_error(capsys, "--adapter", adapter_copy, "--base", base, "--prompt", "hi", "--quiet",
                expected=[str(adapter_copy / "tokenizer.json"), "320", "200"])


def test_infer_invalid_target_modules_regex(adapter_copy, capsys):
    edit_json(adapter_copy / "adapter_config.json", lambda c: c.update(target_modules=r".*\.(qkv_proj|o_proj"))
    infer_error(capsys, "--adapter", adapter_copy, "--prompt", "hi", "--quiet",
                expected=["adapter_config.json", "target_modules", "regular expression"])
    edit_json(adapter_copy / "adapter_config.json",
              lambda c: c.update(target_modules=["qkv_proj", "o_proj"], rank_pattern={"[o_proj": 2}))
    infer_error(capsys, "--adapter", adapter_copy, "--prompt", "hi", "--quiet",
                expected=["adapter_config.json", "rank_pattern", "regular expression"])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_infer_refuses_a_non_finite_adapter(value, adapter_copy, capsys):
    path = adapter_copy / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key] = torch.full_like(tensors[key], value)
    save_file(tensors, str(path), metadata={"format": "pt"})
    infer_error(capsys, "--adapter", adapter_copy, "--prompt", "hi", "--quiet",
                expected=["adapter_model.safetensors", key, "non-finite"])


def test_infer_truncated_adapter(adapter_copy, capsys):
    truncate(adapter_copy / "adapter_model.safetensors", -100)
    infer_error(capsys, "--adapter", adapter_copy, "--prompt", "hi", "--quiet",
                expected=["adapter_model.safetensors", "truncated"])


def test_infer_prompt_not_utf8(adapter, tmp_path, capsys):
    # a shell argument with byte 0xE9 (Latin-1 "é") arrives surrogate-escaped
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")
    infer_error(capsys, "--adapter", adapter, "--prompt", bad, "--quiet", expected=["--prompt", "UTF-8", "0xe9"])
    infer_error(capsys, "--adapter", adapter, "--prompt", "hi", "--system", bad, "--quiet",
                expected=["--system", "UTF-8"])
    # stdin decoded with surrogateescape (a C locale), as lines and as JSONL
    infer_error(capsys, "--adapter", adapter, "--prompts-file", "-", "--quiet", stdin=f"hello\n{bad}\n",
                expected=["<stdin>:2", "UTF-8"])
    infer_error(capsys, "--adapter", adapter, "--prompts-file", "-", "--quiet",
                stdin='{"prompt": "ok"}\n{"prompt": "\\ud800 lone"}\n', expected=["<stdin>:2", "UTF-8", "U+D800"])
    # a file with invalid bytes (already refused before: still one line)
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"hello\ncaf\xe9\n")
    infer_error(capsys, "--adapter", adapter, "--prompts-file", prompts, "--quiet", expected=["prompts.txt"])


def test_infer_output_is_a_folder(adapter, tmp_path, capsys):
    infer_error(capsys, "--adapter", adapter, "--prompts-file", "-", "--output", tmp_path, "--quiet", stdin="hi\n",
                expected=["--output", "is a folder"])


def test_infer_temperature_nan(adapter, capsys):
    for value in ("nan", "inf", "-1"):
        infer_error(capsys, "--adapter", adapter, "--prompt", "hi", "--temperature", value, expected=["--temperature"])


def test_infer_failing_chat_template(adapter_copy, bases, capsys):
    load_tokenizer(bases["tiny-phi-3"]).save(adapter_copy)
    template = ("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no booms') }}"
                "{% endif %}{{ m['content'] }}<|end|>{% endfor %}")
    edit_json(adapter_copy / "tokenizer_config.json", lambda c: c.update(chat_template=template))
    infer_error(capsys, "--adapter", adapter_copy, "--prompt", "boom", "--quiet", expected=["no booms"])
    # a template the sandbox refuses
    edit_json(adapter_copy / "tokenizer_config.json",
              lambda c: c.update(chat_template="{{ messages.__class__.__mro__ }}"))
    infer_error(capsys, "--adapter", adapter_copy, "--prompt", "hi", "--quiet", expected=[])


def test_debug_shows_the_traceback_of_known_errors(adapter, capsys):
    capsys.readouterr()
    rc, _ = run_infer("--adapter", adapter, "--prompt", b"\xff".decode("utf-8", "surrogateescape"), "--debug")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback (most recent call last)" in err
    assert err.splitlines()[-1].startswith("error: --prompt: not valid UTF-8")


def test_out_of_memory_exits_1(adapter, monkeypatch, capsys):
    from phicore.console import Console

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Console, "answer", out_of_memory)
    infer_error(capsys, "--adapter", adapter, "--prompt", "hi", "--quiet", rc=1,
                expected=["out of memory", "20.00 GiB", "--batch-size"])


def test_unexpected_errors_keep_their_traceback(adapter, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(infer, "load_session", bug)
    with pytest.raises(ZeroDivisionError):
        run_infer("--adapter", adapter, "--prompt", "hi")


# ----------------------------------------------------------------------------- outputs that cannot be written
@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past `nbytes` fail with EFBIG ("File too large"), the way a full disk fails them
    with ENOSPC: a real OSError from the kernel for every file this process writes."""
    resource = pytest.importorskip("resource")
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("flag", ["--output", "--merge", "--gguf"])
def test_disk_full_exits_1_naming_the_path(flag, adapter, tmp_path, capsys):
    if flag == "--gguf":
        pytest.importorskip("gguf")
    target = tmp_path / {"--output": "answers.jsonl", "--merge": "merged", "--gguf": "model.gguf"}[flag]
    args = ["--adapter", adapter, flag, target, "--quiet", "--max-new-tokens", 2]
    if flag == "--output":
        args += ["--prompts-file", "-"]
    capsys.readouterr()
    with file_size_limit(16):
        rc, _ = run_infer(*args, stdin="hello there\n")
    err = capsys.readouterr().err
    assert rc == 1, err
    one_error_line(err, [flag, str(target), "File too large"])
    assert not target.exists() and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("flag", ["--output", "--merge", "--gguf"])
def test_read_only_target_exits_1_before_loading(flag, adapter, tmp_path, capsys, monkeypatch):
    if flag == "--gguf":
        pytest.importorskip("gguf")
    target = tmp_path / "sub" / "out.file"
    statvfs = os.statvfs

    class ReadOnly:  # what os.statvfs says of a read-only mount (root can write into any 0o500 folder)
        def __init__(self, result):
            self.f_flag = result.f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly(statvfs(path)))
    monkeypatch.setattr(infer, "load_session", lambda *a, **k: pytest.fail("loaded before checking the target"))
    args = ["--adapter", adapter, flag, target, "--quiet"] + (["--prompts-file", "-"] if flag == "--output" else [])
    capsys.readouterr()
    rc, _ = run_infer(*args, stdin="hi\n")
    err = capsys.readouterr().err
    assert rc == 1, err
    one_error_line(err, [flag, str(target), "read-only file system"])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_folder_exits_1(adapter, tmp_path, capsys):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        infer_error(capsys, "--adapter", adapter, "--prompts-file", "-", "--output", folder / "a.jsonl", "--quiet",
                    stdin="hi\n", rc=1, expected=["--output", "permission denied"])
    finally:
        folder.chmod(0o700)
