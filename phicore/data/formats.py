"""Read a data file into normalised conversation records.

Every supported file becomes a list of `Conversation`s: a tuple of `Turn(role, content)` with
role "system", "user" or "assistant", plus `source = (path, line)` for error messages.
A `{text}` record becomes a *plain* conversation (`plain=True`, one assistant turn): no prompt,
the whole text is the training target.

Files: `.jsonl` (one record per line), `.json` (a list of records, or JSON Lines under a .json
name), `.csv` / `.tsv` (a table), `.xlsx` (a table, through the optional `openpyxl`).

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

Tables (CSV/TSV/XLSX): the first row is a header when one of its cells names a known column
(question/prompt/instruction/input/query/setup for the prompt, answer/response/output/
completion/punchline for the response, or `text`); columns are then found by name (an
`instruction` + `input` pair works like `alpaca`). Otherwise every row is data and the first
two columns are prompt and response. Rows whose cells are all empty are skipped; an empty
response cell is an error (a spreadsheet has no other way to say "missing").

Any problem raises `DataError` (a `ValueError`) with a one-line message that names the file and
the line (or row), e.g. `data.jsonl:17: missing field "response" (found: prompt, answerx)`.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

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

class _Where:
    """Where a record came from: `label` prefixes error messages ("data.jsonl:17")."""

    def __init__(self, path: str, line: int, label: Optional[str] = None):
        self.source = (path, line)
        self.label = label or f"{path}:{line}"

    def error(self, message: str) -> DataError:
        return DataError(f"{self.label}: {message}")


def _fields(record: dict) -> str:
    return ", ".join(str(k) for k in record) or "no fields"


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean",
            int: "number", float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _get_str(record: dict, key: str, where: _Where, optional: bool = False) -> str:
    if key not in record:
        if optional:
            return ""
        raise where.error(f'missing field "{key}" (found: {_fields(record)})')
    value = record[key]
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise where.error(f'field "{key}" must be a string, got {_type_name(value)}')
    return value


def _get_list(record: dict, key: str, where: _Where) -> list:
    if key not in record:
        raise where.error(f'missing field "{key}" (found: {_fields(record)})')
    value = record[key]
    if not isinstance(value, list):
        raise where.error(f'field "{key}" must be a list, got {_type_name(value)}')
    if not value:
        raise where.error(f'field "{key}" is an empty list')
    return value


def _pair(prompt: str, response: str, where: _Where) -> Conversation:
    return Conversation((Turn("user", prompt), Turn("assistant", response)), where.source)


def _join_input(instruction: str, extra: str) -> str:
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _parse_prompt_response(r: dict, where: _Where) -> Conversation:
    return _pair(_get_str(r, "prompt", where), _get_str(r, "response", where), where)


def _parse_question_answer(r: dict, where: _Where) -> Conversation:
    return _pair(_get_str(r, "question", where), _get_str(r, "answer", where), where)


def _parse_joke(r: dict, where: _Where) -> Conversation:
    return _pair(_get_str(r, "setup", where), _get_str(r, "punchline", where), where)


def _parse_alpaca(r: dict, where: _Where) -> Conversation:
    instruction = _get_str(r, "instruction", where)
    extra = _get_str(r, "input", where, optional=True)
    return _pair(_join_input(instruction, extra), _get_str(r, "output", where), where)


def _parse_self_instruct(r: dict, where: _Where) -> Conversation:
    instruction = _get_str(r, "instruction", where)
    first = _get_list(r, "instances", where)[0]
    if not isinstance(first, dict):
        raise where.error(f'instances[0] must be an object, got {_type_name(first)}')
    inner = _Where(*where.source, label=f"{where.label}: instances[0]")
    extra = _get_str(first, "input", inner, optional=True)
    return _pair(_join_input(instruction, extra), _get_str(first, "output", inner), where)


def _parse_text(r: dict, where: _Where) -> Conversation:
    text = _get_str(r, "text", where)
    if not text.strip():
        raise where.error('field "text" is empty')
    return Conversation.from_text(text, where.source)


def _turns_from_list(items: list, key_role: str, key_content: str, field: str,
                     where: _Where) -> tuple[Turn, ...]:
    turns = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise where.error(f'{field}[{i}] must be an object, got {_type_name(item)}')
        for key in (key_role, key_content):
            if key not in item:
                raise where.error(f'{field}[{i}]: missing field "{key}" (found: {_fields(item)})')
        role, content = item[key_role], item[key_content]
        if not isinstance(role, str) or role.lower() not in _ROLE_ALIASES:
            raise where.error(f'{field}[{i}]: unknown role {role!r} (expected one of: '
                              f'{", ".join(sorted(_ROLE_ALIASES))})')
        if not isinstance(content, str):
            raise where.error(f'{field}[{i}].{key_content} must be a string, got {_type_name(content)}')
        turns.append(Turn(_ROLE_ALIASES[role.lower()], content))
    return tuple(turns)


def _parse_messages(r: dict, where: _Where) -> Conversation:
    turns = _turns_from_list(_get_list(r, "messages", where), "role", "content", "messages", where)
    return _checked(Conversation(turns, where.source), where)


def _parse_sharegpt(r: dict, where: _Where) -> Conversation:
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


def _parse_oasst(r: dict, where: _Where) -> Conversation:
    node = _oasst_root(r)
    if node is None:
        raise where.error(f'not an OpenAssistant message tree: need "text" and "replies", '
                          f'or a "prompt" object holding them (found: {_fields(r)})')
    turns, depth = [], 0
    while node is not None:
        label = "message" if depth == 0 else f"reply at depth {depth}"
        text, role = node.get("text"), node.get("role")
        if not isinstance(text, str):
            raise where.error(f'{label}: field "text" must be a string, got {_type_name(text)}')
        if role not in ("prompter", "assistant", "user", "system"):
            raise where.error(f'{label}: unknown role {role!r} (expected prompter or assistant)')
        turns.append(Turn(_ROLE_ALIASES[role], text))
        replies = node.get("replies") or []
        if not isinstance(replies, list):
            raise where.error(f'{label}: field "replies" must be a list, got {_type_name(replies)}')
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


def _parse_human_assistant(r: dict, where: _Where) -> Conversation:
    text = _get_str(r, "text", where)
    turns = split_human_assistant(text)
    if not any(t.role == "assistant" for t in turns):
        raise where.error('no "Assistant:" turn found in field "text"')
    return _checked(Conversation(tuple(turns), where.source), where)


def _checked(conv: Conversation, where: _Where) -> Conversation:
    if not any(t.role == "assistant" for t in conv.turns):
        raise where.error("conversation has no assistant turn (nothing to train on)")
    return conv


_PARSERS: dict[str, Callable[[dict, _Where], Conversation]] = {
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
FORMATS = tuple(_PARSERS)


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


def _undetected(record: Any, where: _Where) -> DataError:
    if not isinstance(record, dict):
        return where.error(f"expected a JSON object, got {_type_name(record)}")
    return where.error(
        f"cannot tell the data format from the fields ({_fields(record)}); expected "
        "prompt/response, question/answer, instruction/input/output, text, messages, "
        "conversations, setup/punchline or an OpenAssistant tree (or force one with format=)")


# --------------------------------------------------------------------------- file readers

def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {col})") from None


def _json_error(path: str, e: json.JSONDecodeError) -> DataError:
    return DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})")


def _read_jsonl(text: str, path: str) -> list[tuple[Any, int]]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((json.loads(line), lineno))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    return records


def _read_json(text: str, path: str) -> list[tuple[Any, int]]:
    """A JSON list of records with the line each starts on (or one top-level record)."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text).end()
    if not text.startswith("[", pos):
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _json_error(path, e) from None
        if ws.match(text, end).end() != len(text):  # more after the first value: JSON Lines
            return _read_jsonl(text, path)
        if not isinstance(value, dict):
            raise DataError(f"{path}:1: expected a list of records, got {_type_name(value)}")
        return [(value, text.count("\n", 0, pos) + 1)]
    records = []
    pos = ws.match(text, pos + 1).end()
    counted, line = 0, 1  # newlines before `counted`, counted incrementally (linear time)

    def line_at(p: int) -> int:
        nonlocal counted, line
        line += text.count("\n", counted, p)
        counted = p
        return line

    if text.startswith("]", pos):
        return records
    while True:
        start_line = line_at(pos)
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _json_error(path, e) from None
        records.append((value, start_line))
        pos = ws.match(text, pos).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            end = ws.match(text, pos + 1).end()
            if end != len(text):
                raise DataError(f"{path}:{line_at(end)}: invalid JSON: extra data after the list")
            return records
        else:
            what = "end of file" if pos >= len(text) else repr(text[pos])
            raise DataError(f"{path}:{line_at(pos)}: invalid JSON: expected ',' or ']' in the list, got {what}")


def _parse_records(records: list[tuple[Any, int]], path: str, fmt: Optional[str]) -> list[Conversation]:
    if not records:
        raise DataError(f"{path}: no records")
    if fmt is None:
        first, line = records[0]
        fmt = detect_format(first)
        if fmt is None:
            raise _undetected(first, _Where(path, line))
    parser = _PARSERS[fmt]
    out = []
    for record, line in records:
        where = _Where(path, line)
        if not isinstance(record, dict):
            raise where.error(f"expected a JSON object, got {_type_name(record)}")
        out.append(parser(record, where))
    return out


# Column names for tables, in order of preference.
_PROMPT_COLUMNS = ("question", "prompt", "instruction", "query", "input", "setup")
_RESPONSE_COLUMNS = ("answer", "response", "output", "completion", "punchline")


def _table_to_conversations(rows: Iterable[tuple[int, list[str]]], path: str,
                            fmt: Optional[str], unit: str) -> list[Conversation]:
    """Rows of cells (with their line/row number) -> conversations; see the module docstring."""
    rows = [(n, [c.strip() for c in cells]) for n, cells in rows if any(c.strip() for c in cells)]
    if not rows:
        raise DataError(f"{path}: no rows")
    first_n, first = rows[0]
    names = [c.lower() for c in first]
    known = set(_PROMPT_COLUMNS) | set(_RESPONSE_COLUMNS) | {"text"}
    has_header = any(n in known for n in names)

    def label(n: int) -> str:
        return f"{path}:{n}" if unit == "line" else f"{path}: row {n}"

    def where(n: int) -> _Where:
        return _Where(path, n, label(n))

    if has_header:
        body = rows[1:]
        if not body:
            raise DataError(f"{label(first_n)}: header row but no data rows")
        if fmt is not None:  # forced: rows as records keyed by the header names
            records = [({k: v for k, v in zip(names, cells)}, n) for n, cells in body]
            return [_PARSERS[fmt](r, where(n)) for r, n in records]
        col = {n: i for i, n in reversed(list(enumerate(names)))}  # first occurrence wins
        resp = next((col[c] for c in _RESPONSE_COLUMNS if c in col), None)
        if resp is None and "text" in col:
            return [Conversation.from_text(cells[col["text"]], (path, n))
                    for n, cells in body if col["text"] < len(cells) and cells[col["text"]]]
        if resp is None:
            raise DataError(f"{label(first_n)}: no answer/response/output column in the header "
                            f"(found: {', '.join(first)})")
        extra = col.get("input") if "instruction" in col else None
        prompt = col["instruction"] if extra is not None else next(
            (col[c] for c in _PROMPT_COLUMNS if c in col), None)
        if prompt is None:
            raise DataError(f"{label(first_n)}: no question/prompt/instruction/input column in the "
                            f"header (found: {', '.join(first)})")
        need = max(prompt, resp) + 1
        out = []
        for n, cells in body:
            if len(cells) < need:
                raise DataError(f"{label(n)}: expected {need} columns, got {len(cells)}")
            text = cells[prompt]
            if extra is not None and extra < len(cells):
                text = _join_input(text, cells[extra])
            if not cells[resp]:
                raise DataError(f'{label(n)}: empty "{first[resp]}" cell (column {resp + 1})')
            out.append(_pair(text, cells[resp], where(n)))
        return out

    if fmt is not None:
        raise DataError(f"{label(first_n)}: format={fmt!r} needs a header row naming the columns")
    out = []
    for n, cells in rows:
        if len(cells) < 2:
            raise DataError(f"{label(n)}: expected 2 columns (prompt, response), got {len(cells)}")
        if not cells[1]:
            raise DataError(f"{label(n)}: empty response cell (column 2)")
        out.append(_pair(cells[0], cells[1], where(n)))
    return out


def _read_csv(text: str, path: str, delimiter: str) -> list[tuple[int, list[str]]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows, start = [], 1
    try:
        for cells in reader:
            rows.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: invalid {'TSV' if delimiter == chr(9) else 'CSV'}: {e}") from None
    return rows


def _read_xlsx(file: Path, path: str) -> list[tuple[int, list[str]]]:
    try:
        import openpyxl  # optional
    except ImportError:
        raise DataError(f"{path}: reading .xlsx files needs the optional package openpyxl "
                        "(pip install openpyxl), or save the sheet as CSV") from None
    try:
        book = openpyxl.load_workbook(file, read_only=True, data_only=True)
    except Exception as e:  # openpyxl raises several kinds for a broken file
        raise DataError(f"{path}: cannot read the workbook: {e}".replace("\n", " ")) from None
    sheet = book.worksheets[0]
    rows = []
    for n, values in enumerate(sheet.iter_rows(values_only=True), start=1):
        rows.append((n, ["" if v is None else str(v) for v in values]))
    book.close()
    return rows


def read_conversations(path: str | Path, format: Optional[str] = None) -> list[Conversation]:
    """Read a data file into conversations; `format` forces a record format (see `FORMATS`).

    Raises `DataError` with a one-line `file:line: problem` message for any bad input.
    """
    if format is not None and format not in _PARSERS:
        raise DataError(f"{path}: unknown format {format!r} (known: {', '.join(FORMATS)})")
    file = Path(path)
    name = str(path)
    try:
        data = file.read_bytes()
    except OSError as e:
        raise DataError(f"{name}: cannot read file: {e.strerror or e}") from None
    suffix = file.suffix.lower()
    if suffix == ".xlsx":
        return _table_to_conversations(_read_xlsx(file, name), name, format, unit="row")
    text = _decode(data, name)
    if not text.strip():
        raise DataError(f"{name}: file is empty")
    if suffix in (".csv", ".tsv"):
        rows = _read_csv(text, name, "\t" if suffix == ".tsv" else ",")
        return _table_to_conversations(rows, name, format, unit="line")
    if suffix == ".jsonl" and not text.lstrip().startswith("["):
        records = _read_jsonl(text, name)
    else:  # .json and anything else: a JSON list, one object, or JSON Lines
        records = _read_json(text, name)
    return _parse_records(records, name, format)


def _is_json_lines(file: Path) -> bool:
    """A .jsonl file whose first non-blank character is not "[" (read_conversations' rule)."""
    if file.suffix.lower() != ".jsonl":
        return False
    with file.open("rb") as f:
        while True:
            block = f.read(1 << 16)
            if not block:
                return True
            stripped = block.lstrip(b" \t\r\n\xef\xbb\xbf")
            if stripped:
                return not stripped.startswith(b"[")


def iter_conversations(path: str | Path, format: Optional[str] = None) -> Iterator[Conversation]:
    """Like `read_conversations`, one conversation at a time, with the same one-line errors.

    A JSON Lines file is read line by line, so a file of millions of rows never sits in memory
    (the tokenised dataset cache reads data this way); other files are read whole.
    """
    if format is not None and format not in _PARSERS:
        raise DataError(f"{path}: unknown format {format!r} (known: {', '.join(FORMATS)})")
    file, name = Path(path), str(path)
    try:
        streaming = _is_json_lines(file)
    except OSError as e:
        raise DataError(f"{name}: cannot read file: {e.strerror or e}") from None
    if not streaming:
        yield from read_conversations(path, format)
        return
    parser, blank = None, True
    with file.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{name}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1})") from None
            line = line[:-1] if line.endswith("\n") else line
            line = line[:-1] if line.endswith("\r") else line
            if not line.strip():
                continue
            blank = False
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{name}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            where = _Where(name, lineno)
            if parser is None:
                fmt = format or detect_format(record)
                if fmt is None:
                    raise _undetected(record, where)
                parser = _PARSERS[fmt]
            if not isinstance(record, dict):
                raise where.error(f"expected a JSON object, got {_type_name(record)}")
            yield parser(record, where)
    if blank:
        raise DataError(f"{name}: file is empty")


def conversations_from_records(records: Sequence[dict], format: Optional[str] = None,
                               name: str = "<records>") -> list[Conversation]:
    """Like `read_conversations` for records already in memory (line = 1-based index)."""
    if format is not None and format not in _PARSERS:
        raise DataError(f"{name}: unknown format {format!r} (known: {', '.join(FORMATS)})")
    return _parse_records([(r, i) for i, r in enumerate(records, start=1)], name, format)
