"""Reading a JSON file that came from a download or a user: whatever is wrong with it (a
truncated download, bytes that are not UTF-8, nesting too deep) is one line naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REDOWNLOAD = "an interrupted download? delete it and download again"


def read_json(path, error: type = ValueError) -> Any:
    """The file's JSON value; `error` (a ValueError subclass) with one line when it cannot be
    read or parsed. FileNotFoundError passes through for the caller to word."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: truncated or corrupt (not UTF-8 at byte {err.start}; {REDOWNLOAD})") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: truncated or corrupt (not valid JSON: {err.msg} at line {err.lineno} column "
                    f"{err.colno}; {REDOWNLOAD})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply") from None
