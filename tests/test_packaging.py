"""The installed distribution: phicore's kernels live under phicore.kernels and leave the global
import name `kernels` to Hugging Face's package, which bitsandbytes and transformers import.

One fresh virtual environment (it sees this environment's packages, torch included, so nothing
is downloaded) gets phicore installed from this checkout as a user's `pip install .` would; in
it, Hugging Face's `kernels` and `phicore.kernels` both import and work, no file of phicore's
is `site-packages/kernels/...`, and importing bitsandbytes does not trip over phicore.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK = r"""
import json, kernels, torch
import phicore.kernels as ours
from phicore.nf4 import quantize_nf4
torch.manual_seed(0)
w = torch.randn(8, 64)
packed, state = quantize_nf4(w)
dense = ours.dequantize_nf4(packed, state, torch.float32)
print(json.dumps({
    "hf_kernels": kernels.__file__, "hf_get_kernel": callable(getattr(kernels, "get_kernel", None)),
    "phicore_kernels": ours.__file__, "nf4_error": float((dense - w).abs().max() / w.abs().max()),
}))
"""


def _hf_kernels_installed() -> bool:
    """Hugging Face's distribution is installed (an import of `kernels` from the repository root
    would find this checkout's folder first)."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _hf_kernels_installed(), reason="needs Hugging Face's kernels package (pip install kernels)")
def test_installed_phicore_leaves_kernels_to_hugging_face(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside setup.py
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "out"))
    # pip from this environment, installing into the new one: a regular (not editable) install
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-index", "--disable-pip-version-check", str(source)],
        capture_output=True, text=True, timeout=300)
    if "no such option: --python" in install.stderr:
        pytest.skip("pip too old for --python (needs pip >= 22.3)")
    assert install.returncode == 0, install.stderr[-2000:]

    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    record = next(site.glob("phicore-*.dist-info")) / "RECORD"
    owned = [line.split(",")[0] for line in record.read_text().splitlines()]
    assert not [path for path in owned if path.startswith("kernels/")], "phicore installs a top-level kernels/"
    assert "phicore/kernels/__init__.py" in owned and "phicore/kernels/nf4_triton.py" in owned

    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    run = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=clean_env)
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["hf_get_kernel"] and not Path(found["hf_kernels"]).is_relative_to(REPO)
    assert Path(found["phicore_kernels"]).is_relative_to(site)  # the installed copy, not this checkout
    # a working dequantise: NF4's widest gap (-1 to -0.696) is at most ~0.16 of a block's absmax away
    assert found["nf4_error"] < 0.16

    if importlib.util.find_spec("bitsandbytes") is None:
        return
    bnb = subprocess.run([str(python), "-c", "import bitsandbytes"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**clean_env, "HF_HUB_OFFLINE": "1"})
    assert bnb.returncode == 0, bnb.stderr[-2000:]
    # bitsandbytes may still say its kernels-community download is unavailable offline; it must
    # never find phicore's kernels where it looks for Hugging Face's
    assert "cannot import name 'get_kernel'" not in bnb.stderr and "phicore" not in bnb.stderr, bnb.stderr
