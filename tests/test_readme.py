"""The README as a newcomer uses it: its Python example runs offline as written, its config
file example is a valid RunConfig, its commands name files that exist, and CI runs the test
command it gives."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phicore.train.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


@pytest.mark.slow
def test_python_example_runs_offline_as_written(tmp_path):
    (code,) = re.findall(r"```python\n(.*?)```", _section("From Python"), flags=re.S)
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "PHICORE_CACHE_DIR": str(tmp_path / "cache" / "datasets"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^20 steps, final loss \d+\.\d{3}$", run.stdout, flags=re.M), run.stdout
    assert (tmp_path / "out" / "python-demo" / "adapter_model.safetensors").is_file()


def test_config_file_example_is_a_run_config(tmp_path):
    (toml,) = [block for block in _blocks("toml") if "model =" in block]
    path = tmp_path / "run.toml"
    path.write_text(toml, encoding="utf-8")
    config = RunConfig.from_file(path)
    assert config.lora_r == 8 and config.targets == "qkv_proj,o_proj" and config.save_every == 50


def test_commands_name_files_that_exist():
    for block in _blocks("bash"):
        for path in re.findall(r"(examples/\S+)", block):
            assert (REPO / path).exists(), path
    assert "--data humor.jsonl" not in README


def test_ci_runs_the_readme_test_command():
    (command,) = {line.strip() for line in _blocks("bash")[0].splitlines() if "pytest" in line}
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == command
    assert command in _section("Tests")
