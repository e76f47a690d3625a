"""Cost of building one packed batch on the data loader's side (`collate_packed`).

    python bench/collate.py [--batch 8] [--seq 2048] [--repeats 20] [--seed 0] [--json PATH]

Rows are filled greedily with examples of seeded random lengths, uniform in
[--min-length, --max-length] (default 60..400 tokens: Alpaca's Phi-3 lengths average ~195), up
to --seq tokens each, and padded to a multiple of 64 as train.py pads. Reported: the time per
batch (min and median over --repeats), and the bytes of the batch's tensors, which are what the
loader copies to the device every step. Compares nothing by itself: run it on two commits to
compare two collates (bench/results/ keeps such pairs with their commands).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# bench/ holds a kernels.py: keep it from shadowing phicore's `kernels` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from phicore.data.collate import collate_packed  # noqa: E402
from phicore.data.tokenization import Example  # noqa: E402


def packed_rows(batch: int, seq: int, min_length: int, max_length: int, seed: int) -> list:
    """`batch` rows of examples with seeded random lengths, each row filled up to `seq` tokens."""
    rng = random.Random(seed)
    rows = []
    for _ in range(batch):
        row, used = [], 0
        while True:
            n = rng.randint(min_length, max_length)
            if used + n > seq:
                break
            row.append(Example(list(range(1, n + 1)), [-100] + list(range(2, n + 1))))
            used += n
        rows.append(row)
    return rows


def batch_bytes(batch) -> dict:
    """Bytes of each tensor field of a Batch (None fields left out)."""
    return {name: t.numel() * t.element_size() for name, t in vars(batch).items() if isinstance(t, torch.Tensor)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--min-length", type=int, default=60)
    parser.add_argument("--max-length", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if not 0 < args.min_length <= args.max_length <= args.seq:
        parser.error("need 0 < --min-length <= --max-length <= --seq")
    torch.set_num_threads(args.threads)

    rows = packed_rows(args.batch, args.seq, args.min_length, args.max_length, args.seed)
    collate_packed(rows, pad_id=0, pad_to_multiple_of=64)  # warm up
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        batch = collate_packed(rows, pad_id=0, pad_to_multiple_of=64)
        seconds.append(time.perf_counter() - start)
    sizes = batch_bytes(batch)
    result = {
        "command": "python bench/collate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": date.today().isoformat(),
        "device": f"cpu: {platform.processor() or platform.machine()}, {args.threads} thread(s)",
        "torch": torch.__version__,
        "shape": {"batch": args.batch, "tokens_per_row": int(batch.input_ids.shape[1]),
                  "examples": sum(len(r) for r in rows), "real_tokens": batch.num_tokens},
        "ms_per_batch_min": round(min(seconds) * 1e3, 3),
        "ms_per_batch_median": round(statistics.median(seconds) * 1e3, 3),
        "batch_tensor_bytes": sizes,
        "batch_tensor_bytes_total": sum(sizes.values()),
    }
    print(f"collate_packed {args.batch} x {result['shape']['tokens_per_row']} "
          f"({result['shape']['examples']} examples): {result['ms_per_batch_min']:.1f} ms min, "
          f"{result['ms_per_batch_median']:.1f} ms median; batch tensors "
          f"{result['batch_tensor_bytes_total'] / 2**20:.2f} MiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
