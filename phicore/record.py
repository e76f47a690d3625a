"""`RunRecord`: what a training run leaves beside its adapter for whoever uses it next.

OUT/training_config.json holds the base model the adapter belongs to, the prompt template and
quantisation it was trained with, the run's full settings (`config`, a `RunConfig` as saved:
give the file back to `train.py --config` to run it again) and, once the run has finished,
its result. Training writes it (`phicore.train`); inference reads it (`phicore.inference`).
This module is all they share, so inference does not import the training stack.

Records written before the settings had one owner (an "args" dict instead of "config") still
read: the fields inference needs have kept their names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

RECORD_NAME = "training_config.json"


class RecordError(ValueError):
    """A run record that cannot be read: one line naming the file."""


@dataclass
class RunRecord:
    base_model: str  # folder or hub id of the base the adapter was trained on
    prompt_template: Optional[str] = None  # "chat", "instruct", a custom template; None: the tokenizer's default
    quantization: Optional[dict] = None  # {"type": "nf4", "double_quant": bool, "compute_dtype": "bfloat16"}
    config: dict = field(default_factory=dict)  # the RunConfig's settings (RunConfig.to_dict())
    world_size: int = 1  # data-parallel processes that trained it
    data_cache: Optional[str] = None  # the tokenised dataset's cache entry
    data_sources: Optional[dict] = None  # hub datasets / selections: id, revision, split, files' sha256, filters
    result: Optional[dict] = None  # steps, final_loss, best_val_loss, seconds, tokens, peak_memory_bytes, ...

    @property
    def quantized(self) -> bool:
        return bool(self.quantization and self.quantization.get("type"))

    def write(self, folder) -> Path:
        """Write OUT/training_config.json atomically; returns its path."""
        from .weights import atomic_write_text

        path = Path(folder) / RECORD_NAME
        atomic_write_text(path, json.dumps(asdict(self), indent=2, default=str) + "\n")
        return path

    @classmethod
    def read(cls, path) -> "RunRecord":
        """Read and check a record file (unknown keys of other versions are ignored)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RecordError(f"{path}: cannot read ({err})") from None
        if not isinstance(data, dict):
            raise RecordError(f"{path}: expected a JSON object")
        expected = {"base_model": str, "prompt_template": (str, type(None)), "quantization": (dict, type(None)),
                    "config": dict, "world_size": int, "data_cache": (str, type(None)), "result": (dict, type(None)),
                    "data_sources": (dict, type(None))}
        values = {}
        for key, kind in expected.items():
            if key in data:
                if not isinstance(data[key], kind) or isinstance(data[key], bool):
                    raise RecordError(f"{path}: {key} has the wrong type ({type(data[key]).__name__})")
                values[key] = data[key]
        if "base_model" not in values:
            raise RecordError(f"{path}: no base_model")
        return cls(**values)

    @staticmethod
    def find(adapter_dir) -> Optional[Path]:
        """The record of an adapter folder: in it (train.py's --out) or, for one of the run's
        checkpoint folders (OUT/best, OUT/checkpoint-40), in its parent."""
        adapter_dir = Path(adapter_dir)
        return next((p for p in (adapter_dir / RECORD_NAME, adapter_dir.parent / RECORD_NAME) if p.is_file()), None)
