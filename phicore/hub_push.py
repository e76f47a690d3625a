"""Upload a finished run or an export to the Hugging Face hub (`--push-to-hub REPO_ID [--private]`).

`train.py` pushes the run's --out folder once the run has finished; `infer.py` pushes the
adapter folder, or what it exported in the same command (the --merge folder, the --gguf file,
the --ollama or --mlx-adapter folder). From an adapter folder only the files that describe the
adapter go (`adapter_files`: adapter, adapter config, tokenizer files, README.md model card,
training_config.json, metrics); never checkpoints, best/, base/ or the lock.

    token = hub_token()                     # HF_TOKEN, else the saved login; checked before any work
    url = push(repo_id, path, token=token, private=False, files=adapter_files(path))

The repo is created if needed (`create_repo(exist_ok=True)`, repo type "model"; `--private`
makes a new repo private, an existing one keeps its visibility), then the folder goes up in
one commit (`upload_folder`, limited to `files` when given) or the file with `upload_file`.
huggingface_hub is imported when used.

Failures are one line: `HubTokenError` (a ValueError: no token to authenticate with, a bad
repo id; bad input, exit 2) and `HubUploadError` (an OSError: the hub refused or the network
failed; exit 1). Nothing local is changed either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence


class HubTokenError(ValueError):
    """Nothing to authenticate with, or a repo id the hub would refuse: bad input, exit 2."""


class HubUploadError(OSError):
    """The upload failed (HTTP error, network, permissions on the hub): exit 1."""


def adapter_files(folder) -> list:
    """Names of the files of an adapter folder (train.py's --out) that are pushed, those present."""
    from .export.model_card import CARD_NAME, CURVES_PNG, METRICS_CSV, METRICS_JSONL
    from .peft_io import CONFIG_NAME, WEIGHTS_NAME
    from .record import RECORD_NAME
    from .tokenizer_files import (ADDED_TOKENS_FILE, CHAT_TEMPLATE_JINJA_FILE, SENTENCEPIECE_MODEL_FILE,
                                  SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE)
    names = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, RECORD_NAME, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE,
             SPECIAL_TOKENS_MAP_FILE, ADDED_TOKENS_FILE, CHAT_TEMPLATE_JINJA_FILE, SENTENCEPIECE_MODEL_FILE,
             METRICS_JSONL, METRICS_CSV, CURVES_PNG)
    return [name for name in names if (Path(folder) / name).is_file()]


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if the hub would accept it as "user/name" or "org/name"; HubTokenError if not."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubTokenError(f"--push-to-hub {repo_id!r}: not a valid hub repo id ({err})") from None
    if "/" not in repo_id:
        raise HubTokenError(f"--push-to-hub {repo_id!r}: give the repo as user/name or org/name")
    return repo_id


def check_push_flags(repo_id, private: bool) -> None:
    """The --push-to-hub / --private flags of train.py and infer.py, checked once: SettingsError
    naming the flag (--private without a repo, a repo id the hub would refuse)."""
    from .settings import SettingsError

    if private and not repo_id:
        raise SettingsError("--private makes the --push-to-hub repo private: it needs --push-to-hub REPO_ID",
                            field="private")
    if repo_id:
        try:
            check_repo_id(repo_id)
        except HubTokenError as err:
            raise SettingsError(str(err), field="push_to_hub") from None


def hub_token() -> str:
    """The token to push with: HF_TOKEN, else the one `hf auth login` saved. HubTokenError if none."""
    import huggingface_hub

    token = huggingface_hub.get_token()
    if not token:
        raise HubTokenError("--push-to-hub: no Hugging Face token; set HF_TOKEN or run `hf auth login` "
                            "(a token with write access)")
    return token


def _upload_errors() -> tuple:
    """What a failed upload raises: OSError (huggingface_hub's HTTP errors derive from it) and
    the HTTP client's own base error (its connection errors and time-outs do not)."""
    from huggingface_hub.errors import HfHubHTTPError

    client = tuple(c for c in HfHubHTTPError.__mro__[1:] if c not in (OSError, Exception, BaseException, object))
    return (OSError, *client)


def push(repo_id: str, path, *, token: str, private: bool = False, files: Optional[Sequence[str]] = None,
         commit_message: Optional[str] = None) -> str:
    """Create the model repo if needed and upload `path` (a folder, or one file) into its root.
    `files`: for a folder, only these names. Returns the repo's URL."""
    import huggingface_hub

    path = Path(path)
    message = commit_message or f"Upload {path.name} with phicore"
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        if path.is_dir():
            api.upload_folder(repo_id=repo_id, folder_path=str(path), repo_type="model", commit_message=message,
                              allow_patterns=list(files) if files is not None else None)
        else:
            api.upload_file(repo_id=repo_id, path_or_fileobj=str(path), path_in_repo=path.name, repo_type="model",
                            commit_message=message)
    except _upload_errors() as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise HubUploadError(f"--push-to-hub {repo_id}: upload of {path} failed ({type(err).__name__}: "
                             f"{first})") from err
    return f"https://huggingface.co/{repo_id}"
