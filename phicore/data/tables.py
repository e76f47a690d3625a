"""Tables (CSV, TSV, XLSX) -> conversations: one row a record, columns found by name.

The first row must be a header. Columns are found by name (case-insensitive): one of
question/prompt/instruction/query/input/setup for the prompt, one of
answer/response/output/completion/punchline for the response (an `instruction` + `input` pair
works like `alpaca`), or a `text` column alone for plain records. `--prompt-field`,
`--response-field` and `--text-field` (a `FieldMap`) name the columns instead, for tables whose
header uses other names (a side the mapping leaves out is still found by its known name).
With `format=` forced, the header names are the record's fields.

Nothing is dropped silently:
- a first row that names no known column (a headerless table, or a header of other names) is
  refused, with the names found and the mapping flags, never read as data;
- without a mapping (or a forced format), a column with data that no known name uses (`id`,
  `source`, a second `answer`) is refused: the mapping (or the format) is how a table says
  which columns count, and then the other columns are ignored;
- a row with more non-empty cells than the header has columns is refused (an unquoted comma).
Rows whose cells are all empty are skipped; an empty response (or text) cell is an error (a
spreadsheet has no other way to say "missing").

CSV/TSV rows are numbered by the file line they start on ("data.csv:7"), XLSX rows by their
row number ("data.xlsx: row 7"). `.xlsx` needs the optional package openpyxl, imported only
when such a file is read.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable, NamedTuple, Optional

from .formats import (MAPPING_FLAGS, PARSERS, PROMPT_FIELDS, RESPONSE_FIELDS, Conversation, DataError, FieldMap,
                      Where, join_instruction_input)

_SHOWN_CELLS, _SHOWN_CHARS = 8, 40  # how much of a first row an error message quotes


class _Columns(NamedTuple):
    """The columns a table is read from (0-based), or text alone for plain records."""

    prompt: Optional[int] = None
    extra: Optional[int] = None  # `input`, appended to an `instruction` prompt
    response: Optional[int] = None
    text: Optional[int] = None

    def used(self) -> set[int]:
        return {i for i in self if i is not None}


def _shown(cells: list[str]) -> str:
    shown = [c if len(c) <= _SHOWN_CHARS else c[:_SHOWN_CHARS] + "..." for c in cells[:_SHOWN_CELLS]]
    more = f", ... ({len(cells)} columns)" if len(cells) > _SHOWN_CELLS else ""
    return ", ".join(repr(c) if c.strip() != c or not c or "," in c else c for c in shown) + more


def _named(header: list[str], wanted: str, flag: str, where: Where) -> int:
    """The column a mapping names: the exact name, else the one name equal ignoring case."""
    found = [i for i, c in enumerate(header) if c == wanted.strip()]
    if not found:
        found = [i for i, c in enumerate(header) if c.lower() == wanted.strip().lower()]
    if len(found) > 1:
        raise where.error(f"{flag} {wanted!r}: {len(found)} columns have that name (columns "
                          f"{', '.join(str(i + 1) for i in found)})")
    if not found:
        raise where.error(f"{flag} {wanted!r}: no such column in the header (found: {_shown(header)})")
    return found[0]


def _known(names: list[str], known: tuple[str, ...]) -> Optional[int]:
    """The first column (leftmost) whose name is the most preferred known name present."""
    return next((names.index(k) for k in known if k in names), None)


def _columns(header: list[str], fields: FieldMap, where: Where) -> _Columns:
    """Which columns hold what, from the mapping and the known names (see the module docstring)."""
    names = [c.lower() for c in header]
    if fields.text is not None:
        return _Columns(text=_named(header, fields.text, "--text-field", where))
    prompt = _named(header, fields.prompt, "--prompt-field", where) if fields.prompt is not None else None
    response = _named(header, fields.response, "--response-field", where) if fields.response is not None else None
    if not fields and response is None and "text" in names and _known(names, RESPONSE_FIELDS) is None:
        return _Columns(text=names.index("text"))
    if response is None:
        response = _known(names, RESPONSE_FIELDS)
        if response is None:
            raise where.error(f"no answer/response/output column in the header (found: {_shown(header)}); "
                              "name yours with --response-field NAME")
    extra = None
    if prompt is None:
        if "instruction" in names:
            prompt = names.index("instruction")
            extra = names.index("input") if "input" in names else None
        else:
            prompt = _known(names, PROMPT_FIELDS)
        if prompt is None:
            raise where.error(f"no question/prompt/instruction/input column in the header (found: "
                              f"{_shown(header)}); name yours with --prompt-field NAME")
    if prompt == response:
        raise where.error(f"column {header[prompt]!r} would be both the prompt and the response; name the other "
                          "with --prompt-field/--response-field")
    return _Columns(prompt=prompt, extra=extra, response=response)


def table_to_conversations(rows: Iterable[tuple[int, list[str]]], path: str, fmt: Optional[str], unit: str,
                           fields: Optional[FieldMap] = None) -> list[Conversation]:
    """Rows of cells (with their line/row number) -> conversations (see the module docstring)."""
    fields = fields or FieldMap()
    rows = [(n, [c.strip() for c in cells]) for n, cells in rows if any(c.strip() for c in cells)]
    if not rows:
        raise DataError(f"{path}: no rows")
    first_n, header = rows[0]
    names = [c.lower() for c in header]

    def where(n: int) -> Where:
        return Where(path, n, f"{path}:{n}" if unit == "line" else f"{path}: row {n}")

    known = set(PROMPT_FIELDS) | set(RESPONSE_FIELDS) | {"text"}
    if not fields and not any(n in known for n in names):
        raise where(first_n).error(
            f"the first row names no known column (found: {_shown(header)}); a table needs a header row: "
            f"name the columns (prompt,response / question,answer / instruction,input,output / text) or map "
            f"yours with {MAPPING_FLAGS}")
    body = rows[1:]
    if not body:
        raise where(first_n).error("header row but no data rows")
    for n, cells in body:  # cells past the header's columns: most often an unquoted comma
        if any(cells[len(header):]):
            raise where(n).error(f"{len(cells)} cells, but the header has {len(header)} columns "
                                 "(quote cells that hold the delimiter)")
    if fmt is not None:  # forced: rows as records keyed by the header names; the format says which count
        return [PARSERS[fmt]({k: v for k, v in zip(names, cells)}, where(n)) for n, cells in body]

    cols = _columns(header, fields, where(first_n))
    if not fields:  # without a mapping, a column nothing reads must be empty
        unused = [i for i in range(len(header)) if i not in cols.used()
                  and any(i < len(cells) and cells[i] for _, cells in body)]
        if unused:
            which = ", ".join(repr(header[i]) if header[i] else f"column {i + 1} (no name)" for i in unused)
            used = cols.used()
            if cols.text is not None:
                mapping = f"--text-field {header[cols.text]}"
            elif cols.extra is not None:  # the instruction + input prompt is still found by name
                mapping = f"--response-field {header[cols.response]}"
            else:
                mapping = f"--prompt-field {header[cols.prompt]} --response-field {header[cols.response]}"
            raise where(first_n).error(
                f"column{'s' * (len(unused) > 1)} {which} would not be used (the known column"
                f"{'s' * (len(used) > 1)} read: {', '.join(header[i] for i in sorted(used))}); to train on "
                f"those and ignore the rest, say so with {mapping}")
    out = []
    for n, cells in body:
        if cols.text is not None:
            if cols.text >= len(cells) or not cells[cols.text]:
                raise where(n).error(f'empty "{header[cols.text]}" cell (column {cols.text + 1})')
            out.append(Conversation.from_text(cells[cols.text], (path, n)))
            continue
        need = max(cols.prompt, cols.response) + 1
        if len(cells) < need:
            raise where(n).error(f"expected {need} columns, got {len(cells)}")
        text = cells[cols.prompt]
        if cols.extra is not None and cols.extra < len(cells):
            text = join_instruction_input(text, cells[cols.extra])
        if not cells[cols.response]:
            raise where(n).error(f'empty "{header[cols.response]}" cell (column {cols.response + 1})')
        out.append(Conversation.from_pair(text, cells[cols.response], source=(path, n)))
    return out


def read_csv_rows(text: str, path: str, delimiter: str) -> list[tuple[int, list[str]]]:
    """(line the row starts on, cells) for each row of a CSV (or, with a tab, TSV) text."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows, start = [], 1
    # csv refuses cells over 128 Ki characters by default; the text is in memory already, and a
    # long cell is cut to what --max-length can use before it is tokenised (tokenization.py)
    previous = csv.field_size_limit()
    csv.field_size_limit(max(previous, min(len(text), 2**31 - 1)))
    try:
        for cells in reader:
            rows.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: invalid {'TSV' if delimiter == chr(9) else 'CSV'}: {e}") from None
    finally:
        csv.field_size_limit(previous)
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
