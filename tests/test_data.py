"""The data pipeline: files -> conversations -> segments -> token ids/labels -> batches.

Most tests use `ByteTokenizer`, a byte-level fake with Phi-3-style special tokens, so they do
not depend on phicore.tokenizer; the real-tokenizer tests read ../shared/models and skip
(with the reason) where that folder or phicore.tokenizer is missing.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import jinja2
import pytest
import torch

from phicore.data import (EOS, IGNORE_INDEX, BatchPlan, ChatTemplateFormat, Conversation,
                          DataError, Example, FieldMap, Segment, TemplateFormat, Turn, batches_for_epoch,
                          bos_ids, collate, collate_packed, conversations_from_records,
                          detect_format, encode_prompt, pack_examples, prompt_format_for,
                          read_conversations, split_train_val, tokenize_dataset,
                          tokenize_segments)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATASETS = SHARED / "datasets"
MODELS = SHARED / "models"

# The shape of Phi-3.5-mini's template (the real one is read from ../shared where it is used).
PHI35_LIKE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


class ByteTokenizer:
    """One id per UTF-8 byte (0-255) plus special tokens recognised in the text."""

    SPECIALS = {"<|endoftext|>": 256, "<|end|>": 257, "<|user|>": 258, "<|assistant|>": 259,
                "<|system|>": 260, "<s>": 261}
    _split = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")

    def __init__(self, chat_template=None, add_bos=False, merges=None):
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.merges = merges or {}  # {(a, b): id}: a pair merged into one token (greedy, left to right)
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 261, 256, 256
        self.stop_token_ids = [256, 257]
        self._inverse = {v: k for k, v in self.SPECIALS.items()}
        self._inverse.update({v: bytes(k) for k, v in self.merges.items()})

    def encode(self, text, add_special_tokens=True):
        ids = [self.bos_token_id] if add_special_tokens and self.add_bos else []
        for piece in self._split.split(text):
            if piece in self.SPECIALS:
                ids.append(self.SPECIALS[piece])
                continue
            raw = list(piece.encode("utf-8"))
            i = 0
            while i < len(raw):
                pair = tuple(raw[i:i + 2])
                if pair in self.merges:
                    ids.append(self.merges[pair])
                    i += 2
                else:
                    ids.append(raw[i])
                    i += 1
        return ids

    def decode(self, ids, skip_special_tokens=False):
        out = b""
        for i in ids:
            tok = self._inverse.get(i, bytes([i]) if i < 256 else b"")
            if isinstance(tok, str):
                tok = b"" if skip_special_tokens else tok.encode()
            out += tok
        return out.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        text = jinja2.Environment().from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token="<s>", eos_token="<|endoftext|>")
        return self.encode(text, add_special_tokens=False) if tokenize else text


def real_tokenizer(name):
    folder = MODELS / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (real model folders live in ../shared/models)")
    try:
        from phicore.tokenizer import load_tokenizer
    except ImportError as e:
        pytest.skip(f"phicore.tokenizer is not importable: {e}")
    return load_tokenizer(folder)


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:  # records -> JSON Lines
        path.write_text("\n".join(json.dumps(r) for r in content) + "\n", encoding="utf-8")
    return path


def pair(conv):
    return [(t.role, t.content) for t in conv.turns]


def target_texts(tok, ids, labels):
    """Decoded runs of consecutive target tokens."""
    runs, cur = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


# =========================================================================== formats

OASST_TREE = {
    "message_tree_id": "t1",
    "prompt": {
        "text": "What is 2+2?", "role": "prompter",
        "replies": [
            {"text": "5", "role": "assistant", "rank": 1, "replies": []},
            {"text": "4", "role": "assistant", "rank": 0, "replies": [
                {"text": "Why?", "role": "prompter", "replies": [
                    {"text": "Unranked", "role": "assistant", "replies": []},
                    {"text": "Deleted", "role": "assistant", "rank": 0, "deleted": True, "replies": []},
                    {"text": "Because.", "role": "assistant", "rank": 0, "replies": [
                        {"text": "unanswered", "role": "prompter", "replies": []}]},
                ]}]},
        ],
    },
}

RECORD_CASES = {
    "prompt_response": ({"prompt": "P", "response": "R"}, [("user", "P"), ("assistant", "R")]),
    "question_answer": ({"question": "Q", "answer": "A"}, [("user", "Q"), ("assistant", "A")]),
    "alpaca": ({"instruction": "Do", "input": "this", "output": "done"},
               [("user", "Do\n\nthis"), ("assistant", "done")]),
    "self_instruct": ({"id": "s0", "instruction": "Do", "instances": [{"input": "", "output": "ok"}]},
                      [("user", "Do"), ("assistant", "ok")]),
    "joke": ({"type": "general", "setup": "Why?", "punchline": "Because."},
             [("user", "Why?"), ("assistant", "Because.")]),
    "text": ({"text": "hi"}, [("assistant", "hi")]),
    "human_assistant": ({"text": "Human: Hi there\n\nAssistant: Hello!\nHuman: Bye\nAssistant: Bye."},
                        [("user", "Hi there"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Bye.")]),
    "messages": ({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                               {"role": "assistant", "content": "A"}]},
                 [("system", "S"), ("user", "U"), ("assistant", "A")]),
    "sharegpt": ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "U"},
                                    {"from": "gpt", "value": "A"}]},
                 [("system", "S"), ("user", "U"), ("assistant", "A")]),
    "oasst": (OASST_TREE, [("user", "What is 2+2?"), ("assistant", "4"), ("user", "Why?"),
                           ("assistant", "Because.")]),
}


@pytest.mark.parametrize("fmt", sorted(RECORD_CASES))
def test_every_record_format_is_detected_and_parsed(tmp_path, fmt):
    record, turns = RECORD_CASES[fmt]
    assert detect_format(record) == fmt
    path = write(tmp_path, "data.jsonl", [record, record])
    convs = read_conversations(path)
    assert len(convs) == 2
    assert pair(convs[0]) == turns
    assert convs[1].source == (str(path), 2)
    assert convs[0].plain == (fmt == "text")


def test_alpaca_without_input_keeps_the_instruction_alone():
    (conv,) = conversations_from_records([{"instruction": "Do", "input": "  ", "output": "x"}])
    assert pair(conv) == [("user", "Do"), ("assistant", "x")]


def test_guanaco_style_markers_split_mid_line(tmp_path):
    text = "### Human: What is 1+1?### Assistant: 2.### Human: Sure?### Assistant: Yes."
    (conv,) = read_conversations(write(tmp_path, "g.jsonl", [{"text": text}]))
    assert pair(conv) == [("user", "What is 1+1?"), ("assistant", "2."), ("user", "Sure?"),
                          ("assistant", "Yes.")]


def test_oasst_node_as_the_record_itself(tmp_path):
    (conv,) = read_conversations(write(tmp_path, "o.jsonl", [OASST_TREE["prompt"]]))
    assert pair(conv)[:2] == [("user", "What is 2+2?"), ("assistant", "4")]


def test_format_can_be_forced(tmp_path):
    path = write(tmp_path, "d.jsonl", [{"text": "Human: hi\nAssistant: yo"}])
    assert pair(read_conversations(path)[0]) == [("user", "hi"), ("assistant", "yo")]
    forced = read_conversations(path, format="text")[0]
    assert forced.plain and forced.turns[0].content == "Human: hi\nAssistant: yo"


def test_json_list_single_object_and_json_lines_named_json(tmp_path):
    records = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    listed = read_conversations(write(tmp_path, "l.json", json.dumps(records, indent=2)))
    assert [c.source[1] for c in listed] == [2, 6]
    assert [pair(c) for c in listed] == [[("user", "a"), ("assistant", "b")], [("user", "c"), ("assistant", "d")]]
    assert len(read_conversations(write(tmp_path, "one.json", json.dumps(records[0])))) == 1
    assert len(read_conversations(write(tmp_path, "lines.json", records))) == 2


def test_tiny_text_record_is_all_target(tmp_path):
    (conv,) = read_conversations(write(tmp_path, "t.jsonl", [{"text": "x"}]))
    tok = ByteTokenizer()
    ids, labels = tokenize_segments(prompt_format_for(tok).segments(conv), tok)
    assert ids == [ord("x"), tok.eos_token_id]
    assert labels == [IGNORE_INDEX, tok.eos_token_id]  # the first token is never predicted


def test_csv_columns_by_name_with_header(tmp_path):
    path = write(tmp_path, "d.csv", 'id,answer,question\n1,"Four, of course",What is 2+2?\n'
                                    '2,"multi\nline",Q2\n\n3,A3,Q3\n')
    with pytest.raises(DataError, match=r"d\.csv:1: column 'id' would not be used .*--prompt-field question "
                                        r"--response-field answer$"):
        read_conversations(path)  # an unused column with data is never dropped silently
    convs = read_conversations(path, fields=FieldMap(prompt="question", response="answer"))
    assert [pair(c) for c in convs] == [
        [("user", "What is 2+2?"), ("assistant", "Four, of course")],
        [("user", "Q2"), ("assistant", "multi\nline")],
        [("user", "Q3"), ("assistant", "A3")]]
    assert [c.source[1] for c in convs] == [2, 3, 6]


def test_csv_alpaca_columns_and_text_column(tmp_path):
    (conv,) = read_conversations(write(tmp_path, "a.csv", "instruction,input,output\nDo,this,done\n"))
    assert pair(conv) == [("user", "Do\n\nthis"), ("assistant", "done")]
    (conv,) = read_conversations(write(tmp_path, "t.csv", "text\nhello world\n"))
    assert conv.plain and conv.turns[0].content == "hello world"


def test_tsv_and_headerless_table_is_refused(tmp_path):
    (conv,) = read_conversations(write(tmp_path, "d.tsv", "prompt\tresponse\nhi, you\tyo\n"))
    assert pair(conv) == [("user", "hi, you"), ("assistant", "yo")]
    with pytest.raises(DataError, match=r"n\.csv:1: the first row names no known column \(found: What is up\?, "
                                        r"Not much\); a table needs a header row"):
        read_conversations(write(tmp_path, "n.csv", "What is up?,Not much\nHi,Hello\n"))


def test_xlsx_without_openpyxl_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openpyxl", None)  # import fails even where it is installed
    with pytest.raises(DataError, match=r"^.*d\.xlsx: .*openpyxl \(pip install openpyxl\)"):
        read_conversations(write(tmp_path, "d.xlsx", b"PK"))


def test_xlsx_with_openpyxl(tmp_path):
    openpyxl = pytest.importorskip("openpyxl", reason="openpyxl (optional) is not installed")
    book = openpyxl.Workbook()
    book.active.append(["Question", "Answer"])
    book.active.append(["Q", 42])
    book.active.append([None, None])
    book.active.append(["Q2", "A2"])
    book.save(tmp_path / "d.xlsx")
    convs = read_conversations(tmp_path / "d.xlsx")
    assert [pair(c) for c in convs] == [[("user", "Q"), ("assistant", "42")], [("user", "Q2"), ("assistant", "A2")]]
    assert [c.source[1] for c in convs] == [2, 4]
    book.active.append(["only a question"])
    book.save(tmp_path / "d.xlsx")
    with pytest.raises(DataError, match=r'd\.xlsx: row 5: empty "Answer" cell \(column 2\)$'):
        read_conversations(tmp_path / "d.xlsx")


BAD_INPUTS = [
    ("malformed json line", "data.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "a",\n',
     r'data\.jsonl:2: invalid JSON: '),
    ("missing field", "data.jsonl", [{"prompt": "a", "response": "b"}] * 2 + [{"prompt": "a", "answerx": "b"}],
     r'data\.jsonl:3: missing field "response" \(found: prompt, answerx\)$'),
    ("wrong type", "data.jsonl", [{"prompt": "a", "response": 7}],
     r'data\.jsonl:1: field "response" must be a string, got number$'),
    ("null field", "data.jsonl", [{"question": "a", "answer": None}],
     r'data\.jsonl:1: field "answer" must be a string, got null$'),
    ("record not an object", "data.jsonl", '{"text": "a"}\n["text", "b"]\n',
     r"data\.jsonl:2: expected a JSON object, got list$"),
    ("empty file", "data.jsonl", "\n  \n", r"data\.jsonl: file is empty$"),
    ("empty json list", "data.json", "[ ]", r"data\.json: no records$"),
    ("non-utf8", "data.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
     r"data\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 14\)$"),
    ("malformed json list", "data.json", '[\n  {"text": "a"},\n  {"text": "b"\n  {"text": "c"}\n]',
     r"data\.json:4: invalid JSON"),
    ("missing comma in list", "data.json", '[\n {"text": "a"}\n {"text": "b"}\n]',
     r"data\.json:3: invalid JSON: expected ',' or ']'"),
    ("unknown fields", "data.jsonl", [{"body": "joke", "rating": 3}],
     r"data\.jsonl:1: cannot tell the data format from the fields \(body, rating\)"),
    ("bad role", "data.jsonl", [{"messages": [{"role": "tool", "content": "x"}]}],
     r"data\.jsonl:1: messages\[0\]: unknown role 'tool'"),
    ("no assistant turn", "data.jsonl", [{"messages": [{"role": "user", "content": "x"}]}],
     r"data\.jsonl:1: conversation has no assistant turn"),
    ("empty instances", "data.jsonl", [{"instruction": "x", "instances": []}],
     r'data\.jsonl:1: field "instances" is an empty list$'),
    ("instance without output", "data.jsonl", [{"instruction": "x", "instances": [{"input": ""}]}],
     r'data\.jsonl:1: instances\[0\]: missing field "output" \(found: input\)$'),
    ("csv one column", "data.csv", "question,answer\nq1,a1\nq2\n", r"data\.csv:3: expected 2 columns, got 1$"),
    ("csv headerless one column", "data.csv", "just one\n", r"data\.csv:1: the first row names no known column"),
    ("csv no answer column", "data.csv", "question,notes\nq,n\n",
     r"data\.csv:1: no answer/response/output column in the header \(found: question, notes\); name yours with "
     r"--response-field NAME$"),
    ("csv empty answer", "data.csv", "question,answer\nq1,a1\nq2,\n", r'data\.csv:3: empty "answer" cell \(column 2\)$'),
    ("csv header only", "data.csv", "question,answer\n", r"data\.csv:1: header row but no data rows$"),
    ("csv non-utf8", "data.csv", b"question,answer\nq,a\nq\xff,a\n", r"data\.csv:3: not valid UTF-8"),
]


@pytest.mark.parametrize("name,content,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gives_one_line_with_file_and_line(tmp_path, name, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as info:
        read_conversations(path)
    text = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in text
    assert text.startswith(str(path))
    assert re.search(message, text), text


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: cannot read file"):
        read_conversations(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"unknown format 'alpacca'"):
        read_conversations(write(tmp_path, "d.jsonl", [{"text": "a"}]), format="alpacca")


# --------------------------------------------------------------------------- real datasets

def dataset(relative):
    path = DATASETS / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent (real datasets live in ../shared/datasets)")
    return path


def test_real_alpaca_json_parses():
    convs = read_conversations(dataset("llamafactory-alpaca-en-demo/alpaca_en_demo.json"))
    assert len(convs) == 999
    assert pair(convs[0])[0] == ("user", "Describe a process of making crepes.")
    assert convs[0].turns[1].content.startswith("Making crepes is an easy and delicious process!")
    assert convs[0].source[1] == 2
    assert all(len(c.turns) == 2 and c.turns[1].role == "assistant" for c in convs)


def test_real_joke_json_parses_setup_as_prompt():
    convs = read_conversations(dataset("official-joke-api/index.json"))
    assert len(convs) == 451
    assert pair(convs[0]) == [("user", "What did the fish say when it hit the wall?"), ("assistant", "Dam.")]


def test_real_seed_tasks_jsonl_uses_first_instance():
    convs = read_conversations(dataset("stanford-alpaca-seed-tasks/seed_tasks.jsonl"))
    assert len(convs) == 175
    assert pair(convs[1]) == [
        ("user", "What is the relation between the given pairs?\n\nNight : Day :: Right : Left"),
        ("assistant", "The relation between the given pairs is that they are opposites.")]
    assert convs[174].source[1] == 175


def test_real_taivop_jokes_need_a_mapping():
    with pytest.raises(DataError, match=r"stupidstuff\.json:2: cannot tell the data format .*\(body, category, id, rating\)"):
        read_conversations(dataset("taivop-joke-dataset/stupidstuff.json"))


# =========================================================================== prompts

def test_instruct_format_single_turn():
    fmt = prompt_format_for(ByteTokenizer())
    assert fmt.name == "instruct"
    segs = fmt.segments(Conversation.from_pair("What is 2+2?", "4."))
    assert segs == [Segment("Instruct: What is 2+2?\nOutput:", False), Segment(" 4.", True), EOS]
    assert fmt.format_prompt_for_generation("What is 2+2?") == "Instruct: What is 2+2?\nOutput:"


def test_instruct_format_multi_turn_with_system_falls_back_per_turn():
    fmt = prompt_format_for(ByteTokenizer())  # no chat template: never an error
    conv = Conversation((Turn("system", "Be brief."), Turn("user", "A?"), Turn("assistant", "a."),
                         Turn("user", "B?"), Turn("assistant", "b."), Turn("user", "unanswered")))
    segs = fmt.segments(conv)
    assert segs == [Segment("Be brief.\nInstruct: A?\nOutput:", False), Segment(" a.", True),
                    Segment("\nInstruct: B?\nOutput:", False), Segment(" b.", True), EOS]
    history = [m for m in conv.messages()[:5]] + [{"role": "user", "content": "C?"}]
    assert fmt.format_prompt_for_generation(history) == (
        "Be brief.\nInstruct: A?\nOutput: a.\nInstruct: B?\nOutput: b.\nInstruct: C?\nOutput:")


def test_custom_template_and_placeholders():
    fmt = prompt_format_for(ByteTokenizer(), template="### Question: {prompt}\n### Answer: {response}")
    segs = fmt.segments(Conversation.from_pair("Use {braces}?", "Yes {response}"))
    assert segs == [Segment("### Question: Use {braces}?\n### Answer:", False),
                    Segment(" Yes {response}", True), EOS]
    sys_fmt = TemplateFormat("<{system}> Q: {prompt} A: {response}</s>")
    segs = sys_fmt.segments(Conversation.from_pair("q", "a", system="S"))
    assert segs == [Segment("<S> Q: q A:", False), Segment(" a</s>", True), EOS]
    assert sys_fmt.format_prompt_for_generation("q", system="S") == "<S> Q: q A:"
    for bad in ("{prompt} only", "{response} before {prompt}", "{prompt} {response} {prompt}"):
        with pytest.raises(ValueError, match="template"):
            TemplateFormat(bad)
    with pytest.raises(ValueError, match="unknown prompt format"):
        prompt_format_for(ByteTokenizer(), template="alpaca")


def test_prompt_format_choice():
    chat_tok = ByteTokenizer(chat_template=PHI35_LIKE_TEMPLATE)
    assert isinstance(prompt_format_for(chat_tok), ChatTemplateFormat)
    assert prompt_format_for(chat_tok, template="instruct").name == "instruct"
    with pytest.raises(ValueError, match="has none"):
        prompt_format_for(ByteTokenizer(), template="chat")


def test_chat_template_targets_are_contents_plus_end_marker():
    tok = ByteTokenizer(chat_template=PHI35_LIKE_TEMPLATE)
    fmt = prompt_format_for(tok)
    conv = Conversation((Turn("system", "S"), Turn("user", "Q1"), Turn("assistant", "A1"),
                         Turn("user", "Q2"), Turn("assistant", "A2")))
    segs = fmt.segments(conv)
    assert [s.text for s in segs if s.is_target] == ["A1<|end|>", "A2<|end|>"]
    assert "".join(s.text for s in segs) == tok.apply_chat_template(conv.messages())
    ids, labels = tokenize_segments(segs, tok)
    assert target_texts(tok, ids, labels) == ["A1<|end|>", "A2<|end|>"]
    # the generation prompt is exactly the training text before the first target
    prompt = fmt.format_prompt_for_generation(conv.messages()[:2])
    assert prompt == segs[0].text == "<|system|>\nS<|end|>\n<|user|>\nQ1<|end|>\n<|assistant|>\n"


def test_chat_template_without_end_marker_gets_eos_after_last_reply():
    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    tok = ByteTokenizer(chat_template=template)
    segs = prompt_format_for(tok).segments(Conversation.from_pair("hi", "yo"))
    assert segs == [Segment("user: hi\nassistant:", False), Segment(" yo", True), EOS, Segment("\n", False)]


def test_plain_text_is_all_target_in_every_format():
    conv = Conversation.from_text("Once upon a time.")
    for tok in (ByteTokenizer(), ByteTokenizer(chat_template=PHI35_LIKE_TEMPLATE)):
        assert prompt_format_for(tok).segments(conv) == [Segment("Once upon a time.", True), EOS]


# =========================================================================== tokenising

def test_labels_mask_the_prompt_and_eos_is_a_target():
    tok = ByteTokenizer()
    ids, labels = tokenize_segments([Segment("Q:", False), Segment(" A", True), EOS], tok)
    assert ids == list(b"Q: A") + [tok.eos_token_id]
    assert labels == [IGNORE_INDEX] * 2 + list(b" A") + [tok.eos_token_id]
    ids2, labels2 = tokenize_segments([Segment("Q:", False), Segment(" A", True), EOS], tok,
                                      train_on_prompt=True)
    assert ids2 == ids and labels2 == [IGNORE_INDEX] + ids[1:]


def test_bos_follows_the_tokenizer_and_is_never_doubled():
    tok = ByteTokenizer(add_bos=True)
    assert bos_ids(tok) == [tok.bos_token_id] and bos_ids(ByteTokenizer()) == []
    ids, labels = tokenize_segments([Segment("Q", False), Segment("A", True), EOS], tok)
    assert ids[0] == tok.bos_token_id and labels[:2] == [IGNORE_INDEX] * 2
    ids, _ = tokenize_segments([Segment("<s>Q", False), Segment("A", True)], tok)
    assert ids.count(tok.bos_token_id) == 1
    assert encode_prompt(tok, "Q") == [tok.bos_token_id, ord("Q")]


def test_boundary_inside_a_merged_token_uses_the_whole_text_tokenisation():
    tok = ByteTokenizer(merges={(ord(":"), ord(" ")): 300})  # ": " is one token
    ids, labels = tokenize_segments([Segment("Q:", False), Segment(" A", True)], tok)
    assert ids == [ord("Q"), 300, ord("A")]  # what the whole string encodes to
    assert labels == [IGNORE_INDEX, 300, ord("A")]  # the merged token straddling the boundary is a target


def test_truncation_and_rows_without_targets_are_counted():
    tok = ByteTokenizer()
    fmt = prompt_format_for(tok)
    convs = [Conversation.from_pair("short", "ok"),  # 27 tokens
             Conversation.from_pair("a much longer question " * 3, "answer"),  # prompt > 30
             Conversation.from_pair("mid", "a fairly long answer")]  # 21 + 22: cut inside the answer
    examples, stats = tokenize_dataset(convs, fmt, tok, max_length=30)
    assert (stats.total, stats.kept, stats.truncated, stats.dropped_no_target) == (3, 2, 2, 1)
    assert all(len(e) <= 30 for e in examples)
    assert examples[0].input_ids[-1] == tok.eos_token_id and examples[0].labels[-1] == tok.eos_token_id
    assert len(examples[1]) == 30 and examples[1].labels[-1] != IGNORE_INDEX
    assert stats.target_tokens == sum(e.num_targets for e in examples)
    assert "2 truncated, 1 dropped" in stats.summary()


def test_split_is_reproducible_from_the_seed():
    items = list(range(100))
    train, val = split_train_val(items, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train + val) == items and train == sorted(train)
    assert split_train_val(items, 0.1, seed=3) == (train, val)
    assert split_train_val(items, 0.1, seed=4)[1] != val
    assert split_train_val(items, 0.0, seed=3) == (items, [])
    assert len(split_train_val(items[:5], 0.01, seed=0)[1]) == 1
    with pytest.raises(ValueError):
        split_train_val(items[:1], 0.5, seed=0)


# =========================================================================== batches

def make_examples(lengths, first_target=1):
    return [Example(list(range(10, 10 + n)), [IGNORE_INDEX] * first_target + list(range(10 + first_target, 10 + n)))
            for n in lengths]


def test_collate_pads_right_and_masks_padding_by_position():
    tok = ByteTokenizer()  # pad id == eos id, like Phi-2
    a = Example([1, 2, tok.eos_token_id], [IGNORE_INDEX, 2, tok.eos_token_id])
    b = Example([5, 6, 7, 8, tok.eos_token_id], [IGNORE_INDEX, IGNORE_INDEX, 7, 8, tok.eos_token_id])
    batch = collate([a, b], pad_id=tok.pad_token_id)
    assert batch.input_ids.tolist() == [[1, 2, 256, 256, 256], [5, 6, 7, 8, 256]]
    assert batch.labels.tolist() == [[-100, 2, 256, -100, -100], [-100, -100, 7, 8, 256]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.position_ids.tolist() == [list(range(5))] * 2
    assert (batch.num_target_tokens, batch.num_tokens) == (5, 8)
    assert batch.input_ids.dtype == batch.labels.dtype == batch.position_ids.dtype == torch.long
    assert collate([a], 0, pad_to_multiple_of=8).input_ids.shape == (1, 8)
    assert batch.to("cpu").labels.equal(batch.labels)


def test_packing_first_fit_never_exceeds_max_length():
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(500)]
    rows = pack_examples(lengths, 64, seed=1)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    # the same as naive first-fit over the same seeded order
    order = list(range(500))
    random.Random(1).shuffle(order)
    naive, free = [], []
    for i in order:
        r = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if r is None:
            naive.append([]), free.append(64)
            r = len(naive) - 1
        naive[r].append(i)
        free[r] -= lengths[i]
    assert rows == naive
    assert len(rows) < 0.6 * len(lengths)
    with pytest.raises(ValueError, match="more than max_length"):
        pack_examples([10, 70], 64)


def test_packed_batch_restarts_positions_and_masks_block_diagonal_causal():
    ex = make_examples([3, 2, 4])
    batch = collate_packed([[ex[0], ex[1]], [ex[2]]], pad_id=0)
    T = 5
    assert batch.input_ids.shape == batch.labels.shape == batch.position_ids.shape == (2, T)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    segment = [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]]
    assert batch.document_ids.tolist() == segment
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]  # real tokens; no T x T tensor
    dense = batch.dense_attention_mask()
    assert dense.shape == (2, 1, T, T) and dense.dtype == torch.bool
    for b in range(2):
        for q in range(T):
            for k in range(T):
                if segment[b][q] < 0:  # padding query: itself only, so softmax stays finite
                    expected = q == k
                else:  # same example and key <= query; padding keys never
                    expected = segment[b][k] == segment[b][q] and k <= q
                assert bool(dense[b, 0, q, k]) == expected, (b, q, k)
    inputs = batch.model_inputs()
    assert inputs["document_ids"] is batch.document_ids and inputs["position_ids"] is batch.position_ids
    # each example's first label is -100: no example learns to predict the next one
    assert batch.labels.tolist() == [[-100, 11, 12, -100, 11], [-100, 11, 12, 13, -100]]
    assert batch.num_target_tokens == 6 and batch.num_tokens == 9


def padded_tokens(batches, lengths):
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_length_grouping_reduces_padding_and_order_is_reproducible():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    grouped = batches_for_epoch(lengths, 8, seed=0, epoch=0)
    plain = batches_for_epoch(lengths, 8, seed=0, epoch=0, group_by_length=False)
    for batches in (grouped, plain):
        assert sorted(i for b in batches for i in b) == list(range(1000))
    assert padded_tokens(grouped, lengths) < 0.7 * padded_tokens(plain, lengths)
    assert grouped == batches_for_epoch(lengths, 8, seed=0, epoch=0)
    assert grouped != batches_for_epoch(lengths, 8, seed=0, epoch=1)
    assert grouped != batches_for_epoch(lengths, 8, seed=1, epoch=0)
    assert all(len(b) == 8 for b in batches_for_epoch(lengths[:999], 8, 0, 0, drop_last=True))
    assert batches_for_epoch(lengths[:5], 2, 0, 0, shuffle=False, group_by_length=False) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("pack", [False, True])
def test_batch_plan_is_resumable(pack):
    rng = random.Random(0)
    examples = make_examples([rng.randint(2, 40) for _ in range(50)])
    plan = BatchPlan(examples, batch_size=4, pad_id=0, seed=7, pack=pack, max_length=64)
    assert len(plan) == len(plan.batch_rows(0)) == len(plan.batch_rows(3))
    full = list(plan.batches(epoch=2))
    resumed = list(plan.batches(epoch=2, start=3))
    assert len(full) == len(plan) and len(resumed) == len(plan) - 3
    for a, b in zip(full[3:], resumed):
        assert a.input_ids.equal(b.input_ids) and a.labels.equal(b.labels)
    seen = sorted(i for batch in plan.batch_rows(1) for row in batch for i in row)
    assert seen == list(range(50))
    if pack:
        assert all(b.input_ids.shape[1] <= 64 and b.document_ids is not None for b in full)
    else:
        assert all(b.document_ids is None and "document_ids" not in b.model_inputs() for b in full)


# =========================================================================== end to end

def test_real_alpaca_through_the_pipeline():
    convs = read_conversations(dataset("llamafactory-alpaca-en-demo/alpaca_en_demo.json"))[:200]
    tok = ByteTokenizer()
    train, val = split_train_val(convs, 0.1, seed=0)
    examples, stats = tokenize_dataset(train, prompt_format_for(tok), tok, max_length=256)
    assert stats.total == 180 and stats.truncated > 0 and stats.kept == len(examples)
    batch = next(BatchPlan(examples, 4, tok.pad_token_id, pack=True, max_length=256).batches(0))
    assert batch.input_ids.shape[1] <= 256 and batch.num_target_tokens > 0


def test_phi35_chat_template_targets_with_phicore_tokenizer():
    tok = real_tokenizer("phi-3.5-mini-instruct")
    fmt = prompt_format_for(tok)
    assert isinstance(fmt, ChatTemplateFormat)
    conv = Conversation((Turn("system", "Be brief."), Turn("user", "Capital of France?"),
                         Turn("assistant", "Paris."), Turn("user", "And Italy?"), Turn("assistant", "Rome.")))
    ids, labels = tokenize_segments(fmt.segments(conv), tok)
    assert ids == tok.encode(tok.apply_chat_template(conv.messages()), add_special_tokens=False)
    end = tok.encode("<|end|>", add_special_tokens=False)
    assert end == [32007]
    targets = [[i for i, l in zip(ids, labels) if l != IGNORE_INDEX]]
    expected = tok.encode("Paris.", add_special_tokens=False) + end + tok.encode("Rome.", add_special_tokens=False) + end
    assert targets[0] == expected
    assert target_texts(tok, ids, labels) == ["Paris.<|end|>", "Rome.<|end|>"]
    # inference feeds exactly the training prompt tokens
    prompt_ids = encode_prompt(tok, fmt.format_prompt_for_generation(conv.messages()[:2]))
    assert ids[:len(prompt_ids)] == prompt_ids and labels[len(prompt_ids)] != IGNORE_INDEX


def test_phi3_mini_template_writes_bos_once():
    tok = real_tokenizer("phi-3-mini-4k-instruct")
    ids, labels = tokenize_segments(prompt_format_for(tok).segments(Conversation.from_pair("Hi", "Hello.")), tok)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert target_texts(tok, ids, labels) == ["Hello.<|end|>"]


def test_phi2_instruct_format_with_phicore_tokenizer():
    tok = real_tokenizer("phi-2")
    fmt = prompt_format_for(tok)
    assert fmt.name == "instruct"
    convs = read_conversations(dataset("official-joke-api/index.json"))
    examples, stats = tokenize_dataset(convs, fmt, tok, max_length=128)
    assert stats.kept == 451 and stats.truncated == 0
    first = examples[0]
    assert first.input_ids[-1] == first.labels[-1] == 50256  # EOS (= pad) is a target
    assert tok.decode([i for i, l in zip(first.input_ids, first.labels) if l != IGNORE_INDEX]) == " Dam.<|endoftext|>"
    prompt_ids = encode_prompt(tok, fmt.format_prompt_for_generation(convs[0].turns[0].content))
    assert first.input_ids[:len(prompt_ids)] == prompt_ids
    assert all(l == IGNORE_INDEX for l in first.labels[:len(prompt_ids)])


def test_a_record_the_format_cannot_render_is_a_data_error_with_its_source():
    tok = ByteTokenizer()
    conv = Conversation((Turn("user", "only a question"),), ("d.jsonl", 4))
    with pytest.raises(DataError, match=r"^d\.jsonl:4: conversation has no assistant turn"):
        tokenize_dataset([conv], prompt_format_for(tok), tok, max_length=64)
