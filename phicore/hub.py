"""Resolve what a user typed (preset name, hub id or local folder) to a local folder.

Downloads fetch only safetensors, json and tokenizer files: never pickle weights. Setting
HF_HUB_OFFLINE=1 makes huggingface-hub answer from its cache only.
"""

from __future__ import annotations

from pathlib import Path

from .config import PRESETS

# What a model folder needs: weights (safetensors only), configs, tokenizer files.
DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.jinja", "tokenizer.model"]


def hub_id_for(name_or_path: str) -> str:
    """A preset name maps to its hub id; anything else is returned unchanged."""
    return PRESETS.get(name_or_path, name_or_path)


def resolve_model_dir(name_or_path) -> Path:
    """Return a local folder for a preset name, a hub id or a folder path. The offline tiny
    presets (tiny-phi-2, tiny-phi-3) are built once into the cache (phicore.tiny.tiny_dir)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{name_or_path}: is a file, not a model folder (give the folder holding "
                                "config.json and the weights)")
    name = str(name_or_path)
    from .tiny import TINY_PRESETS, build_tiny, tiny_dir  # imported on use: it builds models

    if name in TINY_PRESETS:
        return build_tiny(name, tiny_dir(name))
    repo_id = hub_id_for(name)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or path.suffix
    if looks_like_path or "/" not in repo_id:
        known = ", ".join([*sorted(PRESETS), *TINY_PRESETS])
        raise FileNotFoundError(
            f"{name}: no such folder, and not a preset ({known}) or a hub id like 'microsoft/phi-2'"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as err:  # network, auth, offline mode with an empty cache, ...
        raise FileNotFoundError(f"{repo_id}: could not download from the Hugging Face hub ({err})") from None
