"""Tokenizers for Phi-2 and Phi-3 models, read straight from a Hugging Face model folder.

The heavy lifting (BPE merges, byte fallback, added-token splitting, decoding) is done by the
`tokenizers` library from the folder's ``tokenizer.json``. This module adds what a model folder
spreads over the other files: which strings are bos/eos/unk/pad, extra added tokens, the chat
template, and the ids generation has to stop on. `Tokenizer` holds them; `load_tokenizer` builds
one from a folder, whose files are read and written by `phicore.tokenizer_files`; chat templates
are rendered by `phicore.chat_template`.

The goal is to give exactly the ids and text that ``transformers.AutoTokenizer`` gives for the
same folder, without depending on transformers. The transformers (v5) behaviours that matter:

* ``tokenizer.json`` is the single source of truth for ``encode``: its post-processor decides
  whether BOS/EOS are added. ``add_bos_token``/``add_eos_token`` in ``tokenizer_config.json`` are
  dropped whenever a ``tokenizer.json`` exists (Phi-3-mini-4k declares ``add_bos_token: true``
  yet its ``tokenizer.json`` adds nothing, so plain ``encode`` adds no ``<s>``; its chat template
  writes ``{{ bos_token }}`` itself). Only a tokenizer built in code with an explicit
  ``add_bos_token``/``add_eos_token`` gets its post-processor rewritten, as transformers does for
  a ``tokenizer_object``.
* ``decode`` is the backend's decode. ``clean_up_tokenization_spaces`` (true for Phi-2) is ignored
  for BPE models, because the cleanup is designed for WordPiece and corrupts BPE output.
* Special tokens named in the config but missing from the vocabulary are added as special tokens.
* Chat templates render in transformers' sandboxed Jinja environment (`phicore.chat_template`)
  with the named special tokens as variables; the tokenized form is
  ``encode(text, add_special_tokens=False)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as BackendTokenizer

from .chat_template import render_chat_template
from .tokenizer_files import (
    STANDARD_NAMED_TOKENS,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,  # noqa: F401 (phicore.inference and users import it from here)
    TokenizerError,
    config_extras,
    read_additional_special_tokens,
    read_backend,
    read_chat_template,
    read_config_added_tokens,
    read_generation_eos_ids,
    read_named_tokens,
    read_tokenizer_config,
    reading,
    token_content,
    write_tokenizer_files,
)

#: Tokens that end a turn in Phi chat formats; generation stops on them whenever they exist.
TURN_END_TOKENS = ("<|end|>", "<|endoftext|>")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the model folder's special tokens and chat template.

    Build one with :func:`load_tokenizer` for a model folder, or directly from an in-memory
    backend::

        Tokenizer(backend, bos_token="<s>", eos_token="</s>", chat_template=..., add_bos_token=True)

    The backend is used in place (not copied): named special tokens missing from its vocabulary
    are added, padding and truncation are switched off (``encode`` returns one whole sequence),
    and an explicit ``add_bos_token``/``add_eos_token`` rewrites its post-processor.

    Args:
        backend: the `tokenizers.Tokenizer` doing the actual work.
        bos_token, eos_token, unk_token, pad_token: special-token strings (or None).
        chat_template: Jinja source of the chat template, or None.
        add_bos_token, add_eos_token: None keeps the backend's post-processor as it is; a bool
            makes ``encode(..., add_special_tokens=True)`` add (or not add) that token.
        other_named_tokens: further named tokens (``sep_token``, ``mask_token``, model-specific
            ``*_token`` keys); they become special tokens and chat-template variables.
        additional_special_tokens: unnamed special tokens to register.
        clean_up_tokenization_spaces: the config flag; only applied by ``decode`` for non-BPE
            models, as in transformers.
        extra_stop_token_ids: more ids generation must stop on (a generation_config.json's
            ``eos_token_id``).
        config_extras: other tokenizer_config.json keys (``model_max_length``, ``add_bos_token``
            as declared, ...) written back unchanged by :meth:`save`.
        name_or_path: where this tokenizer came from, for messages.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        other_named_tokens: Mapping[str, str] | None = None,
        additional_special_tokens: Iterable[str] = (),
        clean_up_tokenization_spaces: bool = False,
        extra_stop_token_ids: Iterable[int] = (),
        config_extras: Mapping[str, Any] | None = None,
        name_or_path: str | None = None,
    ):
        self._backend = backend
        self.name_or_path = name_or_path
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.config_extras = dict(config_extras or {})
        self._named_tokens = _collect_named_tokens(
            bos_token=bos_token,
            eos_token=eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            other_named_tokens=other_named_tokens,
        )
        self.additional_special_tokens = list(dict.fromkeys(additional_special_tokens))
        self._extra_stop_token_ids = [int(i) for i in extra_stop_token_ids]

        # encode() must return exactly one untruncated sequence, whatever tokenizer.json says.
        self._backend.no_padding()
        self._backend.no_truncation()
        self._backend.encode_special_tokens = False
        self._register_special_tokens()
        if add_bos_token is not None or add_eos_token is not None:
            self._rewrite_post_processor(bool(add_bos_token), bool(add_eos_token))
            self.config_extras["add_bos_token"] = bool(add_bos_token)
            self.config_extras["add_eos_token"] = bool(add_eos_token)

    # ----------------------------------------------------------------------------------- setup

    def _register_special_tokens(self) -> None:
        """Add named and additional special tokens that the vocabulary lacks (as transformers does)."""
        wanted = list(self._named_tokens.values()) + self.additional_special_tokens
        missing = [token for token in dict.fromkeys(wanted) if self._backend.token_to_id(token) is None]
        if missing:
            self._backend.add_special_tokens(
                [AddedToken(token, special=True, normalized=False) for token in missing]
            )

    def _rewrite_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """Make encode() add BOS and/or EOS around the text (transformers' update_post_processor)."""
        bos, eos = self._named_tokens.get("bos_token"), self._named_tokens.get("eos_token")
        if add_bos and bos is None:
            raise ValueError("add_bos_token=True needs a bos_token")
        if add_eos and eos is None:
            raise ValueError("add_eos_token=True needs an eos_token")
        prefix = f"{bos}:0 " if add_bos else ""
        suffix = f" {eos}:0" if add_eos else ""
        single = f"{prefix}$A:0{suffix}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        special_tokens = []
        if add_bos:
            special_tokens.append((bos, self._backend.token_to_id(bos)))
        if add_eos and eos != bos:
            special_tokens.append((eos, self._backend.token_to_id(eos)))
        self._backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special_tokens
        )

    # ------------------------------------------------------------------------------ vocabulary

    @property
    def backend(self) -> BackendTokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' ``len(tokenizer)``)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def id_limit(self) -> int:
        """One more than the largest token id: the embedding rows a model needs for it."""
        return max(self._backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        """Id of a single token string, or None when it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id, or None when the id is out of range."""
        return self._backend.id_to_token(int(token_id))

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens (``bos_token`` etc.) that are set, as strings."""
        return dict(self._named_tokens)

    def _named_token_id(self, name: str) -> int | None:
        token = self._named_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self._named_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._named_tokens.get("eos_token")

    @property
    def unk_token(self) -> str | None:
        return self._named_tokens.get("unk_token")

    @property
    def pad_token(self) -> str | None:
        """The configured pad token; None when the folder has none (Phi-2)."""
        return self._named_tokens.get("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._named_token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._named_token_id("eos_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._named_token_id("unk_token")

    @property
    def pad_token_id(self) -> int | None:
        """Id to pad batches with: the pad token, or eos when there is none (Phi-2).

        Padding positions must be masked out of attention and loss by position, never by
        comparing ids, because the id may be a real eos.
        """
        pad_id = self._named_token_id("pad_token")
        return self.eos_token_id if pad_id is None else pad_id

    @property
    def special_token_ids(self) -> list[int]:
        """Sorted ids of every special token: the ones ``decode(skip_special_tokens=True)`` drops."""
        flagged = {i for i, token in self._backend.get_added_tokens_decoder().items() if token.special}
        named = {self._backend.token_to_id(t) for t in self._named_tokens.values()}
        extra = {self._backend.token_to_id(t) for t in self.additional_special_tokens}
        return sorted(i for i in flagged | named | extra if i is not None)

    @property
    def stop_token_ids(self) -> list[int]:
        """Sorted ids generation must stop on.

        eos, the Phi turn-end tokens ``<|end|>`` / ``<|endoftext|>`` where the vocabulary has
        them, and the generation_config.json ``eos_token_id`` list of the folder.
        """
        stops = set(self._extra_stop_token_ids)
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        for token in TURN_END_TOKENS:
            token_id = self._backend.token_to_id(token)
            if token_id is not None:
                stops.add(token_id)
        return sorted(stops)

    @property
    def add_bos_token(self) -> bool:
        """Whether ``encode(text)`` puts the bos token first (read off the post-processor)."""
        prefix, _ = self._special_tokens_added_by_encode()
        return self.bos_token_id is not None and self.bos_token_id in prefix

    @property
    def add_eos_token(self) -> bool:
        """Whether ``encode(text)`` puts the eos token last (read off the post-processor)."""
        _, suffix = self._special_tokens_added_by_encode()
        return self.eos_token_id is not None and self.eos_token_id in suffix

    def _special_tokens_added_by_encode(self) -> tuple[list[int], list[int]]:
        """The ids encode() puts before and after the text when add_special_tokens=True."""
        probe = "a"
        plain = self._backend.encode(probe, add_special_tokens=False).ids
        full = self._backend.encode(probe, add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start], full[start + len(plain) :]
        return [], []

    # ------------------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the post-processor (BOS/EOS)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """:meth:`encode` for many texts at once (the backend encodes them in parallel)."""
        texts = list(texts)
        if not all(isinstance(text, str) for text in texts):
            raise TypeError("encode_batch() takes a sequence of str")
        encodings = self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids (a list, an int, or a 1-D tensor / array)."""
        token_ids = _as_id_list(ids)
        text = self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and not self._is_bpe():
            text = clean_up_tokenization(text)
        return text

    def _is_bpe(self) -> bool:
        return type(self._backend.model).__name__ == "BPE"

    # --------------------------------------------------------------------------- chat template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **template_variables: Any,
    ) -> str | list[int]:
        """Render a conversation with the folder's own chat template.

        Args:
            messages: dicts with at least ``role`` and ``content``.
            add_generation_prompt: append the prompt that opens the assistant's turn (when the
                template supports it).
            tokenize: return token ids (``encode(text, add_special_tokens=False)``; the template
                writes any bos itself) instead of the text.
            template_variables: extra variables for the template; they override the special
                token variables of the same name.
        """
        if self.chat_template is None:
            raise ValueError(
                f"tokenizer {self.name_or_path or '(in memory)'} has no chat template (Phi-2 has "
                "none: format prompts yourself, e.g. 'Instruct: {prompt}\\nOutput:')"
            )
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        text = render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **template_variables},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ------------------------------------------------------------------------------------ save

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

        Both :func:`load_tokenizer` and ``transformers.AutoTokenizer.from_pretrained`` load the
        result and give the same ids. Returns the paths written.
        """
        return write_tokenizer_files(
            Path(directory),
            self._backend,
            named_tokens=self._named_tokens,
            additional_special_tokens=self.additional_special_tokens,
            chat_template=self.chat_template,
            clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
            config_extras=self.config_extras,
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name_or_path or '(in memory)'}, vocab_size={self.vocab_size}, "
            f"bos={self.bos_token!r}, eos={self.eos_token!r}, pad={self.pad_token!r}, "
            f"chat_template={'yes' if self.chat_template else 'no'})"
        )


# ===================================================================================== loading


def load_tokenizer(name_or_path: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer of a model folder or hub id (resolved by ``phicore.hub``).

    Raises FileNotFoundError naming the folder and what is missing when it has no
    tokenizer.json (a SentencePiece-only ``tokenizer.model`` is not supported), and
    TokenizerError (a ValueError) naming the file when one is unreadable, truncated or corrupt,
    or when the tokenizer has more ids than the folder's config.json ``vocab_size`` (its ids
    would index past the model's embedding).
    """
    folder = _resolve_model_folder(name_or_path)
    backend = read_backend(folder)
    config = read_tokenizer_config(folder)
    named_tokens = read_named_tokens(folder, config)
    with reading(folder / TOKENIZER_CONFIG_FILE):
        additional_special_tokens = read_additional_special_tokens(config)
        clean_up = config.get("clean_up_tokenization_spaces") or False
        if not isinstance(clean_up, bool):
            raise TypeError(f"clean_up_tokenization_spaces must be true or false, got {clean_up!r:.40}")
    special_contents = set(named_tokens.values()) | set(additional_special_tokens)
    _add_missing_tokens(backend, read_config_added_tokens(folder, config, special_contents))
    tokenizer = Tokenizer(
        backend,
        bos_token=named_tokens.pop("bos_token", None),
        eos_token=named_tokens.pop("eos_token", None),
        unk_token=named_tokens.pop("unk_token", None),
        pad_token=named_tokens.pop("pad_token", None),
        other_named_tokens=named_tokens,
        additional_special_tokens=additional_special_tokens,
        chat_template=read_chat_template(folder, config),
        clean_up_tokenization_spaces=clean_up,
        extra_stop_token_ids=read_generation_eos_ids(folder),
        config_extras=config_extras(config),
        name_or_path=str(folder),
    )
    vocab_size = _model_vocab_size(folder / "config.json")
    if vocab_size is not None:
        check_vocab_fits(tokenizer, vocab_size, f"{folder / 'config.json'}'s vocab_size")
    return tokenizer


def check_vocab_fits(tokenizer: Tokenizer, vocab_size: int, what: str) -> None:
    """TokenizerError when the tokenizer has ids the model's embedding (`vocab_size` rows, named
    by `what`) has no row for."""
    if tokenizer.id_limit > vocab_size:
        where = Path(tokenizer.name_or_path) / TOKENIZER_FILE if tokenizer.name_or_path else "the tokenizer"
        raise TokenizerError(
            f"{where}: has token ids up to {tokenizer.id_limit - 1} ({tokenizer.id_limit} ids), but {what} is "
            f"{vocab_size}: its ids would index past the model's embedding (a tokenizer of another model?)"
        )


def _model_vocab_size(path: Path) -> int | None:
    """config.json's vocab_size when the folder has a readable one (the model loader reports a
    broken config.json; here it only serves to check the tokenizer against)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    size = raw.get("vocab_size") if isinstance(raw, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _resolve_model_folder(name_or_path: str | os.PathLike) -> Path:
    """A folder path, preset name or hub id, as a local folder (phicore.hub decides)."""
    from phicore.hub import resolve_model_dir  # imported on use: only hub ids need the hub client

    return Path(resolve_model_dir(name_or_path))


def _add_missing_tokens(backend: BackendTokenizer, tokens: Sequence[AddedToken]) -> None:
    """Add declared tokens whose text the backend vocabulary does not have yet."""
    missing = [token for token in tokens if backend.token_to_id(token.content) is None]
    if missing:
        backend.add_tokens(missing)


# ====================================================================================== helpers


def clean_up_tokenization(text: str) -> str:
    """transformers' clean-up of spaces before punctuation and English contractions."""
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


def _collect_named_tokens(
    *,
    bos_token: str | None,
    eos_token: str | None,
    unk_token: str | None,
    pad_token: str | None,
    other_named_tokens: Mapping[str, str] | None,
) -> dict[str, str]:
    """Named tokens in transformers' order (standard slots first), leaving out unset ones."""
    given = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token}
    for key, value in (other_named_tokens or {}).items():
        if key in given:
            raise ValueError(f"{key} is passed twice")
        given[key] = value
    contents = {key: token_content(value) for key, value in given.items()}
    ordered = [key for key in STANDARD_NAMED_TOKENS if key in contents]
    ordered += [key for key in contents if key not in STANDARD_NAMED_TOKENS]
    return {key: contents[key] for key in ordered if contents[key] is not None}


def _as_id_list(ids: int | Iterable[int]) -> list[int]:
    """Accept an int, a list, or anything with ``tolist()`` (tensors, arrays)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]

