"""Runs that never lose work (issue 15, items 1-11): resuming a finished run, changed settings on
resume, damaged checkpoints, SIGTERM, the output folder (finished runs kept, --overwrite, the
lock, stale best/, a tiny preset's base), file modes, non-finite adapters.

Every run is a few steps of the tiny presets on CPU (the FAST flags), in-process through
train.main except where a real signal to a real process is the point.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train_runs import adapter, run_main, write_jsonl

from phicore.train.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[1]
FAST = ["--max-length", "64", "--quiet", "--no-grad-checkpointing", "--batch-size", "2"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    records = [{"prompt": f"{i} times {i % 3}?", "response": f"{i * (i % 3)}, says the cat."} for i in range(16)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", records)


def common(bases, data_file, preset="tiny-phi-2"):
    return ["--model", bases[preset], "--data", data_file, "--val-split", 0.25, "--lora-dropout", 0.1,
            "--lr", 5e-3, *FAST]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def same_adapter(a, b) -> bool:
    a, b = adapter(a), adapter(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.fixture(scope="module")
def whole(bases, data_file, tmp_path_factory):
    """An uninterrupted 6-step run: what every resumed run below must end equal to."""
    out = tmp_path_factory.mktemp("whole") / "out"
    assert run_main(*common(bases, data_file), "--max-steps", 6, "--out", out) == 0
    return out


# ----------------------------------------------------------------------------- 1. a finished run

def test_resuming_a_finished_run_says_so_and_trains_nothing(bases, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(*common(bases, data_file), "--max-steps", 4, "--save-every", 1, "--out", out) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert run_main(*common(bases, data_file), "--max-steps", 4, "--save-every", 1, "--out", out,
                    "--resume", "auto") == 0
    assert "complete" in capsys.readouterr().out
    assert snapshot(out) == before  # nothing retrained, nothing rewritten


def test_killed_after_its_last_checkpoint_the_final_outputs_are_written(bases, data_file, whole, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(*common(bases, data_file), "--max-steps", 6, "--save-every", 1, "--out", out) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "training_config.json"):  # as if killed
        (out / name).unlink()
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert run_main(*common(bases, data_file), "--max-steps", 6, "--save-every", 1, "--out", out,
                    "--resume", "auto") == 0
    assert "complete at step 6" in capsys.readouterr().out
    assert same_adapter(out, whole) and same_adapter(out, out / "checkpoint-6")
    assert (out / "metrics.jsonl").read_text() == metrics  # no step was run again
    assert json.loads((out / "training_config.json").read_text())["result"]["steps"] == 6


def test_finished_run_without_checkpoints(bases, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(*common(bases, data_file), "--max-steps", 3, "--out", out) == 0
    before = snapshot(out)
    assert run_main(*common(bases, data_file), "--max-steps", 3, "--out", out, "--resume", "auto") == 0
    capsys.readouterr()
    assert run_main(*common(bases, data_file), "--max-steps", 5, "--out", out, "--resume", "auto") == 2
    assert "no checkpoint" in one_error_line(capsys)
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- 2. changed settings

@pytest.fixture(scope="module")
def paused(bases, data_file, tmp_path_factory):
    """A run stopped after 2 of 6 steps (--stop-after), to be resumed."""
    out = tmp_path_factory.mktemp("paused") / "out"
    assert run_main(*common(bases, data_file), "--max-steps", 6, "--stop-after", 2, "--out", out) == 0
    return out


CHANGES = {
    "--lr": ["--lr", 1e-3], "--batch-size": ["--batch-size", 4], "--grad-accum": ["--grad-accum", 2],
    "--max-length": ["--max-length", 48], "--pack": ["--pack"], "--seed": ["--seed", 7],
    "--val-split": ["--val-split", 0.5], "--lora-r": ["--lora-r", 4], "--scheduler": ["--scheduler", "linear"],
}


@pytest.mark.parametrize("flag", sorted(CHANGES))
def test_a_change_that_alters_training_is_refused(flag, bases, data_file, paused, capsys):
    before = snapshot(paused)
    capsys.readouterr()
    rc = run_main(*common(bases, data_file), "--max-steps", 6, "--out", paused, "--resume", "auto", *CHANGES[flag])
    err = one_error_line(capsys)
    assert rc == 2 and flag in err and "->" in err, err
    assert snapshot(paused) == before


def test_changed_model_and_data_are_refused(bases, data_file, paused, tmp_path, capsys):
    before = snapshot(paused)
    args = common(bases, data_file, "tiny-phi-3")
    assert run_main(*args, "--max-steps", 6, "--out", paused, "--resume", "auto") == 2
    assert "--model" in one_error_line(capsys)
    edited = tmp_path / "pairs.jsonl"  # the same name, other contents
    edited.write_text(data_file.read_text().replace("cat", "dog"))
    args = common(bases, edited)
    assert run_main(*args, "--max-steps", 6, "--out", paused, "--resume", "auto") == 2
    assert "--data" in one_error_line(capsys)
    assert snapshot(paused) == before


def test_safe_changes_are_accepted_logged_and_end_bit_identical(bases, data_file, paused, whole, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(paused, out)
    capsys.readouterr()
    rc = run_main(*common(bases, data_file), "--max-steps", 6, "--out", out, "--resume", "auto",
                  "--save-every", 3, "--keep-last", 5, "--eval-every", 2, "--data-cache", tmp_path / "cache")
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "resuming from" in printed and "checkpoint-2" in printed
    assert "--save-every None -> 3" in printed and "--keep-last 2 -> 5" in printed
    assert same_adapter(out, whole)


def test_a_longer_run_states_the_schedule_change(bases, data_file, paused, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(paused, out)
    capsys.readouterr()
    assert run_main(*common(bases, data_file), "--max-steps", 9, "--out", out, "--resume", "auto") == 0
    printed = capsys.readouterr().out
    assert "ends at step 9, not 6" in printed and "schedule" in printed
    assert json.loads((out / "training_config.json").read_text())["result"]["steps"] == 9


# ----------------------------------------------------------------------------- 3. damaged checkpoints

def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated adapter": lambda c: _cut(c / "adapter_model.safetensors"),
    "corrupt trainer state": lambda c: (c / "trainer_state.json").write_text("{not json"),
    "missing optimizer": lambda c: (c / "optimizer.pt").unlink(),
    "truncated optimizer": lambda c: _cut(c / "optimizer.pt"),
    "edited config": lambda c: (c / "run_config.json").write_text("{}"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_an_intact_one(case, bases, data_file, whole, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(*common(bases, data_file), "--max-steps", 6, "--stop-after", 4, "--save-every", 2,
                    "--keep-last", 5, "--out", out) == 0
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    DAMAGE[case](out / "checkpoint-4")
    capsys.readouterr()
    assert run_main(*common(bases, data_file), "--max-steps", 6, "--save-every", 2, "--keep-last", 5,
                    "--out", out, "--resume", "auto") == 0
    printed = capsys.readouterr().out
    assert "warning: skipping damaged checkpoint checkpoint-4" in printed and "resuming from" in printed
    assert same_adapter(out, whole)
    # named explicitly, a damaged checkpoint is refused in one line
    DAMAGE[case](out / "checkpoint-6")
    assert run_main(*common(bases, data_file), "--max-steps", 6, "--out", tmp_path / "other",
                    "--resume", out / "checkpoint-6") == 2
    assert "checkpoint-6" in one_error_line(capsys)


# ----------------------------------------------------------------------------- 4. SIGTERM

def _start(args: list, env=None, code: str = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    command = [sys.executable, "-c", code, *map(str, args)] if code else [sys.executable, str(REPO / "train.py"),
                                                                           *map(str, args)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(condition, proc, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            return
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[0]
    assert condition(), "timed out"


def _finish(proc) -> str:
    try:
        return proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_checkpoints_exits_143_and_resumes_exactly(bases, data_file, tmp_path):
    args = ["--model", bases["tiny-phi-3"], "--data", data_file, "--val-split", 0, "--scheduler", "constant",
            "--warmup-ratio", 0, "--lora-dropout", 0.1, "--lr", 5e-3, *FAST]
    out = tmp_path / "cut"
    proc = _start([*args, "--out", out, "--max-steps", 100000])
    _wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    output = _finish(proc)
    assert proc.returncode == 143, output
    assert "interrupted (SIGTERM)" in output and "Traceback" not in output
    (checkpoint,) = list_checkpoints(out)
    k = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    assert run_main(*args, "--out", out, "--max-steps", k + 2, "--resume", "auto") == 0
    assert run_main(*args, "--out", tmp_path / "whole", "--max-steps", k + 2) == 0
    assert same_adapter(out, tmp_path / "whole")


SLOW_CHECKPOINT = """
import sys, time
sys.path.insert(0, {repo!r})
import phicore.train.checkpoint as checkpoint
real = checkpoint._sha256
def slow(path):
    time.sleep(0.5)
    return real(path)
checkpoint._sha256 = slow  # the manifest is hashed while the checkpoint is a temporary folder
import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_second_signal_during_the_checkpoint_stops_at_once_and_corrupts_nothing(bases, data_file, tmp_path):
    args = ["--model", bases["tiny-phi-2"], "--data", data_file, "--val-split", 0, *FAST]
    out = tmp_path / "out"
    proc = _start([*args, "--out", out, "--max-steps", 100000, "--save-every", 1],
                  code=SLOW_CHECKPOINT.format(repo=str(REPO)))
    _wait_for(lambda: len(list_checkpoints(out)) >= 1, proc)
    proc.send_signal(signal.SIGTERM)  # checkpoint, then stop...
    _wait_for(lambda: any(p.name.endswith(".tmp") for p in out.glob("checkpoint-*")), proc)
    proc.send_signal(signal.SIGTERM)  # ...no: now
    output = _finish(proc)
    assert proc.returncode == 143 and "Traceback" not in output and "stopped at once" in output, output
    checkpoints = list_checkpoints(out)
    assert checkpoints and all((c / "manifest.json").is_file() for c in checkpoints)
    assert run_main(*args, "--out", out, "--max-steps", len(checkpoints) + 3, "--resume", "auto") == 0


# ----------------------------------------------------------------------------- 5-8. the output folder

def test_a_finished_run_is_never_replaced_without_overwrite(bases, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(*common(bases, data_file), "--max-steps", 2, "--out", out) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert run_main(*common(bases, data_file), "--max-steps", 3, "--out", out) == 2
    assert "finished run" in one_error_line(capsys) and snapshot(out) == before
    assert run_main(*common(bases, data_file), "--max-steps", -5, "--out", out) == 2
    assert snapshot(out) == before


def test_overwrite_replaces_only_once_the_new_run_has_finished(bases, data_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert run_main(*common(bases, data_file), "--max-steps", 2, "--save-every", 1, "--out", out) == 0
    before = snapshot(out)
    # a new run that fails while training (every step NaN): the earlier run comes back whole
    import phicore.train.step as step

    monkeypatch.setattr(step, "_loss_sum", lambda model, batch, dtype: torch.tensor(float("nan"), requires_grad=True))
    capsys.readouterr()
    assert run_main(*common(bases, data_file), "--max-steps", 3, "--out", out, "--overwrite") == 1
    assert "nothing was learnt" in one_error_line(capsys)
    assert snapshot(out) == before
    monkeypatch.undo()
    # a new run that finishes replaces it: its own files only, nothing of the earlier one left
    assert run_main(*common(bases, data_file), "--max-steps", 3, "--lr", 1e-3, "--out", out, "--overwrite") == 0
    record = json.loads((out / "training_config.json").read_text())
    assert record["result"]["steps"] == 3 and record["config"]["lr"] == 1e-3
    assert not list_checkpoints(out) and not (out / ".replaced").exists()


def test_a_second_run_into_the_same_folder_is_refused(bases, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom phicore.train.output import "
                               f"OutputFolder\nfolder = OutputFolder({str(out)!r})\nfolder.lock()\nprint('locked', flush=True)\n"
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_main(*common(bases, data_file), "--max-steps", 1, "--out", out) == 2
        err = one_error_line(capsys)
        assert "another run" in err and f"pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    assert run_main(*common(bases, data_file), "--max-steps", 1, "--out", out) == 0  # the lock died with it
    assert not (out / ".phicore.lock").exists()


def test_stale_best_is_removed(bases, data_file, tmp_path):
    out = tmp_path / "out"
    (out / "best").mkdir(parents=True)  # an earlier run that stopped before any checkpoint
    (out / "best" / "adapter_model.safetensors").write_bytes(b"stale")
    assert run_main(*common(bases, data_file), "--max-steps", 2, "--val-split", 0, "--out", out) == 0
    assert not (out / "best").exists()


def test_tiny_base_is_the_preset_asked_for_and_recorded_absolutely(bases, data_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "base").mkdir(parents=True)
    from phicore.tiny import build_tiny

    build_tiny("tiny-phi-2", out / "base")  # a leftover base of another preset
    monkeypatch.chdir(tmp_path)
    assert run_main("--model", "tiny-phi-3", "--data", data_file, "--out", "out", "--max-steps", 1, *FAST) == 0
    config = json.loads((out / "base" / "config.json").read_text())
    assert config["model_type"] == "phi3"
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_absolute() and Path(base) == (out / "base").resolve()
    monkeypatch.chdir(REPO)  # another working folder: the adapter still finds its base
    from phicore.inference import load_session

    assert load_session(out, device="cpu").model.config.model_type == "phi3"


# ----------------------------------------------------------------------------- 9-11

def test_files_follow_the_umask(bases, data_file, tmp_path):
    previous = os.umask(0o022)
    try:
        out = tmp_path / "out"
        assert run_main(*common(bases, data_file), "--max-steps", 1, "--save-every", 1, "--out", out) == 0
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert modes and all(mode == 0o644 for mode in modes.values()), modes


def test_device_without_it_and_a_long_max_length(bases, data_file, tmp_path, capsys):
    if not torch.cuda.is_available():
        assert run_main(*common(bases, data_file), "--device", "cuda", "--out", tmp_path / "o") == 2
        assert "--device" in one_error_line(capsys)
    assert run_main(*common(bases, data_file), "--max-steps", 1, "--out", tmp_path / "long",
                    "--max-length", 9999) == 0
    assert "warning: --max-length 9999" in capsys.readouterr().out


def test_a_non_finite_adapter_is_never_saved(bases, data_file, tmp_path, monkeypatch, capsys):
    real, calls = torch.optim.AdamW.step, []

    def overflowing_step(self, *args, **kwargs):  # step 3's update turns the adapter to inf
        result = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    out = tmp_path / "out"
    rc = run_main(*common(bases, data_file), "--max-steps", 8, "--save-every", 1, "--out", out)
    err = one_error_line(capsys)
    assert rc == 1 and "step 3" in err and "NaN/inf" in err and "checkpoint-2" in err, err
    assert not (out / "adapter_model.safetensors").exists()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    for checkpoint in list_checkpoints(out):
        assert all(torch.isfinite(t).all() for t in adapter(checkpoint).values()), checkpoint


@pytest.mark.slow
def test_random_kills_and_relaunches_end_bit_identical(tmp_path):
    """bench/kill_resume.py in small: one kill each at a random time, during a checkpoint write and
    after the last checkpoint; every relaunch succeeds and every adapter equals the reference."""
    report = tmp_path / "kills.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "kill_resume.py"), "--trials", "3", "--json",
                          str(report)], capture_output=True, text=True, timeout=280,
                         env={**os.environ, "PHICORE_CACHE_DIR": str(tmp_path / "cache"),
                              "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert run.returncode == 0, run.stdout + run.stderr
    totals = json.loads(report.read_text())["totals"]
    assert totals["failed_relaunches"] == 0 and totals["identical_adapters"] == "3 of 3" and totals["kills"] >= 2


def test_the_model_folder_is_checked_before_the_data_is_tokenised(bases, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(bases["tiny-phi-2"], base)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # an interrupted download
    data = write_jsonl(tmp_path / "fresh.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(8)])
    assert run_main("--model", base, "--data", data, "--out", tmp_path / "out", *FAST) == 2
    captured = capsys.readouterr()
    assert "model.safetensors" in captured.err and "truncated" in captured.err, captured.err
    assert "tokenising" not in captured.out


def test_an_unwritable_out_is_one_line(bases, data_file, capsys):
    assert run_main(*common(bases, data_file), "--out", "/sys/phicore-out") == 2  # EPERM even for root
    assert "/sys/phicore-out" in one_error_line(capsys)


def test_a_full_disk_while_checkpointing_exits_1_and_leaves_no_half_checkpoint(bases, data_file, tmp_path, capsys):
    import resource

    out = tmp_path / "out"
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG ("File too large") instead of a kill
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, hard))  # the adapter fits, the optimizer state not
    try:
        rc = run_main(*common(bases, data_file), "--max-steps", 3, "--save-every", 1, "--out", out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    err = one_error_line(capsys)
    assert rc == 1 and "File too large" in err, err
    assert not list(out.glob("checkpoint-*")) and not (out / "adapter_model.safetensors").exists()
