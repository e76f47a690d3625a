"""phicore: LoRA and QLoRA fine-tuning of Phi-2 and Phi-3 family models.

This file only re-exports the public API. Names are resolved lazily so that
`import phicore` stays cheap and each concept lives in its own module.
"""

import importlib.util
import os
from importlib import import_module

# kernels/ sits at the repository's top level and installs as phicore.kernels (setup.py's
# package_dir; the global name `kernels` is Hugging Face's). Run from a checkout that was not
# pip-installed, phicore.kernels is found in that folder.
if importlib.util.find_spec(__name__ + ".kernels") is None:
    __path__.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Imported eagerly: the function shares its module's name, and a lazy lookup would be
# shadowed by the submodule once anything imports `phicore.generate`.
from .generate import generate

_PUBLIC_API = {
    "ModelConfig": "phicore.config",
    "PRESETS": "phicore.config",
    "load_model": "phicore.weights",
    "save_model": "phicore.weights",
    "PhiForCausalLM": "phicore.model",
    "KVCache": "phicore.layers",
    "load_tokenizer": "phicore.tokenizer",
    "Tokenizer": "phicore.tokenizer",
    "apply_lora": "phicore.lora",
    "save_adapter": "phicore.peft_io",
    "load_adapter": "phicore.peft_io",
    "RunConfig": "phicore.train.config",
    "finetune": "phicore.train.run",
    "RunRecord": "phicore.record",
    "CodePaths": "phicore.code_paths",
    "current_paths": "phicore.code_paths",
    "set_paths": "phicore.code_paths",
    "force_paths": "phicore.code_paths",
}

__all__ = sorted([*_PUBLIC_API, "generate"])
__version__ = "0.1.0"


def __getattr__(name):
    if name in _PUBLIC_API:
        return getattr(import_module(_PUBLIC_API[name]), name)
    raise AttributeError(f"module 'phicore' has no attribute {name!r}")
