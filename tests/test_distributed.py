"""Data parallelism on CPU with gloo: DDP, FSDP2, exact resume, and the torchrun command line.

Issue 8's "must show": two ranks with batch b give one rank's batch-2b adapter (within 1e-6);
a two-rank run killed and resumed ends bit-identical to an uninterrupted one; FSDP2 (it runs
on CPU/gloo in this PyTorch) gives the same adapter, saved as the same PEFT files.

How ranks are started: `torchrun` (`python -m torch.distributed.run`) in one test, which is
the real command line. The others fork the ranks from this process with torchrun's
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and call `train.main`
in each: the same code path after the launcher, without paying for a fresh Python that
imports torch per rank (~10 s each on a busy 2-core machine). Everything runs with one torch
thread per process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import train  # noqa: E402
from train_runs import adapter, run_main  # noqa: E402
from phicore.peft_io import load_adapter  # noqa: E402
from phicore.tiny import build_tiny  # noqa: E402
from phicore.train.checkpoint import list_checkpoints  # noqa: E402
from phicore.weights import load_model  # noqa: E402

# on CPU even where a GPU exists: the ranks are forked (no CUDA after fork) and use gloo
FAST = ["--max-length", "64", "--quiet", "--no-grad-checkpointing", "--device", "cpu"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny("tiny-phi-3", tmp_path_factory.mktemp("base") / "tiny-phi-3")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """9 examples with very different target counts: a per-rank (or per-batch) mean would
    weight them differently from the global token mean. With 2 ranks x batch 2 the epoch is
    global batches of 4, 4 and 1, so one rank's share of the last is empty (a stand-in)."""
    records = [{"prompt": f"{i} plus {i % 4}?", "response": "So. " * (1 + 3 * (i % 4)) + f"{i + i % 4}."}
               for i in range(9)]
    path = tmp_path_factory.mktemp("data") / "nine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, argv: list, log: str):
    """One forked rank: torchrun's environment, then train.main; output to a log file."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # past pytest's capture
    torch.set_num_threads(1)
    try:
        code = train.main([str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    except BaseException:
        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Ranks:
    """`world` forked ranks running train.main(argv)."""

    def __init__(self, argv, world: int, logs: Path):
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = [logs / f"rank{r}.log" for r in range(world)]
        port = free_port()
        context = multiprocessing.get_context("fork")
        self.procs = [context.Process(target=_rank_main, args=(r, world, port, list(argv), str(self.logs[r])))
                      for r in range(world)]
        for proc in self.procs:
            proc.start()

    def wait(self, timeout: float = 240) -> list:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self.kill()
        return [proc.exitcode for proc in self.procs]

    def kill(self):
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join()

    def output(self, rank: int = 0) -> str:
        return self.logs[rank].read_text()


def run_ranks(argv, world: int, logs: Path) -> str:
    ranks = Ranks(argv, world, logs)
    codes = ranks.wait()
    assert codes == [0] * world, "\n".join(f"--- rank {r} ({c})\n{ranks.output(r)}" for r, c in enumerate(codes))
    return ranks.output(0)


def common(base, data, cache_dir, *extra):
    return ["--model", base, "--data", data, "--data-cache", cache_dir, "--val-split", 0, *FAST, *extra]


# ----------------------------------------------------------------------------- equivalence

# lr 2e-4 as in test_train's accumulation test: Adam turns fp32 summation-order noise
# (~5e-7 relative, from splitting a batch's sums across ranks) into update differences of up to
# ~lr on near-zero elements only; a wrong normalisation (per-rank means, averaged instead of
# summed gradients, a different set of examples per step) shows as differences of order lr.
EQUIV = ["--lora-dropout", 0, "--max-steps", 4, "--lr", 2e-4, "--warmup-ratio", 0]


@pytest.fixture(scope="module")
def one_rank_batch_4(base, data, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    assert run_main(*common(base, data, cache_dir, *EQUIV), "--batch-size", 4, "--out", out) == 0
    return out


@pytest.fixture(scope="module")
def two_ranks_batch_2(base, data, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "out"
    log = run_ranks([*common(base, data, cache_dir, *EQUIV), "--batch-size", 2, "--out", out], 2, out.parent / "logs")
    assert "data parallel: 2 processes (DDP, gloo); effective batch 2 x 1 x 2 = 4" in log, log
    return out


def test_two_ranks_batch_b_equal_one_rank_batch_2b(one_rank_batch_4, two_ranks_batch_2):
    one, two = adapter(one_rank_batch_4), adapter(two_ranks_batch_2)
    diff = max_diff(one, two)
    assert diff <= 1e-6, diff
    assert any(float(v.abs().max()) > 1e-4 for k, v in one.items() if "lora_B" in k)  # it did train
    losses = lambda out: [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(two_ranks_batch_2) == pytest.approx(losses(one_rank_batch_4), rel=1e-5)
    assert len(losses(two_ranks_batch_2)) == 4  # rank 0 alone wrote the metrics
    # same files as a one-process run: PEFT adapter, config, tokenizer, run record
    names = lambda out: sorted(p.name for p in out.iterdir() if p.is_file())  # noqa: E731
    assert names(two_ranks_batch_2) == names(one_rank_batch_4)
    record = json.loads((two_ranks_batch_2 / "training_config.json").read_text())
    assert record["world_size"] == 2 and record["result"]["steps"] == 4


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_checkpointed_layers_across_ranks_equal_one_rank(base, data, cache_dir, one_rank_batch_4, tmp_path, sharding):
    """--grad-checkpointing under DDP (phicore's checkpoint node: the adapter gradients leave it
    as inputs, and DDP's hooks reduce them) and FSDP2 (torch.utils.checkpoint: FSDP2 gathers a
    layer's parameters inside its forward, where the node would not see them): the adapter of one
    rank without checkpointing."""
    out = tmp_path / "out"
    run_ranks([*common(base, data, cache_dir, *EQUIV), "--batch-size", 2, "--grad-checkpointing", "--out", out,
               *(["--fsdp"] if sharding == "fsdp" else [])], 2, tmp_path / "logs")
    assert max_diff(adapter(out), adapter(one_rank_batch_4)) <= 1e-6


def test_grad_accum_across_ranks(base, data, cache_dir, tmp_path):
    """2 ranks x batch 1 x 2 micro-batches (no_sync on the first) = 1 rank x batch 2 x 2
    micro-batches: the same global micro-batches of 2 rows make up each step."""
    out, single = tmp_path / "accum", tmp_path / "single"
    run_ranks([*common(base, data, cache_dir, *EQUIV), "--batch-size", 1, "--grad-accum", 2, "--out", out], 2,
              tmp_path / "logs")
    assert run_main(*common(base, data, cache_dir, *EQUIV), "--batch-size", 2, "--grad-accum", 2, "--out", single) == 0
    # gradients summed across ranks vs accumulated in one process: fp32 summation order differs,
    # and Adam turns that noise into update differences far above it on near-zero elements (1.3e-6
    # measured here); a wrong step (normalisation, sync) differs by the order of lr, 2e-4
    assert max_diff(adapter(single), adapter(out)) <= 1e-5


# ----------------------------------------------------------------------------- FSDP2

def test_fsdp2_two_ranks_equal_one_rank_and_save_peft_files(base, data, cache_dir, one_rank_batch_4, tmp_path):
    out = tmp_path / "fsdp"
    log = run_ranks([*common(base, data, cache_dir, *EQUIV), "--batch-size", 2, "--fsdp", "--out", out], 2,
                    tmp_path / "logs")
    assert "FSDP2" in log, log
    fsdp, one = adapter(out), adapter(one_rank_batch_4)
    assert max_diff(fsdp, one) <= 1e-6
    assert all(fsdp[k].shape == one[k].shape and fsdp[k].dtype == one[k].dtype for k in one)  # full tensors
    assert json.loads((out / "adapter_config.json").read_text()) == \
        json.loads((one_rank_batch_4 / "adapter_config.json").read_text()) | {
            "base_model_name_or_path": json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]}
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    ids = torch.tensor([list(range(40, 72))])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        peft_logits = peft.PeftModel.from_pretrained(hf, str(out)).eval()(ids).logits
        ours = load_adapter(load_model(base), out).eval()(ids)
    assert (ours - peft_logits).abs().max() <= 1e-5


def test_fsdp2_stop_and_resume_is_bit_identical(base, data, cache_dir, tmp_path):
    """--stop-after 2 (a checkpoint, then exit), --resume auto to step 5: the adapter of an
    uninterrupted FSDP2 run, bit for bit (cosine schedule, dropout on: RNG per rank)."""
    argv = [*common(base, data, cache_dir), "--lora-dropout", 0.1, "--max-steps", 5, "--batch-size", 2,
            "--lr", 5e-3, "--fsdp"]
    run_ranks([*argv, "--out", tmp_path / "whole"], 2, tmp_path / "logs-whole")
    log = run_ranks([*argv, "--out", tmp_path / "cut", "--stop-after", 2], 2, tmp_path / "logs-cut")
    assert "stopped after 2 steps" in log and not (tmp_path / "cut" / "adapter_model.safetensors").exists()
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["checkpoint-2"]
    run_ranks([*argv, "--out", tmp_path / "cut", "--resume", "auto"], 2, tmp_path / "logs-resumed")
    whole, resumed = adapter(tmp_path / "whole"), adapter(tmp_path / "cut")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


# ----------------------------------------------------------------------------- resume

def test_killed_two_rank_run_resumes_bit_identical(base, data, cache_dir, tmp_path):
    """SIGKILL both ranks of a run once it has a checkpoint; --resume auto to K+2 steps gives
    the adapter of an uninterrupted K+2-step two-rank run, bit for bit. Dropout on (each rank's
    RNG state matters), gradient accumulation, evaluations; a constant schedule makes the lr
    independent of --max-steps (as in test_train's Ctrl-C test)."""
    argv = ["--model", base, "--data", data, "--data-cache", cache_dir, *FAST, "--val-split", 0.25,
            "--eval-every", 2, "--batch-size", 1, "--grad-accum", 2, "--lora-dropout", 0.1, "--lr", 5e-3,
            "--scheduler", "constant", "--warmup-ratio", 0, "--save-every", 2]
    cut = tmp_path / "cut"
    ranks = Ranks([*argv, "--out", cut, "--max-steps", 100000], 2, tmp_path / "logs-cut")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list_checkpoints(cut):
            assert all(p.is_alive() for p in ranks.procs), ranks.output(0) + ranks.output(1)
            time.sleep(0.05)
        for proc in ranks.procs:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        ranks.kill()
    checkpoints = list_checkpoints(cut)
    assert checkpoints, ranks.output(0)
    k = json.loads((checkpoints[-1] / "trainer_state.json").read_text())["step"]
    assert not (cut / "adapter_model.safetensors").exists()
    rng = torch.load(checkpoints[-1] / "rng_state.pt", weights_only=True)
    assert len(rng["ranks"]) == 2 and not torch.equal(rng["ranks"][0]["cpu"], rng["ranks"][1]["cpu"])

    run_ranks([*argv, "--out", cut, "--max-steps", k + 2, "--resume", "auto"], 2, tmp_path / "logs-resumed")
    run_ranks([*argv, "--out", tmp_path / "whole", "--max-steps", k + 2], 2, tmp_path / "logs-whole")
    whole, resumed = adapter(tmp_path / "whole"), adapter(cut)
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


def test_resume_with_another_world_size_is_refused(base, data, tmp_path, capsys):
    """Also: two ranks on a cache miss: rank 0 tokenises, rank 1 waits for its entry."""
    fresh = tmp_path / "fresh-cache"
    argv = [*common(base, data, fresh), "--max-steps", 2, "--batch-size", 2, "--out", tmp_path / "two"]
    log = run_ranks([*argv, "--stop-after", 1], 2, tmp_path / "logs")
    assert "data cache: tokenising 9 rows" in log
    assert len(list(fresh.iterdir())) == 1  # one complete entry, no temporary folder left
    capsys.readouterr()
    assert run_main(*argv, "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 process(es)" in err and "--nproc_per_node=2" in err, err


def test_fsdp_with_a_quantised_base_is_a_clear_error(base, data, cache_dir, tmp_path, capsys):
    rc = run_main(*common(base, data, cache_dir), "--fsdp", "--quantize", "nf4", "--out", tmp_path / "q")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--fsdp" in err and "quantised" in err, err
    assert not (tmp_path / "q").exists()


# ----------------------------------------------------------------------------- torchrun

@pytest.mark.slow
def test_torchrun_command_line(base, data, cache_dir, two_ranks_batch_2, tmp_path):
    """`python -m torch.distributed.run --nproc_per_node=2 train.py ...` (gloo, one thread a
    rank): the adapter of the forked two-rank run, bit for bit."""
    out = tmp_path / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(REPO / "train.py"),
           *map(str, common(base, data, cache_dir, *EQUIV)), "--batch-size", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("data parallel: 2 processes (DDP, gloo)") == 1  # rank 0 alone reports
    assert "data cache: hit" in proc.stdout
    torchrun, forked = adapter(out), adapter(two_ranks_batch_2)
    assert all(torch.equal(torchrun[k], forked[k]) for k in forked)
