"""Helpers for tests that run train.py and infer.py in-process: their entry points, data files,
the adapter a run wrote."""

import io
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import infer  # noqa: E402  (infer.py at the repo root)
import train  # noqa: E402  (train.py at the repo root)


def run_main(*args) -> int:
    """train.main in-process; argparse's SystemExit becomes its code."""
    try:
        return train.main([str(a) for a in args])
    except SystemExit as exit:
        return exit.code


def run_infer(*args, stdin: str = "") -> tuple:
    """(exit status, what infer.main printed to stdout), with `stdin` as its standard input."""
    out = io.StringIO()
    try:
        rc = infer.main([str(a) for a in args], stdin=io.StringIO(stdin), stdout=out)
    except SystemExit as exit:
        rc = exit.code
    return rc, out.getvalue()


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def adapter(out) -> dict:
    """The adapter tensors a run wrote to OUT/ (PEFT key names)."""
    return load_file(str(Path(out) / "adapter_model.safetensors"))
