"""The Phi causal language model: one decoder driven by the config.

Phi-2's block runs attention and the MLP in parallel on one normed input; Phi-3's runs them
one after the other with a second norm. That is the only place the two differ in control
flow (`DecoderLayer.forward`); everything else is which modules the config asks for.
Module names are Hugging Face's, so checkpoints load without a key map.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .config import ModelConfig
from .layers import Attention, KVCache, RotaryEmbedding, build_attention_mask, make_mlp, make_norm
from .layer_checkpoint import checkpoint_layer
from .loss import next_token_loss_sum

STATIC_CACHE_BLOCK = 256  # a static KV cache's length is a multiple of this (new_cache)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.parallel = config.layout.parallel_block
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, layer_idx)
        self.mlp = make_mlp(config)
        if not self.parallel:
            self.post_attention_layernorm = make_norm(config)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, h, cos, sin, mask, cache: Optional[KVCache] = None):
        """h (B, T, D) -> (B, T, D)."""
        x = self.input_layernorm(h)
        attn = self.resid_dropout(self.self_attn(x, cos, sin, mask, cache))
        if self.parallel:  # Phi-2: h + attn(x) + mlp(x), one shared norm
            return h + attn + self.resid_dropout(self.mlp(x))
        h = h + attn  # Phi-3: sequential, second norm before the MLP
        return h + self.resid_dropout(self.mlp(self.post_attention_layernorm(h)))


class PhiModel(nn.Module):
    """Embeddings, decoder layers and the final norm (Hugging Face's `model.` prefix)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if weight.device.type != "meta":  # normal_ on the meta device costs seconds of lazy imports
            nn.init.normal_(weight)  # nn.Embedding's own initialisation
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.embed_dropout = nn.Dropout(config.embd_pdrop)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm_name = config.layout.final_norm_name
        self.add_module(self.final_norm_name, make_norm(config))

    @property
    def final_norm(self) -> nn.Module:
        return getattr(self, self.final_norm_name)


class PhiForCausalLM(nn.Module):
    """Phi-2 / Phi-3 family causal LM returning logits (B, T, V)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = PhiModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.layout.lm_head_bias)
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        # With gradient_checkpointing: keep each layer's saved input in (pinned) CPU memory
        # instead of on the device until backward (phicore/offload.py); saves N x D per layer.
        self.checkpoint_offload = False
        # phicore.compile.compile_model sets this: the compiled decoder_stack, called in its place
        self.compiled_stack = None
        self.compile_mode = None
        if config.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self):
        """Share one matrix between the input embedding and the output projection."""
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        last_only: bool = False,
        labels: Optional[torch.Tensor] = None,
        document_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or (B, 1, V) with `last_only`; with `labels`,
        the summed next-token cross-entropy instead (phicore.loss.next_token_loss_sum).

        attention_mask: (B, S) with 1 for real tokens and 0 for padding (S counts the cached
        past too), or a (B, 1, T, S) bool mask used as given (packed sequences).
        position_ids: (B, T); by default past_len .. past_len + T - 1.
        cache: a KVCache to read the past from and append this step's keys/values to.
        labels: (B, T) targets aligned with input_ids (unshifted; -100 = no loss): returns an
        fp32 scalar, computed in token chunks so the (tokens x V) logits never exist in full.
        document_ids: (B, T) packed rows: which example each token belongs to (a contiguous run
        per example, < 0 = padding); replaces attention_mask. Attention then stays inside each
        example (phicore.attention: flex_attention BlockMask on CUDA, dense mask + SDPA elsewhere).
        """
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, cache, document_ids)
        if labels is not None:
            return next_token_loss_sum(hidden, self.lm_head, labels)
        if last_only:
            hidden = hidden[:, -1:]
        return self.lm_head(hidden)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                      document_ids=None) -> torch.Tensor:
        """input_ids (B, T) -> final-normed hidden states (B, T, D)."""
        B, T = input_ids.shape
        past_len = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=input_ids.device).expand(B, T)
        h = self.model.embed_dropout(self.model.embed_tokens(input_ids))  # (B, T, D)
        cos, sin = self.rotary.cos_sin(position_ids, h.dtype)  # (B, T, R) each
        dropout = self.config.attention_dropout if self.training else 0.0
        mask = build_attention_mask(attention_mask, T, past_len, self.config.sliding_window, h.device,
                                    document_ids, dropout)  # one mask (bool, BlockMask or None) for every layer
        if cache is not None and cache.static:  # every preallocated position attended, under a mask
            mask = cache.static_mask(mask, T, self.config.sliding_window, h.device)  # (B|1, 1, T, max_len) bool
            cache.begin(T)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and self.checkpoint_offload:
            # Imported here, where it is used: phicore.offload imports torch._dynamo (through its
            # torch.compiler.disable), about a second of start-up that only this mode needs.
            from .offload import ActivationOffloader
            # always eager (phicore/offload.py), so the compiled stack is not used here
            h = self.decoder_stack(h, cos, sin, mask, cache, offloader=ActivationOffloader(h.device))
        else:
            stack = self.compiled_stack if self.compiled_stack is not None else self.decoder_stack
            h = stack(h, cos, sin, mask, cache, checkpointing)
        if cache is not None:
            cache.advance(T)
        return h

    def decoder_stack(self, h, cos, sin, mask, cache: Optional[KVCache] = None, checkpointing: bool = False,
                      offloader=None) -> torch.Tensor:
        """h (B, T, D) through every decoder layer, then the final norm -> (B, T, D).

        The part of the model that phicore.compile compiles (`compiled_stack`): everything in it
        has static control flow; the masks, rotary tables and loss around it are computed eagerly.
        checkpointing: each layer recomputed in backward (phicore.layer_checkpoint); offloader:
        the same with its input held in host memory (phicore.offload)."""
        for layer in self.model.layers:
            if offloader is not None:
                h = offloader.checkpoint(layer, h, cos, sin, mask, cache)
            elif checkpointing:
                h = checkpoint_layer(layer, h, cos, sin, mask, cache)
            else:
                h = layer(h, cos, sin, mask, cache)
        return self.model.final_norm(h)

    def new_cache(self, batch_size: int, max_len: int, static: Optional[bool] = None) -> KVCache:
        """A KV cache in the model's dtype and device for `max_len` positions. static (default:
        whether the stack is compiled): attention reads all `max_len` positions under a mask, so
        every decode step has the same shapes (layers.KVCache)."""
        weight = self.model.embed_tokens.weight
        static = self.compiled_stack is not None if static is None else static
        if static:  # rounded up, so other prompt lengths and --max-new-tokens reuse the compiled decode step
            max_len = -(-max_len // STATIC_CACHE_BLOCK) * STATIC_CACHE_BLOCK
        return KVCache(self.config, batch_size, max_len, weight.dtype, weight.device, static=static)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype
