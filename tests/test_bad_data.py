"""Bad data and bad chat templates (issue 15, items 12, 13, 14 and 16).

12 tables: a first row that names no known column is refused, never trained on; so is a
   column with data that nothing reads, and a row wider than its header. `--prompt-field`,
   `--response-field` and `--text-field` map any column or key, and are part of the cache key.
13 rows: an empty response, a duplicate JSON key, deep nesting, a lone surrogate, a huge
   integer and a symbolic link loop are one-line `file:line` errors; U+2028/U+2029 inside
   strings and CR-only line ends are read.
14 one huge row: its fields are cut to what `--max-length` can use before tokenising.
16 chat templates: the rendering is capped, and a failing template is named by its file.

User-facing paths go through `train.main` (exit 2 and exactly one stderr line); the rest
through the data functions. FieldMap and the new helpers are imported inside the tests that
use them, so each test fails on the code before this change for its own reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from train_runs import run_main, write_jsonl  # noqa: E402
from phicore.chat_template import render_chat_template  # noqa: E402
from phicore.data import (DataError, conversations_from_records, prompt_format_for, read_conversations,  # noqa: E402
                          tokenize_dataset)
from phicore.data import cache  # noqa: E402
from phicore.data.files import iter_conversations  # noqa: E402
from phicore.tokenizer import load_tokenizer  # noqa: E402

FAST = ["--max-length", "64", "--quiet", "--no-grad-checkpointing", "--max-steps", "1"]
DATASETS = REPO.parent / "shared" / "datasets"
GOOD = {"prompt": "What is 2+2?", "response": "Four."}


def write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def train_fails(capsys, data, *flags, model="tiny-phi-2", out=None) -> str:
    """train.main on `data` must exit 2 with exactly one stderr line; that line."""
    capsys.readouterr()
    rc = run_main("--model", model, "--data", data, "--out", out or Path(data).parent / "out", *FAST, *flags)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def train_works(capsys, data, *flags, out) -> str:
    capsys.readouterr()
    rc = run_main("--model", "tiny-phi-2", "--data", data, "--out", out, *FAST, *flags)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def both_readers(path, **kwargs) -> list:
    """read_conversations and the streaming iter_conversations must agree."""
    whole = read_conversations(path, **kwargs)
    assert list(iter_conversations(path, **kwargs)) == whole
    return whole


def refused(path, pattern: str, **kwargs) -> str:
    """Both readers raise one DataError line matching `pattern`."""
    for reader in (read_conversations, lambda p, **k: list(iter_conversations(p, **k))):
        with pytest.raises(DataError, match=pattern) as info:
            reader(path, **kwargs)
        assert "\n" not in str(info.value)
    return str(info.value)


# =========================================================================== 12: tables

@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv", "\t")])
def test_a_header_of_unknown_names_is_refused_naming_the_columns_and_the_mapping(tmp_path, capsys, suffix, sep):
    """Before: read as headerless, the header row trained as an example and `extra` dropped."""
    data = write(tmp_path / f"jokes{suffix}", sep.join(["title", "body", "extra"]) + "\n"
                 + sep.join(["Knock knock", "Who's there?", "x"]) + "\n")
    err = train_fails(capsys, data)
    for part in (f"jokes{suffix}:1", "title, body, extra", "--prompt-field", "--response-field", "--text-field"):
        assert part in err, err


def test_a_header_of_unknown_names_in_a_workbook_is_refused(tmp_path):
    openpyxl = pytest.importorskip("openpyxl", reason="openpyxl (optional) is not installed")
    book = openpyxl.Workbook()
    book.active.append(["title", "body"])
    book.active.append(["Knock knock", "Who's there?"])
    book.save(tmp_path / "jokes.xlsx")
    with pytest.raises(DataError, match=r"jokes\.xlsx: row 1: the first row names no known column \(found: "
                                        r"title, body\).*--prompt-field"):
        read_conversations(tmp_path / "jokes.xlsx")


def test_a_headerless_table_is_refused_not_trained_on(tmp_path):
    """No header is unambiguous: "What is up?,Not much" may be a header or a row. Refused."""
    data = write(tmp_path / "pairs.csv", "What is up?,Not much\nHi,Hello\n")
    refused(data, r"^.*pairs\.csv:1: the first row names no known column \(found: What is up\?, Not much\); "
                  r"a table needs a header row")


def test_a_column_nothing_reads_is_refused_until_a_mapping_says_which_count(tmp_path):
    from phicore.data import FieldMap

    data = write(tmp_path / "qa.csv", "question,answer,source\nWhat is 2+2?,Four,book\nWhy?,Because,web\n")
    refused(data, r"qa\.csv:1: column 'source' would not be used \(the known columns read: question, answer\); "
                  r"to train on those and ignore the rest, say so with --prompt-field question --response-field "
                  r"answer$")
    convs = both_readers(data, fields=FieldMap(prompt="question", response="answer"))
    assert [[t.content for t in c.turns] for c in convs] == [["What is 2+2?", "Four"], ["Why?", "Because"]]
    # an alpaca table with a spare column: mapping the response keeps instruction + input together
    data = write(tmp_path / "alpaca.csv", "instruction,input,output,text\nAdd,2+2,4,full text\n")
    refused(data, r"--response-field output$")
    (conv,) = both_readers(data, fields=FieldMap(response="output"))
    assert [t.content for t in conv.turns] == ["Add\n\n2+2", "4"]
    # an empty extra column drops nothing: accepted
    assert len(both_readers(write(tmp_path / "blank.csv", "question,answer,notes\nq,a,\n"))) == 1


def test_a_row_wider_than_its_header_is_refused(tmp_path):
    """An unquoted comma used to cut the response at the comma and drop the rest."""
    data = write(tmp_path / "qa.csv", "question,answer\nWhat is 2+2?,Four, of course\n")
    refused(data, r"qa\.csv:2: 3 cells, but the header has 2 columns \(quote cells that hold the delimiter\)$")


def test_fields_map_any_column_or_key(tmp_path, capsys):
    from phicore.data import FieldMap

    csv = write(tmp_path / "jokes.csv", "title,body,rating\nKnock knock,Who's there?,4\nA pun,Punny.,2\n")
    (first, _) = both_readers(csv, fields=FieldMap(prompt="title", response="body"))
    assert [(t.role, t.content) for t in first.turns] == [("user", "Knock knock"), ("assistant", "Who's there?")]
    (plain, _) = both_readers(csv, fields=FieldMap(text="Body"))  # a column name matches ignoring case
    assert plain.plain and plain.turns[0].content == "Who's there?"
    jsonl = write_jsonl(tmp_path / "jokes.jsonl", [{"title": "T", "body": "B", "id": 1}] * 2)
    (conv, _) = both_readers(jsonl, fields=FieldMap(prompt="title", response="body"))
    assert [t.content for t in conv.turns] == ["T", "B"]
    (conv, _) = both_readers(jsonl, fields=FieldMap(text="body"))
    assert conv.plain and conv.turns[0].content == "B"
    # a side left out is found by its known name
    (conv,) = conversations_from_records([{"question": "Q", "reply": "R"}], fields=FieldMap(response="reply"))
    assert [t.content for t in conv.turns] == ["Q", "R"]
    # through train.py, table and JSON alike
    assert "2/2 examples" in train_works(capsys, csv, "--prompt-field", "title", "--response-field", "body",
                                         "--val-split", "0", out=tmp_path / "out-csv")
    assert "2/2 examples" in train_works(capsys, jsonl, "--text-field", "body", "--val-split", "0",
                                         out=tmp_path / "out-jsonl")


def test_the_real_taivop_jokes_read_through_a_mapping():
    """taivop-joke-dataset: {body, category, id, rating}; 573 of its 3773 bodies are empty, so
    the file itself is refused at the first one, naming its line."""
    from phicore.data import FieldMap

    path = DATASETS / "taivop-joke-dataset" / "stupidstuff.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent (real datasets live in ../shared/datasets)")
    with pytest.raises(DataError, match=r'stupidstuff\.json:10370: field "body" is empty'):
        read_conversations(path, fields=FieldMap(prompt="category", response="body"))
    records = [r for r in json.loads(path.read_text(encoding="utf-8")) if r["body"].strip()]
    convs = conversations_from_records(records, fields=FieldMap(prompt="category", response="body"))
    assert len(convs) == 3200
    assert convs[0].turns[0].content == "Children" and convs[0].turns[1].content.startswith("A blackjack dealer")


@pytest.mark.parametrize("flags,expected", [
    (["--response-field", "nope"], ["jokes.csv:1", "--response-field 'nope': no such column", "title, body"]),
    (["--text-field", "body", "--prompt-field", "title"], ["jokes.csv", "--text-field", "cannot be combined"]),
    (["--prompt-field", "title", "--response-field", "body", "--format", "joke"], ["--format joke", "combined"]),
    (["--prompt-field", "body", "--response-field", "body"], ["both name 'body'"]),
])
def test_mapping_mistakes_are_one_line(tmp_path, capsys, flags, expected):
    data = write(tmp_path / "jokes.csv", "title,body\nKnock knock,Who's there?\n")
    err = train_fails(capsys, data, *flags)
    assert all(part in err for part in expected), err


def test_the_mapping_is_part_of_the_cache_key(bases, tmp_path):
    from phicore.data import FieldMap

    data = write_jsonl(tmp_path / "d.jsonl", [{"title": "T", "body": "Body text", "notes": "N"}] * 3)
    tokenizer = load_tokenizer(bases["tiny-phi-2"])
    fmt = prompt_format_for(tokenizer)
    keys = [cache.cache_key(data, tokenizer, fmt, max_length=64, train_on_prompt=False, fields=f)
            for f in (FieldMap(prompt="title", response="body"), FieldMap(prompt="notes", response="body"),
                      FieldMap(text="body"))]
    assert len({cache.entry_dir(tmp_path, data, k) for k in keys}) == 3

    def build(fields):
        return cache.open_or_build(data, tokenizer, fmt, max_length=64, fields=fields, cache_dir=tmp_path / "c",
                                   show_progress=False, log=lambda m: None)

    first, hit = build(FieldMap(prompt="title", response="body"))
    assert not hit
    again, hit = build(FieldMap(prompt="title", response="body"))
    assert hit
    other, hit = build(FieldMap(text="body"))  # another mapping tokenises again, into another entry
    assert not hit and other.folder != first.folder
    assert list(other[0].input_ids) != list(first[0].input_ids)


# =========================================================================== 13: rows

EMPTY_RESPONSES = {  # format: (a record with an empty or blank response, what the error names)
    "prompt_response": ({"prompt": "p", "response": "  \n"}, 'field "response" is empty'),
    "question_answer": ({"question": "q", "answer": ""}, 'field "answer" is empty'),
    "alpaca": ({"instruction": "i", "input": "", "output": "\t"}, 'field "output" is empty'),
    "self_instruct": ({"instruction": "i", "instances": [{"input": "", "output": " "}]}, 'field "output" is empty'),
    "joke": ({"setup": "s", "punchline": ""}, 'field "punchline" is empty'),
    "messages": ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": " "}]},
                 'messages[1]: empty assistant "content"'),
    "sharegpt": ({"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": ""}]},
                 'conversations[1]: empty assistant "value"'),
    "oasst": ({"text": "u", "role": "prompter", "replies": [{"text": "  ", "role": "assistant", "replies": []}]},
              'reply at depth 1: empty assistant "text"'),
    "human_assistant": ({"text": "Human: hi\nAssistant:   \n"}, 'empty "Assistant:" turn'),
}


@pytest.mark.parametrize("fmt", sorted(EMPTY_RESPONSES))
def test_an_empty_response_is_an_error_naming_file_and_line_in_every_format(tmp_path, fmt):
    record, message = EMPTY_RESPONSES[fmt]
    path = write_jsonl(tmp_path / "d.jsonl", [record, record])
    text = refused(path, r"d\.jsonl:1: ", format=fmt)
    assert message in text, text
    as_list = write(tmp_path / "d.json", "[\n" + json.dumps(record) + "\n]")
    with pytest.raises(DataError, match=r"d\.json:2: "):
        read_conversations(as_list, format=fmt)


def test_an_empty_mapped_response_or_text_is_an_error(tmp_path):
    from phicore.data import FieldMap

    path = write_jsonl(tmp_path / "d.jsonl", [{"title": "t", "body": "b"}, {"title": "t", "body": " "}])
    refused(path, r'd\.jsonl:2: field "body" is empty', fields=FieldMap(prompt="title", response="body"))
    refused(path, r'd\.jsonl:2: field "body" is empty', fields=FieldMap(text="body"))
    table = write(tmp_path / "t.csv", "title,body\nt,b\nt,\n")
    refused(table, r't\.csv:3: empty "body" cell', fields=FieldMap(prompt="title", response="body"))


def test_an_empty_response_stops_train_py_with_one_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, {"prompt": "p", "response": " "}])
    err = train_fails(capsys, data)
    assert "d.jsonl:3" in err and "empty" in err, err


@pytest.mark.parametrize("name,text,where,key", [
    ("top.jsonl", json.dumps(GOOD) + '\n{"prompt": "a", "response": "b", "prompt": "c"}\n', ":2:", '"prompt"'),
    ("nested.jsonl", '{"messages": [{"role": "user", "content": "a", "content": "b"}]}\n', ":1:", '"content"'),
    ("list.json", '[\n  {"prompt": "a",\n   "response": "b"},\n  {"prompt": "a",\n   "response": "b",\n'
                  '   "response": "c"}\n]\n', ":4:", '"response"'),
])
def test_a_duplicate_key_is_an_error_naming_file_line_and_key(tmp_path, capsys, name, text, where, key):
    """json keeps the last value silently; a duplicate is most often a broken export."""
    data = write(tmp_path / name, text)
    err = train_fails(capsys, data)
    assert f"{name}{where} invalid JSON: duplicate key {key}" in err, err


def test_line_and_paragraph_separators_inside_strings_are_characters(tmp_path, capsys):
    """U+2028/U+2029 (and U+0085) are valid raw inside JSON strings; str.splitlines() broke
    the record there."""
    rows = [{"prompt": "one\u2028two", "response": "three\u2029four\x85five"}, GOOD]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    for name in ("d.jsonl", "lines.json"):
        convs = both_readers(write(tmp_path / name, text)) if name.endswith("l") else read_conversations(
            write(tmp_path / name, text))
        assert [t.content for t in convs[0].turns] == ["one\u2028two", "three\u2029four\x85five"]
        assert [c.source[1] for c in convs] == [1, 2]
    bad = write(tmp_path / "bad.jsonl", text + '{"prompt": "x"}\n')
    refused(bad, r'bad\.jsonl:3: missing field "response"')
    assert "2/2 examples" in train_works(capsys, tmp_path / "d.jsonl", "--val-split", "0", out=tmp_path / "out")


def test_cr_only_line_ends_are_line_ends(tmp_path, capsys):
    """Old Mac files: "\\r" alone separates the lines (the stream read them as one line)."""
    rows = "".join(json.dumps(r) + "\r" for r in [GOOD, {"prompt": "a", "response": "b"}])
    data = write(tmp_path / "mac.jsonl", rows)
    assert [c.source[1] for c in both_readers(data)] == [1, 2]
    assert "2/2 examples" in train_works(capsys, data, "--val-split", "0", out=tmp_path / "out")
    bad = write(tmp_path / "bad.jsonl", rows + '\r\n{"prompt": "x"}\r')  # a blank line, then row 4
    refused(bad, r'bad\.jsonl:4: missing field "response"')
    mixed = write(tmp_path / "mixed.json", '[\r  {"prompt": "a", "response": "b"},\r  {"prompt": "a"}\r]')
    with pytest.raises(DataError, match=r'mixed\.json:3: missing field "response"'):
        read_conversations(mixed)
    assert cache.count_lines(bad) == 4


@pytest.mark.parametrize("name,text,line,message", [
    ("deep.jsonl", json.dumps(GOOD) + '\n{"prompt": "a", "response": "b", "x": ' + "[" * 100_000 + "]" * 100_000
     + "}\n", 2, "nested too deeply"),
    ("deep.json", '[\n' + json.dumps(GOOD) + ',\n{"prompt": "a", "response": "b", "x": ' + "[" * 100_000
     + "]" * 100_000 + "}\n]", 3, "nested too deeply"),
    ("surrogate.jsonl", json.dumps(GOOD) + '\n{"prompt": "a", "response": "half \\ud800 of a pair"}\n', 2,
     'a lone surrogate "\\ud800"'),
    ("surrogate-key.json", '[\n' + json.dumps(GOOD) + ',\n{"prompt": "a", "response": "b", "\\udfff": 1}\n]', 3,
     'a lone surrogate "\\udfff"'),
    ("digits.jsonl", json.dumps(GOOD) + '\n{"prompt": "a", "response": "b", "id": ' + "7" * 5000 + "}\n", 2,
     "a number of 5000 digits"),
])
def test_json_that_python_cannot_hold_is_a_one_line_error(tmp_path, capsys, name, text, line, message):
    """Before: RecursionError, a TypeError from the tokenizer, a ValueError: tracebacks."""
    data = write(tmp_path / name, text)
    err = train_fails(capsys, data)
    assert f"{name}:{line}: invalid JSON: {message}" in err, err
    with pytest.raises(DataError, match=f"{name}:{line}: "):
        read_conversations(data)


def test_a_pair_of_surrogate_escapes_is_one_character(tmp_path):
    data = write(tmp_path / "emoji.jsonl", '{"prompt": "a", "response": "\\ud83d\\ude00 and \\\\ud800"}\n')
    (conv,) = both_readers(data)
    assert conv.turns[1].content == "\U0001F600 and \\ud800"


def test_a_symbolic_link_loop_is_a_one_line_error(tmp_path, capsys):
    loop = tmp_path / "loop.jsonl"
    os.symlink(loop.name, loop)  # the data path is a link to itself
    err = train_fails(capsys, loop)
    assert "loop.jsonl: cannot read file: a symbolic link loop" in err, err
    refused(loop, r"loop\.jsonl: cannot read file: a symbolic link loop")


# =========================================================================== 14: one huge row

class CountingTokenizer:
    """A tokenizer that records the longest text it was asked to encode."""

    def __init__(self, inner):
        self._inner, self.longest = inner, 0

    def encode(self, text, add_special_tokens=True):
        self.longest = max(self.longest, len(text))
        return self._inner.encode(text, add_special_tokens=add_special_tokens)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.mark.parametrize("preset", ["tiny-phi-2", "tiny-phi-3"])
def test_a_huge_field_reaches_the_tokenizer_cut_to_what_max_length_can_use(bases, preset):
    inner = load_tokenizer(bases[preset])
    tokenizer = CountingTokenizer(inner)
    fmt = prompt_format_for(inner)
    words = "the quick brown fox jumps over the lazy dog and keeps running "
    huge = (words * (2_000_000 // len(words)))
    convs = (conversations_from_records([{"prompt": "Tell me a story", "response": huge}])
             + conversations_from_records([{"messages": [{"role": "user", "content": huge},
                                                         {"role": "assistant", "content": huge}] * 50}]))
    examples, stats = tokenize_dataset(convs, fmt, tokenizer, max_length=64)
    assert 0 < tokenizer.longest < 40_000  # of 2 MB fields (before: all of them, 200 MB for the chat)
    from phicore.data.tokenization import field_char_limit, max_token_chars

    limit = field_char_limit(64, max_token_chars(inner))  # 64 x the longest token + a margin
    assert tokenizer.longest <= 2 * limit + 1_000  # two fields at most, plus the template's text
    # the chat's first reply lies past 64 tokens of its huge question: dropped, as before the cut
    assert (stats.truncated, stats.dropped_no_target, [len(e) for e in examples]) == (2, 1, [64])


def test_cutting_a_long_field_keeps_the_tokens_of_normal_text(bases):
    """The kept tokens of a cut row are those of the whole row (for text made of words)."""
    from phicore.data.tokenization import tokenize_conversation, tokenize_segments

    tokenizers = [load_tokenizer(bases["tiny-phi-2"])]
    phi2 = REPO.parent / "shared" / "models" / "phi-2"
    if phi2.is_dir():
        tokenizers.append(load_tokenizer(phi2))
    text = " ".join(f"word{i % 97} and, some punctuation; {i}." for i in range(12_000))  # ~400k chars
    (conv,) = conversations_from_records([{"prompt": "Summarise " + text[:5000], "response": text}])
    for tokenizer in tokenizers:
        fmt = prompt_format_for(tokenizer)
        for max_length in (64, 1024):
            ids, labels, truncated = tokenize_conversation(conv, fmt, tokenizer, max_length)
            full_ids, full_labels = tokenize_segments(fmt.segments(conv), tokenizer)
            assert truncated and ids == full_ids[:max_length] and labels == full_labels[:max_length]


def test_a_huge_row_trains_in_little_memory_and_time(bases, tmp_path):
    """A 16 MB single-line JSONL row through train.py in a fresh process: peak RSS (VmHWM) under
    1 GiB and well under a minute (before: 4.1 GB; 50 MB took 1m46s and 11.8 GB)."""
    from bench.cache_memory import PEAK_RSS_WRAPPER

    words = "the quick brown fox jumps over the lazy dog and keeps running "
    data = write_jsonl(tmp_path / "huge.jsonl", [{"prompt": "Tell me a long story",
                                                  "response": words * (16_000_000 // len(words))}])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PHICORE_CACHE_DIR": str(tmp_path / "cache")}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, str(REPO / "train.py"), "--model",
                           bases["tiny-phi-2"], "--data", data, "--out", tmp_path / "out", "--max-length", "256",
                           "--max-steps", "1", "--quiet"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    peak_mib = int(proc.stdout.split("peak-rss-kib")[-1].split()[0]) / 1024
    assert "1/1 examples, 256 tokens" in proc.stdout and "1 truncated" in proc.stdout
    assert peak_mib < 1024, f"peak RSS {peak_mib:.0f} MiB"
    assert seconds < 60, f"{seconds:.1f}s"


def test_a_json_lines_file_is_still_streamed(tmp_path):
    """Row 1 comes out before row 2 (broken) is read: the reader holds one line at a time."""
    data = write(tmp_path / "d.jsonl", json.dumps(GOOD) + "\r\n" + '{"prompt": \n')
    rows = iter_conversations(data)
    assert next(rows).turns[1].content == "Four."
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        next(rows)


# =========================================================================== 16: chat templates

def test_a_template_that_renders_too_much_is_refused():
    """Before: each of these rendered (or built) tens of megabytes and returned it."""
    messages = [{"role": "user", "content": "hi"}]
    runaway = {
        "loop": "{% for i in range(2000) %}{% for j in range(1000) %}0123456789{% endfor %}{% endfor %}",
        "repeat": "{{ 'x' * 30000000 }}",
        "doubling": "{% set ns = namespace(s='x') %}{% for i in range(24) %}{% set ns.s = ns.s ~ ns.s %}"
                    "{% endfor %}{{ ns.s | length }}",
        "captured": "{% set s %}{% for i in range(3000) %}{% for j in range(1000) %}0123456789{% endfor %}"
                    "{% endfor %}{% endset %}{{ s | length }}",
        "width": "{{ '%30000000d' % 1 }}",
    }
    for name, template in runaway.items():
        with pytest.raises(ValueError, match=r"^chat template (renders more than|loops over more than|formats "
                                             r"with a width)") as info:
            render_chat_template(template, messages)
        assert "\n" not in str(info.value), name
    # the cap grows with the conversation: a long conversation renders whole
    long = [{"role": "user", "content": "x" * 3_000_000}]
    assert len(render_chat_template("{{ messages[0]['content'] }}", long)) == 3_000_000


TEMPLATE_FAILURES = {  # case: (file holding the template, template, what the one line says)
    "sandbox": ("tokenizer_config.json", "{{ messages.append(1) }}", "refused by the sandbox: SecurityError"),
    "type": ("chat_template.jinja", "{% for m in messages %}{{ m + 1 }}{% endfor %}", "failed: TypeError"),
    "syntax": ("chat_template.jinja", "{% for m in messages %}", "does not compile"),
    "runaway": ("tokenizer_config.json", "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
                                         "{% endfor %}{% for i in range(300) %}{% for j in range(1000) %}xxxxxx"
                                         "{% endfor %}{% endfor %}", "chat template renders more than"),
    "per-record": ("tokenizer_config.json", "{% for m in messages %}{% if 'boom' in m['content'] %}"
                                            "{{ raise_exception('no booms') }}{% endif %}<|{{ m['role'] }}|>"
                                            "{{ m['content'] }}<|end|>{% endfor %}"
                                            "{% if add_generation_prompt %}<|assistant|>{% endif %}",
                   "d.jsonl:2: "),
}


@pytest.mark.parametrize("case", sorted(TEMPLATE_FAILURES))
def test_a_failing_chat_template_is_one_line_naming_its_file(bases, tmp_path, capsys, case):
    file, template, expected = TEMPLATE_FAILURES[case]
    model = tmp_path / "model"
    shutil.copytree(bases["tiny-phi-3"], model)
    if file == "chat_template.jinja":
        (model / file).write_text(template, encoding="utf-8")
    else:
        config = json.loads((model / file).read_text(encoding="utf-8"))
        config["chat_template"] = template
        (model / file).write_text(json.dumps(config), encoding="utf-8")
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "boom", "response": "bang"}])
    err = train_fails(capsys, data, model=str(model), out=tmp_path / "out")
    assert str(model / file) in err and expected in err, err
