"""Which examples go in which batch, every epoch: reproducible, resumable, shardable.

Order: `epoch_order(lengths, batch_size, seed, epoch)` gives the batches of one epoch as numpy
index arrays, a pure function of its arguments (seeded numpy generators), so a run resumes by
skipping the first k batches of the same epoch; `batches_for_epoch` is the same as lists. With
length grouping the shuffled indices are cut into buckets of `bucket_batches` batches, each
bucket is sorted by length and cut into batches, and the batch order is shuffled: batches hold
similar lengths (little padding) yet differ between epochs. `pack_examples` builds packed rows
once per dataset (seeded greedy first-fit), so the number of batches per epoch is fixed;
`BatchPlan` ties examples, rows and batch order together, collates each batch
(`phicore.data.collate`), and shards each global batch across data-parallel ranks.
`split_indices` / `split_train_val` hold out a seeded validation set the same way.

Examples may come from the memory-mapped dataset cache (`phicore.data.cache`): nothing here
needs the whole dataset in memory, only its lengths.
"""

from __future__ import annotations

import random
from typing import Iterator, Optional, Sequence, TypeVar

import numpy as np

from .collate import Batch, collate, collate_packed
from .tokenization import IGNORE_INDEX, Example

Item = TypeVar("Item")


# --------------------------------------------------------------------------- split

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


# --------------------------------------------------------------------------- packing

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


# --------------------------------------------------------------------------- the plan

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
