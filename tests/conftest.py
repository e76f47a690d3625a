"""Fixtures every test file shares.

- One torch thread: the tiny models here run faster on one thread than on two contending ones
  (CI has 2 cores), and results do not depend on thread scheduling.
- The tokenised-dataset cache goes to a temporary folder, never the user's ~/.cache.
- `bases`: the two offline tiny presets, built once per session.
"""

import os

import pytest
import torch

from phicore.tiny import build_tiny


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def private_data_cache(tmp_path_factory):
    before = os.environ.get("PHICORE_CACHE_DIR")
    os.environ["PHICORE_CACHE_DIR"] = str(tmp_path_factory.mktemp("data-cache"))
    yield
    if before is None:
        os.environ.pop("PHICORE_CACHE_DIR", None)
    else:
        os.environ["PHICORE_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    """{"tiny-phi-2": folder, "tiny-phi-3": folder}: random tiny bases with byte-level tokenizers."""
    root = tmp_path_factory.mktemp("bases")
    return {name: build_tiny(name, root / name) for name in ("tiny-phi-2", "tiny-phi-3")}
