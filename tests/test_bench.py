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
                "--peak-size", "256", "--json", str(out))
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
