"""The output folder of a run (--out): who may write it, what an earlier run left in it, and
keeping a finished run's work safe.

- One run at a time: `lock()` takes an operating-system lock on OUT/.phicore.lock (released when
  the process ends, even by SIGKILL); a second run into the same folder stops with one line
  naming the first one's process and command.
- What is there: `finished()` (training_config.json with a result: a finished run) and
  `checkpoints()` (an unfinished run that can be continued).
- `--overwrite`: `set_aside()` moves the earlier run's files into OUT/.replaced/ before the new
  run writes anything; `restore()` puts them back when the new run fails or is rejected, and
  `discard()` deletes them once it has finished. A run killed in between leaves .replaced/,
  which the next run in the folder restores unless that killed run got as far as a checkpoint
  or a finished adapter (`recover()`).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from ..export.model_card import CARD_NAME
from ..peft_io import CONFIG_NAME, WEIGHTS_NAME
from ..record import RECORD_NAME, RecordError, RunRecord
from ..tokenizer_files import (CHAT_TEMPLATE_JINJA_FILE, SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE,
                               TOKENIZER_FILE)
from .checkpoint import PREFIX, list_checkpoints
from .config import UsageError
from .metrics import CURVES_NAME, CSV_NAME, JSONL_NAME

LOCK_NAME = ".phicore.lock"
SET_ASIDE = ".replaced"
BASE_NAME = "base"  # a tiny preset's base model, built into the run's folder
BEST_NAME = "best"
# everything a run writes into OUT (beside the lock and .replaced/)
RUN_FILES = (WEIGHTS_NAME, CONFIG_NAME, RECORD_NAME, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE,
             CHAT_TEMPLATE_JINJA_FILE, JSONL_NAME, CSV_NAME, CURVES_NAME, CARD_NAME, BEST_NAME, BASE_NAME)


class OutputFolder:
    def __init__(self, path):
        self.path = Path(path)
        self._lock_file = None

    # -- one run at a time
    def lock(self) -> None:
        """Create the folder if needed and take its lock, or raise UsageError (one line) naming the
        run that holds it. Held until `unlock()` or the end of the process."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / LOCK_NAME, "a+", encoding="utf-8")
        except FileExistsError:
            raise UsageError(f"{self.path}: exists and is not a folder (--out)") from None
        except PermissionError:
            raise UsageError(f"{self.path}: permission denied: cannot write the output folder (--out)") from None
        except OSError as err:
            raise UsageError(f"{self.path}: cannot write the output folder ({err.strerror}) (--out)") from None
        if not _try_lock(handle):
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UsageError(f"{self.path}: another run is writing this folder ({holder}); wait for it to end "
                             "or choose another --out")
        if not _same_file(handle, self.path / LOCK_NAME):  # its holder removed it as we locked: take the new one
            handle.close()
            return self.lock()
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                     f"{' '.join(sys.argv) or 'python'}\n")
        handle.flush()
        self._lock_file = handle

    def unlock(self) -> None:
        """Release the lock and remove its file (a run that was refused leaves the folder as it
        found it). Removed before it is released, so whoever locks next locks a new file."""
        if self._lock_file is not None:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            self._lock_file.close()
            self._lock_file = None

    # -- what is there
    def finished(self) -> Optional[RunRecord]:
        """The record of a finished run in the folder (None: none, or no result in it)."""
        path = self.path / RECORD_NAME
        if not path.is_file():
            return None
        try:
            record = RunRecord.read(path)
        except RecordError:
            return None
        return record if record.result is not None else None

    def checkpoints(self) -> list:
        return list_checkpoints(self.path) if self.path.is_dir() else []

    def holds_a_run(self) -> bool:
        """A finished run, an adapter, or checkpoints: work that a new run must not replace."""
        return bool(self.finished() or (self.path / WEIGHTS_NAME).exists() or self.checkpoints())

    def remove_stale_best(self) -> None:
        """best/ of an earlier, unfinished run: never left beside a newer run's adapter."""
        shutil.rmtree(self.path / BEST_NAME, ignore_errors=True)

    # -- --overwrite
    def _run_paths(self) -> list:
        names = [*RUN_FILES, *(p.name for p in self.path.glob(PREFIX + "*"))]
        return [self.path / name for name in names if (self.path / name).exists()]

    def set_aside(self) -> bool:
        """Move the earlier run's files into .replaced/ (renames, nothing copied). If .replaced/
        already holds a run (an earlier --overwrite that never finished), what is in the folder
        now is that unfinished run's and is deleted instead. Returns whether anything moved."""
        aside = self.path / SET_ASIDE
        if aside.exists():
            for path in self._run_paths():
                _remove(path)
            return False
        paths = self._run_paths()
        if not paths:
            return False
        aside.mkdir()
        for path in paths:
            os.replace(path, aside / path.name)
        return True

    def restore(self) -> None:
        """Put the set-aside run back, replacing what the failed or rejected new run wrote."""
        aside = self.path / SET_ASIDE
        if not aside.is_dir():
            return
        for path in self._run_paths():
            _remove(path)
        for path in aside.iterdir():
            os.replace(path, self.path / path.name)
        aside.rmdir()

    def discard(self) -> None:
        """The new run has finished: the set-aside run goes."""
        shutil.rmtree(self.path / SET_ASIDE, ignore_errors=True)

    def recover(self) -> Optional[str]:
        """After a run killed during --overwrite: restore the set-aside run unless the killed run
        left something to continue (a checkpoint) or finished. Returns what was done, if anything."""
        aside = self.path / SET_ASIDE
        if not aside.is_dir():
            return None
        if self.finished():
            self.discard()
            return None
        if self.checkpoints():
            return None  # the --overwrite run can be resumed; the old run stays aside until it finishes
        self.restore()
        return f"{self.path}: an earlier --overwrite run stopped before its first checkpoint; the run it was " \
               "replacing is back in place"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _same_file(handle, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def _try_lock(handle) -> bool:
    """An exclusive, non-blocking lock on an open file (fcntl on POSIX, msvcrt on Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
