"""Text generation with a KV cache: prefill the prompts once, then decode one token a step.

Batched prompts are left-padded so every row's next token sits in the last column; position
ids count real tokens only (as transformers does), so a padded row sees the same positions as
it would alone. Sampling follows transformers' order: repetition penalty, temperature,
top-k, top-p.

Longrope models switch from short to long rotary factors once the sequence passes the
original training length; keys cached with short factors are then stale, so the cache is
rebuilt from the whole sequence at the step that crosses (once).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

StreamCallback = Callable[[list], None]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device):
    """Token lists -> input_ids (B, T) left-padded with pad_id, and attention_mask (B, T)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """attention_mask (B, S) -> position ids (B, S): 0.. over real tokens, 1 on left padding."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, S) token ids already in each sequence. Divides positive and
    multiplies negative logits of seen tokens by `penalty` (CTRL paper, as transformers)."""
    scores = logits.gather(1, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, seen, scores)


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already enough
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(logits, seen, *, temperature, top_k, top_p, repetition_penalty, generator) -> torch.Tensor:
    """logits (B, V) of the last position -> chosen token ids (B,)."""
    logits = logits.float()
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature <= 0:
        return logits.argmax(-1)
    logits = filter_top_p(filter_top_k(logits / temperature, top_k), top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompts,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    seed: Optional[int] = None,
    stop_ids: Sequence[int] = (),
    pad_id: Optional[int] = None,
    stream: Optional[StreamCallback] = None,
) -> list:
    """Generate continuations for one prompt (a list of ids) or a batch (a list of lists).

    Returns, per prompt, the new token ids up to (not including) the first stop id.
    temperature 0 means greedy. `stream`, if given, is called after every step with a list
    holding each row's new token id, or None for rows that have already stopped.
    """
    single = len(prompts) > 0 and isinstance(prompts[0], int)
    batch = [list(prompts)] if single else [list(p) for p in prompts]
    if not batch or any(len(p) == 0 for p in batch):
        raise ValueError("generate: every prompt needs at least one token")
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=model.device)
    pad = pad_id if pad_id is not None else (stop_ids[0] if len(stop_ids) else 0)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)

    was_training = model.training
    model.eval()
    ids, mask = left_pad(batch, pad, model.device)  # (B, T0)
    cache = model.new_cache(len(batch), ids.shape[1] + max_new_tokens)
    rotary = model.rotary
    positions = positions_from_mask(mask)
    cache.uses_long_rope = rotary.uses_long_factors(int(positions.max()) + 1)
    logits = model(ids, attention_mask=mask, position_ids=positions, cache=cache, last_only=True)

    finished = torch.zeros(len(batch), dtype=torch.bool, device=model.device)
    generated = []
    for _ in range(max_new_tokens):
        token = next_tokens(
            logits[:, -1], ids, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, generator=generator,
        )  # (B,)
        token = torch.where(finished, torch.full_like(token, pad), token)
        just_stopped = torch.isin(token, stop) & ~finished
        if stream is not None:
            stream([None if done else int(t) for t, done in zip(token.tolist(), (finished | just_stopped).tolist())])
        generated.append(token)
        finished |= just_stopped
        if bool(finished.all()) or len(generated) == max_new_tokens:
            break  # no forward for a token nobody will read
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        next_position = positions[:, -1:] + 1  # (B, 1)
        positions = torch.cat([positions, next_position], dim=1)
        if rotary.uses_long_factors(int(next_position.max()) + 1) and not cache.uses_long_rope:
            cache.reset()  # keys carry short-factor rotations: rebuild them with the long ones
            cache.uses_long_rope = True
            logits = model(ids, attention_mask=mask, position_ids=positions, cache=cache, last_only=True)
        else:
            logits = model(token[:, None], attention_mask=mask, position_ids=next_position, cache=cache)

    model.train(was_training)
    return _cut_at_stop(generated, len(batch), stop_ids, single)


def _cut_at_stop(steps: list, batch_size: int, stop_ids, single: bool) -> list:
    stop_set = set(stop_ids)
    rows = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(batch_size)]
    out = []
    for row in rows:
        cut = next((i for i, t in enumerate(row) if t in stop_set), len(row))
        out.append(row[:cut])
    return out[0] if single else out
