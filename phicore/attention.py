"""Attention masks for packed rows: per-token document ids -> one mask shared by every layer.

A packed row holds several examples one after the other (phicore.data.collate_packed). Token q
may attend key k when both belong to the same example, k <= q, and (with a sliding window W)
q - k < W. Since each example is one contiguous run of the row, that is an interval per query:

    allowed(q, k)  <=>  lo[q] <= k <= q,    lo[q] = max(start of q's example, q - W + 1)

`lo` (B, T) is non-decreasing along the row. Padding (document id < 0) is its own example of
one token: a padding query attends only to itself (no fully masked row, so no NaN), and no
real token attends to padding.

Two ways to run it, chosen once per forward (`packed_mask`):

- "sdpa": the dense (B, 1, T, T) bool mask for F.scaled_dot_product_attention. T^2 memory,
  every masked score still computed, and on CUDA an explicit mask rules out the flash kernel.
  Bit for bit what collate_packed's own mask gives.
- "flex": a flex_attention BlockMask. The row is cut into BLOCK_SIZE x BLOCK_SIZE tiles; a tile
  is skipped when no (q, k) in it is allowed, run without the mask function when all are
  ("full"), and masked element-wise otherwise. With k examples of length L in a row of T,
  attention work drops from ~T^2/2 to ~k L^2/2. The block lists come straight from `lo` in
  O(B (T / BLOCK_SIZE)^2) (`document_block_mask`), never from a T x T mask.

`phicore.force_paths(packed_attention="auto" | "flex" | "sdpa")` (phicore/code_paths.py) forces
either. "auto" (the default) takes flex on CUDA and SDPA elsewhere: on CPU flex_attention runs
unfused (it materialises the scores) and torch refuses its backward there. Attention dropout > 0
while training always takes SDPA (flex_attention has no dropout; Phi configs use 0.0). On CUDA
flex_attention runs torch.compile'd (compiled once per process, on first use); elsewhere eagerly.
"""

from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from torch.nn.attention.flex_attention import BlockMask
from torch.nn.attention.flex_attention import flex_attention as _torch_flex_attention

from .code_paths import current_paths

__all__ = ["BlockMask", "BLOCK_SIZE", "MODES", "uses_flex", "document_bounds", "document_dense_mask",
           "document_block_mask", "packed_mask", "flex_attention"]

MODES = ("auto", "flex", "sdpa")  # the packed_attention choices of phicore.code_paths
BLOCK_SIZE = 128  # flex_attention's default tile (queries x keys)

_compiled_flex = None  # torch.compile(flex_attention), built on first CUDA use


# ----------------------------------------------------------------------------- switch
def uses_flex(device: torch.device, attention_dropout: float = 0.0) -> bool:
    """Whether a packed batch on `device` goes through flex_attention under the current
    packed_attention choice (phicore.code_paths). `attention_dropout`: the dropout that applies
    now (0 outside training); flex has none, so any dropout means SDPA."""
    mode = current_paths().packed_attention
    if mode == "sdpa" or attention_dropout > 0:
        return False
    return mode == "flex" or torch.device(device).type == "cuda"


# ----------------------------------------------------------------------------- masks
def document_bounds(document_ids: torch.Tensor, sliding_window: Optional[int] = None) -> torch.Tensor:
    """document_ids (B, T) -> lo (B, T) long: the first key each query may attend.

    Each maximal run of one id >= 0 is one example; every id < 0 is padding (one token each).
    With `sliding_window` W, lo[q] >= q - W + 1 (a no-op for rows no longer than W).
    """
    if document_ids.dim() != 2:
        raise ValueError(f"document_ids must be (batch, tokens), got shape {tuple(document_ids.shape)}")
    B, T = document_ids.shape
    pos = torch.arange(T, device=document_ids.device)  # (T,)
    starts = torch.ones_like(document_ids, dtype=torch.bool)  # (B, T): an example begins here
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    starts |= document_ids < 0
    lo = torch.where(starts, pos, 0).cummax(dim=1).values  # (B, T) start of q's example
    if sliding_window is not None and T > sliding_window:
        lo = torch.maximum(lo, pos - sliding_window + 1)
    return lo


def document_dense_mask(lo: torch.Tensor) -> torch.Tensor:
    """lo (B, T) -> (B, 1, T, T) bool, True where query q may attend key k (lo[q] <= k <= q)."""
    T = lo.shape[1]
    pos = torch.arange(T, device=lo.device)
    keys = pos[None, None, :]  # (1, 1, T)
    allowed = (keys <= pos[None, :, None]) & (keys >= lo[:, :, None])  # (B, T, T)
    return allowed[:, None]


def _ordered(blocks: torch.Tensor):
    """blocks (B, n, n) bool -> counts (B, 1, n) int32 and indices (B, 1, n, n) int32: per query
    tile, how many key tiles are marked and which (marked ones first, ascending)."""
    counts = blocks.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None].contiguous(), order[:, None].contiguous()


def document_block_mask(lo: torch.Tensor, block_size: int = BLOCK_SIZE) -> BlockMask:
    """lo (B, T) (from document_bounds) -> the flex_attention BlockMask of lo[q] <= k <= q.

    Tile (i, j) covers queries qs..qe and keys ks..ke. Because lo is non-decreasing:
    - some pair is allowed iff q* = max(qs, ks) <= qe and lo[q*] <= ke;
    - every pair is allowed ("full", no mask function needed) iff ke <= qs, lo[qe] <= ks and the
      tile is whole (a tile cut by the row's end stays partial, as create_block_mask makes it).
    Same tiles as `create_block_mask` over the same mask function, without the T x T mask.
    """
    B, T = lo.shape
    n = -(-T // block_size)
    first = torch.arange(n, device=lo.device) * block_size  # (n,) first token of each tile
    last = torch.clamp(first + block_size, max=T) - 1  # (n,)
    qs, qe = first[:, None], last[:, None]  # query tile i: (n, 1)
    ks, ke = first[None, :], last[None, :]  # key tile j: (1, n)
    q_star = torch.maximum(qs, ks)  # (n, n) first query of tile i at or after key tile j's start
    lo_star = lo[:, q_star.clamp(max=T - 1)]  # (B, n, n)
    some = (q_star <= qe) & (lo_star <= ke)  # (B, n, n)
    whole = (qe - qs + 1 == block_size) & (ke - ks + 1 == block_size)  # (n, n)
    full = whole & (ke <= qs) & (lo[:, last][:, :, None] <= ks)  # (B, n, n)
    partial = some & ~full
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    lo = lo.contiguous()
    if B == 1:  # one row's mask broadcast over the batch: flex still passes each row's own b
        lo_row = lo[0]

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (kv_idx >= lo_row[q_idx])
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (kv_idx >= lo[b, q_idx])

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod, seq_lengths=(T, T))


def packed_mask(document_ids: torch.Tensor, sliding_window: Optional[int], device,
                attention_dropout: float = 0.0, block_size: Optional[int] = None) -> Union[BlockMask, torch.Tensor]:
    """The mask every layer gets for a packed batch: a BlockMask (tiles of `block_size`, default
    BLOCK_SIZE) when `uses_flex`, else the dense (B, 1, T, T) bool mask. Built once per forward."""
    lo = document_bounds(document_ids.to(device), sliding_window)  # (B, T)
    if uses_flex(torch.device(device), attention_dropout):
        return document_block_mask(lo, block_size or BLOCK_SIZE)
    return document_dense_mask(lo)


# ----------------------------------------------------------------------------- attention
def _flex_for(device: torch.device):
    """torch.compile'd flex_attention on CUDA (compiled on first use), eager elsewhere.

    The compiled function specialises on the first shape and, when a later batch has another
    length, recompiles once with a dynamic length (torch.compile's default), so packed rows of
    varying length do not recompile at every step.
    """
    global _compiled_flex
    if device.type != "cuda":
        return _eager_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(_torch_flex_attention)
    return _compiled_flex


def _eager_flex(*args, **kwargs):
    """flex_attention without torch.compile, minus its one-time "called without torch.compile"
    warning (here it is deliberate: CPU runs and tests)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _torch_flex_attention(*args, **kwargs)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask,
                   scale: float) -> torch.Tensor:
    """q (B, H, T, d), k and v (B, KV, T, d) with H a multiple of KV -> (B, H, T, d).

    Query head j reads key/value head j // (H / KV) (enable_gqa), so k and v are never repeated.
    """
    gqa = q.shape[1] != k.shape[1]
    return _flex_for(q.device)(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
