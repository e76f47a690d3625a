"""Kill training runs at random moments, relaunch them with --resume auto, and check that every
run ends exactly as an uninterrupted one: no lost work, no stuck relaunch, no corrupt checkpoint.

    python bench/kill_resume.py                        # 24 trials, results in bench/results/
    python bench/kill_resume.py --trials 3 --json /tmp/k.json

A trial trains the tiny-phi-2 preset for --steps steps with a checkpoint after every step
(--save-every 1), SIGKILLs it, relaunches it with --resume auto (killing again, in the random
mode, with probability 1/2) until a launch exits 0, then compares its adapter with the
uninterrupted reference run's, bit for bit, and checks that the metrics file holds each step
once. The trials cycle through three ways of choosing the moment:

  random       a random time between the launch and the end of an uninterrupted run
  checkpoint   while a checkpoint is being written (a checkpoint-N.tmp folder exists)
  final        after the last checkpoint is renamed into place (the run may or may not have
               written its final adapter yet: either way a relaunch must finish the run)

Reported: kills, relaunches, failed relaunches (exit status other than 0 that we did not
cause), kills that landed during a checkpoint write or between the last checkpoint and the
final outputs, and adapters identical to the reference.
The goal is 0 failed relaunches and every adapter identical.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from safetensors.torch import load_file  # noqa: E402

MODES = ("random", "checkpoint", "final")


def train_command(data: Path, out: Path, steps: int, resume: bool) -> list:
    command = [sys.executable, str(ROOT / "train.py"), "--model", "tiny-phi-2", "--data", str(data), "--out",
               str(out), "--max-steps", str(steps), "--save-every", "1", "--keep-last", "2", "--batch-size", "2",
               "--max-length", "64", "--val-split", "0.25", "--eval-every", "3", "--lora-dropout", "0.1",
               "--lr", "5e-3", "--quiet", "--no-grad-checkpointing"]
    return command + ["--resume", "auto"] if resume else command


def launch(command: list, log) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def checkpoint_in_progress(out: Path) -> bool:
    try:
        return any(entry.name.endswith(".tmp") and entry.name.startswith("checkpoint-") for entry in os.scandir(out))
    except FileNotFoundError:
        return False


def wait_and_kill(proc: subprocess.Popen, out: Path, mode: str, steps: int, seconds: float, rng) -> dict:
    """Kill `proc` at the moment `mode` asks for; {'killed': bool, 'during_checkpoint': bool}."""
    deadline = time.monotonic() + (rng.uniform(0, seconds) if mode == "random" else 120)
    while proc.poll() is None and time.monotonic() < deadline:
        if mode == "checkpoint" and checkpoint_in_progress(out):
            break
        if mode == "final" and (out / f"checkpoint-{steps}").is_dir():
            break
        time.sleep(0.0005 if mode != "random" else 0.005)
    if proc.poll() is not None:
        return {"killed": False, "during_checkpoint": False, "before_final_outputs": False}
    during = checkpoint_in_progress(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last_checkpoint_only = (out / f"checkpoint-{steps}").is_dir() and not (out / "training_config.json").exists()
    return {"killed": True, "during_checkpoint": during or checkpoint_in_progress(out),
            "before_final_outputs": last_checkpoint_only}


def trial(index: int, mode: str, data: Path, root: Path, steps: int, seconds: float, reference: dict, rng,
          log) -> dict:
    out = root / f"trial-{index}"
    kills, relaunches, failed, during, before_final = 0, 0, 0, 0, 0
    resume = False
    may_kill = True
    while True:
        proc = launch(train_command(data, out, steps, resume), log)
        if may_kill:
            event = wait_and_kill(proc, out, mode, steps, seconds, rng)
            kills += event["killed"]
            during += event["during_checkpoint"]
            before_final += event["before_final_outputs"]
            if event["killed"]:
                relaunches += 1
                resume = True
                may_kill = mode == "random" and rng.random() < 0.5  # random mode: maybe once more
                continue
        code = proc.wait()
        if code == 0:
            break
        failed += 1  # a launch that failed by itself
        relaunches += 1
        resume, may_kill = True, False
        if failed > 3:
            break
    identical = False
    if (out / "adapter_model.safetensors").exists():
        final = load_file(str(out / "adapter_model.safetensors"))
        identical = final.keys() == reference.keys() and all((final[k] == reference[k]).all() for k in final)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (out / "metrics.jsonl").exists() else []
    steps_logged = [r["step"] for r in rows if "loss" in r]
    return {"trial": index, "mode": mode, "kills": kills, "relaunches": relaunches, "failed_relaunches": failed,
            "kills_during_checkpoint_write": during, "kills_after_last_checkpoint_before_final_outputs": before_final,
            "identical": bool(identical),
            "metrics_each_step_once": steps_logged == list(range(1, steps + 1))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps of each run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--json", default=None, help="result file (default: bench/results/kill-resume-DATE.json)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="phicore-kill-"))
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} plus {i % 7}?", "response": f"{i + i % 7}, says my cat."})
                            + "\n" for i in range(24)), encoding="utf-8")
    os.environ.setdefault("PHICORE_CACHE_DIR", str(root / "cache"))
    os.environ.setdefault("XDG_CACHE_HOME", str(root / "xdg"))
    log = open(root / "train.log", "w")
    started = time.monotonic()
    reference_out = root / "reference"
    code = subprocess.call(train_command(data, reference_out, args.steps, False), cwd=ROOT, stdout=log,
                           stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.monotonic() - started
    if code != 0:
        print(f"the reference run failed ({code}); see {root / 'train.log'}", file=sys.stderr)
        return 1
    reference = load_file(str(reference_out / "adapter_model.safetensors"))
    results = []
    for index in range(args.trials):
        result = trial(index, MODES[index % len(MODES)], data, root, args.steps, seconds, reference, rng, log)
        results.append(result)
        print(json.dumps(result), flush=True)
    totals = {key: sum(r[key] for r in results) for key in
              ("kills", "relaunches", "failed_relaunches", "kills_during_checkpoint_write",
               "kills_after_last_checkpoint_before_final_outputs")}
    totals["identical_adapters"] = f"{sum(r['identical'] for r in results)} of {len(results)}"
    totals["metrics_each_step_once"] = f"{sum(r['metrics_each_step_once'] for r in results)} of {len(results)}"
    given = sys.argv[1:] if argv is None else list(argv)
    report = {"command": " ".join(["python bench/kill_resume.py", *given]),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "steps": args.steps,
              "reference_run_seconds": round(seconds, 2), "totals": totals, "trials": results}
    print("totals:", json.dumps(totals))
    path = Path(args.json) if args.json else \
        ROOT / "bench" / "results" / f"kill-resume-cpu-{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"written: {path}")
    log.close()
    shutil.rmtree(root, ignore_errors=True)
    ok = totals["failed_relaunches"] == 0 and all(r["identical"] and r["metrics_each_step_once"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
