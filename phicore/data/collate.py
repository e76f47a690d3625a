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
  `document_ids` (B, T) long: each token's example within its row (0, 1, ...), -1 on padding,
  and `attention_mask` (B, T) long 1/0 (real tokens). The model builds the attention mask from
  `document_ids` (phicore.attention: a flex_attention BlockMask on CUDA, else the dense mask):
  query t may attend key s when both are in the same example and s <= t; padding never attends
  to or is attended by real tokens, and a padding position attends only to itself (a fully
  masked row would turn softmax into NaN). The batch carries no T x T tensor: at 8 x 2048 that
  was 32 MiB built on the loader's thread and copied to the device every step. Pass a batch to
  a model with `model(batch.input_ids, **batch.model_inputs())`, which includes `document_ids`
  (the 2-D mask alone would let packed examples see each other); `dense_attention_mask()` gives
  the (B, 1, T, T) bool mask for models that take no document ids (transformers). Unpacked
  batches: `document_ids` None.

Order: `epoch_order(lengths, batch_size, seed, epoch)` gives the batches of one epoch as numpy
index arrays, a pure function of its arguments (seeded numpy generators), so a run resumes by
skipping the first k batches of the same epoch; `batches_for_epoch` is the same as lists. With
length grouping the shuffled indices are cut into buckets of `bucket_batches` batches, each
bucket is sorted by length and cut into batches, and the batch order is shuffled: batches hold
similar lengths (little padding) yet differ between epochs. `pack_examples` builds packed rows
once per dataset (seeded greedy first-fit), so the number of batches per epoch is fixed;
`BatchPlan` ties examples, rows and batch order together, and shards each global batch across
data-parallel ranks. Examples may come from the memory-mapped dataset cache
(`phicore.data.cache`): nothing here needs the whole dataset in memory, only its lengths.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, TypeVar

import numpy as np
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
                          train_on_prompt: bool = False,
                          bos: Optional[list[int]] = None) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) for one conversation, cut to `max_length` tokens.

    The one place a record becomes tokens: `tokenize_dataset` and the dataset cache's worker
    processes both call it, so cached and in-memory examples are the same.
    """
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
    bos = bos_ids(tokenizer)
    stats, out = TokenizeStats(total=len(conversations)), []
    for conv in conversations:
        ids, labels, truncated = tokenize_conversation(conv, fmt, tokenizer, max_length, train_on_prompt, bos)
        example = Example(ids, labels, conv.source)
        if stats.count(len(ids), example.num_targets, truncated):
            out.append(example)
    return out, stats


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split of n items as two sorted index arrays (file order kept):
    round(fraction * n) items, at least 1, for validation. O(n) memory in numpy, so a split of
    millions of cached examples costs a few megabytes."""
    if fraction <= 0:
        return np.arange(n, dtype=index_dtype(n)), np.arange(0, dtype=index_dtype(n))
    if fraction >= 1:
        raise ValueError(f"validation fraction must be below 1, got {fraction}")
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise ValueError(f"a validation fraction of {fraction} leaves no training data ({n} examples)")
    in_val = np.zeros(n, dtype=bool)
    in_val[_rng(seed, 0x5E1EC7).permutation(n)[:n_val]] = True
    return np.flatnonzero(~in_val).astype(index_dtype(n)), np.flatnonzero(in_val).astype(index_dtype(n))


def split_train_val(items: Sequence[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """A seeded split: round(fraction * n) items (at least 1) for validation, file order kept."""
    train, val = split_indices(len(items), fraction, seed)
    return [items[i] for i in train.tolist()], [items[i] for i in val.tolist()]


# --------------------------------------------------------------------------- order

def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed % (1 << 64), stream])


class EpochOrder:
    """The batches of one epoch as numpy index arrays: `order[k]` is batch k's item indices.

    Items are laid out in `arranged` so that unshuffled batch j is `arranged[j*B:(j+1)*B]`;
    `visit` is the order the batches are taken in. 16 bytes an item, so the order of a
    million-example epoch takes 16 MB instead of a few hundred MB of Python lists.
    """

    def __init__(self, arranged: np.ndarray, visit: np.ndarray, batch_size: int):
        self.arranged, self.visit, self.batch_size = arranged, visit, batch_size

    def __len__(self) -> int:
        return len(self.visit)

    def __getitem__(self, k: int) -> np.ndarray:
        j = int(self.visit[k])
        return self.arranged[j * self.batch_size:(j + 1) * self.batch_size]


def index_dtype(n: int):
    """int32 indices where they fit: half the memory of int64 for a million-row order."""
    return np.int32 if n < 2**31 else np.int64


def epoch_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, *, shuffle: bool = True,
                group_by_length: bool = True, bucket_batches: int = 32, drop_last: bool = False) -> EpochOrder:
    """The batches of one epoch (see the module docstring), a pure function of its arguments."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    lengths = np.asarray(lengths)
    n = len(lengths)
    rng = _rng(seed, epoch)
    order = np.arange(n, dtype=index_dtype(n))
    if shuffle:
        rng.shuffle(order)
    num_batches = -(-n // batch_size)
    visit = np.arange(num_batches)
    if group_by_length:
        # sort each bucket of bucket_batches batches by length, longest first (stable); a
        # bucket is a whole number of batches, so batch j is still positions j*B .. j*B+B-1
        bucket = batch_size * max(1, bucket_batches)
        for start in range(0, n, bucket):
            chunk = order[start:start + bucket]
            chunk[:] = chunk[np.argsort(-lengths[chunk], kind="stable")]
        if shuffle:
            visit = rng.permutation(num_batches)
    if drop_last and n % batch_size:
        visit = visit[visit != num_batches - 1]  # the one short batch is the last laid out
    return EpochOrder(order, visit, batch_size)


def batches_for_epoch(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, *,
                      shuffle: bool = True, group_by_length: bool = True, bucket_batches: int = 32,
                      drop_last: bool = False) -> list[list[int]]:
    """The batches of one epoch as lists of indices into `lengths` (`epoch_order` as lists)."""
    order = epoch_order(lengths, batch_size, seed, epoch, shuffle=shuffle, group_by_length=group_by_length,
                        bucket_batches=bucket_batches, drop_last=drop_last)
    return [order[k].tolist() for k in range(len(order))]


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
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token, 0 = padding
    position_ids: torch.Tensor  # (B, T) long
    num_target_tokens: int  # labels != -100
    num_tokens: int = 0  # real (non-padding) tokens
    document_ids: Optional[torch.Tensor] = None  # packed: (B, T) long, example index in its row, -1 = padding

    def model_inputs(self) -> dict:
        """Keyword arguments of PhiForCausalLM.forward besides input_ids: the masks and positions,
        with `document_ids` for packed batches."""
        inputs = {"attention_mask": self.attention_mask, "position_ids": self.position_ids}
        if self.document_ids is not None:
            inputs["document_ids"] = self.document_ids
        return inputs

    def dense_attention_mask(self) -> torch.Tensor:
        """The mask for a model that takes no document ids: packed -> (B, 1, T, T) bool, True where
        query t may attend key s (built as the model builds it); unpacked -> the (B, T) mask."""
        if self.document_ids is None:
            return self.attention_mask
        from ..attention import document_bounds, document_dense_mask
        return document_dense_mask(document_bounds(self.document_ids))

    def to(self, device, non_blocking: bool = False) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.attention_mask),
                     move(self.position_ids), self.num_target_tokens, self.num_tokens, move(self.document_ids))


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
    """Several examples per row: restarting positions and the document ids that the model
    turns into a block-diagonal causal mask."""
    T = _padded_length(max(sum(len(e) for e in row) for row in rows), pad_to_multiple_of)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    document_ids = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for doc, e in enumerate(row):
            n = len(e)
            input_ids[b, t:t + n] = torch.tensor(e.input_ids, dtype=torch.long)
            labels[b, t:t + n] = torch.tensor(e.labels, dtype=torch.long)
            position_ids[b, t:t + n] = torch.arange(n)
            document_ids[b, t:t + n] = doc
            t += n
        mask[b, :t] = 1
    return Batch(input_ids, labels, mask, position_ids,
                 int((labels != IGNORE_INDEX).sum()), int(mask.sum()), document_ids)


def example_lengths(examples: Sequence[Example]) -> np.ndarray:
    """Token counts of the examples; a cached dataset answers from its offsets without
    building a single example."""
    lengths = getattr(examples, "lengths", None)
    if lengths is not None:
        return np.asarray(lengths, dtype=np.int32)
    return np.fromiter((len(e) for e in examples), dtype=np.int32, count=len(examples))


class BatchPlan:
    """The batches of every epoch for a list of examples: reproducible, resumable, shardable.

    `plan.batches(epoch, start=k)` yields collated `Batch`es from batch k; `len(plan)` batches
    every epoch. `examples` may be a list or a lazy sequence (the dataset cache's
    `CachedExamples`): only the examples of the batch being built are read.

    Data parallelism (`world_size` > 1): the epoch order is laid out in *global* batches of
    `batch_size * world_size` rows, exactly as one process with that batch size would see it;
    rank r takes its share of each (rows r*B .. r*B+B-1 of a full batch; a short last batch is
    split as evenly as it goes). So N ranks with batch B see the same examples per step as one
    rank with batch N*B, and every rank has `len(plan)` micro-batches an epoch. A rank whose
    share of a short batch is empty gets a stand-in with no target tokens (one row of the
    batch with every label -100): it adds nothing to the loss or the gradient but keeps the
    ranks' collective calls in step.

    `batch_rows(epoch)` lists this rank's batches as lists of rows, each a list of example
    indices (several per row when packing).
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, pad_id: int, *, seed: int = 0,
                 pack: bool = False, max_length: Optional[int] = None, shuffle: bool = True,
                 group_by_length: bool = True, drop_last: bool = False,
                 pad_to_multiple_of: Optional[int] = None, rank: int = 0, world_size: int = 1):
        if not len(examples):
            raise ValueError("no examples to batch")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.pack, self.shuffle, self.group_by_length = pack, shuffle, group_by_length
        self.drop_last, self.pad_to_multiple_of = drop_last, pad_to_multiple_of
        self.rank, self.world_size = rank, world_size
        self.global_batch_size = batch_size * world_size
        lengths = example_lengths(examples)
        if pack:
            if max_length is None:
                raise ValueError("packing needs max_length")
            rows = pack_examples(lengths.tolist(), max_length, seed)
            self._row_members = np.fromiter((i for row in rows for i in row), dtype=index_dtype(len(lengths)),
                                            count=len(lengths))
            self._row_starts = np.cumsum([0] + [len(row) for row in rows], dtype=np.int64)
            self.row_lengths = np.add.reduceat(lengths[self._row_members], self._row_starts[:-1]).astype(np.int32)
            del rows
        else:
            self._row_members = self._row_starts = None
            self.row_lengths = lengths
        self._epoch: Optional[tuple[int, EpochOrder]] = None
        self._num_batches = len(self.epoch_order(0))

    def __len__(self) -> int:
        return self._num_batches

    def row(self, r: int) -> list[int]:
        """The example indices of row r (one example unless packing)."""
        if self._row_members is None:
            return [int(r)]
        return self._row_members[self._row_starts[r]:self._row_starts[r + 1]].tolist()

    def epoch_order(self, epoch: int) -> EpochOrder:
        """Global batches of `epoch` (row indices); the latest epoch's order is kept."""
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_order(self.row_lengths, self.global_batch_size, self.seed, epoch,
                                              shuffle=self.shuffle, group_by_length=self.group_by_length,
                                              drop_last=self.drop_last))
        return self._epoch[1]

    def shard(self, global_rows: np.ndarray) -> np.ndarray:
        """This rank's rows of one global batch: the r-th of world_size near-equal parts."""
        per = -(-len(global_rows) // self.world_size)
        return global_rows[self.rank * per:(self.rank + 1) * per]

    def batch_rows(self, epoch: int) -> list[list[list[int]]]:
        order = self.epoch_order(epoch)
        return [[self.row(r) for r in self.shard(order[k])] for k in range(len(order))]

    def collate(self, rows: list[list[int]]) -> Batch:
        if self.pack:
            return collate_packed([[self.examples[i] for i in row] for row in rows], self.pad_id,
                                  self.pad_to_multiple_of)
        return collate([self.examples[row[0]] for row in rows], self.pad_id, self.pad_to_multiple_of)

    def stand_in(self, global_rows: np.ndarray) -> Batch:
        """A batch with no target tokens for a rank with no share of a short global batch."""
        batch = self.collate([self.row(global_rows[0])])
        batch.labels.fill_(IGNORE_INDEX)
        batch.num_target_tokens = batch.num_tokens = 0
        return batch

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        order = self.epoch_order(epoch)
        for k in range(start, len(order)):
            global_rows = order[k]
            mine = self.shard(global_rows)
            yield self.collate([self.row(r) for r in mine]) if len(mine) else self.stand_in(global_rows)
