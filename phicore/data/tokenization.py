"""Conversations -> training examples: token ids and loss labels (`tokenize_dataset`).

`tokenize_dataset` turns conversations into `Example(input_ids, labels)`:

- Segments from a `PromptFormat` are tokenised as one text, so tokens across a segment boundary
  are what the tokenizer makes of the whole string. Each boundary is placed after
  `encode(text[:boundary])`, i.e. the prompt tokens are exactly the tokens that generation will
  feed (when the tokenizer merges across a boundary, the longest common prefix is used).
- `labels` are the token ids on target tokens and -100 elsewhere (prompt tokens are targets too
  with `train_on_prompt=True`). The first token's label is always -100: nothing predicts it, and
  in a packed row this keeps one example from being trained to predict the next.
- BOS is prepended when the tokenizer's `encode(..., add_special_tokens=True)` adds one and the
  text does not already start with it (Phi-3-mini's chat template writes `<s>` itself).
- An EOS segment becomes `tokenizer.eos_token_id`, a target.
- Rows longer than `max_length` are cut at the end (counted in `stats.truncated`); rows left
  with no target token are dropped (counted in `stats.dropped_no_target`).
- Before any of that, a record's text is bounded (`bound_conversation`): each turn's content is
  cut to `field_char_limit` characters, and turns that start past that many characters of
  content are left out, so one huge row costs what a `max_length` row costs, not its size.

Labels are NOT shifted: `labels[b, t]` is the label of `input_ids[b, t]`; the trainer compares
`logits[:, :-1]` with `labels[:, 1:]`. `tokenize_conversation` is the one place a record
becomes tokens, for in-memory datasets and the dataset cache's workers alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .formats import Conversation, DataError, Turn
from .prompts import PromptFormat, Segment

IGNORE_INDEX = -100  # the label of a token that takes no loss (F.cross_entropy's default)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    source: tuple[str, int] = ("<memory>", 0)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class TokenizeStats:
    total: int = 0  # conversations seen
    kept: int = 0  # examples returned
    truncated: int = 0  # rows cut to max_length (kept or not)
    dropped_no_target: int = 0  # rows with no target token left (after truncation)
    target_tokens: int = 0
    tokens: int = 0

    def count(self, num_tokens: int, num_targets: int, truncated: bool) -> bool:
        """Count one tokenised row; True when it is kept (it has a target token left)."""
        self.truncated += truncated
        if num_targets == 0:
            self.dropped_no_target += 1
            return False
        self.kept += 1
        self.tokens += num_tokens
        self.target_tokens += num_targets
        return True

    def summary(self) -> str:
        return (f"{self.kept}/{self.total} examples, {self.tokens} tokens ({self.target_tokens} "
                f"targets); {self.truncated} truncated, {self.dropped_no_target} dropped with no target left")


FALLBACK_TOKEN_CHARS = 128  # a token's characters at most, for a tokenizer that shows no vocabulary
FIELD_MARGIN_CHARS = 1024  # kept past the bound, so the word (pre-token) at the cut is not the one split


def max_token_chars(tokenizer) -> int:
    """How many characters one token can stand for at most: the longest string in the
    vocabulary, added tokens included (byte-level BPE writes a token one character per byte,
    SentencePiece writes "▁" for a space, so a token covers at most that many characters of
    text). Phi-2: 128; Phi-3: 16."""
    get_vocab = getattr(getattr(tokenizer, "backend", None), "get_vocab", None)
    if get_vocab is None:
        return FALLBACK_TOKEN_CHARS
    return max(map(len, get_vocab(with_added_tokens=True)), default=FALLBACK_TOKEN_CHARS)


def field_char_limit(max_length: int, token_chars: int) -> int:
    """The characters of one field that can reach the first `max_length` tokens of a row.

    No token covers more than `token_chars` characters, so the first `max_length` tokens of a
    row end at most `max_length * token_chars` characters into any field (whatever comes
    before the field only uses up tokens sooner). The tokenizer's pre-tokenizer splits text
    into words before BPE sees it, so cutting a field after that point, plus a margin, changes
    only the words at the cut, which lie past every kept token: for normal text the kept
    tokens are exactly those of the whole field. (A single "word" longer than the margin, e.g.
    megabytes without a space, may tokenise differently at the end of the kept tokens.)
    """
    return max_length * token_chars + FIELD_MARGIN_CHARS


def bound_conversation(conv: Conversation, limit: int) -> Conversation:
    """`conv` with each turn's content cut to `limit` characters, and without the turns that
    start after `limit` characters of content (their text cannot reach the kept tokens; the
    first assistant turn is always kept, so a row whose target lies past the cut is still
    counted as "dropped with no target left"). The same conversation when nothing is that long."""
    if sum(len(t.content) for t in conv.turns) <= limit:
        return conv
    turns, seen, answered = [], 0, False
    for turn in conv.turns:
        if seen > limit and answered:
            break
        turns.append(Turn(turn.role, turn.content[:limit]) if len(turn.content) > limit else turn)
        seen += len(turn.content)
        answered = answered or turn.role == "assistant"
    return Conversation(tuple(turns), conv.source, conv.plain)


def bos_ids(tokenizer) -> list[int]:
    """The ids `tokenizer.encode(text, add_special_tokens=True)` puts before the text."""
    with_special = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def _add_bos(ids: list[int], bos: list[int]) -> list[int]:
    return ids if not bos or ids[:len(bos)] == bos else bos + ids


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Ids for a generation prompt, with BOS handled exactly as in training."""
    return _add_bos(tokenizer.encode(text, add_special_tokens=False), bos_ids(tokenizer))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _encode_run(tokenizer, segments: list[Segment]) -> list[tuple[list[int], bool]]:
    """Encode consecutive text segments as one string; split the ids at segment boundaries."""
    text = "".join(s.text for s in segments)
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, start_tok, chars = [], 0, 0
    for i, seg in enumerate(segments):
        chars += len(seg.text)
        if i == len(segments) - 1:
            end_tok = len(ids)
        else:
            end_tok = _common_prefix(ids, tokenizer.encode(text[:chars], add_special_tokens=False))
        end_tok = max(end_tok, start_tok)
        pieces.append((ids[start_tok:end_tok], seg.is_target))
        start_tok = end_tok
    return pieces


def tokenize_segments(segments: Sequence[Segment], tokenizer, train_on_prompt: bool = False,
                      bos: Optional[list[int]] = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for segments; see the module docstring. `bos`: from `bos_ids`."""
    merged: list[Segment] = []  # join neighbours with the same role: fewer prefix encodes
    for seg in segments:
        if merged and not seg.is_eos and not merged[-1].is_eos and merged[-1].is_target == seg.is_target:
            merged[-1] = Segment(merged[-1].text + seg.text, seg.is_target)
        elif seg.text or seg.is_eos:
            merged.append(seg)
    pieces: list[tuple[list[int], bool]] = []
    run: list[Segment] = []
    for seg in merged + [None]:
        if seg is None or seg.is_eos:
            if run:
                pieces += _encode_run(tokenizer, run)
                run = []
            if seg is not None:
                if tokenizer.eos_token_id is None:
                    raise ValueError("the tokenizer has no EOS token")
                pieces.append(([tokenizer.eos_token_id], True))
        else:
            run.append(seg)
    ids, labels = [], []
    for piece, is_target in pieces:
        ids += piece
        labels += piece if (is_target or train_on_prompt) else [IGNORE_INDEX] * len(piece)
    bos = bos_ids(tokenizer) if bos is None else bos
    if bos and ids[:len(bos)] != bos:
        ids = bos + ids
        labels = [IGNORE_INDEX] * len(bos) + labels
    if labels:
        labels[0] = IGNORE_INDEX
    return ids, labels


def tokenize_conversation(conv: Conversation, fmt: PromptFormat, tokenizer, max_length: int,
                          train_on_prompt: bool = False, bos: Optional[list[int]] = None,
                          token_chars: Optional[int] = None) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) for one conversation, cut to `max_length` tokens.

    The one place a record becomes tokens: `tokenize_dataset` and the dataset cache's worker
    processes both call it, so cached and in-memory examples are the same. `token_chars`:
    `max_token_chars(tokenizer)`, computed once by callers that tokenise many rows.
    """
    token_chars = max_token_chars(tokenizer) if token_chars is None else token_chars
    conv = bound_conversation(conv, field_char_limit(max_length, token_chars))
    try:
        segments = fmt.segments(conv)
    except ValueError as e:  # e.g. a chat template that drops a turn: say which record
        raise DataError(f"{conv.source[0]}:{conv.source[1]}: {e}") from None
    ids, labels = tokenize_segments(segments, tokenizer, train_on_prompt, bos)
    if len(ids) > max_length:
        return ids[:max_length], labels[:max_length], True
    return ids, labels, False


def tokenize_dataset(conversations: Sequence[Conversation], fmt: PromptFormat, tokenizer,
                     max_length: int, train_on_prompt: bool = False) -> tuple[list[Example], TokenizeStats]:
    """Conversations -> examples no longer than `max_length`, and what was cut or dropped."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    bos, token_chars = bos_ids(tokenizer), max_token_chars(tokenizer)
    stats, out = TokenizeStats(total=len(conversations)), []
    for conv in conversations:
        ids, labels, truncated = tokenize_conversation(conv, fmt, tokenizer, max_length, train_on_prompt, bos,
                                                       token_chars)
        example = Example(ids, labels, conv.source)
        if stats.count(len(ids), example.num_targets, truncated):
            out.append(example)
    return out, stats
