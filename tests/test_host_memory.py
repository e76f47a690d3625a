"""phicore/host_memory.py: with glibc keeping freed large blocks, a second block of the same size
is served from memory already resident, so filling it costs no page faults (the first one costs
one per page; the second may too, where the 64-byte-aligned request does not fit the freed block). Measured in a fresh process (the setting is process-wide), by the minor page
faults getrusage counts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from phicore import host_memory

_FAULTS = """
import resource, sys, torch
if sys.argv[1] == "kept":
    from phicore.host_memory import keep_freed_host_memory
    assert keep_freed_host_memory() and keep_freed_host_memory()  # idempotent
from phicore.kernels import dequantize_nf4
from phicore.nf4 import quantize_nf4
torch.set_num_threads(1)
packed, state = quantize_nf4(torch.randn(4096, 4096))
def faults(calls):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        weight = dequantize_nf4(packed, state, torch.float32)  # (4096, 4096) fp32: 64 MiB, then freed
        del weight
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults(3)  # the first blocks fault in either way
print(faults(4))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_repeated_large_blocks_are_reused_without_page_faults():
    def faults(mode):
        proc = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.split()[-1])

    default, kept = faults("default"), faults("kept")
    # 4 calls x 64 MiB: a fault per 4 KiB page by default (65536; 128 where transparent huge pages
    # back the mappings); kept: none measured (0-1)
    assert default >= 100, default
    assert kept * 10 <= default, (kept, default)


def test_off_linux_it_changes_nothing(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setattr(host_memory.sys, "platform", "darwin")
    assert host_memory.keep_freed_host_memory() is False


@pytest.mark.parametrize("flag, calls", [([], 1), (["--no-keep-host-memory"], 0)])
def test_train_keeps_host_memory_on_cpu_unless_told_not_to(bases, tmp_path, monkeypatch, flag, calls):
    import phicore.train.run as run
    from train_runs import run_main, write_jsonl

    called = []
    monkeypatch.setattr(run, "keep_freed_host_memory", lambda: called.append(True))
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": f"a short line number {i}"} for i in range(8)])
    assert run_main("--model", bases["tiny-phi-3"], "--data", data, "--max-steps", 1, "--quiet", "--device", "cpu",
                    "--val-split", 0, "--out", tmp_path / "out", *flag) == 0
    assert len(called) == calls
