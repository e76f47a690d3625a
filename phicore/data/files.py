"""Read a data file into conversations: `read_conversations`, `iter_conversations`.

Files: `.jsonl` (one record per line), `.json` (a list of records, one record, or JSON Lines
under a .json name), `.csv` / `.tsv` (a table), `.xlsx` (a table, through the optional
`openpyxl`). JSON records become conversations in `phicore.data.formats` (which detects the
record format); tables in `phicore.data.tables`. Text must be UTF-8 (a BOM is allowed).

Every error is a `DataError` with a one-line `file:line: problem` message: invalid UTF-8 or JSON
names the line and column where it is; a record's problem names the line the record starts on.
`iter_conversations` streams a JSON Lines file line by line, with the same messages.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator, Optional

from .formats import (PARSERS, Conversation, DataError, Where, check_format, detect_format, json_type_name,
                      parse_records, undetected_format)
from .tables import read_csv_rows, read_xlsx_rows, table_to_conversations


# --------------------------------------------------------------------------- JSON text

def _decode(data: bytes, path: str) -> str:
    """The file's text (UTF-8, an optional BOM dropped); invalid bytes name line and column."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {col})") from None


def _json_error(path: str, e: json.JSONDecodeError) -> DataError:
    return DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})")


def _read_jsonl(text: str, path: str) -> list[tuple[Any, int]]:
    """JSON Lines: (record, line) for each non-blank line."""
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
            raise DataError(f"{path}:1: expected a list of records, got {json_type_name(value)}")
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


# --------------------------------------------------------------------------- files

def read_conversations(path: str | Path, format: Optional[str] = None) -> list[Conversation]:
    """Read a data file into conversations; `format` forces a record format (see `FORMATS`).

    Raises `DataError` with a one-line `file:line: problem` message for any bad input.
    """
    check_format(format, str(path))
    file = Path(path)
    name = str(path)
    try:
        data = file.read_bytes()
    except OSError as e:
        raise DataError(f"{name}: cannot read file: {e.strerror or e}") from None
    suffix = file.suffix.lower()
    if suffix == ".xlsx":
        return table_to_conversations(read_xlsx_rows(file, name), name, format, unit="row")
    text = _decode(data, name)
    if not text.strip():
        raise DataError(f"{name}: file is empty")
    if suffix in (".csv", ".tsv"):
        rows = read_csv_rows(text, name, "\t" if suffix == ".tsv" else ",")
        return table_to_conversations(rows, name, format, unit="line")
    if suffix == ".jsonl" and not text.lstrip().startswith("["):
        records = _read_jsonl(text, name)
    else:  # .json and anything else: a JSON list, one object, or JSON Lines
        records = _read_json(text, name)
    return parse_records(records, name, format)


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
    check_format(format, str(path))
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
            where = Where(name, lineno)
            if parser is None:
                fmt = format or detect_format(record)
                if fmt is None:
                    raise undetected_format(record, where)
                parser = PARSERS[fmt]
            if not isinstance(record, dict):
                raise where.error(f"expected a JSON object, got {json_type_name(record)}")
            yield parser(record, where)
    if blank:
        raise DataError(f"{name}: file is empty")
