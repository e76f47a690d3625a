"""Examples -> padded tensor batches: `collate` (one example a row), `collate_packed` (several).

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

Which examples go in which batch (and row, when packing) is decided by `phicore.data.batch_plan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .tokenization import IGNORE_INDEX, Example


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
