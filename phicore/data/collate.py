"""Token ids, loss masks, packing and batches.

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

Labels are NOT shifted: `labels[b, t]` is the label of `input_ids[b, t]`; the trainer compares
`logits[:, :-1]` with `labels[:, 1:]`.

Batches (`Batch`): `input_ids`, `labels`, `position_ids` (B, T) long and `attention_mask`:

- unpacked (`collate`): right padding with the pad id, `attention_mask` (B, T) long 1/0; padding
  is masked from the loss by position (labels -100), never by id (Phi-2's pad id is its EOS).
- packed (`collate_packed`): several examples per row, `position_ids` restarting at 0 for each,
  and `attention_mask` (B, 1, T, T) bool, True where query t may attend key s: same example and
  s <= t. Padding never attends to or is attended by real tokens; a padding position attends
  only to itself (a fully masked row would turn softmax into NaN).

Order: `batches_for_epoch(lengths, batch_size, seed, epoch)` gives the batches of one epoch as
index lists, a pure function of its arguments, so a run resumes by skipping the first k batches
of the same epoch. With length grouping the shuffled indices are cut into buckets of
`bucket_batches` batches, each bucket is sorted by length and cut into batches, and the batch
order is shuffled: batches hold similar lengths (little padding) yet differ between epochs.
`pack_examples` builds packed rows once per dataset (seeded greedy first-fit), so the number of
batches per epoch is fixed; `BatchPlan` ties examples, rows and batch order together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, TypeVar

import torch

from .formats import Conversation, DataError
from .prompts import PromptFormat, Segment

IGNORE_INDEX = -100
Item = TypeVar("Item")


# --------------------------------------------------------------------------- tokenising

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

    def summary(self) -> str:
        return (f"{self.kept}/{self.total} examples, {self.tokens} tokens ({self.target_tokens} "
                f"targets); {self.truncated} truncated, {self.dropped_no_target} dropped with no target left")


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


def tokenize_dataset(conversations: Sequence[Conversation], fmt: PromptFormat, tokenizer,
                     max_length: int, train_on_prompt: bool = False) -> tuple[list[Example], TokenizeStats]:
    """Conversations -> examples no longer than `max_length`, and what was cut or dropped."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    bos = bos_ids(tokenizer)
    stats, out = TokenizeStats(total=len(conversations)), []
    for conv in conversations:
        try:
            segments = fmt.segments(conv)
        except ValueError as e:  # e.g. a chat template that drops a turn: say which record
            raise DataError(f"{conv.source[0]}:{conv.source[1]}: {e}") from None
        ids, labels = tokenize_segments(segments, tokenizer, train_on_prompt, bos)
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            stats.truncated += 1
        example = Example(ids, labels, conv.source)
        targets = example.num_targets
        if targets == 0:
            stats.dropped_no_target += 1
            continue
        stats.kept += 1
        stats.tokens += len(ids)
        stats.target_tokens += targets
        out.append(example)
    return out, stats


def split_train_val(items: Sequence[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """A seeded split: round(fraction * n) items (at least 1) for validation, file order kept."""
    if fraction <= 0:
        return list(items), []
    if fraction >= 1:
        raise ValueError(f"validation fraction must be below 1, got {fraction}")
    n = len(items)
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise ValueError(f"a validation fraction of {fraction} leaves no training data ({n} examples)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


# --------------------------------------------------------------------------- order

def _epoch_rng(seed: int, epoch: int) -> random.Random:
    return random.Random(seed * 1_000_003 + epoch)


def batches_for_epoch(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, *,
                      shuffle: bool = True, group_by_length: bool = True, bucket_batches: int = 32,
                      drop_last: bool = False) -> list[list[int]]:
    """The batches of one epoch as lists of indices into `lengths` (see the module docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = _epoch_rng(seed, epoch)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        bucket = batch_size * max(1, bucket_batches)
        batches = []
        for b in range(0, len(order), bucket):
            chunk = sorted(order[b:b + bucket], key=lambda i: -lengths[i])
            batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        if shuffle:
            rng.shuffle(batches)
    else:
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    return batches


def pack_examples(lengths: Sequence[int], max_length: int, seed: int = 0) -> list[list[int]]:
    """Greedy first-fit of examples (in a seeded random order) into rows of <= max_length tokens.

    Returns the rows as lists of example indices. A max-tree over the rows' free space finds the
    first row that fits in O(log n), so packing 100k examples takes a second or so.
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more than "
                         f"max_length={max_length}; truncate first")
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    free = [0] * (2 * size)  # free[size + r] = free tokens of row r; internal nodes hold maxima
    rows: list[list[int]] = []
    for i in order:
        need = lengths[i]
        if free[1] >= need:  # leftmost row with enough room
            node = 1
            while node < size:
                node = 2 * node if free[2 * node] >= need else 2 * node + 1
            r = node - size
        else:  # open a new row
            r = len(rows)
            rows.append([])
            node = size + r
            free[node] = max_length
        rows[r].append(i)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


# --------------------------------------------------------------------------- batches

@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long, -100 = no loss; NOT shifted
    attention_mask: torch.Tensor  # (B, T) long 1/0, or packed: (B, 1, T, T) bool, True = may attend
    position_ids: torch.Tensor  # (B, T) long
    num_target_tokens: int  # labels != -100
    num_tokens: int = 0  # real (non-padding) tokens

    def to(self, device, non_blocking: bool = False) -> "Batch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.attention_mask),
                     move(self.position_ids), self.num_target_tokens, self.num_tokens)


def _padded_length(n: int, multiple: Optional[int]) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def collate(examples: Sequence[Example], pad_id: int, pad_to_multiple_of: Optional[int] = None) -> Batch:
    """One example per row, right-padded with `pad_id`; padding masked by position."""
    T = _padded_length(max(len(e) for e in examples), pad_to_multiple_of)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e)
        input_ids[b, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[b, :n] = 1
    position_ids = torch.arange(T, dtype=torch.long).expand(B, T).clone()
    return Batch(input_ids, labels, mask, position_ids,
                 int((labels != IGNORE_INDEX).sum()), int(mask.sum()))


def collate_packed(rows: Sequence[Sequence[Example]], pad_id: int,
                   pad_to_multiple_of: Optional[int] = None) -> Batch:
    """Several examples per row: restarting positions and a block-diagonal causal mask."""
    T = _padded_length(max(sum(len(e) for e in row) for row in rows), pad_to_multiple_of)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T, T), dtype=torch.bool)  # (B, query, key)
    real = torch.zeros((B, T), dtype=torch.bool)
    for b, row in enumerate(rows):
        t = 0
        for e in row:
            n = len(e)
            input_ids[b, t:t + n] = torch.tensor(e.input_ids, dtype=torch.long)
            labels[b, t:t + n] = torch.tensor(e.labels, dtype=torch.long)
            position_ids[b, t:t + n] = torch.arange(n)
            mask[b, t:t + n, t:t + n] = torch.ones((n, n), dtype=torch.bool).tril_()  # causal block
            t += n
        real[b, :t] = True
        pad = torch.arange(t, T)
        mask[b, pad, pad] = True  # padding attends to itself only
    return Batch(input_ids, labels, mask[:, None], position_ids,
                 int((labels != IGNORE_INDEX).sum()), int(real.sum()))


class BatchPlan:
    """The batches of every epoch for a list of examples: reproducible and resumable.

    `plan.batch_rows(epoch)` lists each batch as lists of example indices (one per row; a row has
    several when packing); `plan.batches(epoch, start=k)` yields collated `Batch`es from batch k.
    The number of batches is the same every epoch (`len(plan)`).
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, pad_id: int, *, seed: int = 0,
                 pack: bool = False, max_length: Optional[int] = None, shuffle: bool = True,
                 group_by_length: bool = True, drop_last: bool = False,
                 pad_to_multiple_of: Optional[int] = None):
        if not examples:
            raise ValueError("no examples to batch")
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.pack, self.shuffle, self.group_by_length = pack, shuffle, group_by_length
        self.drop_last, self.pad_to_multiple_of = drop_last, pad_to_multiple_of
        lengths = [len(e) for e in examples]
        if pack:
            if max_length is None:
                raise ValueError("packing needs max_length")
            self.rows = pack_examples(lengths, max_length, seed)
        else:
            self.rows = [[i] for i in range(len(examples))]
        self.row_lengths = [sum(lengths[i] for i in row) for row in self.rows]
        self._num_batches = len(self.batch_rows(0))

    def __len__(self) -> int:
        return self._num_batches

    def batch_rows(self, epoch: int) -> list[list[list[int]]]:
        batches = batches_for_epoch(self.row_lengths, self.batch_size, self.seed, epoch,
                                    shuffle=self.shuffle, group_by_length=self.group_by_length,
                                    drop_last=self.drop_last)
        return [[self.rows[r] for r in batch] for batch in batches]

    def collate(self, rows: list[list[int]]) -> Batch:
        if self.pack:
            return collate_packed([[self.examples[i] for i in row] for row in rows], self.pad_id,
                                  self.pad_to_multiple_of)
        return collate([self.examples[row[0]] for row in rows], self.pad_id, self.pad_to_multiple_of)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        for rows in self.batch_rows(epoch)[start:]:
            yield self.collate(rows)
