"""Export folders (--ollama, --mlx-adapter): a new or empty folder, written complete or not at all.

`check_new_folder(DIR, flag)` refuses a target that exists with anything in it (an export never
overwrites files); `building(DIR)` yields DIR.partial to write into and renames it to DIR once
the block ends without an error (the partial folder is removed if it does not).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from . import ExportError


def check_new_folder(directory, flag: str) -> Path:
    """`directory` as a Path if it is absent or an empty folder; ExportError naming `flag` if not."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ExportError(f"{flag} {directory}: already exists and is not an empty folder; choose another folder")
    return directory


@contextlib.contextmanager
def building(directory) -> Iterator[Path]:
    """Write into DIR.partial; on success it becomes DIR (which must be absent or empty)."""
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        if directory.exists():
            directory.rmdir()  # empty: check_new_folder
        os.replace(partial, directory)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
