"""infer.py and phicore.inference / phicore.console on CPU with the tiny random-weight presets.

Issue 5's "must show" for generation: prompts formatted exactly as training formatted them,
greedy output deterministic and equal to `phicore.generate` on the same weights (and, in
test_export.py, to transformers' generate on the merged folder), streamed text equal to the
non-streamed text, `--compare` printing both answers with the tuned one different after a
training run (the base answer equal to a plain base model's), colours only on a terminal and
never with NO_COLOR, the chat loop's turns and commands, and the bad-adapter exits (one line,
code 2) through a real process.

Speed: one short training run per tiny preset for the module (high learning rate, so the
adapter changes greedy answers); everything else loads the adapter in-process.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from train_runs import run_infer  # noqa: E402
import train  # noqa: E402
from phicore.console import BLUE, GREEN, Console, side_by_side  # noqa: E402
from phicore.data import IGNORE_INDEX, conversations_from_records, tokenize_dataset  # noqa: E402
from phicore.generate import generate  # noqa: E402
from phicore.inference import (AnswerDecoder, GenerationSettings, InferenceError, load_session,  # noqa: E402
                               read_adapter_info, read_prompts)
from phicore.weights import load_model  # noqa: E402

GREEDY = GenerationSettings(max_new_tokens=24)
PROMPTS = ["3 plus 3?", "10 plus 3?", "What is the best way to wake up early?"]


def _pairs(n: int) -> list:
    return [{"prompt": f"{i} plus {i % 7}?", "response": f"{i + i % 7}, says my cat."} for i in range(n)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """train.py once per tiny preset: 16 steps at lr 1e-2, adapters in OUT/ (base in OUT/base,
    a checkpoint in OUT/checkpoint-16)."""
    root = tmp_path_factory.mktemp("infer")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _pairs(24)), encoding="utf-8")
    outs = {}
    for preset in ("tiny-phi-3", "tiny-phi-2"):
        out = root / preset
        rc = train.main(["--model", preset, "--data", str(data), "--out", str(out), "--max-steps", "16",
                         "--batch-size", "4", "--max-length", "48", "--lr", "1e-2", "--val-split", "0",
                         "--no-grad-checkpointing", "--quiet", "--seed", "1", "--save-every", "16"])
        assert rc == 0
        outs[preset] = out
    return outs


@pytest.fixture(scope="module")
def sessions(runs):
    return {preset: load_session(out, device="cpu") for preset, out in runs.items()}


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


# ----------------------------------------------------------------------------- reading the folder

def test_session_reads_the_training_record(runs, sessions):
    phi3, phi2 = sessions["tiny-phi-3"], sessions["tiny-phi-2"]
    assert phi3.info.base_model == str(runs["tiny-phi-3"] / "base")
    assert phi3.prompt_format.name == "chat" and phi3.multi_turn and phi3.text_stops == []
    assert phi2.prompt_format.name == "instruct" and not phi2.multi_turn
    assert phi2.text_stops == ["\nInstruct:"]
    # stop on the tokenizer's stop tokens: <|end|> and <|endoftext|> for the Phi-3 preset
    tok = phi3.tokenizer
    assert set(phi3.stop_ids) == {tok.token_to_id("<|end|>"), tok.token_to_id("<|endoftext|>")}
    # a checkpoint folder (OUT/checkpoint-16) finds the run record in its parent
    checkpoint = read_adapter_info(runs["tiny-phi-2"] / "checkpoint-16")
    assert checkpoint.base_model == str(runs["tiny-phi-2"] / "base") and checkpoint.prompt_template == "instruct"


@pytest.mark.parametrize("preset", ["tiny-phi-3", "tiny-phi-2"])
def test_prompt_ids_are_the_training_prompt(sessions, preset):
    """The generation prompt is token for token the part of a training example before its target."""
    session = sessions[preset]
    record = {"prompt": "7 plus 0?", "response": "7, says my cat."}
    examples, _ = tokenize_dataset(conversations_from_records([record]), session.prompt_format, session.tokenizer, 256)
    ids, labels = examples[0].input_ids, examples[0].labels
    first_target = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert session.prompt_ids(record["prompt"]) == ids[:first_target]
    text = session.prompt_text(record["prompt"])
    assert text.endswith("<|assistant|>\n" if preset == "tiny-phi-3" else "Output:")


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("preset", ["tiny-phi-3", "tiny-phi-2"])
def test_greedy_is_deterministic_and_equals_generate(sessions, preset):
    session = sessions[preset]
    ids = session.prompt_ids(PROMPTS[0])
    first = session.answer(PROMPTS[0], GREEDY)
    second = session.answer(PROMPTS[0], GREEDY)
    assert first.token_ids == second.token_ids and first.text == second.text
    reference = generate(session.model, ids, max_new_tokens=GREEDY.max_new_tokens, stop_ids=session.stop_ids)
    n = len(first.token_ids)  # a text stop may end the answer early: its ids are a prefix
    assert first.token_ids == reference[:n]
    if not first.text or not session.text_stops:
        assert first.token_ids == reference
    # batched answers are the single answers (left padding does not change them)
    batch = session.generate([session.prompt_ids(p) for p in PROMPTS], GREEDY)
    for prompt, answer in zip(PROMPTS, batch):
        assert answer.token_ids == session.answer(prompt, GREEDY).token_ids


@pytest.mark.parametrize("preset", ["tiny-phi-3", "tiny-phi-2"])
@pytest.mark.parametrize("settings", [GREEDY, GenerationSettings(max_new_tokens=40, temperature=0.9, top_k=50,
                                                                  top_p=0.95, seed=7)])
def test_streamed_text_equals_non_streamed(sessions, preset, settings):
    session = sessions[preset]
    pieces = []
    streamed = session.answer(PROMPTS[2], settings, on_text=pieces.append)
    plain = session.answer(PROMPTS[2], settings)
    assert "".join(pieces) == streamed.text == plain.text
    assert streamed.token_ids == plain.token_ids
    # and the same text straight from generate's ids, decoded in one go
    ids = generate(session.model, session.prompt_ids(PROMPTS[2]), max_new_tokens=settings.max_new_tokens,
                   temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed,
                   stop_ids=session.stop_ids)
    text = session.tokenizer.decode(ids, skip_special_tokens=True)
    for stop in session.text_stops:
        text = text.split(stop)[0]
    assert plain.text == text.strip()


def test_answer_decoder_text_stops_and_partial_characters(sessions):
    tok = sessions["tiny-phi-2"].tokenizer  # byte-level: "é" and "☕" are several byte tokens
    ids = tok.encode(" Café ☕ time.\nInstruct: next question", add_special_tokens=False)
    decoder = AnswerDecoder(tok, ["\nInstruct:"])
    pieces = [decoder.add(i) for i in ids] + [decoder.finish()]
    assert "".join(pieces) == decoder.text == "Café ☕ time."
    assert decoder.stopped and all("\ufffd" not in p for p in pieces)
    assert len([p for p in pieces if p]) > 3  # really streamed, not all at the end
    # a prefix of the stop that turns out not to be one is released
    decoder = AnswerDecoder(tok, ["\nInstruct:"])
    pieces = [decoder.add(i) for i in tok.encode(" a\nIns b", add_special_tokens=False)] + [decoder.finish()]
    assert "".join(pieces) == "a\nIns b" and not decoder.stopped


# ----------------------------------------------------------------------------- compare

def test_compare_prints_both_answers_and_the_tuned_one_differs(runs, sessions):
    session = sessions["tiny-phi-3"]
    out = io.StringIO()
    result = Console(session, GREEDY, out, compare=True).answer(PROMPTS[0])
    text = out.getvalue()
    assert "[base]" in text and "[fine-tuned]" in text
    assert result.base.text in text and result.tuned.text in text
    assert "\033[" not in text  # not a terminal: plain
    assert result.base.token_ids != result.tuned.token_ids
    # the base answer (adapter switched off) is the plain base model's answer
    base = load_model(runs["tiny-phi-3"] / "base", device="cpu")
    ids = generate(base, session.prompt_ids(PROMPTS[0]), max_new_tokens=GREEDY.max_new_tokens,
                   stop_ids=session.stop_ids)
    assert result.base.token_ids == ids
    # switching the adapter off and on left it on
    assert session.answer(PROMPTS[0], GREEDY).token_ids == result.tuned.token_ids


def test_compare_colours_only_on_a_terminal(sessions, monkeypatch):
    session = sessions["tiny-phi-2"]
    monkeypatch.delenv("NO_COLOR", raising=False)
    tty = FakeTTY()
    Console(session, GREEDY, tty, compare=True).answer(PROMPTS[1])
    assert BLUE in tty.getvalue() and GREEN in tty.getvalue()
    assert tty.getvalue().index(BLUE) < tty.getvalue().index(GREEN)  # base first
    monkeypatch.setenv("NO_COLOR", "1")
    tty = FakeTTY()
    Console(session, GREEDY, tty, compare=True).answer(PROMPTS[1])
    assert "\033[" not in tty.getvalue()


def test_side_by_side_layout(sessions):
    plain = side_by_side("a short base answer", "the fine-tuned answer is longer " * 4, 60, lambda t, c: t)
    lines = plain.splitlines()
    assert lines[0].startswith("base") and "| fine-tuned" in lines[0]
    assert all(len(line) <= 60 for line in lines) and all("|" in line or "+" in line for line in lines)
    out = io.StringIO()
    result = Console(sessions["tiny-phi-2"], GREEDY, out, compare=True, layout="side", width=80).answer(PROMPTS[0])
    assert result.base is not None and "| fine-tuned" in out.getvalue()


# ----------------------------------------------------------------------------- CLI in-process

def test_cli_prompt_and_prompts_file(runs, sessions, tmp_path):
    session = sessions["tiny-phi-3"]
    rc, out = run_infer("--adapter", runs["tiny-phi-3"], "--prompt", PROMPTS[0], "--max-new-tokens", 24, "--quiet")
    assert rc == 0 and out == session.answer(PROMPTS[0], GREEDY).text + "\n"

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    rc, out = run_infer("--adapter", runs["tiny-phi-3"], "--prompts-file", prompts, "--max-new-tokens", 24,
                        "--batch-size", 2, "--compare", "--output", answers, "--quiet")
    assert rc == 0
    records = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS
    for r in records:
        assert r["response"] == session.answer(r["prompt"], GREEDY).text
        assert r["base_response"] == session.answer(r["prompt"], GREEDY, adapter=False).text
        assert f"> {r['prompt']}" in out

    # plain text, one prompt per line, from stdin
    rc, out = run_infer("--adapter", runs["tiny-phi-2"], "--prompts-file", "-", "--max-new-tokens", 8, "--quiet",
                        stdin="\n".join(PROMPTS[:2]) + "\n")
    assert rc == 0 and out.count("> ") == 2


def test_cli_bad_input_in_process(runs, tmp_path, capsys):
    adapter = runs["tiny-phi-2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"question": "no prompt field"}\n', encoding="utf-8")
    cases = [
        (("--prompts-file", bad), "bad.jsonl:2"),
        (("--prompts-file", tmp_path / "missing.txt"), "no such prompts file"),
        (("--prompt", "x", "--temperature", "-1"), "--temperature"),
        (("--prompt", "x", "--top-p", "0"), "--top-p"),
        ((), "nothing to do"),  # not a terminal, no prompt: no chat
        (("--prompt", "x", "--dtype", "fp12"), "fp12"),
    ]
    for args, expected in cases:
        rc, _ = run_infer("--adapter", adapter, *args)
        err = capsys.readouterr().err
        assert rc == 2, args
        assert expected in err and len(err.strip().splitlines()) == 1, err


def test_read_prompts_formats(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("first\n\n  second  \n", encoding="utf-8")
    assert read_prompts(plain) == ["first", "second"]
    jsonl = tmp_path / "p.data"
    jsonl.write_text('{"prompt": "a\\nb"}\n', encoding="utf-8")
    assert read_prompts(jsonl) == ["a\nb"]
    with pytest.raises(InferenceError, match="no prompts"):
        (tmp_path / "e.txt").write_text("\n", encoding="utf-8")
        read_prompts(tmp_path / "e.txt")


# ----------------------------------------------------------------------------- chat

def _scripted(lines):
    lines = iter(lines)

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    return read


def test_chat_loop_multi_turn_reset_and_quit(sessions, monkeypatch):
    session = sessions["tiny-phi-3"]
    seen = []
    original = session.answer

    def recording(messages, settings, **kwargs):
        seen.append(messages if isinstance(messages, str) else [dict(m) for m in messages])
        return original(messages, settings, **kwargs)

    monkeypatch.setattr(session, "answer", recording)
    out = io.StringIO()
    turns = Console(session, GREEDY, out).chat(_scripted(["hello", "", "/help", "and again", "/reset", "third",
                                                          "/quit", "never read"]))
    assert turns == 3
    assert [len(m) for m in seen] == [1, 3, 1]  # user; user, assistant, user; after /reset: user
    assert seen[1][0]["content"] == "hello" and seen[1][1]["role"] == "assistant" and seen[1][2]["content"] == "and again"
    assert seen[1][1]["content"] == original("hello", GREEDY).text  # the answer it gave continues the chat
    assert "unknown command /help" in out.getvalue() and "(conversation cleared)" in out.getvalue()


def test_chat_single_turn_format_and_eof(sessions, monkeypatch):
    session = sessions["tiny-phi-2"]
    seen = []
    original = session.answer
    monkeypatch.setattr(session, "answer", lambda m, s, **kw: seen.append(m) or original(m, s, **kw))
    out = io.StringIO()
    assert Console(session, GREEDY, out).chat(_scripted(["one", "two"])) == 2  # ends at EOF
    assert seen == ["one", "two"]  # Instruct/Output is a single-turn format: no history


def test_chat_drops_oldest_turns_to_fit_the_context(sessions):
    session = sessions["tiny-phi-3"]
    console = Console(session, GenerationSettings(max_new_tokens=session.context_length - 60))
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    fitted = console._fit_history(history + [{"role": "user", "content": "last"}])
    assert fitted[-1]["content"] == "last" and fitted[0]["role"] == "user" and len(fitted) < 13
    assert len(session.prompt_ids(fitted)) <= 60


# ----------------------------------------------------------------------------- bad adapters, real process

def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "infer.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def other_phi3(runs, tmp_path_factory):
    """The Phi-3 preset's base with another width (hidden 64, not 128): the adapter cannot fit."""
    from phicore.config import ModelConfig
    from phicore.model import PhiForCausalLM
    from phicore.weights import save_model

    base = runs["tiny-phi-3"] / "base"
    raw = json.loads((base / "config.json").read_text(encoding="utf-8"))
    folder = tmp_path_factory.mktemp("other") / "phi3"
    save_model(PhiForCausalLM(ModelConfig.from_dict({**raw, "hidden_size": 64})), folder)
    return folder


def test_bad_adapters_exit_2_with_one_line(runs, tmp_path, other_phi3, capsys):
    # a real process for the exit code: a missing folder, and an adapter that does not fit its base
    for args, expected in [((tmp_path / "missing",), "no such adapter folder"),
                           ((runs["tiny-phi-3"], "--base", other_phi3), "adapter does not fit the base")]:
        result = run_cli("--adapter", *args, "--prompt", "hi", "--quiet")
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
        assert result.stdout == ""
    assert "shape" in lines[0] and "[128" in lines[0]  # the misfit names a tensor and both shapes
    # a folder that is not an adapter folder (in-process: the same main)
    not_adapter = tmp_path / "not_an_adapter"
    not_adapter.mkdir()
    (not_adapter / "notes.txt").write_text("hello", encoding="utf-8")
    rc, out = run_infer("--adapter", not_adapter, "--prompt", "hi")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and out == "" and len(err) == 1 and "not an adapter folder" in err[0]
    # an adapter_config.json of another PEFT method
    other = tmp_path / "prefix_tuning"
    other.mkdir()
    config = json.loads((runs["tiny-phi-2"] / "adapter_config.json").read_text(encoding="utf-8"))
    (other / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}), encoding="utf-8")
    (other / "adapter_model.safetensors").write_bytes((runs["tiny-phi-2"] / "adapter_model.safetensors").read_bytes())
    rc, out = run_infer("--adapter", other, "--prompt", "hi")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "PREFIX_TUNING" in err[0]


# ----------------------------------------------------------------------------- NF4 base held dense
def test_dense_base_decodes_the_same_tokens_as_nf4(runs, tmp_path):
    """--dense-base (the default on CPU when it fits): an NF4 base dequantised once gives the
    logits of the NF4 path (the same weights: the 4-bit path dequantises them on every call) and
    the same greedy answer."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _pairs(24)), encoding="utf-8")
    out = tmp_path / "qlora"
    assert train.main(["--model", "tiny-phi-3", "--data", str(data), "--out", str(out), "--max-steps", "8",
                       "--quantize", "nf4", "--max-length", "48", "--lr", "1e-2", "--val-split", "0",
                       "--quiet"]) == 0
    nf4, dense = load_session(out, device="cpu"), load_session(out, device="cpu", dense=True)
    ids = torch.tensor([nf4.tokenizer.encode("3 plus 3?")])
    with torch.no_grad():
        torch.testing.assert_close(dense.model(ids), nf4.model(ids), rtol=0, atol=1e-5)
    answers = {}
    for choice in ("auto", "no"):
        code, text = run_infer("--adapter", out, "--prompt", "3 plus 3?", "--max-new-tokens", 12, "--no-stream",
                               "--dense-base", choice, "--device", "cpu")
        assert code == 0
        answers[choice] = text
    assert answers["auto"] == answers["no"]
