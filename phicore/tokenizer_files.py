"""The files of a Hugging Face tokenizer folder: what each one holds, read and written as
transformers reads and writes them.

A model folder spreads its tokenizer over several files. ``tokenizer.json`` is the pipeline
itself (vocabulary, merges, normaliser, pre-tokeniser, post-processor, added tokens);
``tokenizer_config.json`` names the special tokens and carries the chat template and other
settings; older folders put the same things in ``special_tokens_map.json`` and
``added_tokens.json``; a chat template may also sit in ``chat_template.jinja`` or
``chat_template.json``; and ``generation_config.json`` can name more end-of-sequence ids.
The ``read_*`` functions below apply transformers' (v5) precedence between them;
`write_tokenizer_files` writes a folder that both `phicore.tokenizer.load_tokenizer` and
``transformers.AutoTokenizer`` load to the same ids. `phicore.tokenizer` builds the
`Tokenizer` from what is read here.

A file that cannot be read, is not valid JSON (a truncated download) or holds the wrong kind
of value raises `TokenizerError`, one line naming the file.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping, Sequence

from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

from .json_file import REDOWNLOAD, read_json

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"
CHAT_TEMPLATE_JINJA_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON_FILE = "chat_template.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SENTENCEPIECE_MODEL_FILE = "tokenizer.model"

#: The named special-token slots transformers knows about, in its order.
STANDARD_NAMED_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

#: Class name written into saved configs: transformers 4 and 5 both load it as a plain
#: tokenizer.json-backed tokenizer, without rebuilding the pipeline the way LlamaTokenizer does.
SAVED_TOKENIZER_CLASS = "PreTrainedTokenizerFast"

# tokenizer_config.json keys the Tokenizer manages itself; every other key is kept verbatim.
_MANAGED_CONFIG_KEYS = frozenset(
    {
        "added_tokens_decoder",
        "additional_special_tokens",
        "extra_special_tokens",
        "chat_template",
        "clean_up_tokenization_spaces",
        "tokenizer_class",
    }
)




class TokenizerError(ValueError):
    """A tokenizer file that cannot be read or used: one line naming the file."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextmanager
def reading(path: Path):
    """Turn a file's wrong content (a KeyError, TypeError or ValueError while interpreting it)
    into a TokenizerError naming the file."""
    try:
        yield
    except TokenizerError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise TokenizerError(f"{path}: unexpected content ({type(err).__name__}: {_first_line(err)})") from None


# ===================================================================================== reading


def read_backend(folder: Path) -> BackendTokenizer:
    """Load tokenizer.json, or explain precisely why the folder cannot be used."""
    tokenizer_path = folder / TOKENIZER_FILE
    if tokenizer_path.is_file():
        try:
            text = tokenizer_path.read_text(encoding="utf-8")
        except OSError as err:
            raise TokenizerError(f"{tokenizer_path}: cannot read ({err.strerror or err})") from None
        except UnicodeDecodeError as err:
            raise TokenizerError(f"{tokenizer_path}: truncated or corrupt (not UTF-8 at byte {err.start}; "
                                 f"{REDOWNLOAD})") from None
        try:
            return BackendTokenizer.from_str(text)
        except Exception as err:  # noqa: BLE001  (the tokenizers library raises plain Exception for bad files)
            raise TokenizerError(f"{tokenizer_path}: truncated or corrupt ({_first_line(err)}; {REDOWNLOAD})") from None
    if (folder / SENTENCEPIECE_MODEL_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} has {SENTENCEPIECE_MODEL_FILE} but no {TOKENIZER_FILE}: the "
            "SentencePiece-only form is not supported. Convert it once with transformers "
            "(AutoTokenizer.from_pretrained(folder).save_pretrained(folder)) to get a tokenizer.json."
        )
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(
        f"{folder} has no {TOKENIZER_FILE}, which phicore needs to build the tokenizer "
        f"(files present: {', '.join(present) or 'none'})"
    )


def read_tokenizer_config(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json, or {} when the folder has none."""
    return _read_json(folder / TOKENIZER_CONFIG_FILE) or {}


def read_named_tokens(folder: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """bos/eos/unk/pad/... strings; special_tokens_map.json counts only for legacy configs.

    transformers reads special_tokens_map.json (and lets it override the config) only when the
    config has no ``added_tokens_decoder``; we follow the same precedence.
    """
    named = _named_tokens_in(folder / TOKENIZER_CONFIG_FILE, config)
    if "added_tokens_decoder" not in config:
        token_map = _read_json(folder / SPECIAL_TOKENS_MAP_FILE) or {}
        named.update(_named_tokens_in(folder / SPECIAL_TOKENS_MAP_FILE, token_map))
    return {key: value for key, value in named.items() if value is not None}


def _named_tokens_in(path: Path, entries: Mapping[str, Any]) -> dict[str, str | None]:
    """The named-token entries of one file, as strings (None where unset)."""
    with reading(path):
        named = {key: token_content(value) for key, value in entries.items() if _is_named_token_entry(key, value)}
        for key, value in named.items():
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{key} must be a string or {{\"content\": string}}, got {value!r:.60}")
    return named


def _is_named_token_entry(key: str, value: Any) -> bool:
    """``bos_token: "<s>"``-style entries; model-specific ``*_token`` keys count when strings."""
    if key in STANDARD_NAMED_TOKENS:
        return value is None or isinstance(value, (str, dict))
    return key.endswith("_token") and isinstance(value, str)


def read_additional_special_tokens(config: Mapping[str, Any]) -> list[str]:
    """Unnamed special tokens from ``additional_special_tokens`` / ``extra_special_tokens``."""
    tokens: list[str] = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(key) or []
        if not isinstance(value, (list, dict)):
            raise TypeError(f"{key} must be a list of tokens, got {value!r:.60}")
        entries = value.values() if isinstance(value, dict) else value
        tokens.extend(t for t in (token_content(entry) for entry in entries) if t is not None)
    return list(dict.fromkeys(tokens))


def read_config_added_tokens(folder: Path, config: Mapping[str, Any], special: set[str]) -> list[AddedToken]:
    """Added tokens declared by tokenizer_config.json or, for legacy folders, added_tokens.json."""
    declared = config.get("added_tokens_decoder")
    if isinstance(declared, dict):
        with reading(folder / TOKENIZER_CONFIG_FILE):
            ordered = sorted(declared.items(), key=lambda item: int(item[0]))
            return [_added_token_from_fields(fields) for _, fields in ordered]
    legacy = _read_json(folder / ADDED_TOKENS_FILE) or {}
    with reading(folder / ADDED_TOKENS_FILE):
        ordered_contents = sorted(legacy, key=lambda content: int(legacy[content]))
        return [
            AddedToken(content, normalized=content not in special, special=content in special)
            for content in ordered_contents
        ]


def read_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja, then chat_template.json, then the config."""
    jinja_file = folder / CHAT_TEMPLATE_JINJA_FILE
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except OSError as err:
            raise TokenizerError(f"{jinja_file}: cannot read ({err.strerror or err})") from None
        except UnicodeDecodeError as err:
            raise TokenizerError(f"{jinja_file}: not valid UTF-8 (byte {err.start}); truncated or corrupt?") from None
    json_file = _read_json(folder / CHAT_TEMPLATE_JSON_FILE)
    if json_file and json_file.get("chat_template") is not None:
        with reading(folder / CHAT_TEMPLATE_JSON_FILE):
            return _default_template(json_file["chat_template"])
    with reading(folder / TOKENIZER_CONFIG_FILE):
        return _default_template(config.get("chat_template"))


def _default_template(value: Any) -> str | None:
    """A template string, or the ``default`` one from a list/dict of named templates."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        value = {entry["name"]: entry["template"] for entry in value}
    if isinstance(value, dict):
        value = value.get("default")
        if value is None or isinstance(value, str):
            return value
    raise ValueError(f"unrecognised chat_template value of type {type(value).__name__}")


def read_generation_eos_ids(folder: Path) -> list[int]:
    """generation_config.json's eos_token_id (an int or a list), if the folder has one."""
    generation_config = _read_json(folder / GENERATION_CONFIG_FILE) or {}
    eos = generation_config.get("eos_token_id")
    if eos is None:
        return []
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise TokenizerError(f"{folder / GENERATION_CONFIG_FILE}: eos_token_id must be a token id or a list of them, "
                             f"got {eos!r:.60}")
    return [int(i) for i in ids]


def config_extras(config: Mapping[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json keys kept verbatim for saving: all but the managed ones."""
    return {
        key: value
        for key, value in config.items()
        if key not in _MANAGED_CONFIG_KEYS and not _is_named_token_entry(key, value)
    }


# ===================================================================================== writing


def write_tokenizer_files(
    folder: Path,
    backend: BackendTokenizer,
    *,
    named_tokens: Mapping[str, str],
    additional_special_tokens: Sequence[str],
    chat_template: str | None,
    clean_up_tokenization_spaces: bool,
    config_extras: Mapping[str, Any],
) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``folder``
    (created if needed) and keep chat template files already there in step. Returns the three
    paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_path = folder / TOKENIZER_FILE
    with open(tokenizer_path, "w", encoding="utf-8") as handle:  # what backend.save writes, with Python's OSError
        handle.write(backend.to_str(pretty=True))
    config = _tokenizer_config(
        backend, named_tokens, additional_special_tokens, chat_template, clean_up_tokenization_spaces, config_extras
    )
    config_path = _write_json(folder / TOKENIZER_CONFIG_FILE, config)
    token_map = _special_tokens_map(backend, named_tokens, additional_special_tokens)
    map_path = _write_json(folder / SPECIAL_TOKENS_MAP_FILE, token_map)
    _replace_stale_chat_template_file(folder, chat_template)
    return [tokenizer_path, config_path, map_path]


def _tokenizer_config(
    backend: BackendTokenizer,
    named_tokens: Mapping[str, str],
    additional_special_tokens: Sequence[str],
    chat_template: str | None,
    clean_up_tokenization_spaces: bool,
    extras: Mapping[str, Any],
) -> dict[str, Any]:
    """tokenizer_config.json contents: the kept extras plus everything the Tokenizer manages."""
    added = backend.get_added_tokens_decoder()
    config: dict[str, Any] = dict(extras)
    config["added_tokens_decoder"] = {
        str(token_id): _added_token_fields(token, with_special=True) for token_id, token in sorted(added.items())
    }
    config.update(named_tokens)
    if additional_special_tokens:
        config["additional_special_tokens"] = list(additional_special_tokens)
    config["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces
    if chat_template is not None:
        config["chat_template"] = chat_template
    config["tokenizer_class"] = SAVED_TOKENIZER_CLASS
    return config


def _special_tokens_map(
    backend: BackendTokenizer, named_tokens: Mapping[str, str], additional_special_tokens: Sequence[str]
) -> dict[str, Any]:
    """special_tokens_map.json contents, in the ``{"content": ...}`` form Phi-3 ships."""
    added_by_content = {t.content: t for t in backend.get_added_tokens_decoder().values()}
    token_map: dict[str, Any] = {}
    for name, content in named_tokens.items():
        token = added_by_content.get(content)
        token_map[name] = content if token is None else _added_token_fields(token, with_special=False)
    if additional_special_tokens:
        token_map["additional_special_tokens"] = list(additional_special_tokens)
    return token_map


def _replace_stale_chat_template_file(folder: Path, chat_template: str | None) -> None:
    """Chat template files left in the folder win over the config: keep them in step.

    A stale chat_template.jinja is rewritten (or removed when there is no template); a
    chat_template.json (a processor file that may hold more) has only its template replaced.
    """
    jinja_file = folder / CHAT_TEMPLATE_JINJA_FILE
    if jinja_file.exists():
        if chat_template is None:
            jinja_file.unlink()
        else:
            jinja_file.write_text(chat_template, encoding="utf-8")
    json_file = folder / CHAT_TEMPLATE_JSON_FILE
    json_content = _read_json(json_file)
    if json_content is not None and "chat_template" in json_content:
        json_content["chat_template"] = chat_template
        _write_json(json_file, json_content)


# ====================================================================================== helpers


def token_content(value: Any) -> str | None:
    """A token given as a string or as a ``{"content": ...}`` dict (or an AddedToken)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, AddedToken):
        return value.content
    raise TypeError(f"cannot read a token from {value!r}")


def _added_token_from_fields(fields: Mapping[str, Any]) -> AddedToken:
    return AddedToken(
        fields["content"],
        single_word=bool(fields.get("single_word", False)),
        lstrip=bool(fields.get("lstrip", False)),
        rstrip=bool(fields.get("rstrip", False)),
        normalized=bool(fields.get("normalized", not fields.get("special", False))),
        special=bool(fields.get("special", False)),
    )


def _added_token_fields(token: AddedToken, with_special: bool) -> dict[str, Any]:
    fields = {
        "content": token.content,
        "lstrip": token.lstrip,
        "normalized": token.normalized,
        "rstrip": token.rstrip,
        "single_word": token.single_word,
    }
    if with_special:
        fields["special"] = token.special
    return fields


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, None when absent; TokenizerError when unreadable, not JSON (truncated
    or corrupt) or not an object."""
    if not path.is_file():
        return None
    content = read_json(path, TokenizerError)
    if not isinstance(content, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(content).__name__}")
    return content


def _write_json(path: Path, content: Mapping[str, Any]) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    return path
