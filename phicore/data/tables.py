"""Tables (CSV, TSV, XLSX) -> conversations: one row a record, columns found by name.

The first row is a header when one of its cells names a known column (question/prompt/
instruction/input/query/setup for the prompt, answer/response/output/completion/punchline for
the response, or `text`); columns are then found by name (an `instruction` + `input` pair works
like `alpaca`; a `text` column without a response column makes plain records). Otherwise every
row is data and the first two columns are prompt and response. With `format=` forced, the
header names are the record's fields. Rows whose cells are all empty are skipped; an empty
response cell is an error (a spreadsheet has no other way to say "missing").

CSV/TSV rows are numbered by the file line they start on ("data.csv:7"), XLSX rows by their
row number ("data.xlsx: row 7"). `.xlsx` needs the optional package openpyxl, imported only
when such a file is read.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable, Optional

from .formats import PARSERS, Conversation, DataError, Where, join_instruction_input

# Column names for tables, in order of preference.
_PROMPT_COLUMNS = ("question", "prompt", "instruction", "query", "input", "setup")
_RESPONSE_COLUMNS = ("answer", "response", "output", "completion", "punchline")


def table_to_conversations(rows: Iterable[tuple[int, list[str]]], path: str,
                           fmt: Optional[str], unit: str) -> list[Conversation]:
    """Rows of cells (with their line/row number) -> conversations (see the module docstring)."""
    rows = [(n, [c.strip() for c in cells]) for n, cells in rows if any(c.strip() for c in cells)]
    if not rows:
        raise DataError(f"{path}: no rows")
    first_n, first = rows[0]
    names = [c.lower() for c in first]
    known = set(_PROMPT_COLUMNS) | set(_RESPONSE_COLUMNS) | {"text"}
    has_header = any(n in known for n in names)

    def label(n: int) -> str:
        return f"{path}:{n}" if unit == "line" else f"{path}: row {n}"

    def where(n: int) -> Where:
        return Where(path, n, label(n))

    if has_header:
        body = rows[1:]
        if not body:
            raise DataError(f"{label(first_n)}: header row but no data rows")
        if fmt is not None:  # forced: rows as records keyed by the header names
            records = [({k: v for k, v in zip(names, cells)}, n) for n, cells in body]
            return [PARSERS[fmt](r, where(n)) for r, n in records]
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
                text = join_instruction_input(text, cells[extra])
            if not cells[resp]:
                raise DataError(f'{label(n)}: empty "{first[resp]}" cell (column {resp + 1})')
            out.append(Conversation.from_pair(text, cells[resp], source=(path, n)))
        return out

    if fmt is not None:
        raise DataError(f"{label(first_n)}: format={fmt!r} needs a header row naming the columns")
    out = []
    for n, cells in rows:
        if len(cells) < 2:
            raise DataError(f"{label(n)}: expected 2 columns (prompt, response), got {len(cells)}")
        if not cells[1]:
            raise DataError(f"{label(n)}: empty response cell (column 2)")
        out.append(Conversation.from_pair(cells[0], cells[1], source=(path, n)))
    return out


def read_csv_rows(text: str, path: str, delimiter: str) -> list[tuple[int, list[str]]]:
    """(line the row starts on, cells) for each row of a CSV (or, with a tab, TSV) text."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows, start = [], 1
    try:
        for cells in reader:
            rows.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: invalid {'TSV' if delimiter == chr(9) else 'CSV'}: {e}") from None
    return rows


def read_xlsx_rows(file: Path, path: str) -> list[tuple[int, list[str]]]:
    """(row number, cells as text) for each row of the workbook's first sheet."""
    try:
        import openpyxl  # optional, and only .xlsx files need it: imported here, not at the top
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
