"""README's "How much memory do I need?" table, from the memory planner (phicore/memory_plan.py).

    python bench/memory_table.py            # print the table
    python bench/memory_table.py --write    # put it into README.md between its markers

Each cell is the largest micro-batch whose planned peak fits a GPU of that size: CUDA, bf16
weights and autocast, LoRA r=16 on every linear (dropout 0.05), gradient checkpointing on, the
CUDA context (phicore.memory_plan.CUDA_CONTEXT_BYTES) and a 10 % margin kept free, batches
of rows padded to the sequence length (with a padding mask from 2 rows on).
tests/test_memory_plan.py checks that README.md holds exactly this script's output.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _shapes import shape_config  # noqa: E402
from phicore.config import ModelConfig  # noqa: E402
from phicore.memory_plan import CUDA_CONTEXT_BYTES, GIB, Budget, TrainingShape, plan_training  # noqa: E402

MODELS = {"phi-2": "Phi-2", "phi-3-mini-4k": "Phi-3-mini-4k", "phi-3.5-mini": "Phi-3.5-mini",
          "phi-4-mini": "Phi-4-mini", "phi-4": "Phi-4 (14B)"}
SEQUENCES = (512, 1024, 2048, 4096)
GPU_GIB = (8, 12, 16, 24, 48, 80)
MAX_BATCH = 64
MARGIN = 0.1
BEGIN, END = "<!-- memory table: begin (bench/memory_table.py --write) -->", "<!-- memory table: end -->"


def largest_batch(config: ModelConfig, shape: TrainingShape, gib: int) -> int:
    budget = Budget("cuda", gib * GIB, MARGIN, f"{gib} GiB")
    best = 0
    for batch in range(1, MAX_BATCH + 1):
        plan = plan_training(config, replace(shape, batch_size=batch, dense_mask=batch > 1), fixed=CUDA_CONTEXT_BYTES)
        if plan.peak_bytes > budget.usable_bytes:
            break
        best = batch
    return best


def table() -> str:
    head = "| model | method | tokens per row | " + " | ".join(f"{g} GB" for g in GPU_GIB) + " |"
    lines = [head, "|" + "---|" * (3 + len(GPU_GIB))]
    for key, name in MODELS.items():
        config = ModelConfig.from_dict(shape_config(key))
        for method, quantize in (("LoRA", None), ("QLoRA", "nf4")):
            for seq in SEQUENCES:
                shape = TrainingShape(batch_size=1, seq_len=seq, weight_bytes=2, activation_bytes=2, quantize=quantize,
                                      lora_r=16, lora_dropout=0.05, grad_checkpointing=True)
                cells = []
                for gib in GPU_GIB:
                    batch = largest_batch(config, shape, gib)
                    cells.append("-" if batch == 0 else f"{MAX_BATCH}+" if batch == MAX_BATCH else str(batch))
                lines.append(f"| {name} | {method} | {seq} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_block() -> str:
    return "\n".join([BEGIN, table(), END])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = parser.parse_args(argv)
    block = readme_block()
    if not args.write:
        print(block)
        return 0
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        print(f"error: {readme}: no {BEGIN!r} ... {END!r} markers", file=sys.stderr)
        return 1
    start, end = text.index(BEGIN), text.index(END) + len(END)
    readme.write_text(text[:start] + block + text[end:], encoding="utf-8")
    print(f"written: {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
