"""Building blocks of the Phi decoders: norms, rotary embeddings, attention, MLPs, KV cache.

Shapes: B batch, T query tokens, S key/value tokens (past + new), D hidden size,
H query heads, KV key/value heads, d head dim, R rotary dims (R <= d).

Where the fused kernels run (`kernels.uses_triton(op, device)`: CUDA with triton, by default),
the norms, RoPE and the MLP activations go through them (kernels/fused.py: autograd Functions
that save only what backward needs; frozen norm weights get no gradient). Everywhere else,
and whenever a norm's weight trains, the plain PyTorch code below runs unchanged, so CPU
results match transformers bit for bit. `phicore.force_paths(kernels={op: "torch"})` forces
the plain path for one op (to measure each kernel on its own).

Packed rows (per-token `document_ids`) get their mask from phicore.attention: a flex_attention
BlockMask on CUDA, the dense bool mask for SDPA elsewhere; `phicore.force_paths(packed_attention=...)`
forces either.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels

from .attention import BlockMask, flex_attention, packed_mask, uses_flex
from .config import ModelConfig


def _use_kernel(op: str, x: torch.Tensor, *frozen: Optional[torch.Tensor]) -> bool:
    """Whether `op` takes its fused kernel for x: Triton runs on x's device, and none of the
    `frozen` parameters wants a gradient (the fused norms compute dL/dx only)."""
    if torch.compiler.is_compiling():  # inductor fuses the plain code below into its own kernels
        return False
    if not kernels.uses_triton(op, x.device):
        return False
    return not (torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in frozen))


# ----------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """Phi-3's RMSNorm: normalise in fp32, cast back to the input dtype, THEN scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_kernel("rms_norm", x, self.weight):
            return kernels.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """Phi-2's LayerNorm: nn.LayerNorm (same parameters, same state dict) that takes the fused
    kernel where it runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) == 1 and self.weight is not None and _use_kernel(
            "layer_norm", x, self.weight, self.bias
        ):
            return kernels.layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


def make_norm(config: ModelConfig, dim: Optional[int] = None) -> nn.Module:
    dim = dim or config.hidden_size
    if config.layout.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return LayerNorm(dim, eps=config.norm_eps)


# ----------------------------------------------------------------------------- rotary
class RotaryEmbedding:
    """NeoX-style (half-split) rotary position embedding over the first R dims of each head.

    Holds no tensors: inverse frequencies are recomputed per forward (R/2 numbers), so the
    model can be built on the meta device without buffers to re-initialise.

    Longrope (Phi-3 128k, Phi-3.5, Phi-4-mini): inv_freq = 1 / (ext * theta^(2i/R)) where ext
    is the long factor list when the sequence (max position + 1) exceeds the original
    training length and the short list otherwise; cos and sin are multiplied by the
    attention factor always.
    """

    def __init__(self, config: ModelConfig):
        self.dim = config.rotary_dim
        self.theta = config.rope_theta
        self.longrope = config.rope_type == "longrope"
        self.original_max = config.original_max_position_embeddings
        self.short_factor = config.rope_short_factor
        self.long_factor = config.rope_long_factor
        self.scaling = config.attention_scaling

    def uses_long_factors(self, seq_len: int) -> bool:
        return self.longrope and seq_len > self.original_max

    def inv_freq(self, seq_len: int, device) -> torch.Tensor:
        exponent = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim  # (R/2,)
        if not self.longrope:
            return 1.0 / (self.theta**exponent)
        factors = self.long_factor if self.uses_long_factors(seq_len) else self.short_factor
        ext = torch.tensor(factors, dtype=torch.float32, device=device)
        return 1.0 / (ext * self.theta**exponent)

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids (B, T) -> cos, sin (B, T, R) in `dtype`."""
        seq_len = int(position_ids.max()) + 1 if self.longrope else 0
        inv_freq = self.inv_freq(seq_len, position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, R/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, R)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, d); cos/sin (B, T, R). Rotates the first R dims, passes the rest."""
    rot_dim = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, R)
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot


# ----------------------------------------------------------------------------- KV cache
class KVCache:
    """Preallocated keys and values for every layer: (B, KV, max_len, d) each.

    `length` counts the positions filled so far; the model advances it once per forward,
    after all layers have written their new keys and values.

    static (for a compiled decoder stack, phicore.compile): `update` writes the new keys at
    `write_positions` (a tensor set by `begin`, before the layers run) and returns the whole
    (B, KV, max_len, d) buffers; the model masks the unfilled positions (`static_mask`). The
    shapes are then the same at every decode step, and nothing in the layers reads `length`
    (a Python int that would recompile the graph at every token).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype, device, static: bool = False):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0
        self.uses_long_rope = False  # set by generation: which longrope factors the keys carry
        self.static = static
        self.write_positions: Optional[torch.Tensor] = None  # static: (T,) long, set by begin()

    def _check_room(self, num_tokens: int) -> int:
        end = self.length + num_tokens
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions requested, {self.max_len} allocated")
        return end

    def begin(self, num_tokens: int) -> None:
        """Static cache: where this forward's `num_tokens` keys go (called before the layers)."""
        end = self._check_room(num_tokens)
        self.write_positions = torch.arange(self.length, end, device=self.keys[0].device)  # (T,)

    def static_mask(self, mask, num_queries: int, sliding_window: Optional[int], device) -> torch.Tensor:
        """The mask `build_attention_mask` gave for the filled keys widened to all max_len
        positions: (B|1, 1, T, max_len) bool, False beyond the filled ones. None (plain causal)
        or a flex BlockMask (a long prompt's window on CUDA) become the dense causal mask."""
        total = self.length + num_queries
        if not isinstance(mask, torch.Tensor):
            q_pos = torch.arange(self.length, total, device=device)[:, None]  # (T, 1)
            k_pos = torch.arange(total, device=device)[None, :]  # (1, S)
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask = mask & (k_pos > q_pos - sliding_window)
            mask = mask[None, None]  # (1, 1, T, S)
        return F.pad(mask, (0, self.max_len - total), value=False)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, KV, T, d) after the filled part; return all keys/values (B, KV, S, d)
        (static: S = max_len, the unfilled positions masked by the model)."""
        if self.static:
            self.keys[layer].index_copy_(2, self.write_positions, k)
            self.values[layer].index_copy_(2, self.write_positions, v)
            return self.keys[layer], self.values[layer]
        end = self._check_room(k.shape[2])
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int):
        self.length += num_tokens

    def reset(self):
        self.length = 0


# ----------------------------------------------------------------------------- masks
def build_attention_mask(
    attention_mask: Optional[torch.Tensor],
    num_queries: int,
    past_len: int,
    sliding_window: Optional[int],
    device,
    document_ids: Optional[torch.Tensor] = None,
    attention_dropout: float = 0.0,
) -> Optional[Union[torch.Tensor, BlockMask]]:
    """Combine causality, padding and the sliding window into one bool mask (B|1, 1, T, S),
    True where query i may attend key j. Returns None when plain causal attention suffices
    (SDPA's fast `is_causal` path).

    A (B, 1, T, S) bool mask passed in (e.g. block-diagonal for packed sequences) is used as
    given. Query rows that may attend nothing (left padding) are opened to every key, as
    transformers does, so no NaN is produced; those positions are padding and unused.

    `document_ids` (B, T) (packed rows, phicore.attention) replace `attention_mask`: the result
    is phicore.attention.packed_mask's, a flex BlockMask or the dense bool mask, with the
    sliding window applied. `attention_dropout`: the dropout in force now (flex has none).
    Where flex runs (phicore.attention.uses_flex: CUDA by default), unpacked rows without padding
    that the sliding window cuts get a BlockMask too, in place of the dense window mask.
    """
    if document_ids is not None:
        if past_len:
            raise ValueError("document_ids (packed rows) cannot be combined with a KV cache")
        if document_ids.shape[-1] != num_queries:
            raise ValueError(f"document_ids {tuple(document_ids.shape)} do not match {num_queries} tokens")
        return packed_mask(document_ids, sliding_window, device, attention_dropout)
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.to(device=device, dtype=torch.bool)
    total = past_len + num_queries
    window_cuts = sliding_window is not None and total > sliding_window
    has_padding = attention_mask is not None and not bool(attention_mask.all())
    if not window_cuts and not has_padding and (past_len == 0 or num_queries == 1):
        return None  # plain causal (or one query seeing every key)
    if window_cuts and not has_padding and past_len == 0 and uses_flex(torch.device(device), attention_dropout):
        # rows longer than the window (Phi-3-mini-4k at 2048 tokens: window 2047) are one
        # "document" each: flex skips the tiles the window cuts, where SDPA would need the dense
        # mask and its slower masked kernel. One row's mask, broadcast over the batch.
        return packed_mask(torch.zeros(1, num_queries, dtype=torch.long, device=device), sliding_window, device,
                           attention_dropout)
    q_pos = torch.arange(past_len, total, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(total, device=device)[None, :]  # (1, S)
    allowed = k_pos <= q_pos  # (T, S)
    if window_cuts:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if has_padding:
        allowed = allowed & attention_mask[:, None, None, :total].to(device=device, dtype=torch.bool)
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed


# ----------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Multi-head attention with GQA, partial rotary, optional q/k LayerNorm, KV cache.

    Projection names follow the checkpoint: Phi-2 q_proj/k_proj/v_proj/dense with biases,
    Phi-3 one qkv_proj [Q | K | V] and o_proj without.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        layout = config.layout
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.upcast = layout.upcast_attention
        self.fused_qkv = layout.fused_qkv
        D, d, H, KV = config.hidden_size, config.head_dim, self.num_heads, self.num_kv_heads
        if layout.fused_qkv:
            self.qkv_proj = nn.Linear(D, (H + 2 * KV) * d, bias=layout.linear_bias)
        else:
            self.q_proj = nn.Linear(D, H * d, bias=layout.linear_bias)
            self.k_proj = nn.Linear(D, KV * d, bias=layout.linear_bias)
            self.v_proj = nn.Linear(D, KV * d, bias=layout.linear_bias)
        self.out_name = layout.attn_out_name
        self.add_module(self.out_name, nn.Linear(H * d, D, bias=layout.linear_bias))
        if config.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(d, eps=config.norm_eps)
            self.k_layernorm = nn.LayerNorm(d, eps=config.norm_eps)
        self.qk_layernorm = config.qk_layernorm

    def project_qkv(self, x: torch.Tensor):
        """x (B, T, D) -> q (B, T, H*d), k and v (B, T, KV*d)."""
        return self._project(x)[:3]

    def _project(self, x: torch.Tensor):
        """project_qkv plus whether q and k may be overwritten in place: only when both are tensors
        of their own. Never for a fused qkv_proj: q and k are then two views of one tensor, and
        autograd refuses a Function that returns two outputs after changing a view in place
        (seen on CUDA with the unfused LoRA path); nor when a projection returned a view (e.g.
        NF4Linear's output with a bias). Out of place moves the same bytes, into new q and k."""
        if self.fused_qkv:
            H, KV, d = self.num_heads, self.num_kv_heads, self.head_dim
            qkv = self.qkv_proj(x)  # (B, T, (H + 2 KV) d)
            return (*qkv.split([H * d, KV * d, KV * d], dim=-1), False)
        q, k = self.q_proj(x), self.k_proj(x)
        if torch.compiler.is_compiling():  # no in-place RoPE there (and _is_view() is a private API dynamo breaks on)
            return q, k, self.v_proj(x), False
        return q, k, self.v_proj(x), not (q._is_view() or k._is_view())

    def forward(self, x, cos, sin, mask, cache: Optional[KVCache]):
        """x (B, T, D) -> (B, T, D). mask: None (causal), a bool mask (B|1, 1, T, S) for SDPA, or
        a flex BlockMask (packed rows; k and v then stay at KV heads)."""
        B, T, _ = x.shape
        q, k, v, writable = self._project(x)
        q = q.view(B, T, self.num_heads, self.head_dim)  # (B, T, H, d)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, KV, d)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
            writable = True  # new tensors
        if _use_kernel("rope", q):  # one kernel for q and k, on (B, T, heads, d), in place when allowed
            q, k = kernels.rotary_qk(q, k, cos, sin, inplace=writable)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, KV, S, d)
        out_dtype = q.dtype
        if self.upcast and q.dtype == torch.float16:
            q, k, v = q.float(), k.float(), v.float()
        if isinstance(mask, BlockMask):
            out = flex_attention(q, k, v, mask, scale=self.head_dim**-0.5)  # (B, H, T, d)
        else:
            groups = self.num_heads // self.num_kv_heads
            if groups > 1:
                k = k.repeat_interleave(groups, dim=1)  # (B, H, S, d): query head j uses kv head j // groups
                v = v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=mask is None and T > 1,
                scale=self.head_dim**-0.5,
            )  # (B, H, T, d)
        out = out.to(out_dtype).transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return getattr(self, self.out_name)(out)  # (B, T, D)


# ----------------------------------------------------------------------------- MLPs
class GeluMLP(nn.Module):
    """Phi-2: fc2(gelu_tanh(fc1(x))), both with bias."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.layout.linear_bias)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.layout.linear_bias)

    def forward(self, x):
        h = self.fc1(x)  # (B, T, I)
        h = kernels.gelu_tanh(h) if _use_kernel("gelu_tanh", h) else F.gelu(h, approximate="tanh")
        return self.fc2(h)


class GatedMLP(nn.Module):
    """Phi-3: gate, up = gate_up_proj(x).chunk(2) (gate first); down_proj(up * silu(gate))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        bias = config.layout.linear_bias
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)  # (B, T, 2I)
        if _use_kernel("swiglu", gate_up):  # reads [gate | up] in place, keeps only gate_up for backward
            return self.down_proj(kernels.swiglu(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)  # (B, T, I) each
        return self.down_proj(up * F.silu(gate))


def make_mlp(config: ModelConfig) -> nn.Module:
    return GatedMLP(config) if config.layout.gated_mlp else GeluMLP(config)
