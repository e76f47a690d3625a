"""The vocabulary of a GGUF file as llama.cpp uses it, to check an export's tokenizer.

`GGUFVocabulary` tokenises the way src/llama-vocab.cpp does from the file's own vocabulary
(GPT-2 BPE over its merges; SentencePiece over its scores with byte fallback, its space prefix
and its special-token splitting), so `check_gguf_vocabulary` can tell, without llama.cpp,
whether llama.cpp gives phicore's ids for a text.
"""

from __future__ import annotations

import heapq
import re
from pathlib import Path
from typing import Sequence

from . import VerifyError

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_GPT2_PRE = ("gpt-2", "phi-2")  # llama.cpp pre-tokenizers that are GPT-2's regex
_ISSPACE = " \t\n\v\f\r"


def _gpt2_byte_decoder() -> dict:
    """GPT-2's unicode character -> byte (inverse of bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class GGUFVocabulary:
    """The tokenizer a GGUF file carries, applied the way llama.cpp applies it (src/llama-vocab.cpp):
    special tokens split out first (longest first; Phi-3 names strip the whitespace after them),
    then GPT-2 BPE over the merges or SentencePiece over the scores."""

    def __init__(self, gguf, meta: dict):
        TokenType = gguf.TokenType
        self.model = meta.get("tokenizer.ggml.model")
        self.pre = meta.get("tokenizer.ggml.pre")
        self.tokens = list(meta.get("tokenizer.ggml.tokens") or [])
        self.types = list(meta.get("tokenizer.ggml.token_type") or [])
        self.scores = list(meta.get("tokenizer.ggml.scores") or [])
        self.merges = list(meta.get("tokenizer.ggml.merges") or [])
        self.ids = {}
        for i, token in enumerate(self.tokens):
            self.ids.setdefault(token, i)
        special_types = {int(TokenType.CONTROL), int(TokenType.USER_DEFINED), int(TokenType.UNKNOWN)}
        self.special = {i for i, t in enumerate(self.types) if t in special_types}
        self.byte_type = int(TokenType.BYTE)
        self.add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", self.model == "llama"))
        # llama.cpp's rule for Phi-3 (by general.name): every special token but <unk> <s> <|endoftext|>
        # swallows the whitespace after it, as Phi-3's tokenizer.json declares.
        name = str(meta.get("general.name") or "").lower()
        self.phi3_named = "phi-3" in name or "phi3" in name
        self.rstrip = set()
        if self.phi3_named:
            self.rstrip = {i for i in self.special if self.tokens[i] not in ("<unk>", "<s>", "<|endoftext|>")}
            if "</s>" in self.ids:
                self.rstrip.add(self.ids["</s>"])
        self._bpe = None

    @property
    def can_encode(self) -> bool:
        return self.model == "llama" or (self.model == "gpt2" and self.pre in _GPT2_PRE)

    def encode(self, text: str) -> list:
        out = []
        is_prev_special = True
        for fragment in self._partition(text):
            if isinstance(fragment, int):
                out.append(fragment)
                is_prev_special = True
            else:
                out.extend(self._encode_text(fragment, is_prev_special))
                is_prev_special = False
        return out

    def _partition(self, text: str) -> list:
        fragments = [text] if text else []
        for special_id in sorted(self.special, key=lambda i: (-len(self.tokens[i].encode("utf-8")), i)):
            token = self.tokens[special_id]
            if not token:
                continue
            split = []
            for fragment in fragments:
                if not isinstance(fragment, str):
                    split.append(fragment)
                    continue
                rest = fragment
                while True:
                    at = rest.find(token)
                    if at < 0:
                        break
                    if at > 0:
                        split.append(rest[:at])
                    split.append(special_id)
                    rest = rest[at + len(token):]
                    if special_id in self.rstrip:
                        rest = rest.lstrip(_ISSPACE)
                if rest:
                    split.append(rest)
            fragments = split
        return fragments

    def _encode_text(self, text: str, is_prev_special: bool) -> list:
        if self.model == "llama":
            if self.add_space_prefix and is_prev_special:
                text = " " + text
            return self._spm(text.replace(" ", "\u2581"))
        return self._gpt2(text)

    def _spm(self, text: str) -> list:
        """llm_tokenizer_spm_session: merge the adjacent pair whose concatenation is the token with
        the best score (ties: leftmost) until none is left; what is not a token goes out as bytes."""
        symbols = list(text)
        prev = list(range(-1, len(symbols) - 1))
        nxt = list(range(1, len(symbols))) + [-1]
        queue = []

        def try_add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            merged = symbols[left] + symbols[right]
            token = self.ids.get(merged)
            if token is not None:
                heapq.heappush(queue, (-self.scores[token], left, right, len(merged)))

        for i in range(1, len(symbols)):
            try_add(i - 1, i)
        while queue:
            _, left, right, size = heapq.heappop(queue)
            if not symbols[left] or not symbols[right] or len(symbols[left]) + len(symbols[right]) != size:
                continue
            symbols[left] += symbols[right]
            symbols[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            try_add(prev[left], left)
            try_add(left, nxt[left])
        out = []
        i = 0 if symbols else -1
        while i != -1:
            token = self.ids.get(symbols[i])
            if token is not None:
                out.append(token)
            else:
                out.extend(self.ids[f"<0x{b:02X}>"] for b in symbols[i].encode("utf-8"))
            i = nxt[i]
        return out

    def _gpt2(self, text: str) -> list:
        if self._bpe is None:
            from tokenizers import Tokenizer, models, pre_tokenizers

            vocab = {t: i for t, i in self.ids.items() if i not in self.special}
            merges = [tuple(m.split(" ", 1)) for m in self.merges]
            self._bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
            self._bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        return self._bpe.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """llama.cpp's detokenize with special tokens rendered (token_to_piece)."""
        out = bytearray()
        byte_of = _gpt2_byte_decoder() if self.model == "gpt2" else None
        for k, i in enumerate(ids):
            token = self.tokens[i]
            if i in self.special:
                piece = token.encode("utf-8")
            elif self.model == "gpt2":
                piece = bytes(byte_of[ch] for ch in token if ch in byte_of)
            elif self.types[i] == self.byte_type and _BYTE_TOKEN.fullmatch(token):
                piece = bytes([int(token[3:5], 16)])
            else:
                piece = token.replace("\u2581", " ").encode("utf-8")
                if k == 0 and self.add_space_prefix and piece.startswith(b" "):
                    piece = piece[1:]
            out += piece
        return out.decode("utf-8", errors="replace")


def check_gguf_vocabulary(path: Path, gguf, meta: dict, tokenizer, texts: Sequence[str]) -> str:
    """One line, or VerifyError: the file's vocabulary is phicore's, and tokenises `texts` as it."""
    vocab = GGUFVocabulary(gguf, meta)
    if vocab.model == "gpt2" and not vocab.merges:
        raise VerifyError(f"{path}: its 'gpt2' vocabulary has no merges; llama.cpp refuses such a file "
                          "(cannot find tokenizer merges)")
    for token, i in tokenizer.backend.get_vocab(with_added_tokens=True).items():
        if i >= len(vocab.tokens) or vocab.tokens[i] != token:
            got = vocab.tokens[i] if i < len(vocab.tokens) else None
            raise VerifyError(f"{path}: token id {i} is {got!r} in the file but {token!r} in phicore's tokenizer")
    for key, want in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        got = meta.get(f"tokenizer.ggml.{key}_token_id")
        if want is not None and got != want:
            raise VerifyError(f"{path}: {key} token id {got} in the file, {want} in phicore's tokenizer")
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        decoded, want = vocab.decode(ids), tokenizer.decode(ids)
        if decoded != want:
            raise VerifyError(f"{path}: its vocabulary decodes phicore's ids of {short_text(text)} to {decoded!r}, "
                              f"phicore to {want!r}")
        if vocab.can_encode:
            got = vocab.encode(text)
            if got != ids:
                raise VerifyError(f"{path}: llama.cpp's tokenizer over its vocabulary gives {short_ids(got)} for "
                                  f"{short_text(text)}, phicore {short_ids(ids)}{_rstrip_hint(vocab, tokenizer, meta)}")
    how = f"encode and decode as phicore's on {len(texts)} strings" if vocab.can_encode else \
        f"decode as phicore's on {len(texts)} strings (pre-tokenizer {vocab.pre!r}: encoding not re-checked)"
    return f"vocabulary: {vocab.model}, {len(vocab.tokens)} tokens; ids {how}"


def _rstrip_hint(vocab: GGUFVocabulary, tokenizer, meta: dict) -> str:
    added = tokenizer.backend.get_added_tokens_decoder().values()
    if vocab.model == "llama" and not vocab.phi3_named and any(t.rstrip for t in added):
        return (f" (llama.cpp strips the whitespace after Phi-3's special tokens, as phicore does, only when "
                f"general.name contains 'phi3' or 'phi-3'; it is {meta.get('general.name')!r}: name the file "
                "e.g. phi3-NAME.gguf)")
    return ""


def short_text(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def short_ids(ids: Sequence[int], limit: int = 16) -> str:
    ids = list(ids)
    return str(ids) if len(ids) <= limit else f"{ids[:limit]}... ({len(ids)} ids)"
