"""The training loop and train.py end to end, on CPU with the tiny random-weight presets.

Issue 3's "must show" for training: resume bit-identity after a kill (and Ctrl-C), token-normalised
gradient accumulation, packing isolation, every bad-input case through `train.main`, a run whose
val loss falls with all its outputs, NaN handling, the saved adapter in PEFT, the schedule and
the seed-000 flag spellings.

Speed: the tiny bases are built once per module and passed as folders; every run is a few steps
of short sequences with one torch thread (two threads on a busy 2-core machine are ~20x slower
for models this small, from OpenMP spinning). `train.main` runs in-process except for the Ctrl-C
test, which needs a real signal to a real process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from train_runs import adapter, run_main, write_jsonl  # noqa: E402
from phicore.data import (BatchPlan, collate, collate_packed, conversations_from_records,  # noqa: E402
                          prompt_format_for, tokenize_dataset)
from phicore.lora import apply_lora  # noqa: E402
from phicore.peft_io import load_adapter  # noqa: E402
from phicore.tokenizer import load_tokenizer  # noqa: E402
from phicore.train import loop as train_loop  # noqa: E402
from phicore.train.config import RunConfig  # noqa: E402
from phicore.train.checkpoint import list_checkpoints  # noqa: E402
from phicore.train.schedule import lr_at, warmup_steps_for  # noqa: E402
from phicore.weights import load_model  # noqa: E402

FAST = ["--max-length", "64", "--quiet", "--no-grad-checkpointing"]


# ----------------------------------------------------------------------------- fixtures

def _pairs(n: int) -> list[dict]:
    """Short arithmetic with a recurring punchline: learnable in a few steps, under 64 tokens."""
    return [{"prompt": f"{i} plus {i % 7}?", "response": f"{i + i % 7}, says my cat."} for i in range(n)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", _pairs(24))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line]


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under folder ({} when it does not exist)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- a full run

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_file):
    """12 steps on the tiny-phi-2 preset (built into OUT/base), gradient checkpointing on,
    evaluations every 3 steps, checkpoints every 4 keeping 2."""
    out = tmp_path_factory.mktemp("run") / "out"
    rc = run_main("--model", "tiny-phi-2", "--data", data_file, "--out", out, "--max-steps", 12,
                  "--batch-size", 4, "--max-length", 64, "--lr", 5e-3, "--val-split", 0.25,
                  "--eval-every", 3, "--save-every", 4, "--keep-last", 2, "--quiet")
    assert rc == 0
    return out


def test_run_outputs_and_val_loss_falls(trained_run):
    out = trained_run
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "training_config.json", "metrics.jsonl", "metrics.csv", "best/adapter_model.safetensors",
                 "best/adapter_config.json", "base/config.json", "base/model.safetensors"):
        assert (out / name).is_file(), name
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (out / "training_curves.png").stat().st_size > 0

    rows = metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert [r["step"] for r in evals] == [3, 6, 9, 12]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"], evals
    assert all(math.isfinite(r[k]) for r in train_rows for k in ("loss", "lr", "grad_norm", "tokens_per_s"))
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header == ["step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_perplexity"]
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + len(rows)

    # keep-last 2 of checkpoints 4, 8, 12; each complete
    checkpoints = list_checkpoints(out)
    assert [p.name for p in checkpoints] == ["checkpoint-8", "checkpoint-12"]
    assert not list(out.glob("*.tmp"))
    for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "rng_state.pt",
                 "trainer_state.json", "run_config.json"):
        assert (checkpoints[-1] / name).is_file(), name
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert state["step"] == 12
    # the last checkpoint's adapter is the final adapter; best/ is the lowest val loss's
    final = adapter(out)
    assert all(torch.equal(final[k], v) for k, v in adapter(checkpoints[-1]).items())
    assert state["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in evals), rel=1e-6)

    record = json.loads((out / "training_config.json").read_text())
    assert record["result"]["steps"] == 12
    assert Path(record["base_model"]).resolve() == (out / "base").resolve()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    assert Path(config["base_model_name_or_path"]).resolve() == (out / "base").resolve()


def test_saved_adapter_loads_in_peft(trained_run):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    out = trained_run
    ids = torch.tensor([list(range(40, 72))])

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / "base"), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = hf(ids).logits
        peft_logits = peft.PeftModel.from_pretrained(hf, str(out)).eval()(ids).logits

    ours = load_adapter(load_model(out / "base"), out).eval()
    with torch.no_grad():
        our_logits = ours(ids)
    assert (peft_logits - base_logits).abs().max() > 1e-3, "trained adapter has no effect"
    assert (our_logits - peft_logits).abs().max() <= 1e-5


def test_fresh_run_over_checkpoints_is_refused(trained_run, data_file, capsys):
    before = snapshot(trained_run)
    capsys.readouterr()
    rc = run_main("--model", "tiny-phi-2", "--data", data_file, "--out", trained_run, "--max-steps", 1, *FAST)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "--resume" in err and str(trained_run) in err
    assert snapshot(trained_run) == before


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("checkpointing", [False, True])
def test_resume_is_bit_identical(bases, data_file, tmp_path, checkpointing):
    """Cosine schedule over 6 steps crossing an epoch, dropout on (RNG state matters), evals in
    between: a run resumed from checkpoint-2 ends with the uninterrupted run's adapter, bit for bit.
    Also with checkpointed layers (train.py's default), whose recompute replays the dropout draws."""
    common = ["--model", bases["tiny-phi-2"], "--data", data_file, "--max-steps", 6, "--batch-size", 2,
              "--grad-accum", 2, "--val-split", 0.25, "--eval-every", 2, "--lora-dropout", 0.1, "--lr", 5e-3, *FAST,
              *(["--grad-checkpointing"] if checkpointing else [])]
    assert run_main(*common, "--out", tmp_path / "whole") == 0

    out = tmp_path / "cut"
    assert run_main(*common, "--out", out, "--save-every", 2, "--keep-last", 5) == 0
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for later in ("checkpoint-4", "checkpoint-6"):  # as if killed after the first checkpoint
        shutil.rmtree(out / later)
    for name in ("adapter_model.safetensors", "adapter_config.json", "training_config.json"):
        (out / name).unlink()

    assert run_main(*common, "--out", out, "--save-every", 2, "--keep-last", 5, "--resume", "auto") == 0
    whole, resumed = adapter(tmp_path / "whole"), adapter(out)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert any(v.abs().max() > 0 for k, v in whole.items() if "lora_B" in k)
    # the metrics files describe one run: steps 1..6 once, with the same losses
    loss = lambda out: [(r["step"], r["loss"]) for r in metrics(out) if "loss" in r]  # noqa: E731
    assert loss(out) == loss(tmp_path / "whole")


def test_ctrl_c_saves_checkpoint_exits_130_and_resumes_exactly(bases, data_file, tmp_path):
    """A real SIGINT to a real run: exit 130 with checkpoint-K. A constant schedule without warmup
    makes the lr independent of --max-steps, so resuming to K+2 must equal a fresh K+2-step run."""
    common = ["--model", bases["tiny-phi-3"], "--data", data_file, "--batch-size", 2, "--val-split", 0,
              "--scheduler", "constant", "--warmup-ratio", 0, "--lora-dropout", 0.1, "--lr", 5e-3, *FAST]
    out = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, common), "--out", str(out),
                             "--max-steps", "100000"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            log = out / "metrics.jsonl"
            if log.exists() and log.read_text().count("\n") >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0]
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output
    assert "interrupted" in output and "Traceback" not in output
    checkpoints = list_checkpoints(out)
    assert len(checkpoints) == 1, checkpoints
    k = json.loads((checkpoints[0] / "trainer_state.json").read_text())["step"]
    assert checkpoints[0].name == f"checkpoint-{k}" and k >= 2
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter from a stopped run

    assert run_main(*common, "--out", out, "--max-steps", k + 2, "--resume", "auto") == 0
    assert run_main(*common, "--out", tmp_path / "whole", "--max-steps", k + 2) == 0
    whole, resumed = adapter(tmp_path / "whole"), adapter(out)
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


# ----------------------------------------------------------------------------- accumulation

def test_grad_accum_is_token_normalised(bases, tmp_path):
    """4 examples with different target counts (val-split 0): 4 micro-batches of 1 and one batch
    of 4 both cover the whole data set each step, whatever the order. Per-micro-batch means
    would weight the short examples more; the token-normalised loss makes the runs agree."""
    records = [{"prompt": "1 plus 1?", "response": "2."},
               {"prompt": "12 plus 30?", "response": "42, says my cat, who is very good at sums."},
               {"prompt": "5 plus 5?", "response": "10, says my cat."},
               {"prompt": "Why sums?", "response": "Because the cat insists, every single evening."}]
    data = write_jsonl(tmp_path / "four.jsonl", records)
    # lr 2e-4 (the default): Adam turns a gradient's fp32 summation-order noise (~5e-7 relative)
    # into update differences of up to ~lr on near-zero elements; a wrong normalisation changes
    # the update direction and shows as differences of order lr (2e-4), far above the 1e-6 bound
    common = ["--model", bases["tiny-phi-3"], "--data", data, "--val-split", 0, "--lora-dropout", 0,
              "--max-steps", 3, "--lr", 2e-4, *FAST]
    assert run_main(*common, "--out", tmp_path / "accum", "--batch-size", 1, "--grad-accum", 4) == 0
    assert run_main(*common, "--out", tmp_path / "batch", "--batch-size", 4, "--grad-accum", 1) == 0
    accum, batch = adapter(tmp_path / "accum"), adapter(tmp_path / "batch")
    diff = max(float((accum[k] - batch[k]).abs().max()) for k in accum)
    assert diff <= 1e-6, diff
    assert any(v.abs().max() > 1e-4 for k, v in batch.items() if "lora_B" in k)  # it did train
    rows = lambda out: [r["loss"] for r in metrics(out) if "loss" in r]  # noqa: E731
    assert rows(tmp_path / "accum") == pytest.approx(rows(tmp_path / "batch"), rel=1e-5)


# ----------------------------------------------------------------------------- packing

def _loss_sum(model, batch):
    """The training step's call: the summed token loss, masks and document ids from the batch."""
    return model(batch.input_ids, labels=batch.labels, **batch.model_inputs())


@pytest.mark.parametrize("preset", ["tiny-phi-2", "tiny-phi-3"])
def test_packing_isolation(bases, preset):
    """Each example's logits inside a packed row (block-diagonal mask, restarting positions)
    equal its logits alone; the packed loss is the sum of the separate losses."""
    tokenizer = load_tokenizer(bases[preset])
    convs = conversations_from_records(_pairs(12)[9:12])
    examples, _ = tokenize_dataset(convs, prompt_format_for(tokenizer), tokenizer, 64)
    assert len({len(e) for e in examples}) > 1
    model = load_model(bases[preset]).eval()
    packed = collate_packed([examples], tokenizer.pad_token_id or 0, pad_to_multiple_of=64)
    with torch.no_grad():
        logits = model(packed.input_ids, **packed.model_inputs())
        dense = model(packed.input_ids, attention_mask=packed.dense_attention_mask(), position_ids=packed.position_ids)
        assert torch.equal(logits, dense)  # document ids and the dense mask are the same mask
        offset = 0
        for e in examples:
            alone = model(torch.tensor([e.input_ids]))
            assert (logits[0, offset:offset + len(e)] - alone[0]).abs().max() <= 1e-5
            offset += len(e)
        separate = sum(float(_loss_sum(model, collate([e], 0))) for e in examples)
        assert float(_loss_sum(model, packed)) == pytest.approx(separate, rel=1e-5)


def test_pack_trains(bases, data_file, tmp_path):
    """--pack (with seed-000 flag spellings): fewer, fuller micro-batches; the loss falls."""
    out = tmp_path / "packed"
    rc = run_main("--model", bases["tiny-phi-3"], "--dataset_path", data_file, "--output_dir", out, "--pack",
                  "--max_length", 128, "--batch_size", 2, "--learning_rate", 5e-3, "--max-steps", 6,
                  "--val-split", 0.25, "--lora_dropout", 0, "--no-gradient_checkpointing", "--quiet")
    assert rc == 0
    rows = [r for r in metrics(out) if "loss" in r]
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    # 18 training examples of ~40 tokens: unpacked that is 9 batches of 2 an epoch, packed ~3
    assert rows[0]["epoch"] > 1 / 9 + 1e-6
    assert (out / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------- bad input

GOOD = '{"prompt": "hi", "response": "hello"}\n'
BAD_INPUTS = {
    # name: (file name, file bytes or None for no file, extra flags, substrings of the one-line error)
    "malformed-json": ("bad.jsonl", GOOD + '{"prompt": "a",\n', [], ["bad.jsonl:2", "JSON"]),
    "missing-field": ("bad.jsonl", GOOD + GOOD + '{"prompt": "where is my answer"}\n', [], ["bad.jsonl:3", "response"]),
    "empty-file": ("bad.jsonl", "", [], ["bad.jsonl", "empty"]),
    "non-utf8": ("bad.jsonl", GOOD.encode() + b'{"prompt": "caf\xe9", "response": "x"}\n', [], ["bad.jsonl:2", "UTF-8"]),
    "csv-wrong-columns": ("bad.csv", "question,notes\nhi,there\n", [], ["bad.csv:1", "column"]),
    "csv-short-row": ("bad.csv", "question,answer\nhi,hello\nlonely\n", [], ["bad.csv:3", "columns"]),
    "unknown-format": ("ok.jsonl", GOOD * 4, ["--format", "limerick"], ["--format", "limerick"]),
    "missing-file": ("nowhere.jsonl", None, [], ["nowhere.jsonl"]),
    "bad-val-data": ("ok.jsonl", GOOD * 4, ["--val-data", "{tmp}/missing.jsonl"], ["missing.jsonl"]),
    "batch-size-0": ("ok.jsonl", GOOD * 4, ["--batch-size", "0"], ["--batch-size"]),
    "val-split-1.5": ("ok.jsonl", GOOD * 4, ["--val-split", "1.5"], ["--val-split"]),
    "not-an-int": ("ok.jsonl", GOOD * 4, ["--max-steps", "lots"], ["--max-steps"]),
    "unknown-flag": ("ok.jsonl", GOOD * 4, ["--make-it-funny"], ["--make-it-funny"]),
    "bad-scheduler": ("ok.jsonl", GOOD * 4, ["--scheduler", "sawtooth"], ["--scheduler"]),
    "bad-resume": ("ok.jsonl", GOOD * 4, ["--resume", "{tmp}/no-checkpoint"], ["no-checkpoint"]),
    # these three fail after the tiny preset's base was built: it must be removed again
    "bad-targets": ("ok.jsonl", GOOD * 4, ["--targets", "funny_bone"], ["--targets", "funny_bone"]),
    "bad-template": ("ok.jsonl", GOOD * 4, ["--template", "no placeholders"], ["--template"]),
    "bad-device": ("ok.jsonl", GOOD * 4, ["--device", "toaster"], ["--device"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_touches_nothing(case, tmp_path, capsys):
    name, content, flags, expected = BAD_INPUTS[case]
    data = tmp_path / name
    if content is not None:
        data.write_bytes(content.encode() if isinstance(content, str) else content)
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]

    existing = tmp_path / "existing"  # an earlier run's adapter must survive byte for byte
    (existing / "best").mkdir(parents=True)
    (existing / "adapter_model.safetensors").write_bytes(b"earlier adapter \x00\x01")
    (existing / "best" / "adapter_config.json").write_text("{}")
    before = snapshot(existing)
    for out in (tmp_path / "fresh", existing):
        capsys.readouterr()
        # into the earlier run's folder with --overwrite (without, the folder itself is refused
        # first): the bad input must still be what stops it, before the earlier run is touched
        replace = ["--overwrite"] if out == existing and "--resume" not in flags else []
        rc = run_main("--model", "tiny-phi-2", "--data", data, "--out", out, "--max-steps", 1, *flags, *FAST,
                      *replace)
        captured = capsys.readouterr()
        assert rc == 2, captured
        err = captured.err
        assert err.endswith("\n") and err.count("\n") == 1, err
        assert "error" in err and all(s in err for s in expected), err
    assert not (tmp_path / "fresh").exists()
    assert snapshot(existing) == before


# ----------------------------------------------------------------------------- NaN

def _small_setup(bases, tmp_path):
    tokenizer = load_tokenizer(bases["tiny-phi-3"])
    examples, _ = tokenize_dataset(conversations_from_records(_pairs(8)), prompt_format_for(tokenizer), tokenizer, 64)
    torch.manual_seed(0)
    model = load_model(bases["tiny-phi-3"])
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    plan = BatchPlan(examples, 2, tokenizer.pad_token_id, seed=0)
    return model, plan


def _lora_params(model):
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def _run_config(tmp_path, **settings) -> RunConfig:
    return RunConfig(data="unused.jsonl", out=str(tmp_path / "nan"), lr=5e-3, seed=0, **settings)


def test_nan_loss_skips_the_step_with_a_warning(bases, tmp_path, monkeypatch, capsys):
    model, plan = _small_setup(bases, tmp_path)
    real = model.forward
    seen = []

    def flaky(*args, **kwargs):  # the call of step s sees the weights left by step s-1
        seen.append(_lora_params(model))
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(seen) == 2 else loss

    monkeypatch.setattr(model, "forward", flaky)
    result = train_loop.train(model, plan, _run_config(tmp_path, max_steps=4), show_progress=False)
    out = capsys.readouterr().out
    assert result.steps == 4 and "warning: step 2" in out and "skipped" in out
    assert math.isnan(result.history[1]["loss"]) and math.isfinite(result.history[2]["loss"])
    changed = lambda a, b: any(not torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    assert changed(seen[0], seen[1])  # step 1 updated the adapter
    assert not changed(seen[1], seen[2])  # step 2 (NaN) did not
    assert changed(seen[2], seen[3])  # step 3 did again
    assert all(torch.isfinite(p).all() for p in _lora_params(model))


def test_nan_losses_in_a_row_stop_the_run(bases, tmp_path, monkeypatch):
    model, plan = _small_setup(bases, tmp_path)
    real = model.forward
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs) * float("inf" if len(calls) % 2 else "nan")

    monkeypatch.setattr(model, "forward", broken)
    with pytest.raises(FloatingPointError, match="in a row"):
        train_loop.train(model, plan, _run_config(tmp_path, max_steps=50), show_progress=False)
    assert len(calls) == train_loop.MAX_BAD_STEPS_IN_A_ROW
    from phicore.train.checkpoint import list_checkpoints

    assert list_checkpoints(tmp_path / "nan"), "the finite adapter is checkpointed before stopping"


# ----------------------------------------------------------------------------- schedule, flags

def test_schedule_values():
    base, total = 1e-3, 100
    assert warmup_steps_for(total, 0.05) == 5 and warmup_steps_for(total, 0.05, 8) == 8
    assert warmup_steps_for(10, 0.05) == 1  # rounded up
    for kind in ("cosine", "linear", "constant"):
        warm = [lr_at(s, base_lr=base, total_steps=total, warmup_steps=5, kind=kind) for s in range(5)]
        assert warm == pytest.approx([base * (s + 1) / 5 for s in range(5)])
        assert lr_at(5, base_lr=base, total_steps=total, warmup_steps=5, kind=kind) == pytest.approx(base)
    cosine = [lr_at(s, base_lr=base, total_steps=total, warmup_steps=5, kind="cosine") for s in range(5, total + 1)]
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    assert lr_at(5 + 95 // 2, base_lr=base, total_steps=total, warmup_steps=5, kind="cosine") == pytest.approx(
        base * 0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert lr_at(total, base_lr=base, total_steps=total, warmup_steps=5, kind="cosine") == pytest.approx(0, abs=1e-15)
    assert lr_at(55, base_lr=base, total_steps=105, warmup_steps=5, kind="linear") == pytest.approx(base / 2)
    assert lr_at(55, base_lr=base, total_steps=105, warmup_steps=5, kind="cosine") == pytest.approx(base / 2)
    assert lr_at(99, base_lr=base, total_steps=total, warmup_steps=0, kind="constant") == base
    assert lr_at(0, base_lr=base, total_steps=total, warmup_steps=0, kind="cosine") == base
    with pytest.raises(ValueError, match="scheduler"):
        lr_at(0, base_lr=base, total_steps=total, warmup_steps=0, kind="sawtooth")


def test_seed000_flag_spellings_and_defaults():
    args = RunConfig.from_command_line([
        "--dataset_path", "d.jsonl", "--output_dir", "o", "--batch_size", "3", "--gradient_accumulation_steps", "5",
        "--learning_rate", "1e-3", "--warmup_ratio", "0.1", "--lora_r", "4", "--lora_alpha", "8",
        "--lora_dropout", "0.0", "--max_length", "77", "--no-gradient_checkpointing", "--torch_compile"])
    assert (args.data, args.out, args.batch_size, args.grad_accum, args.lr, args.warmup_ratio) == (
        "d.jsonl", "o", 3, 5, 1e-3, 0.1)
    assert (args.lora_r, args.lora_alpha, args.lora_dropout, args.max_length) == (4, 8, 0.0, 77)
    assert args.grad_checkpointing is False and args.compile is True
    assert RunConfig.from_command_line(["--data", "d", "--gradient_checkpointing"]).grad_checkpointing is True

    d = RunConfig.from_command_line(["--data", "d.jsonl"])  # the defaults (lr: 2e-4, tiny presets 2e-3)
    assert (d.lr, d.warmup_ratio, d.scheduler, d.lora_r, d.lora_alpha, d.lora_dropout, d.epochs, d.max_length) == (
        2e-4, 0.05, "cosine", 16, 32, 0.05, 3, 1024)
    assert d.grad_checkpointing is True and d.compile is False and d.targets == "all-linear"
    assert RunConfig.from_command_line(["--data", "d", "--model", "tiny-phi-2"]).lr == 2e-3
