"""RunConfig: one owner of a training run's settings, from flag or file to the run.

- the round trip: flags -> RunConfig -> the run's training_config.json -> `--config` -> the
  same run, bit for bit (and a checkpoint's run_config.json is a valid --config too);
- every alias spelling (the seed projects', Hugging Face Trainer / TRL's) maps to its field;
- every out-of-range value is refused, through train.py, with one line naming the flag;
- config files (TOML, JSON, YAML), command-line flags over file values, bad files named;
- the Python API (`phicore.finetune`) and train.py give bit-identical adapters;
- --help groups the flags by section with defaults and choices; --dtype / --compute-dtype.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
from train_runs import adapter, run_main, write_jsonl  # noqa: E402

import phicore  # noqa: E402
from phicore.settings import SettingsError, settings_of  # noqa: E402
from phicore.train.checkpoint import list_checkpoints  # noqa: E402
from phicore.train.config import RunConfig  # noqa: E402

FAST = ["--max-length", "64", "--quiet", "--no-grad-checkpointing"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    records = [{"prompt": f"{i} plus {i % 5}?", "response": f"{i + i % 5}, purrs the cat."} for i in range(16)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", records)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- round trip

def test_flags_to_file_to_the_same_run(bases, data_file, tmp_path):
    flags = ["--model", bases["tiny-phi-3"], "--data", data_file, "--max-steps", 4, "--batch-size", 2,
             "--lr", 3e-3, "--lora-r", 4, "--lora-alpha", 8, "--lora-dropout", 0.1, "--targets", "qkv_proj,o_proj",
             "--val-split", 0.25, "--warmup-steps", 1, "--scheduler", "linear", "--seed", 7, "--save-every", 2,
             *FAST]
    first = tmp_path / "first"
    assert run_main(*flags, "--out", first) == 0
    record = json.loads((first / "training_config.json").read_text())
    saved = RunConfig.from_command_line(["--config", str(first / "training_config.json")])
    given = RunConfig.from_command_line([str(f) for f in flags] + ["--out", str(first)])
    assert saved == dataclasses.replace(given, resume=None, stop_after=None)
    assert record["config"]["lora_r"] == 4 and record["config"]["targets"] == "qkv_proj,o_proj"

    again = tmp_path / "again"  # the record as --config, only --out changed: the same adapter
    assert run_main("--config", first / "training_config.json", "--out", again) == 0
    assert _same(adapter(first), adapter(again))
    # a checkpoint's run_config.json is a --config too
    checkpoint = list_checkpoints(first)[-1]
    from_checkpoint = RunConfig.from_command_line(["--config", str(checkpoint / "run_config.json")])
    assert from_checkpoint == saved


def test_python_api_and_train_py_give_the_same_adapter(bases, data_file, tmp_path):
    flags = ["--model", bases["tiny-phi-2"], "--data", data_file, "--max-steps", 3, "--batch-size", 2,
             "--lora-r", 4, *FAST]
    assert run_main(*flags, "--out", tmp_path / "cli") == 0
    config = RunConfig(model=str(bases["tiny-phi-2"]), data=str(data_file), max_steps=3, batch_size=2, lora_r=4,
                       max_length=64, quiet=True, grad_checkpointing=False, out=str(tmp_path / "api"))
    result = phicore.finetune(config)
    assert result.finished and result.steps == 3 and math.isfinite(result.final_loss)
    assert _same(adapter(tmp_path / "cli"), adapter(tmp_path / "api"))


def test_tiny_presets_load_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where the preset is built once
    model = phicore.load_model("tiny-phi-2")
    tokenizer = phicore.load_tokenizer("tiny-phi-2")
    assert model.config.model_type == "phi" and tokenizer.vocab_size <= model.config.vocab_size
    ids = tokenizer.encode("Why did the cat sit on the keyboard?")
    out = phicore.generate(model, ids, max_new_tokens=4)
    assert len(out) == 4
    assert (tmp_path / "cache" / "phicore" / "tiny" / "tiny-phi-2" / "model.safetensors").is_file()
    assert not list((tmp_path / "cache" / "phicore" / "tiny").glob("*.tmp-*"))
    phi3 = phicore.load_model("tiny-phi-3")
    assert phi3.config.model_type == "phi3"


# ----------------------------------------------------------------------------- spellings

ALIASES = {
    # seed projects (snake_case of phicore's flags, and their own names)
    "--dataset_path d2": ("data", "d2"), "--output_dir o2": ("out", "o2"), "--max_length 77": ("max_length", 77),
    "--batch_size 3": ("batch_size", 3), "--gradient_accumulation_steps 5": ("grad_accum", 5),
    "--learning_rate 1e-3": ("lr", 1e-3), "--warmup_ratio 0.2": ("warmup_ratio", 0.2), "--lora_r 4": ("lora_r", 4),
    "--lora_alpha 8": ("lora_alpha", 8.0), "--lora_dropout 0.0": ("lora_dropout", 0.0),
    "--no-gradient_checkpointing": ("grad_checkpointing", False), "--torch_compile": ("compile", True),
    "--max_grad_norm 0.5": ("max_grad_norm", 0.5), "--early_stopping_patience 2": ("early_stopping_patience", 2),
    # Hugging Face Trainer / TRL
    "--model_name_or_path m": ("model", "m"), "--num_train_epochs 2": ("epochs", 2.0),
    "--per_device_train_batch_size 6": ("batch_size", 6), "--max_steps 9": ("max_steps", 9),
    "--max_seq_length 99": ("max_length", 99), "--save_steps 10": ("save_every", 10),
    "--eval_steps 11": ("eval_every", 11), "--warmup_steps 3": ("warmup_steps", 3),
    "--weight_decay 0.01": ("weight_decay", 0.01), "--resume_from_checkpoint auto": ("resume", "auto"),
    "--target_modules q_proj v_proj": ("targets", "q_proj,v_proj"), "--load_in_4bit": ("quantize", "nf4"),
    "--bf16": ("precision", "bf16"), "--fp16": ("precision", "fp16"), "--val_split 0.2": ("val_split", 0.2),
    # phicore's own
    "--targets qkv_proj,o_proj": ("targets", "qkv_proj,o_proj"), "--max-steps=4": ("max_steps", 4),
}


@pytest.mark.parametrize("spelling", sorted(ALIASES))
def test_alias_maps_to_its_field(spelling):
    field, expected = ALIASES[spelling]
    argv = ["--data", "d.jsonl", *spelling.split()]
    if field == "data":
        argv = spelling.split()
    config = RunConfig.from_command_line(argv)
    assert getattr(config, field) == expected


def test_help_lists_sections_defaults_and_choices():
    run = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    sections = ["model:", "data:", "LoRA:", "quantisation:", "optimisation:", "schedule:", "evaluation:",
                "checkpoints:", "device:", "output:"]
    positions = [text.index(s) for s in sections]
    assert positions == sorted(positions)
    assert "--config FILE" in text and "default 16" in text and "prompt_response" in text  # --format's choices
    flat = " ".join(text.split())  # help lines wrap
    assert "--learning_rate" in flat and "--load_in_4bit" in flat and "one of cosine, linear, constant" in flat


# ----------------------------------------------------------------------------- values

def _bad_values():
    """For every declared setting, values outside its range, choices or type."""
    cases = []
    for spec in settings_of(RunConfig):
        bad = []
        if spec.range is not None:
            if math.isfinite(spec.range.low):
                bad.append(spec.range.low - 1 if spec.range.low_closed else spec.range.low)
            if math.isfinite(spec.range.high):
                bad.append(spec.range.high if not spec.range.high_closed else spec.range.high + 1)
        if spec.kind is float:
            bad += ["nan", "inf", "-inf"]
        if spec.kind in (int, float):
            bad.append("lots")
        if spec.choices:
            bad.append("nonsense")
        if spec.kind is str and not spec.choices:
            bad.append("")
        for value in bad:
            if spec.kind is int and isinstance(value, float) and value.is_integer():
                value = int(value)
            cases.append((spec.flag, str(value)))
    return cases


BAD_VALUES = _bad_values()


def test_every_range_has_bad_values():
    flags = {flag for flag, _ in BAD_VALUES}
    for flag in ("--lr", "--lora-dropout", "--keep-last", "--max-grad-norm", "--max-steps", "--save-every",
                 "--eval-every", "--early-stopping-patience", "--lora-alpha", "--warmup-ratio", "--warmup-steps",
                 "--weight-decay", "--epochs", "--seed", "--out", "--format", "--dtype"):
        assert flag in flags, flag
    assert ("--seed", "4294967296") in BAD_VALUES and ("--lora-dropout", "1.0") in BAD_VALUES


@pytest.mark.parametrize("flag,value", BAD_VALUES, ids=[f"{f}={v}" for f, v in BAD_VALUES])
def test_out_of_range_value_is_refused_naming_the_flag(flag, value, data_file, tmp_path, capsys):
    rc = run_main("--model", "tiny-phi-2", "--data", data_file, "--out", tmp_path / "out", f"{flag}={value}")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and flag in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [
    (["--offload-checkpoints", "--no-grad-checkpointing"], "--offload-checkpoints"),
    (["--fsdp", "--quantize", "nf4"], "--fsdp"),
    (["--compute-dtype", "bf16"], "--compute-dtype"),
    (["--device", "toaster"], "--device"),
    ([], "--data"),
])
def test_combinations_refused(flags, message, capsys):
    argv = flags if message == "--data" else ["--data", "d.jsonl", *flags]
    with pytest.raises(SettingsError, match=message):
        RunConfig.from_command_line(argv)


def test_lora_dropout_names_its_own_flag(data_file, tmp_path, capsys):
    rc = run_main("--data", data_file, "--out", tmp_path / "o", "--lora-dropout", 1.5)
    err = capsys.readouterr().err
    assert rc == 2 and "--lora-dropout" in err and "--targets" not in err


# ----------------------------------------------------------------------------- files

def test_config_files_and_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "tiny-phi-3"\ndata = "d.jsonl"\nlora_r = 8\nlearning_rate = 1e-3\n'
                    'target_modules = ["qkv_proj", "o_proj"]\nload_in_4bit = true\n', encoding="utf-8")
    config = RunConfig.from_command_line(["--config", str(toml), "--lora-r", "4"])
    assert (config.model, config.lora_r, config.lr, config.targets, config.quantize) == (
        "tiny-phi-3", 4, 1e-3, "qkv_proj,o_proj", "nf4")
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"model": "tiny-phi-3", "data": "d.jsonl", "lora-r": 8, "pack": True}))
    assert RunConfig.from_command_line(["--config", str(as_json)]).pack is True
    assert RunConfig.from_file(as_json, lora_r=2).lora_r == 2
    pytest.importorskip("yaml")
    as_yaml = tmp_path / "run.yaml"
    as_yaml.write_text("model: tiny-phi-3\ndata: d.jsonl\nnum_train_epochs: 2\n")
    assert RunConfig.from_command_line(["--config", str(as_yaml)]).epochs == 2.0


@pytest.mark.parametrize("name,text,message", [
    ("typo.toml", 'data = "d"\nlora_rank = 4\n', ["typo.toml", "lora_rank", "lora_r"]),
    ("bad.toml", 'data = "d"\nlora_r = [\n', ["bad.toml", "TOML"]),
    ("range.json", '{"data": "d", "lora_dropout": 2}', ["range.json", "--lora-dropout"]),
    ("list.json", '[1, 2]', ["list.json", "table"]),
    ("run.ini", "data = d\n", ["run.ini", ".toml"]),
    ("missing.toml", None, ["missing.toml", "no such"]),
])
def test_bad_config_file_is_one_line(name, text, message, tmp_path, capsys):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    rc = run_main("--config", path, "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and all(m in err for m in message), err


def test_command_line_overrides_a_bad_file_value(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"data": "d", "lora_dropout": 2}')
    assert RunConfig.from_command_line(["--config", str(path), "--lora-dropout", "0.1"]).lora_dropout == 0.1


# ----------------------------------------------------------------------------- dtypes

def test_dtype_and_compute_dtype_mean_what_they_say(bases, data_file, tmp_path):
    """--dtype: the base's weights; --compute-dtype: what NF4 layers compute in."""
    from phicore.frozen_linear import FrozenLinear
    from phicore.train.run import prepare_run

    config = RunConfig(model=str(bases["tiny-phi-3"]), data=str(data_file), out=str(tmp_path / "o"), quiet=True,
                       quantize="nf4", dtype="fp32", compute_dtype="bf16", max_length=64)
    run = prepare_run(config, log=lambda message: None)
    nf4 = [m for m in run.model.modules() if isinstance(m, FrozenLinear) and m.is_nf4]  # LoRA over NF4
    assert nf4 and all(m.compute_dtype == torch.bfloat16 for m in nf4)
    assert run.model.model.embed_tokens.weight.dtype == torch.float32
    assert run.model.lm_head.weight.dtype == torch.float32
    assert run.record.quantization["compute_dtype"] == "bfloat16"
