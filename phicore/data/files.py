"""Read a data file into conversations: `read_conversations`, `iter_conversations`.

Files: `.jsonl` (one record per line), `.json` (a list of records, one record, or JSON Lines
under a .json name), `.csv` / `.tsv` (a table), `.xlsx` (a table, through the optional
`openpyxl`). JSON records become conversations in `phicore.data.formats` (which detects the
record format); tables in `phicore.data.tables`. Text must be UTF-8 (a BOM is allowed).

Lines end at \\n, \\r\\n or a lone \\r; U+2028, U+2029 and U+0085 are characters like any other
(valid JSON may hold them raw inside strings). JSON is read strictly: a duplicate key in an
object, a lone UTF-16 surrogate (`"\\ud800"`), an integer of more digits than Python reads
(4300) and nesting deeper than the interpreter's recursion limit are errors, not values.

Every error is a `DataError` with a one-line `file:line: problem` message: invalid UTF-8 or JSON
names the line and column where it is; a record's problem names the line the record starts on;
a file that cannot be read (missing, a folder, a symbolic link loop) names the file.
`iter_conversations` streams a JSON Lines file line by line, with the same messages.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import sys
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

from .formats import (Conversation, DataError, FieldMap, Where, check_format, json_type_name, parse_records,
                      record_parser)
from .tables import read_csv_rows, read_xlsx_rows, table_to_conversations

_EOL = re.compile(rb"\r\n|\r|\n")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")  # how a surrogate gets into JSON text
_SURROGATE = re.compile("[\ud800-\udfff]")


def file_error(name: str, err: OSError) -> DataError:
    """The one line for a data file that cannot be opened or read."""
    reasons = {errno.ENOENT: "no such file", errno.EISDIR: "is a folder, not a data file",
               errno.ELOOP: "a symbolic link loop (the path leads back to itself)",
               errno.EACCES: "permission denied"}
    return DataError(f"{name}: cannot read file: {reasons.get(err.errno, err.strerror or str(err))}")


# --------------------------------------------------------------------------- JSON text

class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


class _NumberTooLong(ValueError):
    def __init__(self, digits: int):
        super().__init__(digits)
        self.digits = digits


def _object(pairs: list) -> dict:
    """json's object hook: a dict, or `_DuplicateKey` (json itself keeps the last value silently)."""
    record = dict(pairs)
    if len(record) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return record


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits())
        raise _NumberTooLong(len(text.lstrip("-"))) from None


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_int=_integer)


@contextlib.contextmanager
def _json_errors(path: str, line: int, first_line: int = 1):
    """JSON problems as `DataError`s: a syntax error names its own line (`first_line`: the file
    line of the decoded text's first line) and column; the rest name `line`, where the value starts."""
    try:
        yield
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{first_line - 1 + e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    except _DuplicateKey as e:
        key = json.dumps(e.key)
        key = key if len(key) <= 60 else key[:57] + '..."'
        raise DataError(f"{path}:{line}: invalid JSON: duplicate key {key} in an object") from None
    except _NumberTooLong as e:
        raise DataError(f"{path}:{line}: invalid JSON: a number of {e.digits} digits (at most "
                        f"{sys.get_int_max_str_digits()} are read)") from None
    except RecursionError:
        raise DataError(f"{path}:{line}: invalid JSON: nested too deeply") from None


def _check_text(value: Any, text: str, start: int, end: int, path: str, line: int) -> None:
    """A lone UTF-16 surrogate (`"\\ud800"`) is valid JSON but no character: nothing downstream
    can encode it. Only a `\\uD8xx`-`\\uDFxx` escape in text[start:end] can make one (UTF-8
    cannot), so values are searched only then (iteratively: any depth)."""
    if not _SURROGATE_ESCAPE.search(text, start, end):
        return
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                raise DataError(f"{path}:{line}: invalid JSON: a lone surrogate \"\\u{ord(found.group()):04x}\" "
                                "in a string (half of a UTF-16 pair, not a character)")
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _json_line(line: str, path: str, lineno: int) -> Any:
    """One JSON Lines record."""
    with _json_errors(path, lineno, lineno):
        value = _DECODER.decode(line)
    _check_text(value, line, 0, len(line), path, lineno)
    return value


def _line_of(data: bytes, pos: int) -> int:
    """The 1-based line of byte `pos` (line breaks: \\n, \\r\\n or a lone \\r)."""
    return data.count(b"\n", 0, pos) + data.count(b"\r", 0, pos) - data.count(b"\r\n", 0, pos) + 1


def _decode(data: bytes, path: str) -> str:
    """The file's text (UTF-8, an optional BOM dropped); invalid bytes name line and column."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_start = max(data.rfind(b"\n", 0, e.start), data.rfind(b"\r", 0, e.start)) + 1
        raise DataError(f"{path}:{_line_of(data, e.start)}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column "
                        f"{e.start - line_start + 1})") from None


def _json_newlines(text: str) -> str:
    """CR-LF and CR-only line breaks as \\n. Safe for JSON: a raw CR inside a string is invalid
    JSON, so every CR is whitespace between values."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _read_jsonl(text: str, path: str) -> list[tuple[Any, int]]:
    """JSON Lines: (record, line) for each non-blank line. Lines end at \\n only (after
    `_json_newlines`): U+2028, U+2029, U+0085 and the like are characters inside strings."""
    return [(_json_line(line, path, lineno), lineno)
            for lineno, line in enumerate(text.split("\n"), start=1) if line.strip()]


def _read_json(text: str, path: str) -> list[tuple[Any, int]]:
    """A JSON list of records with the line each starts on (or one top-level record)."""
    ws = re.compile(r"\s*")
    pos = ws.match(text).end()
    if not text.startswith("[", pos):
        first_line = text.count("\n", 0, pos) + 1
        with _json_errors(path, first_line):
            value, end = _DECODER.raw_decode(text, pos)
        if ws.match(text, end).end() != len(text):  # more after the first value: JSON Lines
            return _read_jsonl(text, path)
        _check_text(value, text, pos, end, path, first_line)
        if not isinstance(value, dict):
            raise DataError(f"{path}:1: expected a list of records, got {json_type_name(value)}")
        return [(value, first_line)]
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
        start, start_line = pos, line_at(pos)
        with _json_errors(path, start_line):
            value, pos = _DECODER.raw_decode(text, pos)
        _check_text(value, text, start, pos, path, start_line)
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


# --------------------------------------------------------------------------- files

def read_conversations(path: str | Path, format: Optional[str] = None,
                       fields: Optional[FieldMap] = None) -> list[Conversation]:
    """Read a data file into conversations; `format` forces a record format (see `FORMATS`),
    `fields` maps record fields or table columns to the prompt, response or text.

    Raises `DataError` with a one-line `file:line: problem` message for any bad input.
    """
    check_format(format, str(path), fields)
    file = Path(path)
    name = str(path)
    try:
        data = file.read_bytes()
    except OSError as e:
        raise file_error(name, e) from None
    suffix = file.suffix.lower()
    if suffix == ".xlsx":
        return table_to_conversations(read_xlsx_rows(file, name), name, format, unit="row", fields=fields)
    text = _decode(data, name)
    del data
    if not text.strip():
        raise DataError(f"{name}: file is empty")
    if suffix in (".csv", ".tsv"):
        rows = read_csv_rows(text, name, "\t" if suffix == ".tsv" else ",")
        return table_to_conversations(rows, name, format, unit="line", fields=fields)
    text = _json_newlines(text)
    if suffix == ".jsonl" and not text.lstrip().startswith("["):
        records = _read_jsonl(text, name)
    else:  # .json and anything else: a JSON list, one object, or JSON Lines
        records = _read_json(text, name)
    return parse_records(records, name, format, fields)


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


def decode_line(raw: bytes, name: str, lineno: int) -> str:
    """One line of a JSON Lines file as text (a byte-order mark on the first is dropped), or a
    DataError naming the file, line and column of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                        f"{e.start + 1})") from None


def binary_lines(f: BinaryIO, block_size: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a binary file without their ends, which are \\n, \\r\\n or a lone \\r (old
    Mac files), read in blocks: one line at a time is held, however long."""
    pieces: list[bytes] = []
    skip_lf = False  # the last block ended with \r: a \n starting the next one belongs to it
    while True:
        block = f.read(block_size)
        if not block:
            break
        if skip_lf and block.startswith(b"\n"):
            block = block[1:]
        skip_lf = False
        pos = 0
        for end in _EOL.finditer(block):
            pieces.append(block[pos:end.start()])
            yield b"".join(pieces)
            pieces = []
            pos = end.end()
        if block.endswith(b"\r") and pos == len(block):
            skip_lf = True
        if pos < len(block):
            pieces.append(block[pos:])
    if pieces:
        yield b"".join(pieces)


def iter_conversations(path: str | Path, format: Optional[str] = None,
                       fields: Optional[FieldMap] = None) -> Iterator[Conversation]:
    """Like `read_conversations`, one conversation at a time, with the same one-line errors.

    A JSON Lines file is read line by line, so a file of millions of rows never sits in memory
    (the tokenised dataset cache reads data this way); other files are read whole.
    """
    check_format(format, str(path), fields)
    file, name = Path(path), str(path)
    try:
        streaming = _is_json_lines(file)
    except OSError as e:
        raise file_error(name, e) from None
    if not streaming:
        yield from read_conversations(path, format, fields)
        return
    parser, blank = None, True
    try:
        f = file.open("rb")
    except OSError as e:
        raise file_error(name, e) from None
    with f:
        for lineno, raw in enumerate(binary_lines(f), start=1):
            line = decode_line(raw, name, lineno)
            del raw
            if not line.strip():
                continue
            blank = False
            record = _json_line(line, name, lineno)
            where = Where(name, lineno)
            if parser is None:
                parser = record_parser(record, where, format, fields)
            if not isinstance(record, dict):
                raise where.error(f"expected a JSON object, got {json_type_name(record)}")
            yield parser(record, where)
    if blank:
        raise DataError(f"{name}: file is empty")
