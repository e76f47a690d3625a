"""Metrics a person can plot: metrics.jsonl (one object a row), metrics.csv (fixed columns),
and training_curves.png when matplotlib is installed."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

COLUMNS = ["step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_perplexity"]
JSONL_NAME, CSV_NAME, CURVES_NAME = "metrics.jsonl", "metrics.csv", "training_curves.png"


class MetricsLog:
    """Appends rows to OUT/metrics.jsonl and OUT/metrics.csv. On resume, rows after the
    resumed step are dropped first, so the files describe one consistent run."""

    def __init__(self, out_dir, resume_step: int = 0):
        self.jsonl = Path(out_dir) / JSONL_NAME
        self.csv = Path(out_dir) / CSV_NAME
        rows = self.read() if resume_step else []
        rows = [r for r in rows if r.get("step", 0) <= resume_step]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        with self.csv.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in COLUMNS} for r in rows)

    def log(self, **row):
        row = {k: (round(v, 8) if isinstance(v, float) else v) for k, v in row.items()}
        with self.jsonl.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        with self.csv.open("a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writerow({k: row.get(k, "") for k in COLUMNS})

    def read(self) -> list:
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]

    def plot(self, path=None):
        """Draw loss / val loss and lr against the step; returns the path, or None without
        matplotlib (an optional extra: pip install phicore[plot])."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        rows = self.read()
        train = [r for r in rows if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
        evals = [r for r in rows if "val_loss" in r]
        fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        if evals:
            ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss")
        ax_loss.legend()
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train])
        ax_lr.set_xlabel("step")
        ax_lr.set_ylabel("learning rate")
        fig.tight_layout()
        path = Path(path) if path else self.jsonl.with_name(CURVES_NAME)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
