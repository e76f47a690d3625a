"""A `DataSelection`: one or more data files read as one dataset, through row filters and a limit.

A hub dataset's split is often several files (`data/train-00000-of-00002.parquet`, ...), may be
Parquet or gzipped JSON Lines, and is rarely used whole: the seed projects kept English rows
only (`--data-filter lang=en`) and tried a few rows first (`--data-limit N`). A selection reads
its files in order as one stream of records, keeps the rows every filter accepts, stops after
`limit` of them, and parses them with the record formats of `phicore.data.formats` (one format
for the whole selection, detected from its first record) or, for CSV/TSV files, the table rules
of `phicore.data.tables`. Local files with `--data-filter`/`--data-limit`, or in a format only a
selection reads (`.parquet`, `.jsonl.gz`, `.json.gz`), are selections too.

Files: `.jsonl` and `.jsonl.gz` are streamed line by line; `.parquet` in row batches (through
the optional `pyarrow`, `pip install phicore[hub]`); `.json`, `.json.gz`, `.csv`, `.tsv` are
read whole. Flat OpenAssistant message tables (rows with message_id, parent_id, role, text: the
oasst1 Parquet files) are assembled into message trees first, so they train like the trees
export; the filters then apply to messages (a reply whose parent was filtered out is dropped)
and the limit to trees.

`digest()` is what the tokenised cache keys on in place of one file's sha256: every file's
sha256, the dataset's identity (hub id, revision, config, split) and the filters and limit.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from .files import _decode, _json_line, _json_newlines, _read_json, binary_lines, decode_line, file_error
from .formats import (Conversation, DataError, FieldMap, Where, check_format, json_type_name, record_parser)
from .tables import read_csv_rows, table_to_conversations

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".jsonl.gz", ".json.gz")
NEEDS_SELECTION = (".parquet", ".jsonl.gz", ".json.gz")  # local files only a selection reads
PYARROW_HINT = "pip install 'phicore[hub]' (or pip install pyarrow)"
_OASST_MESSAGE = {"message_id", "parent_id", "role", "text"}


def data_suffix(path) -> str:
    """The data-file suffix of a path, compressed ones whole (".jsonl.gz"), lower case."""
    name = str(path).lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), Path(name).suffix)


# ----------------------------------------------------------------------------- filters

@dataclass(frozen=True)
class RowFilter:
    """`--data-filter FIELD=VALUE`: keep a row whose FIELD equals VALUE. A dotted FIELD
    (`prompt.lang`) reaches into nested objects; in an OpenAssistant tree a field the record
    lacks is looked up on its first message (`lang` of the `prompt`). Values compare as text,
    booleans and null spelled as in JSON (`deleted=false`)."""

    field: str
    value: str

    def __str__(self) -> str:
        return f"{self.field}={self.value}"

    def lookup(self, record: dict) -> tuple[bool, Any]:
        """(found, value) of the field in a record."""
        node: Any = record
        if isinstance(record, dict) and self.field.split(".")[0] not in record \
                and isinstance(record.get("prompt"), dict) and "replies" in record["prompt"]:
            node = record["prompt"]  # an OpenAssistant tree: the fields of its first message
        for part in self.field.split("."):
            if not isinstance(node, dict) or part not in node:
                return False, None
            node = node[part]
        return True, node

    def keeps(self, record: dict) -> bool:
        found, value = self.lookup(record)
        if not found:
            return False
        if isinstance(value, bool) or value is None:
            return json.dumps(value) == self.value
        return str(value) == self.value


def parse_filters(text: Optional[str]) -> tuple[RowFilter, ...]:
    """The filters of `--data-filter` (comma-joined FIELD=VALUE items); DataError for a bad one."""
    filters = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise DataError(f"--data-filter {item!r}: expected FIELD=VALUE (e.g. lang=en)")
        filters.append(RowFilter(name.strip(), value.strip()))
    return tuple(filters)


# ----------------------------------------------------------------------------- reading files

def _jsonl_records(path: Path, name: str) -> Iterator[tuple[Any, int]]:
    """(record, line) of a JSON Lines file, plain or gzipped, one line at a time."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        f = opener(path, "rb")
    except OSError as e:
        raise file_error(name, e) from None
    with f:
        try:
            for lineno, raw in enumerate(binary_lines(f), start=1):
                line = decode_line(raw, name, lineno)
                if line.strip():
                    yield _json_line(line, name, lineno), lineno
        except (gzip.BadGzipFile, EOFError, OSError) as e:
            raise DataError(f"{name}: cannot read the gzip stream ({e})") from None


def _read_bytes(path: Path, name: str) -> bytes:
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.name.lower().endswith(".gz") else data
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{name}: cannot read the gzip stream ({e})") from None
    except OSError as e:
        raise file_error(name, e) from None


def _parquet_records(path: Path, name: str) -> Iterator[tuple[Any, int]]:
    """(row as a dict, row number) of a Parquet file, read a batch of rows at a time."""
    try:
        import pyarrow.parquet as pq  # optional: only Parquet files need it
    except ImportError:
        raise DataError(f"{name}: Parquet files need pyarrow: {PYARROW_HINT}") from None
    try:
        reader = pq.ParquetFile(str(path))
        row = 0
        for batch in reader.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield record, row
    except OSError as e:
        raise file_error(name, e) from None
    except Exception as e:  # pyarrow's ArrowInvalid and kin: a broken or non-Parquet file
        raise DataError(f"{name}: cannot read the Parquet file ({str(e).splitlines()[0] if str(e) else e})") from None


def _records(path: Path, name: str) -> Iterator[tuple[Any, int]]:
    suffix = data_suffix(path)
    if suffix in (".jsonl", ".jsonl.gz"):
        yield from _jsonl_records(path, name)
    elif suffix == ".parquet":
        yield from _parquet_records(path, name)
    else:  # .json, .json.gz (and anything else): a JSON list, one object, or JSON Lines
        text = _decode(_read_bytes(path, name), name)
        if not text.strip():
            raise DataError(f"{name}: file is empty")
        yield from _read_json(_json_newlines(text), name)


def _is_oasst_message(record: Any) -> bool:
    return isinstance(record, dict) and _OASST_MESSAGE <= set(record) and "replies" not in record


def assemble_oasst_trees(rows: list[tuple[dict, Where]]) -> Iterator[tuple[dict, Where]]:
    """Flat OpenAssistant messages -> one `{text, role, replies}` tree per root message (a row
    whose parent_id is null), in file order; a reply whose parent is missing is dropped."""
    nodes, roots = {}, []
    for record, where in rows:
        node = {k: v for k, v in record.items() if k != "parent_id"}
        node["replies"] = []
        nodes[record["message_id"]] = node
        if record["parent_id"] is None:
            roots.append((node, where))
    for record, _ in rows:
        parent = nodes.get(record["parent_id"]) if record["parent_id"] is not None else None
        if parent is not None:
            parent["replies"].append(nodes[record["message_id"]])
    yield from roots


# ----------------------------------------------------------------------------- the selection

@dataclass
class DataSelection:
    """Files read as one dataset (see the module docstring). `name`: how messages and the log
    call it ("OpenAssistant/oasst1 (train)"); `identity`: what else the data is (hub id,
    revision, config, split), recorded and part of the cache key; `labels`: each file's name in
    messages (default: its path)."""

    name: str
    files: list
    filters: tuple = ()
    limit: Optional[int] = None
    identity: dict = field(default_factory=dict)
    labels: Optional[list] = None
    _hashes: Optional[list] = field(default=None, repr=False)

    def label(self, i: int) -> str:
        return self.labels[i] if self.labels else str(self.files[i])

    @property
    def stem(self) -> str:
        """A readable cache-folder prefix: ORG_NAME-SPLIT, or a local file's name."""
        if "dataset" in self.identity:
            return f"{self.identity['dataset'].replace('/', '_')}-{self.identity.get('split')}"
        name = Path(str(self.files[0])).name
        return name[:len(name) - len(data_suffix(name))] or name

    def file_hashes(self) -> list:
        """sha256 of each file (read once, in blocks)."""
        if self._hashes is None:
            hashes = []
            for i, path in enumerate(self.files):
                digest = hashlib.sha256()
                try:
                    with open(path, "rb") as f:
                        for block in iter(lambda: f.read(1 << 20), b""):
                            digest.update(block)
                except OSError as e:
                    raise file_error(self.label(i), e) from None
                hashes.append(digest.hexdigest())
            self._hashes = hashes
        return self._hashes

    def describe(self) -> dict:
        """What the data is, JSON-ready: for the log, the run record and the checkpoints."""
        return {**self.identity, "files": [{"path": self.label(i), "sha256": h}
                                           for i, h in enumerate(self.file_hashes())],
                "filters": [str(f) for f in self.filters], "limit": self.limit}

    def digest(self) -> str:
        """The cache key's data part: sha256 of `describe()`."""
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()

    # -- reading
    def conversations(self, format: Optional[str] = None,
                      fields: Optional[FieldMap] = None) -> Iterator[Conversation]:
        """The selected rows as conversations, in file order, with one-line DataErrors."""
        check_format(format, self.name, fields)
        kept, seen, parser = 0, 0, None
        found = [0] * len(self.filters)  # rows that have each filter's field, for the "no rows" message
        pending_oasst: list = []

        def parse(record: Any, where: Where) -> Conversation:
            nonlocal parser
            if parser is None:
                parser = record_parser(record, where, format, fields)
            if not isinstance(record, dict):
                raise where.error(f"expected a JSON object, got {json_type_name(record)}")
            return parser(record, where)

        for i, path in enumerate(self.files):
            path, label = Path(path), self.label(i)
            if data_suffix(path) in (".csv", ".tsv"):
                table = self._table(path, label, format, fields, self.limit - kept if self.limit else None)
                kept += len(table)
                seen += len(table)
                yield from table
            else:
                for record, line in _records(path, label):
                    seen += 1
                    if self.filters and isinstance(record, dict):
                        for n, f in enumerate(self.filters):
                            found[n] += f.lookup(record)[0]
                        if not all(f.keeps(record) for f in self.filters):
                            continue
                    where = Where(label, line)
                    if not format and not fields and _is_oasst_message(record):
                        pending_oasst.append((record, where))  # assembled into trees once all are read
                        continue
                    yield parse(record, where)
                    kept += 1
                    if self.limit and kept >= self.limit:
                        return
            if self.limit and kept >= self.limit:
                return
        for tree, where in assemble_oasst_trees(pending_oasst):
            yield parse(tree, where)
            kept += 1
            if self.limit and kept >= self.limit:
                return
        if not kept:
            why = ""
            if self.filters:
                has = "; ".join(f"field {f.field!r} in {n} of them" for f, n in zip(self.filters, found))
                why = f" left after --data-filter {','.join(map(str, self.filters))} ({seen} rows read; {has})"
            raise DataError(f"{self.name}: no rows{why}")

    def _table(self, path: Path, label: str, format: Optional[str], fields: Optional[FieldMap],
               limit: Optional[int]) -> list[Conversation]:
        """A CSV/TSV file's conversations: the filters match header names (case-insensitive)."""
        text = _decode(_read_bytes(path, label), label)
        if not text.strip():
            raise DataError(f"{label}: file is empty")
        rows = read_csv_rows(text, label, "\t" if data_suffix(path) == ".tsv" else ",")
        if self.filters or limit:
            header = [c.strip().lower() for c in rows[0][1]] if rows else []
            body = [(n, cells) for n, cells in rows[1:] if any(c.strip() for c in cells)]
            for f in self.filters:
                if f.field.lower() not in header:
                    raise DataError(f"{label}: --data-filter {f}: no column {f.field!r} in the header")
                col = header.index(f.field.lower())
                body = [(n, cells) for n, cells in body if col < len(cells) and cells[col].strip() == f.value]
            if not body:
                return []
            rows = rows[:1] + body[:limit]
        return table_to_conversations(rows, label, format, unit="line", fields=fields)


def local_selection(path: str, filters: tuple, limit: Optional[int]) -> Optional[DataSelection]:
    """A local data file as a selection when it needs one (filters, a limit, or a format only a
    selection reads); None for a plain file, which keeps the single-file path and cache keys."""
    if not filters and limit is None and data_suffix(path) not in NEEDS_SELECTION:
        return None
    return DataSelection(name=str(path), files=[Path(path)], filters=tuple(filters), limit=limit,
                         labels=[str(path)])

