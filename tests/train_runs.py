"""Helpers for tests that run train.py in-process: its entry point, data files, the adapter it wrote."""

import json
import sys
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import train  # noqa: E402  (train.py at the repo root)


def run_main(*args) -> int:
    """train.main in-process; argparse's SystemExit becomes its code."""
    try:
        return train.main([str(a) for a in args])
    except SystemExit as exit:
        return exit.code


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def adapter(out) -> dict:
    """The adapter tensors a run wrote to OUT/ (PEFT key names)."""
    return load_file(str(Path(out) / "adapter_model.safetensors"))
