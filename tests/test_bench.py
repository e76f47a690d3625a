"""Smoke tests of the benchmarks: bench/throughput.py on the `tiny` shape with 2 steps, and
bench/kernels.py --quick, on CPU. They check what the results files record, and that every
engine trains the same model (equal check losses); they assert no timings.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("phicore-lora", "phicore-qlora", "hf-lora", "hf-qlora")
REQUIRED = ("tokens_per_s", "step_s_median", "peak_mem_bytes")


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _bench_main(module: str, argv: list):
    """bench/<module>.py's main(argv) in this process (the torch import is already paid), with
    torch's thread count restored afterwards (--threads sets it for the whole process)."""
    sys.path.insert(0, str(ROOT))
    import importlib

    import torch

    threads = torch.get_num_threads()
    try:
        return importlib.import_module(f"bench.{module}").main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One throughput run over all four engines: tiny shape, 2 timed steps, short generation."""
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    proc = _run("throughput.py", "--shape", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1",
                "--threads", "1", "--new-tokens", "4", "--gen-repeats", "1", "--prompt-len", "16",
                "--peak-size", "256", "--memory-peak", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_throughput_records_every_engine(tiny_run):
    record, stdout = tiny_run
    assert set(record["engines"]) == set(ENGINES)
    for name, engine in record["engines"].items():
        if "skipped" in engine:  # only a missing library may skip an engine here
            assert isinstance(engine["skipped"], str) and "not installed" in engine["skipped"], (name, engine)
            continue
        for key in REQUIRED:
            assert engine[key] > 0, (name, key)
        spread = engine["step_s"]
        assert spread["min"] <= spread["median"] <= spread["max"]
        assert len(engine["step_s_all"]) == 2 and len(engine["losses"]) == 3  # warm-up + 2 timed
        assert all(math.isfinite(loss) for loss in engine["losses"])
        assert engine["tokens_per_s"] == pytest.approx(2 * 64 / engine["step_s_median"])
        assert set(engine["phases_s_median"]) == {"forward_loss", "backward", "optimizer"}
        assert engine["inference"]["new_tokens"] == 4 and engine["inference"]["decode_tokens_per_s"] > 0
        assert engine["trainable_params"] > 0
        assert engine["step_cpu_s"]["median"] > 0
        if "step_malloc_peak_bytes" in engine:  # glibc: the per-step tensor memory
            assert engine["step_malloc_peak_bytes"] > 0
        assert name in stdout  # a table row per engine
    # the table's ratio lines and the ratios object name the pairs that both ran
    for pair, ratio in record["ratios"].items():
        assert pair in ("phicore-lora/hf-lora", "phicore-qlora/hf-qlora")
        assert ratio["tokens_per_s"] > 0 and ratio["peak_mem_bytes"] > 0


def test_memory_peak_step_needs_cuda(tiny_run):
    """--memory-peak reads the CUDA allocator's history; elsewhere each engine says why it has none."""
    record, _ = tiny_run
    for engine in record["engines"].values():
        if "skipped" not in engine:
            assert engine["memory_peak"] == {"skipped": "needs CUDA (the allocator's history)"}


def test_throughput_records_settings_and_provenance(tiny_run):
    record, _ = tiny_run
    settings = record["settings"]
    assert settings["shape"] == "tiny" and settings["seq_len"] == 64 and settings["batch_size"] == 2
    assert settings["steps"] == 2 and settings["warmup"] == 1 and settings["threads"] == 1
    assert settings["lora"] == {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"}
    assert settings["grad_checkpointing"] is True and settings["dtype"] == "fp32"
    assert record["command"].split()[1:3] == ["bench/throughput.py", "--shape"]
    assert record["device"]["type"] == "cpu" and record["device"]["name"]
    assert record["versions"]["torch"]
    assert "random" in record["weights"]["how"]


def test_mfu_is_tokens_times_model_flops_over_the_measured_peak(tiny_run):
    record, stdout = tiny_run
    peak = record["device"]["matmul_peak"]
    assert peak["size"] == 256 and peak["dtype"] == "float32" and peak["flops_per_s"] > 0
    flops = record["settings"]["flops_per_token"]
    assert flops["linear"] == 4 * flops["matmul_params"]
    for name, engine in record["engines"].items():
        if "skipped" in engine:
            continue
        assert engine["mfu"] == pytest.approx(engine["tokens_per_s"] * flops["linear"] / peak["flops_per_s"])
        assert engine["mfu_with_attention"] > engine["mfu"]
    assert "MFU = tok/s x" in stdout


@pytest.mark.parametrize("shape", ["tiny", "small-phi-2", "phi-2", "phi-3-mini-4k"])
def test_matmul_parameter_count_matches_the_model(shape):
    """The MFU numerator's N equals the weights of every nn.Linear in phicore's model for that
    shape (lm_head included), counted on the meta device."""
    import torch

    sys.path.insert(0, str(ROOT))
    from bench._shapes import matmul_parameter_count, parameter_count, shape_config
    from phicore.config import ModelConfig
    from phicore.model import PhiForCausalLM

    config = shape_config(shape)
    with torch.device("meta"):
        model = PhiForCausalLM(ModelConfig.from_dict(config))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_parameter_count(config) == linear
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())


def test_phicore_options_switch_changes_off_and_train_the_same_model(tiny_run, tmp_path):
    """--phicore-option ablations (full-logits loss, reference LoRA path, PyTorch NF4) run the
    same model: the same check loss and first-step loss as the default path."""
    out = tmp_path / "ablation.json"
    proc = _run("throughput.py", "--shape", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1",
                "--threads", "1", "--new-tokens", "0", "--peak-size", "0", "--engines", "phicore-lora,phicore-qlora",
                "--phicore-option", "full-logits-loss", "--phicore-option", "unfused-lora",
                "--phicore-option", "torch-nf4", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["settings"]["phicore_options"] == ["full-logits-loss", "torch-nf4", "unfused-lora"]
    assert "matmul_peak" not in record["device"] and "mfu" not in record["engines"]["phicore-lora"]
    for name, engine in record["engines"].items():
        default = tiny_run[0]["engines"][name]
        assert engine["options"] == record["settings"]["phicore_options"]
        assert engine["check_loss"] == pytest.approx(default["check_loss"], rel=1e-6)
        assert engine["losses"][0] == pytest.approx(default["losses"][0], rel=1e-5)


def test_engines_train_the_same_model(tiny_run):
    """Same checkpoint, same batch, LoRA B = 0: the untrained losses agree across stacks.
    LoRA vs LoRA exactly (fp32 rounding); QLoRA vs QLoRA to NF4 rounding (bnb's CPU op picks
    another 8-bit absmax code than phicore for a few blocks)."""
    engines = tiny_run[0]["engines"]
    ran = {name: e for name, e in engines.items() if "skipped" not in e}
    if {"phicore-lora", "hf-lora"} <= set(ran):
        assert ran["phicore-lora"]["check_loss"] == pytest.approx(ran["hf-lora"]["check_loss"], rel=1e-5)
    if {"phicore-qlora", "hf-qlora"} <= set(ran):
        assert ran["phicore-qlora"]["check_loss"] == pytest.approx(ran["hf-qlora"]["check_loss"], abs=2e-3)
    # the same layers get adapters on both sides
    for ours, theirs in (("phicore-lora", "hf-lora"), ("phicore-qlora", "hf-qlora")):
        if {ours, theirs} <= set(ran):
            assert ran[ours]["trainable_params"] == ran[theirs]["trainable_params"]


def test_missing_library_skips_with_a_reason(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT))
    from bench import throughput

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "peft" else real_find_spec(name, *a))
    out = tmp_path / "skip.json"
    assert throughput.main(["--shape", "tiny", "--device", "cpu", "--engines", "hf-lora", "--threads", "1",
                            "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["engines"] == {"hf-lora": {"skipped": "peft is not installed"}}
    assert record["ratios"] == {}
    assert "hf-lora  skipped: peft is not installed" in capsys.readouterr().out


def test_bad_arguments_exit_2(capsys):
    sys.path.insert(0, str(ROOT))
    from bench import throughput

    assert throughput.main(["--engines", "phicore-lora,nope", "--device", "cpu"]) == 2
    assert "--engines: unknown nope" in capsys.readouterr().err
    assert throughput.main(["--shape", "tiny", "--seq-len", "5000", "--device", "cpu"]) == 2
    from bench import kernels as bench_kernels

    assert bench_kernels.main(["--device", "cpu", "--shapes", "3x"]) == 2
    assert "--shapes: '3x' is not OUTxIN" in capsys.readouterr().err


def test_kernels_quick(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert _bench_main("kernels", ["--device", "cpu", "--quick", "--repeats", "1", "--threads", "1",
                                   "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["copy"]["gb_per_s"] > 0
    backends = {row["backend"] for row in record["results"]}
    assert "torch" in backends
    if importlib.util.find_spec("bitsandbytes") is not None:
        assert "bitsandbytes" in backends
    assert "triton" in record["skipped"]  # no speed figure from Triton's CPU interpreter
    for row in record["results"]:
        assert row["gb_per_s"] > 0
        assert row["bytes"]["written"] == row["elements"] * 4  # fp32 out
        assert row["max_abs_diff_vs_torch"] == 0.0  # bit-identical to the reference on the same bytes
        assert row["call_peak_bytes"] is None or isinstance(row["call_peak_bytes"], int)  # None: no clear_refs
    assert "GB/s" in capsys.readouterr().out


class _FakeGPU:
    """A GPU clock for bench/kernels.py's device timing: each queued call costs `kernel_s` of GPU
    time; a spin of c cycles costs c / `hz` seconds; the spin still runs after the host queued its
    calls only when it is longer than `host_s_per_call` x calls."""

    def __init__(self, kernel_s, hz, host_s_per_call):
        self.kernel_s, self.hz, self.host_s_per_call = kernel_s, hz, host_s_per_call
        self.gpu_now, self.spin_left, self.queued_calls, self.spins = 0.0, 0.0, 0, []

    def call(self):
        self.gpu_now += self.kernel_s
        self.queued_calls += 1

    def sleep(self, cycles):
        self.spins.append(cycles)
        self.gpu_now += cycles / self.hz
        self.spin_left = cycles / self.hz
        self.queued_calls = 0

    def event(self, enable_timing=True):
        gpu = self

        class Event:
            def record(self):
                self.at = gpu.gpu_now

            def query(self):  # reached by the GPU: the spin ended before the host finished queueing
                return gpu.spin_left <= gpu.queued_calls * gpu.host_s_per_call

            def elapsed_time(self, other):
                return (other.at - self.at) * 1e3  # ms

        return Event()


@pytest.mark.parametrize("host_s_per_call", [1e-6, 2e-3])
def test_kernel_device_time_excludes_launches(monkeypatch, host_s_per_call):
    """device_seconds_per_call: GPU seconds per call from the events around calls queued behind a
    spin, the spin sized from a measured clock rate, lengthened when the host queued too slowly."""
    sys.path.insert(0, str(ROOT))
    from bench import kernels as bench_kernels

    gpu = _FakeGPU(kernel_s=25e-6, hz=1.98e9, host_s_per_call=host_s_per_call)
    monkeypatch.setattr(torch.cuda, "_sleep", gpu.sleep)
    monkeypatch.setattr(torch.cuda, "Event", gpu.event)
    monkeypatch.setattr(bench_kernels, "sync", lambda device: None)
    assert bench_kernels.device_seconds_per_call(gpu.call, torch.device("cpu")) is None  # CUDA only
    result = bench_kernels.device_seconds_per_call(gpu.call, torch.device("cuda"), calls=20)
    assert result["device_s"] == pytest.approx(25e-6)
    assert result["calls"] == 20 and result["queued_behind_spin"]
    assert gpu.spins[0] == 1_000_000  # the clock calibration
    assert gpu.spins[1] == pytest.approx(0.02 * 1.98e9, rel=1e-6)  # at least 20 ms of spin
    if host_s_per_call > 1e-3:  # 20 calls x 2 ms outlast a 20 ms spin: a 4x longer one is tried
        assert len(gpu.spins) == 3 and gpu.spins[2] == pytest.approx(4 * gpu.spins[1], rel=1e-6)
    else:
        assert len(gpu.spins) == 2

    def no_spin(cycles):
        raise RuntimeError("no _sleep here")

    monkeypatch.setattr(torch.cuda, "_sleep", no_spin)  # a failure is recorded, the bench goes on
    assert bench_kernels.device_seconds_per_call(gpu.call, torch.device("cuda")) == {
        "device_time_error": "RuntimeError: no _sleep here"}


def test_live_at_peak_replays_the_allocator_trace():
    """bench/_measure.live_at_peak: the peak above the trace's start and what is alive then, by the
    allocating line in this checkout (innermost first), from a CUDA allocator trace's events."""
    sys.path.insert(0, str(ROOT))
    from bench._measure import live_at_peak

    root = "/repo"

    def frames(*sites):  # innermost first, as the allocator records them, with torch's own frame inside
        return [{"filename": "/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"}] + [
            {"filename": f"{root}/{path}", "line": line, "name": name} for path, line, name in sites]

    checkpoint = frames(("phicore/model.py", 10, "forward"), ("bench/_worker.py", 5, "train_step"))
    dequant = frames(("phicore/nf4.py", 20, "backward"))
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": checkpoint},
        {"action": "alloc", "addr": 2, "size": 100, "frames": checkpoint},
        {"action": "free_requested", "addr": 99, "size": 50, "frames": []},  # held before the trace began
        {"action": "alloc", "addr": 3, "size": 300, "frames": dequant},  # the peak: 100 + 100 - 50 + 300
        {"action": "free_requested", "addr": 3, "size": 300, "frames": dequant},
        {"action": "free_completed", "addr": 3, "size": 300, "frames": dequant},  # not counted twice
        {"action": "alloc", "addr": 3, "size": 200, "frames": dequant},
        {"action": "alloc", "addr": 4, "size": 10, "frames": [{"filename": "/elsewhere.py", "line": 1, "name": "f"}]},
    ]
    found = live_at_peak(trace, root)
    assert found["peak_above_start_bytes"] == 450
    assert found["live_at_peak_bytes"] == 500  # the blocks of the step; the pre-trace free is not one
    assert found["sites"] == [
        {"site": "phicore/nf4.py:20 backward", "bytes": 300, "blocks": 1},
        {"site": "phicore/model.py:10 forward < bench/_worker.py:5 train_step", "bytes": 200, "blocks": 2},
    ]
    outermost_first = [{**event, "frames": [{"filename": "x", "line": 0, "name": "<module>"}] + event["frames"][::-1]}
                       for event in trace]
    assert live_at_peak(outermost_first, root)["sites"] == found["sites"]
    assert live_at_peak(trace, root, top=1)["other_sites_bytes"] == 200


def test_host_overhead_counts_ops_and_times_each_variant(tmp_path, capsys):
    out = tmp_path / "host.json"
    assert _bench_main("host_overhead", ["--layers", "2", "--rounds", "1", "--steps", "1", "--warmup", "1",
                                         "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    for engine in ("lora", "qlora"):
        rows = {variant: results[f"{engine} {variant}"] for variant in
                ("checkpoint-node", "torch-checkpoint", "no-checkpointing")}
        assert all(row["ms_per_step"] > 0 and row["aten_ops"] > 0 for row in rows.values())
        # recomputing costs ops; the node's machinery costs fewer than torch.utils.checkpoint's
        assert rows["no-checkpointing"]["aten_ops"] < rows["checkpoint-node"]["aten_ops"] \
            < rows["torch-checkpoint"]["aten_ops"]
    assert "aten ops" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        _bench_main("host_overhead", ["--layers", "0"])
    assert exit_info.value.code == 2
    assert "--layers must be at least 1, got 0" in capsys.readouterr().err


def test_collate_records_time_and_batch_bytes(tmp_path, capsys):
    out = tmp_path / "collate.json"
    record = _bench_main("collate", ["--batch", "3", "--seq", "256", "--min-length", "20", "--max-length", "90",
                                     "--repeats", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == record
    shape = record["shape"]
    assert shape["batch"] == 3 and shape["tokens_per_row"] == 256 and 0 < shape["real_tokens"] <= 3 * 256
    assert 0 < record["ms_per_batch_min"] <= record["ms_per_batch_median"]
    # every field is (B, T) long: the batch carries no (B, 1, T, T) mask
    assert record["batch_tensor_bytes"] == {name: 3 * 256 * 8 for name in
                                            ("input_ids", "labels", "attention_mask", "position_ids", "document_ids")}
    assert "collate_packed 3 x 256" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        _bench_main("collate", ["--min-length", "500", "--seq", "256"])
    assert exit_info.value.code == 2
