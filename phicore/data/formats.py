"""Record formats: one JSON object (a record) becomes one normalised `Conversation`.

A `Conversation` is a tuple of `Turn(role, content)` with role "system", "user" or "assistant",
plus `source = (path, line)` for error messages. A `{text}` record becomes a *plain*
conversation (`plain=True`, one assistant turn): no prompt, the whole text is the training target.
Files are read into records by `phicore.data.files` (JSON, JSON Lines) and `phicore.data.tables`
(CSV/TSV/XLSX); this module only knows what a record's fields mean.

Record formats (detected from the first record's fields; `format=` forces one):

| format            | fields                                                              |
|-------------------|---------------------------------------------------------------------|
| `prompt_response` | `{prompt, response}`                                                |
| `question_answer` | `{question, answer}`                                                |
| `alpaca`          | `{instruction, input?, output}`: a non-empty input is appended to the instruction after a blank line |
| `self_instruct`   | `{instruction, instances: [{input, output}, ...]}` (Stanford Alpaca seed tasks): `instances[0]` is used, like `alpaca` |
| `joke`            | `{setup, punchline}` (official-joke-api): setup is the prompt, punchline the response |
| `text`            | `{text}`: plain SFT, all target                                     |
| `human_assistant` | `{text}` holding "Human: ... Assistant: ..." (also "### Human: ... ### Assistant: ..."), split into turns; detected when the first record's text starts with such a marker |
| `messages`        | `{messages: [{role, content}, ...]}` (roles system/user/assistant; human/gpt aliases accepted) |
| `sharegpt`        | `{conversations: [{from, value}, ...]}` (from: system/human/gpt)   |
| `oasst`           | an OpenAssistant message tree: `{text, role, replies}` nodes (role prompter/assistant), either the record itself or under its `prompt` key (the oasst "trees" export). One path is taken: at each node the reply with the lowest `rank` (rank 0 is the best; unranked replies come after ranked ones; ties keep file order), skipping replies marked `deleted`. |

A `FieldMap` (`--prompt-field`, `--response-field`, `--text-field`) replaces detection: the
named keys are the prompt and the response (a side left out is found by its known name), or
the text of a plain record; other keys are ignored, as in every format.

A response (every assistant turn) that is empty or only whitespace is an error, in every
format: there is nothing to train on, and it is most often a broken row.

Any problem raises `DataError` (a `ValueError`) with a one-line message that names the file and
the line (or row), e.g. `data.jsonl:17: missing field "response" (found: prompt, answerx)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

ROLES = ("system", "user", "assistant")

# Role spellings seen in the wild -> our three roles.
_ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "chatgpt": "assistant",
}


class DataError(ValueError):
    """A data file cannot be used; the message is one line naming the file and the line."""


# Field (JSON key, table column) names that hold a prompt or a response, in order of preference.
PROMPT_FIELDS = ("question", "prompt", "instruction", "query", "input", "setup")
RESPONSE_FIELDS = ("answer", "response", "output", "completion", "punchline")
MAPPING_FLAGS = "--prompt-field NAME --response-field NAME (or --text-field NAME)"


@dataclass(frozen=True)
class FieldMap:
    """Which field of a record (a JSON key, a table column) holds the prompt, the response or
    the whole text: `--prompt-field`, `--response-field`, `--text-field`. A side left as None
    is found by its known names (`PROMPT_FIELDS`, `RESPONSE_FIELDS`); `text` alone makes plain
    records. Fields the mapping does not use are ignored: the mapping says which ones count."""

    prompt: Optional[str] = None
    response: Optional[str] = None
    text: Optional[str] = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.prompt, self.response, self.text))

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "response": self.response, "text": self.text}

    def check(self, name: str, format: Optional[str] = None) -> None:
        """Raise `DataError` naming `name` when the mapping contradicts itself or `format`."""
        for flag, value in (("--prompt-field", self.prompt), ("--response-field", self.response),
                            ("--text-field", self.text)):
            if value is not None and not value.strip():
                raise DataError(f"{name}: {flag} is empty (give a column or key name)")
        if self.prompt is not None and self.prompt == self.response:
            raise DataError(f"{name}: --prompt-field and --response-field both name {self.prompt!r}")
        if self.text is not None and (self.prompt is not None or self.response is not None):
            raise DataError(f"{name}: --text-field (the whole text is the target) cannot be combined with "
                            "--prompt-field/--response-field")
        if self and format is not None:
            raise DataError(f"{name}: --format {format} cannot be combined with --prompt-field/--response-field/"
                            "--text-field (the mapping already says which fields are read)")


@dataclass(frozen=True)
class Turn:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Conversation:
    """One training record: turns in order, where it came from, and whether it is plain text."""

    turns: tuple[Turn, ...]
    source: tuple[str, int] = ("<memory>", 0)  # (path, line); row number for tables
    plain: bool = False  # a `{text}` record: no prompt, the whole text is the target

    def messages(self) -> list[dict]:
        """The turns as `[{"role", "content"}]` dicts, the shape chat templates expect."""
        return [{"role": t.role, "content": t.content} for t in self.turns]

    @staticmethod
    def from_pair(prompt: str, response: str, system: Optional[str] = None,
                  source: tuple[str, int] = ("<memory>", 0)) -> "Conversation":
        turns = [Turn("system", system)] if system else []
        return Conversation(tuple(turns + [Turn("user", prompt), Turn("assistant", response)]), source)

    @staticmethod
    def from_text(text: str, source: tuple[str, int] = ("<memory>", 0)) -> "Conversation":
        return Conversation((Turn("assistant", text),), source, plain=True)


# --------------------------------------------------------------------------- record parsers
# Each parser turns one JSON object into turns (or a plain text); `where` prefixes errors.

class Where:
    """Where a record came from: `label` prefixes error messages ("data.jsonl:17")."""

    def __init__(self, path: str, line: int, label: Optional[str] = None):
        self.source = (path, line)
        self.label = label or f"{path}:{line}"

    def error(self, message: str) -> DataError:
        return DataError(f"{self.label}: {message}")


def _fields(record: dict) -> str:
    return ", ".join(str(k) for k in record) or "no fields"


def json_type_name(value: Any) -> str:
    """The JSON name of a value's type ("object", "list", ...), for error messages."""
    return {dict: "object", list: "list", str: "string", bool: "boolean",
            int: "number", float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _get_str(record: dict, key: str, where: Where, optional: bool = False) -> str:
    if key not in record:
        if optional:
            return ""
        raise where.error(f'missing field "{key}" (found: {_fields(record)})')
    value = record[key]
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise where.error(f'field "{key}" must be a string, got {json_type_name(value)}')
    return value


def _get_list(record: dict, key: str, where: Where) -> list:
    if key not in record:
        raise where.error(f'missing field "{key}" (found: {_fields(record)})')
    value = record[key]
    if not isinstance(value, list):
        raise where.error(f'field "{key}" must be a list, got {json_type_name(value)}')
    if not value:
        raise where.error(f'field "{key}" is an empty list')
    return value


def _pair(prompt: str, response: str, where: Where, field: str) -> Conversation:
    if not response.strip():
        raise where.error(f'field "{field}" is empty (a response to train on is needed)')
    return Conversation((Turn("user", prompt), Turn("assistant", response)), where.source)


def join_instruction_input(instruction: str, extra: str) -> str:
    """alpaca's prompt: a non-blank input goes after the instruction, after a blank line."""
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _parse_prompt_response(r: dict, where: Where) -> Conversation:
    return _pair(_get_str(r, "prompt", where), _get_str(r, "response", where), where, "response")


def _parse_question_answer(r: dict, where: Where) -> Conversation:
    return _pair(_get_str(r, "question", where), _get_str(r, "answer", where), where, "answer")


def _parse_joke(r: dict, where: Where) -> Conversation:
    return _pair(_get_str(r, "setup", where), _get_str(r, "punchline", where), where, "punchline")


def _parse_alpaca(r: dict, where: Where) -> Conversation:
    instruction = _get_str(r, "instruction", where)
    extra = _get_str(r, "input", where, optional=True)
    return _pair(join_instruction_input(instruction, extra), _get_str(r, "output", where), where, "output")


def _parse_self_instruct(r: dict, where: Where) -> Conversation:
    instruction = _get_str(r, "instruction", where)
    first = _get_list(r, "instances", where)[0]
    if not isinstance(first, dict):
        raise where.error(f'instances[0] must be an object, got {json_type_name(first)}')
    inner = Where(*where.source, label=f"{where.label}: instances[0]")
    extra = _get_str(first, "input", inner, optional=True)
    return _pair(join_instruction_input(instruction, extra), _get_str(first, "output", inner), inner, "output")


def _parse_text(r: dict, where: Where) -> Conversation:
    text = _get_str(r, "text", where)
    if not text.strip():
        raise where.error('field "text" is empty')
    return Conversation.from_text(text, where.source)


def _turns_from_list(items: list, key_role: str, key_content: str, field: str,
                     where: Where) -> tuple[Turn, ...]:
    turns = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise where.error(f'{field}[{i}] must be an object, got {json_type_name(item)}')
        for key in (key_role, key_content):
            if key not in item:
                raise where.error(f'{field}[{i}]: missing field "{key}" (found: {_fields(item)})')
        role, content = item[key_role], item[key_content]
        if not isinstance(role, str) or role.lower() not in _ROLE_ALIASES:
            raise where.error(f'{field}[{i}]: unknown role {role!r} (expected one of: '
                              f'{", ".join(sorted(_ROLE_ALIASES))})')
        if not isinstance(content, str):
            raise where.error(f'{field}[{i}].{key_content} must be a string, got {json_type_name(content)}')
        turn = Turn(_ROLE_ALIASES[role.lower()], content)
        if turn.role == "assistant" and not content.strip():
            raise where.error(f'{field}[{i}]: empty assistant "{key_content}" (a response to train on is needed)')
        turns.append(turn)
    return tuple(turns)


def _parse_messages(r: dict, where: Where) -> Conversation:
    turns = _turns_from_list(_get_list(r, "messages", where), "role", "content", "messages", where)
    return _checked(Conversation(turns, where.source), where)


def _parse_sharegpt(r: dict, where: Where) -> Conversation:
    items = _get_list(r, "conversations", where)
    turns = _turns_from_list(items, "from", "value", "conversations", where)
    return _checked(Conversation(turns, where.source), where)


def _oasst_root(r: dict) -> Optional[dict]:
    if isinstance(r.get("prompt"), dict) and "replies" in r["prompt"]:
        return r["prompt"]
    if "replies" in r and "text" in r:
        return r
    return None


def _best_reply(replies: list) -> Optional[dict]:
    """The highest-ranked live reply: lowest `rank` first, unranked last, ties in file order."""
    live = [m for m in replies if isinstance(m, dict) and not m.get("deleted", False)]
    if not live:
        return None

    def key(item):
        pos, m = item
        rank = m.get("rank")
        return (rank is None, rank if isinstance(rank, (int, float)) else 0, pos)

    return min(enumerate(live), key=key)[1]


def _parse_oasst(r: dict, where: Where) -> Conversation:
    node = _oasst_root(r)
    if node is None:
        raise where.error(f'not an OpenAssistant message tree: need "text" and "replies", '
                          f'or a "prompt" object holding them (found: {_fields(r)})')
    turns, depth = [], 0
    while node is not None:
        label = "message" if depth == 0 else f"reply at depth {depth}"
        text, role = node.get("text"), node.get("role")
        if not isinstance(text, str):
            raise where.error(f'{label}: field "text" must be a string, got {json_type_name(text)}')
        if role not in ("prompter", "assistant", "user", "system"):
            raise where.error(f'{label}: unknown role {role!r} (expected prompter or assistant)')
        turns.append(Turn(_ROLE_ALIASES[role], text))
        if turns[-1].role == "assistant" and not text.strip():
            raise where.error(f'{label}: empty assistant "text" (a response to train on is needed)')
        replies = node.get("replies") or []
        if not isinstance(replies, list):
            raise where.error(f'{label}: field "replies" must be a list, got {json_type_name(replies)}')
        node, depth = _best_reply(replies), depth + 1
    # a path may end on a prompter message with no answer: drop unanswered trailing turns
    while turns and turns[-1].role != "assistant":
        turns.pop()
    return _checked(Conversation(tuple(turns), where.source), where)


_MARKER = re.compile(r"(?:###[ \t]*|(?:^|(?<=\n))[ \t]*)(Human|Assistant|System)[ \t]*:[ \t]?",
                     re.IGNORECASE)


def split_human_assistant(text: str) -> list[Turn]:
    """Split "Human: ... Assistant: ..." (or "### Human: ... ### Assistant: ...") into turns.

    A marker counts at the start of a line, or anywhere after "###". Text before the first
    marker, if any, becomes a system turn. Contents are stripped of surrounding whitespace.
    """
    marks = list(_MARKER.finditer(text))
    turns = []
    lead = text[: marks[0].start()].strip() if marks else ""
    if lead:
        turns.append(Turn("system", lead))
    for m, nxt in zip(marks, marks[1:] + [None]):
        end = nxt.start() if nxt else len(text)
        turns.append(Turn(_ROLE_ALIASES[m.group(1).lower()], text[m.end():end].strip()))
    return turns


def _parse_human_assistant(r: dict, where: Where) -> Conversation:
    text = _get_str(r, "text", where)
    turns = split_human_assistant(text)
    if not any(t.role == "assistant" for t in turns):
        raise where.error('no "Assistant:" turn found in field "text"')
    empty = next((i for i, t in enumerate(turns) if t.role == "assistant" and not t.content), None)
    if empty is not None:
        raise where.error(f'field "text": turn {empty + 1} is an empty "Assistant:" turn '
                          "(a response to train on is needed)")
    return _checked(Conversation(tuple(turns), where.source), where)


def _checked(conv: Conversation, where: Where) -> Conversation:
    if not any(t.role == "assistant" for t in conv.turns):
        raise where.error("conversation has no assistant turn (nothing to train on)")
    return conv


PARSERS: dict[str, Callable[[dict, Where], Conversation]] = {
    "prompt_response": _parse_prompt_response,
    "question_answer": _parse_question_answer,
    "alpaca": _parse_alpaca,
    "self_instruct": _parse_self_instruct,
    "joke": _parse_joke,
    "text": _parse_text,
    "human_assistant": _parse_human_assistant,
    "messages": _parse_messages,
    "sharegpt": _parse_sharegpt,
    "oasst": _parse_oasst,
}
FORMATS = tuple(PARSERS)


def detect_format(record: Any) -> Optional[str]:
    """The record format that the fields of `record` suggest, or None."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if _oasst_root(record) is not None:
        return "oasst"
    if {"instruction", "instances"} <= keys:
        return "self_instruct"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "response"} <= keys:
        return "prompt_response"
    if {"question", "answer"} <= keys:
        return "question_answer"
    if {"setup", "punchline"} <= keys:
        return "joke"
    if "text" in keys:
        text = record["text"]
        if isinstance(text, str) and _MARKER.match(text.lstrip()):
            return "human_assistant"
        return "text"
    return None


def _known_field(record: dict, known: Sequence[str], flag: str, side: str, where: Where) -> str:
    key = next((k for k in known if k in record), None)
    if key is None:
        raise where.error(f"no {side} field ({'/'.join(known)}): name yours with {flag} NAME "
                          f"(found: {_fields(record)})")
    return key


def mapped_parser(fields: FieldMap) -> Callable[[dict, Where], Conversation]:
    """The parser for records read through a field mapping (see `FieldMap`): the mapped keys,
    and for a side the mapping leaves out, the first known name the record has (a known
    `instruction` prompt takes an `input` with it, as in `alpaca`)."""

    def parse(r: dict, where: Where) -> Conversation:
        if fields.text is not None:
            text = _get_str(r, fields.text, where)
            if not text.strip():
                raise where.error(f'field "{fields.text}" is empty')
            return Conversation.from_text(text, where.source)
        prompt_key = fields.prompt or _known_field(r, PROMPT_FIELDS, "--prompt-field", "prompt", where)
        response_key = fields.response or _known_field(r, RESPONSE_FIELDS, "--response-field", "response", where)
        if prompt_key == response_key:
            raise where.error(f'field "{prompt_key}" would be both the prompt and the response; name the other '
                              "with --prompt-field/--response-field")
        prompt = _get_str(r, prompt_key, where)
        if fields.prompt is None and prompt_key == "instruction":
            prompt = join_instruction_input(prompt, _get_str(r, "input", where, optional=True))
        return _pair(prompt, _get_str(r, response_key, where), where, response_key)

    return parse


def record_parser(first: Any, where: Where, fmt: Optional[str] = None,
                  fields: Optional[FieldMap] = None) -> Callable[[dict, Where], Conversation]:
    """The parser for a file's records: the mapping's, the forced format's, or the format the
    first record's fields suggest (`where`: that record's place, for the error)."""
    if fields:
        return mapped_parser(fields)
    fmt = fmt or detect_format(first)
    if fmt is None:
        raise undetected_format(first, where)
    return PARSERS[fmt]


def undetected_format(record: Any, where: Where) -> DataError:
    """The error for a first record whose fields match no format."""
    if not isinstance(record, dict):
        return where.error(f"expected a JSON object, got {json_type_name(record)}")
    return where.error(
        f"cannot tell the data format from the fields ({_fields(record)}); expected "
        "prompt/response, question/answer, instruction/input/output, text, messages, "
        "conversations, setup/punchline or an OpenAssistant tree; force one with --format, or map "
        f"your fields with {MAPPING_FLAGS}")


def check_format(format: Optional[str], name: str, fields: Optional[FieldMap] = None) -> None:
    """Raise `DataError` naming `name` unless `format` is None (detect) or one of `FORMATS`,
    and `fields` (if any) is a mapping that can be used with it."""
    if format is not None and format not in PARSERS:
        raise DataError(f"{name}: unknown format {format!r} (known: {', '.join(FORMATS)})")
    if fields is not None:
        fields.check(name, format)


# --------------------------------------------------------------------------- many records

def parse_records(records: list[tuple[Any, int]], path: str, fmt: Optional[str],
                  fields: Optional[FieldMap] = None) -> list[Conversation]:
    """(record, line) pairs -> conversations, in one format: the mapping's, `fmt`, or the first
    record's."""
    if not records:
        raise DataError(f"{path}: no records")
    first, line = records[0]
    parser = record_parser(first, Where(path, line), fmt, fields)
    out = []
    for record, line in records:
        where = Where(path, line)
        if not isinstance(record, dict):
            raise where.error(f"expected a JSON object, got {json_type_name(record)}")
        out.append(parser(record, where))
    return out


def conversations_from_records(records: Sequence[dict], format: Optional[str] = None,
                               name: str = "<records>", fields: Optional[FieldMap] = None) -> list[Conversation]:
    """Like `read_conversations` for records already in memory (line = 1-based index)."""
    check_format(format, name, fields)
    return parse_records([(r, i) for i, r in enumerate(records, start=1)], name, format, fields)
