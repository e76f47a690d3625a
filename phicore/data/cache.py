"""A tokenised dataset cache: tokenise a data file once, then memory-map the result.

The first run reads the data file as a stream (`files.iter_conversations`: a JSON Lines file
line by line), tokenises it on every CPU core (worker processes, a tqdm bar) and writes one
folder of flat arrays; later runs and every data-parallel rank map those files instead of
tokenising again, and read only the examples of the batch they are building, so resident
memory does not grow with the number of rows.

CACHE_DIR/STEM-KEY/                          KEY: first 16 hex digits of the sha256 of
  input_ids.i32   all examples' token ids, end to end (int32)
  targets.u8      1 where the token is a target (its label is its id), else 0
  offsets.i64     example i is [offsets[i], offsets[i+1]) (n+1 int64)
  lengths.i32     each example's token count (what batching needs, mapped as it is)
  lines.i64       the data file's line (or row) each example came from
  meta.json       the key's parts, the counts, the tokenising statistics

The key covers everything the tokens depend on: the data file's bytes (sha256), the
tokenizer (its full serialised vocabulary, merges, normaliser and post-processor, special
tokens and chat template), the prompt format, `max_length`, `train_on_prompt`, a forced
record format, the field mapping (`--prompt-field`/`--response-field`/`--text-field`) and the
cache version (raised when the layout, or what reading a file yields, changes); for a
`DataSelection` (a hub dataset's split, a filtered or limited file) its digest stands in for
the file's sha256: every file's sha256, the dataset id, revision, config and split, the row
filters and the limit. Change any of them and the run tokenises afresh into a new folder. A
folder is written under a temporary name and renamed when complete; two processes racing to
write the same entry both succeed, one rename wins. A data file that cannot be read (missing,
a folder, a symbolic link loop) is a one-line `DataError`; a huge row is cut to what
`max_length` can use before it reaches a worker.

CACHE_DIR: `--data-cache`, else `$PHICORE_CACHE_DIR`, else `$XDG_CACHE_HOME/phicore/datasets`
(`~/.cache/phicore/datasets`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from .files import file_error, iter_conversations
from .formats import Conversation, FieldMap
from .prompts import PromptFormat
from .selection import DataSelection
from .tokenization import (IGNORE_INDEX, Example, TokenizeStats, bound_conversation, bos_ids, field_char_limit,
                           max_token_chars, tokenize_conversation)

CACHE_VERSION = 3  # 3: field mappings; rows refused or read differently (empty responses, tables, CR lines)
META = "meta.json"
FILES = {"input_ids": ("input_ids.i32", np.int32), "targets": ("targets.u8", np.uint8),
         "offsets": ("offsets.i64", np.int64), "lengths": ("lengths.i32", np.int32),
         "lines": ("lines.i64", np.int64)}
CHUNK_ROWS = 256  # conversations per task sent to a worker
MIN_ROWS_FOR_WORKERS = 4 * CHUNK_ROWS  # below this, forking costs more than it saves
TOKENIZERS_PARALLELISM = "TOKENIZERS_PARALLELISM"  # the tokenizers library's thread-pool switch


def default_cache_dir() -> Path:
    """$PHICORE_CACHE_DIR, else $XDG_CACHE_HOME/phicore/datasets, else ~/.cache/phicore/datasets."""
    if os.environ.get("PHICORE_CACHE_DIR"):
        return Path(os.environ["PHICORE_CACHE_DIR"]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "phicore" / "datasets"


# ----------------------------------------------------------------------------- the key

def file_sha256(path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that decides the ids a tokenizer gives: its serialised backend
    (vocabulary, merges, normaliser, pre-tokeniser, post-processor, added tokens), the
    special token ids and the chat template."""
    backend = getattr(tokenizer, "backend", None)
    parts = {
        "backend": backend.to_str() if backend is not None else type(tokenizer).__qualname__,
        "special_ids": [getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")],
        "stop_ids": list(getattr(tokenizer, "stop_token_ids", None) or []),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def prompt_format_fingerprint(fmt: PromptFormat) -> str:
    """The format's class and its plain settings (template text, separator, end markers);
    a chat format's template is part of the tokenizer's fingerprint."""
    plain = {k: v for k, v in sorted(vars(fmt).items())
             if isinstance(v, (str, int, float, bool, type(None), list, tuple))}
    return json.dumps({"class": type(fmt).__name__, **plain}, sort_keys=True, default=str)


def data_name(data) -> str:
    """How messages name the data: a file's path, or a `DataSelection`'s name."""
    return data.name if isinstance(data, DataSelection) else str(data)


def cache_key(data_path, tokenizer, prompt_format: PromptFormat, *, max_length: int, train_on_prompt: bool,
              record_format: Optional[str] = None, fields: Optional[FieldMap] = None) -> dict:
    """The parts of the key (hashing the data file reads it once, in blocks; a file that
    cannot be read is a `DataError`). `data_path` may be a `DataSelection` (several files, row
    filters, a limit, a hub dataset's identity): its `digest()` stands in for the file's sha256."""
    if isinstance(data_path, DataSelection):
        data_sha256 = data_path.digest()
    else:
        try:
            data_sha256 = file_sha256(data_path)
        except OSError as e:
            raise file_error(str(data_path), e) from None
    return {
        "version": CACHE_VERSION,
        "data_sha256": data_sha256,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "prompt_format": prompt_format_fingerprint(prompt_format),
        "max_length": int(max_length),
        "train_on_prompt": bool(train_on_prompt),
        "record_format": record_format,
        "fields": (fields or FieldMap()).as_dict(),
    }


def entry_dir(cache_dir, data_path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = data_path.stem if isinstance(data_path, DataSelection) else Path(data_path).stem
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:48]
    return Path(cache_dir) / f"{stem}-{digest}"


# ----------------------------------------------------------------------------- reading

class CachedExamples(Sequence[Example]):
    """A cache entry's examples (or a subset of them), read from the mapped files on access.

    `lengths` answers from the lengths file; `examples[i]` builds one `Example` from the maps.
    """

    def __init__(self, folder: Path, arrays: dict, meta: dict, index: Optional[np.ndarray] = None):
        self.folder, self._arrays, self.meta, self._index = folder, arrays, meta, index

    def __len__(self) -> int:
        return len(self._index) if self._index is not None else len(self._arrays["offsets"]) - 1

    def _position(self, i: int) -> int:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range ({len(self)} examples)")
        return int(self._index[i]) if self._index is not None else i

    def __getitem__(self, i) -> Example:
        if isinstance(i, slice):
            return self.subset(np.arange(len(self))[i])
        j = self._position(int(i))
        start, end = (int(x) for x in self._arrays["offsets"][j:j + 2])
        ids = self._arrays["input_ids"][start:end].astype(np.int64)
        labels = np.where(self._arrays["targets"][start:end] != 0, ids, IGNORE_INDEX)
        return Example(ids.tolist(), labels.tolist(), (self.meta["data"], int(self._arrays["lines"][j])))

    def __iter__(self) -> Iterator[Example]:
        for i in range(len(self)):
            yield self[i]

    @property
    def lengths(self) -> np.ndarray:
        """Token counts (int32): the mapped lengths file itself, or its entries at the subset."""
        lengths = self._arrays["lengths"]
        return lengths if self._index is None else lengths[self._index]

    def subset(self, index: np.ndarray) -> "CachedExamples":
        """The examples at `index` (positions in this sequence), still read lazily."""
        index = np.asarray(index)
        if self._index is not None:
            index = self._index[index]
        return CachedExamples(self.folder, self._arrays, self.meta, index)

    @property
    def stats(self) -> TokenizeStats:
        return TokenizeStats(**self.meta["stats"])


def _map(path: Path, dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def open_entry(folder) -> CachedExamples:
    """Map a complete cache folder (read-only)."""
    folder = Path(folder)
    meta = json.loads((folder / META).read_text(encoding="utf-8"))
    arrays = {name: _map(folder / file, dtype) for name, (file, dtype) in FILES.items()}
    if len(arrays["offsets"]) != meta["examples"] + 1 or len(arrays["lengths"]) != meta["examples"] \
            or len(arrays["input_ids"]) != meta["stats"]["tokens"]:
        raise ValueError(f"{folder}: cache entry is inconsistent with its {META}; delete the folder")
    return CachedExamples(folder, arrays, meta)


# ----------------------------------------------------------------------------- tokenising

_JOB = None  # (tokenizer, prompt format, max_length, train_on_prompt, bos ids, max token chars): set before forking


def _tokenize_chunk(conversations: list[Conversation]):
    """Worker: a chunk of conversations -> flat arrays and the chunk's statistics."""
    tokenizer, fmt, max_length, train_on_prompt, bos, token_chars = _JOB
    ids_out, targets_out, lengths, lines = [], [], [], []
    stats = TokenizeStats(total=len(conversations))
    for conv in conversations:
        ids, labels, truncated = tokenize_conversation(conv, fmt, tokenizer, max_length, train_on_prompt, bos,
                                                       token_chars)
        targets = [label != IGNORE_INDEX for label in labels]
        if not stats.count(len(ids), sum(targets), truncated):
            continue
        ids_out += ids
        targets_out += targets
        lengths.append(len(ids))
        lines.append(conv.source[1])
    return (np.asarray(ids_out, dtype=np.int32), np.asarray(targets_out, dtype=np.uint8),
            np.asarray(lengths, dtype=np.int64), np.asarray(lines, dtype=np.int64), stats)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def count_lines(path) -> int:
    """Line breaks in a file (\\n, \\r\\n or a lone \\r: the progress bar's total for JSON
    Lines), read in blocks."""
    count, last = 0, b""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            joined = last[-1:] + block  # a \r\n split across blocks is counted once
            count += block.count(b"\n") + block.count(b"\r") - joined.count(b"\r\n")
            last = block
    return count


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _tokenizers_parallelism_off_for_forked_workers():
    """TOKENIZERS_PARALLELISM=false in the environment while the worker processes are forked,
    then this process's environment as it was (a value the user set is left alone).

    The workers are the parallelism: each must tokenise on one thread. The tokenizers library
    reads the variable in a forked child, to keep its own thread pool off there (no deadlock on
    a pool inherited mid-use) and, in the versions that check, to skip its "the current process
    just got forked, after parallelism has already been used" warning; so it has to be in the
    environment the children inherit at fork time. It leaves this process's environment as soon
    as the workers exist, so nothing else here (later tokenizer calls, subprocesses) sees it.
    """
    if TOKENIZERS_PARALLELISM in os.environ:
        yield
        return
    os.environ[TOKENIZERS_PARALLELISM] = "false"
    try:
        yield
    finally:
        os.environ.pop(TOKENIZERS_PARALLELISM, None)


def _tokenized_chunks(conversations: Iterable[Conversation], workers: int) -> Iterator[tuple]:
    """Chunks tokenised in order: in this process, or on `workers` forked processes with at
    most two chunks a worker in flight (the reader never runs ahead of the writer)."""
    chunks = _chunks(conversations, CHUNK_ROWS)
    if workers <= 1:
        for chunk in chunks:
            yield _tokenize_chunk(chunk)
        return
    with _tokenizers_parallelism_off_for_forked_workers():
        pool = multiprocessing.get_context("fork").Pool(workers)  # forks every worker now
    pending: deque = deque()
    try:
        for chunk in chunks:
            pending.append(pool.apply_async(_tokenize_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        _shut_down(pool, pending)


def _shut_down(pool, pending: deque, grace: float = 30.0) -> None:
    """Let the chunks in flight finish, then let the workers exit. Not `terminate()` at once (a
    bad row found while workers run, Ctrl-C): it can kill a worker in the middle of writing
    its result, and the pool's result thread then waits for the rest of that message forever.
    A worker that died (Ctrl-C reaches it too) leaves its result unfinished: after `grace`
    seconds the pool is terminated anyway."""
    deadline = time.monotonic() + grace
    for result in pending:
        result.wait(max(0.0, deadline - time.monotonic()))
    if all(result.ready() for result in pending):
        pool.close()
    else:
        pool.terminate()
    pool.join()


def build_entry(folder: Path, data_path, key: dict, tokenizer, prompt_format: PromptFormat, *, max_length: int,
                train_on_prompt: bool, record_format: Optional[str] = None, fields: Optional[FieldMap] = None,
                workers: Optional[int] = None, show_progress: bool = True,
                log: Callable[[str], None] = print) -> Path:
    """Tokenise the data file into `folder` (written as a temporary folder, then renamed)."""
    global _JOB
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    selection = data_path if isinstance(data_path, DataSelection) else None
    data_path = selection.name if selection else Path(data_path)
    streaming = selection is None and data_path.suffix.lower() == ".jsonl"
    try:
        total = count_lines(data_path) if streaming else None
    except OSError as e:
        raise file_error(str(data_path), e) from None
    if workers is None:  # every core, unless the file is too small to be worth forking for
        small = total is not None and total < MIN_ROWS_FOR_WORKERS
        if selection is not None:  # rows unknown before reading: judged by the files' size, or the limit
            small = (selection.limit or MIN_ROWS_FOR_WORKERS) < MIN_ROWS_FOR_WORKERS or \
                sum(Path(f).stat().st_size for f in selection.files) < MIN_ROWS_FOR_WORKERS * 1024
        workers = 1 if small else default_workers()
    workers = max(1, workers)
    can_fork = "fork" in multiprocessing.get_all_start_methods() and sys.platform.startswith("linux")
    workers = workers if can_fork else 1
    rows = f"{total} rows" if total is not None else "rows"
    log(f"data cache: tokenising {rows} of {data_path} with {workers} process{'es' * (workers > 1)} "
        f"into {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    stats, offset, examples = TokenizeStats(), 0, 0
    token_chars = max_token_chars(tokenizer)
    _JOB = (tokenizer, prompt_format, max_length, train_on_prompt, bos_ids(tokenizer), token_chars)
    started = time.perf_counter()
    try:
        files = {name: (tmp / file).open("wb") for name, (file, _) in FILES.items()}
        try:
            files["offsets"].write(np.zeros(1, dtype=np.int64).tobytes())
            bar = tqdm(total=total, desc="tokenising", unit="row", disable=not show_progress, dynamic_ncols=True)
            limit = field_char_limit(max_length, token_chars)  # a huge row is cut before it reaches a worker
            source = selection.conversations(record_format, fields) if selection \
                else iter_conversations(data_path, record_format, fields)
            conversations = (bound_conversation(conv, limit) for conv in source)
            for ids, targets, lengths, lines, chunk_stats in _tokenized_chunks(conversations, workers):
                files["input_ids"].write(ids.tobytes())
                files["targets"].write(targets.tobytes())
                files["offsets"].write((offset + np.cumsum(lengths)).astype(np.int64).tobytes())
                files["lengths"].write(lengths.astype(np.int32).tobytes())
                files["lines"].write(lines.tobytes())
                offset += int(lengths.sum())
                examples += len(lengths)
                for field, value in asdict(chunk_stats).items():
                    setattr(stats, field, getattr(stats, field) + value)
                bar.update(chunk_stats.total)
            bar.close()
        finally:
            for f in files.values():
                f.close()
        meta = {"key": key, "data": str(data_path), "examples": examples, "stats": asdict(stats),
                "seconds": round(time.perf_counter() - started, 3), "workers": workers}
        (tmp / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")  # last: marks complete
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same entry first: use theirs
            if not (folder / META).exists():
                raise
    finally:
        _JOB = None
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def open_or_build(data_path, tokenizer, prompt_format: PromptFormat, *, max_length: int,
                  train_on_prompt: bool = False, record_format: Optional[str] = None,
                  fields: Optional[FieldMap] = None, cache_dir=None, build: bool = True,
                  workers: Optional[int] = None, show_progress: bool = True,
                  log: Callable[[str], None] = print, wait_seconds: float = 0.5) -> tuple[CachedExamples, bool]:
    """The cached examples of a data file, tokenising it first on a miss. `fields`: the
    mapping of record fields or table columns (`FieldMap`), part of the key.

    Returns (examples, hit). With `build=False` (data-parallel ranks other than each node's
    first) a miss waits for the entry to appear instead of tokenising too. A data file that
    cannot be read or used raises `DataError` (one line).
    """
    fields = fields or FieldMap()
    if fields:
        fields.check(data_name(data_path), record_format)
    key = cache_key(data_path, tokenizer, prompt_format, max_length=max_length, train_on_prompt=train_on_prompt,
                    record_format=record_format, fields=fields)
    folder = entry_dir(cache_dir or default_cache_dir(), data_path, key)
    if (folder / META).exists():
        log(f"data cache: hit {folder} (no tokenisation)")
        return open_entry(folder), True
    if build:
        build_entry(folder, data_path, key, tokenizer, prompt_format, max_length=max_length,
                    train_on_prompt=train_on_prompt, record_format=record_format, fields=fields,
                    workers=workers, show_progress=show_progress, log=log)
        return open_entry(folder), False
    while not (folder / META).exists():  # the node's first rank is tokenising it
        time.sleep(wait_seconds)
    return open_entry(folder), False
