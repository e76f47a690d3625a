#!/usr/bin/env python
"""Peak resident memory of training from the tokenised dataset cache, against the row count.

    python bench/cache_memory.py                          # 100k and 1M rows (tokenising 1M takes minutes)
    python bench/cache_memory.py --rows 20000 200000 --work /tmp/cache-bench

For each size it writes a synthetic JSONL file (prompt/response pairs) under --work, then runs
train.py twice on the tiny-phi-2 preset's base, each in a fresh process:

1. "build": a miss; the data file is streamed, tokenised on every core into the cache (1 step).
2. "train": a hit; no tokenisation; a few training steps read batches from the mapped files.

Each run's peak RSS is train.py's own VmHWM (read from /proc at exit); the "(workers)" column
is os.wait4's ru_maxrss, the largest peak in the run's process tree, tokenising workers
included. The "train" figure is the one that must not grow with the row count. Nothing is
written inside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_rows(path: Path, rows: int) -> None:
    """Deterministic prompt/response pairs, written as a stream (never all in memory)."""
    if path.exists():
        return
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"prompt": f"What is {i} plus {i % 97}? Answer like a cat.",
                                "response": f"It is {i + i % 97}, says cat number {i % 13}, and naps."}) + "\n")
    tmp.replace(path)


# Runs train.py and prints its own VmHWM (peak resident set of that process) at exit.
PEAK_RSS_WRAPPER = (
    "import atexit, runpy, sys\n"
    "def report():\n"
    "    hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM')]\n"
    "    print('peak-rss-kib', hwm[0].split()[1] if hwm else -1, flush=True)\n"
    "atexit.register(report)\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def run(args: list, log: Path) -> tuple[int, float, float, float]:
    """(exit code, seconds, train.py's peak RSS, largest peak RSS in its process tree) in MiB."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", PEAK_RSS_WRAPPER, str(REPO / "train.py"), *map(str, args)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss: the largest of it and its children
    seconds = time.perf_counter() - started
    text = log.read_text()
    own = int(text.split("peak-rss-kib")[-1].split()[0]) / 1024 if "peak-rss-kib" in text else float("nan")
    return os.waitstatus_to_exitcode(status), seconds, own, usage.ru_maxrss / 1024  # Linux: KiB


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--work", default="/tmp/phicore-cache-bench", help="scratch folder (outside the repo)")
    p.add_argument("--steps", type=int, default=5, help="training steps of the 'train' run")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from phicore.tiny import build_tiny

    base = work / "base"
    if not (base / "config.json").exists():
        build_tiny("tiny-phi-2", base)
    common = ["--model", base, "--data-cache", work / "cache", "--max-length", 128, "--val-split", 0,
              "--batch-size", args.batch_size, "--quiet", "--no-grad-checkpointing"]
    results = []
    for rows in args.rows:
        data = work / f"synthetic-{rows}.jsonl"
        write_rows(data, rows)
        row = {"rows": rows, "file_mib": round(data.stat().st_size / 2**20, 1)}
        for phase, steps in (("build", 1), ("train", args.steps)):
            out = work / f"out-{rows}-{phase}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            log = work / f"{phase}-{rows}.log"
            code, seconds, own, tree = run([*common, "--data", data, "--out", out, "--max-steps", steps], log)
            text = log.read_text()
            if code != 0:
                print(text[-3000:], file=sys.stderr)
                return code
            row[phase] = {"seconds": round(seconds, 1), "peak_rss_mib": round(own, 1),
                          "tree_peak_rss_mib": round(tree, 1), "cache_hit": "data cache: hit" in text}
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'rows':>9} {'file MiB':>9} {'build s':>8} {'build RSS':>10} {'(workers)':>10} {'train s':>8} "
          f"{'train RSS':>10}   peak RSS in MiB; train run = cache hit")
    for r in results:
        b, t = r["build"], r["train"]
        print(f"{r['rows']:>9} {r['file_mib']:>9} {b['seconds']:>8} {b['peak_rss_mib']:>10} {b['tree_peak_rss_mib']:>10} "
              f"{t['seconds']:>8} {t['peak_rss_mib']:>10}   build hit={b['cache_hit']} train hit={t['cache_hit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
