"""LoRA and DoRA adapters over frozen linear layers (dense or NF4).

`LoRALinear(base, r=..., alpha=...)` is a FrozenLinear (phicore.frozen_linear) that takes over an
nn.Linear's or an NF4Linear's weight and bias (the same Parameters; an NF4 base stays packed)
and adds the adapter; `apply_lora` installs one in place of each target layer with
`setattr(parent, name, layer)`. The base tensors keep their names (`q_proj.weight`,
`q_proj.bias`, and for NF4 bitsandbytes' `q_proj.weight.absmax`, ...), so a base checkpoint
loads into a LoRA model unchanged; the adapter adds `q_proj.lora_A.weight` (r, in),
`q_proj.lora_B.weight` (out, r) and, for DoRA, `q_proj.lora_magnitude_vector` (out,).

    y = base(x) + s * B(A(dropout(x)))          s = alpha / r   (alpha / sqrt(r) with rsLoRA)

DoRA (Liu et al. 2024) rescales each output row of the adapted weight to a learned magnitude
m: W' = m / ||W + s*B@A||_row * (W + s*B@A), the norm detached from the graph (section 4.3 of
the paper), computed exactly as peft 0.21 does (`peft/tuners/lora/variants.py`, `dora.py`).

Training runs through one autograd node, `LoRALinearFunction` (phicore.lora_fused); DoRA,
inference and trainable bases take the reference path of separate ops.
`phicore.force_paths(fused_lora=False)` (phicore/code_paths.py) forces the reference path
everywhere. Each layer knows its own settings (r, alpha, dropout, flags): the adapter's config
is read off the layers when it is saved (phicore.peft_io).

Model-agnostic: it works on any nn.Module tree of linear layers, named as the adapter expects.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .code_paths import current_paths
from .frozen_linear import FrozenLinear, NF4Linear
from .lora_fused import LoRALinearFunction

ALL_LINEAR = "all-linear"
NEVER_TARGETED = "lm_head"

Targets = Union[str, Sequence[str], "re.Pattern[str]"]


# ----------------------------------------------------------------------------- the layer
class LoRALinear(FrozenLinear):
    """A frozen linear base (dense or NF4) plus a LoRA (optionally DoRA) adapter.

    `LoRALinear(base, r=8, alpha=16)` takes over `base`'s tensors (an nn.Linear or an NF4Linear:
    the same objects, frozen) and draws the adapter as PEFT does; install it in the base's place.
    Per-layer state: `r`, `lora_alpha`, `scaling`, `use_rslora`, `use_dora`, `dropout_p`,
    `merged` (the adapter is folded into `weight`), `adapter_enabled` (False: the base alone).
    The adapter lives in `dtype` (default fp32, whatever the base's).
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False, dtype: Optional[torch.dtype] = None):
        if isinstance(base, LoRALinear):
            raise TypeError(f"{type(base).__name__} already carries a LoRA adapter")
        if not is_lora_base(base):
            raise TypeError(f"cannot add LoRA to {type(base).__name__}: not a linear layer")
        if not (isinstance(r, int) and r > 0):
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        super().__init__(base.in_features, base.out_features)
        self._adopt(base)
        for param in (self.weight, self.bias):
            if param is not None:
                param.requires_grad_(False)
        device, dtype = self.weight.device, dtype or torch.float32
        self.r = r
        self.lora_alpha = alpha
        self.use_rslora = use_rslora
        self.use_dora = use_dora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.merged = False
        self.adapter_enabled = True
        self._dora_merge_factor = None  # m / ||W + dW|| at merge time, to undo the merge
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
        self.train(base.training)  # new modules start in train mode; follow the base's mode
        self.reset_lora_parameters()

    @property
    def dropout_p(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's init: A ~ kaiming_uniform(a=sqrt(5)), B = 0 (so the adapter starts as a no-op);
        DoRA's magnitude = row norms of W + s*B@A (= ||W|| row-wise, as B = 0)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.use_dora:
            weight = self.dense_weight().to(self.lora_A.weight.dtype)
            self.lora_magnitude_vector.copy_(self._dora_weight_norm(weight))

    def _dora_weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s * B@A|| per output row (out,), no gradient through B@A (PEFT's get_weight_norm)."""
        lora_weight = (self.lora_B.weight @ self.lora_A.weight).detach().to(weight.dtype)  # (out, in)
        return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1).to(weight.dtype)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen base layer alone: x (..., in) -> (..., out)."""
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        if not self.merged and self.adapter_enabled and self._fused_applies(x):
            p = self.dropout_p if self.training else 0.0
            return LoRALinearFunction.apply(x, self.lora_A.weight, self.lora_B.weight, self, p)
        result = self.base_forward(x)  # (..., out), the frozen base
        if self.merged:
            if not self.adapter_enabled:
                raise RuntimeError("LoRA adapter disabled while merged into the weight: call unmerge() first "
                                   "(disable_adapter(model) does this for you)")
            return result
        if not self.adapter_enabled:
            return result
        x = x.to(self.lora_A.weight.dtype)  # the adapter runs in its own dtype, as in PEFT
        if self.use_dora:
            return self._dora_forward(x, result)
        xa = self.lora_A(self.lora_dropout(x))  # (..., r): the rank-r product first
        if result.dtype != xa.dtype:  # e.g. a bf16 base under an fp32 adapter: add in fp32, round once (PEFT)
            return (result + self.lora_B(xa) * self.scaling).to(result.dtype)
        # result + s * xa @ B^T as one GEMM with the add and scale fused (performance.md, LoRA order).
        # B in xa's dtype: under autocast xa is already half precision and the in-place addmm_ is
        # not autocast itself (the cast is a no-op otherwise).
        lora_b = self.lora_B.weight.to(xa.dtype).t()  # (r, out)
        result_2d, xa_2d = result.reshape(-1, self.out_features), xa.reshape(-1, self.r)  # (N, out), (N, r)
        if not torch.compiler.is_compiling() and result.is_contiguous() and not result._is_view():
            # in place, no (N, out) temporary: autograd-safe, as the base's backward needs its input
            # and weight, never its output. Not on a view: autograd forbids modifying a view that a
            # custom Function returned (the NF4 base's output, with a bias and a 3-D input, is one).
            # Not under torch.compile: the compiler plans its own buffers (the out-of-place addmm
            # costs nothing there), and Tensor._is_view() is a private API it cannot trace: it broke
            # the graph between `result` and this addmm_, handing the next graph two aliased inputs
            # one of which it mutated, which inductor failed on (issue 20).
            result_2d.addmm_(xa_2d, lora_b, alpha=self.scaling)
            return result
        return torch.addmm(result_2d, xa_2d, lora_b, alpha=self.scaling).view(result.shape)

    def _fused_applies(self, x: torch.Tensor) -> bool:
        """Whether forward takes LoRALinearFunction: while training the adapter (autograd on), plain
        LoRA (DoRA keeps the reference path), and a frozen base (no gradient for weight or bias)."""
        if not (current_paths().fused_lora and torch.is_grad_enabled() and not self.use_dora):
            return False
        if not (self.lora_A.weight.requires_grad or self.lora_B.weight.requires_grad or x.requires_grad):
            return False
        return not any(t is not None and t.requires_grad for t in (self.weight, self.bias))

    def _dora_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result + (m/||W + sBA|| - 1) * x W^T + (m/||W + sBA||) * s * B(A(x)), as PEFT computes it."""
        result_dtype = result.dtype
        weight = self.dense_weight().to(x.dtype)  # (out, in)
        weight_norm = self._dora_weight_norm(weight).detach()  # (out,)
        mag_norm_scale = (self.lora_magnitude_vector / weight_norm).view(1, -1)  # (1, out)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_result = result - self.bias if self.bias is not None else result  # x W^T
        else:  # dropout changes x, so the base product is recomputed on the dropped-out input
            x = self.lora_dropout(x)
            base_result = F.linear(x, weight)
        lora_result = self.lora_B(self.lora_A(x))
        result = result + ((mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * self.scaling)
        return result.to(result_dtype)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A (out, in), in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def _mergeable_weight(self) -> nn.Parameter:
        if self.is_nf4 or not self.weight.is_floating_point():
            raise TypeError("cannot merge a LoRA adapter into an NF4 base: its weight is quantised, not a dense "
                            "float tensor; keep the adapter separate, or load the base unquantised to merge")
        return self.weight

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight: W += s*B@A (DoRA: W = m/||W + s*B@A|| * (W + s*B@A)).
        Idempotent: merging a merged layer changes nothing. Computed in fp32, stored in W's dtype."""
        if self.merged:
            return
        weight = self._mergeable_weight()
        w, delta = weight.float(), self.delta_weight()
        if self.use_dora:
            factor = self.lora_magnitude_vector.float() / torch.linalg.norm(w + delta, dim=1)  # (out,)
            self._dora_merge_factor = factor
            new = factor.view(-1, 1) * (w + delta)
        else:
            new = w + delta
        weight.copy_(new)  # in place: the same Parameter, so optimisers and ties still hold it
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge()` (up to rounding). A no-op on a layer that is not merged."""
        if not self.merged:
            return
        weight = self._mergeable_weight()
        w, delta = weight.float(), self.delta_weight()
        if self.use_dora:
            new = w / self._dora_merge_factor.to(w.device).view(-1, 1) - delta
            self._dora_merge_factor = None
        else:
            new = w - delta
        weight.copy_(new)
        self.merged = False

    def base_layer(self) -> nn.Module:
        """The base without the adapter, holding this layer's tensors (the same objects): an
        nn.Linear for a dense weight (merged or not: merge() first to keep the adapter's effect),
        an NF4Linear for an NF4 one."""
        if self.is_nf4:
            base = NF4Linear(self.in_features, self.out_features, bias=self.bias is not None,
                             blocksize=self.blocksize, double_quant=self.double_quant,
                             compute_dtype=self.compute_dtype, device="meta")
            base._adopt(self)
        else:
            base = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                             dtype=self.weight.dtype)
            base.weight, base.bias = self.weight, self.bias
        return base.train(self.training)

    def adapter_parameters(self) -> dict:
        """The adapter's tensors by their names inside this layer (the state-dict suffixes)."""
        params = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        if self.use_dora:
            params["lora_magnitude_vector"] = self.lora_magnitude_vector
        return params

    def extra_repr(self) -> str:
        extra = f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"
        if self.use_rslora:
            extra += ", rslora"
        if self.use_dora:
            extra += ", dora"
        if self.merged:
            extra += ", merged"
        return f"{super().extra_repr()}, {extra}"


def is_lora_base(module: nn.Module) -> bool:
    """A layer LoRA can adapt: an nn.Linear or a FrozenLinear (NF4Linear) without an adapter."""
    return isinstance(module, (nn.Linear, FrozenLinear)) and not isinstance(module, LoRALinear)


def _replace_modules(model: nn.Module, replacements: dict) -> None:
    """setattr(parent, name, new) wherever a child is a key of {id(old): new}, under every parent
    that holds it (a layer reachable by two paths is replaced at both)."""
    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if id(child) in replacements:
                setattr(parent, name, replacements[id(child)])


# ----------------------------------------------------------------------------- model level
def lora_layers(model: nn.Module) -> Iterator:
    """(module path, layer) for every LoRA layer in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _parse_targets(targets: Targets):
    """"all-linear", a compiled regex, or a list of module-name suffixes (from a list or a
    comma-separated string)."""
    if isinstance(targets, re.Pattern):
        return targets
    if isinstance(targets, str):
        if targets.strip().lower() == ALL_LINEAR:
            return ALL_LINEAR
        targets = targets.split(",")
    names = [t.strip() for t in targets if t and t.strip()]
    if not names:
        raise ValueError("no LoRA target modules given")
    return sorted(set(names))


def _output_embedding(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def name_matches(path: str, name: str) -> bool:
    """PEFT's rule for a target name: the module path equals it or ends with "." + name."""
    return path == name or path.endswith("." + name)


def resolve_targets(model: nn.Module, targets: Targets) -> list:
    """The layers to adapt, [(path, module)] sorted by path.

    Names match PEFT's rules (`name_matches`); a regex must match the whole path; "all-linear"
    takes every linear layer. lm_head (or whatever the model names as its output head) is never adapted.
    """
    if any(True for _ in lora_layers(model)):
        raise ValueError("the model already has LoRA layers; apply or load an adapter on a fresh model")
    parsed = _parse_targets(targets)
    output_embedding = _output_embedding(model)

    def never(path, module):
        is_head = output_embedding is not None and module is output_embedding
        return is_head or path.rpartition(".")[2] == NEVER_TARGETED

    modules = [(path, m) for path, m in model.named_modules() if path]
    linear = [(path, m) for path, m in modules if is_lora_base(m) and not never(path, m)]
    available = ", ".join(sorted({path.rpartition(".")[2] for path, _ in linear})) or "none"

    if parsed == ALL_LINEAR:
        if not linear:
            raise ValueError("all-linear: the model has no linear layers to adapt")
        return linear
    if isinstance(parsed, re.Pattern):
        selected = [(path, m) for path, m in modules if parsed.fullmatch(path)]
        if not selected:
            raise ValueError(f"LoRA target pattern {parsed.pattern!r} matches no module; "
                             f"linear layers in this model: {available}")
    else:
        selected = []
        for name in parsed:
            found = [(path, m) for path, m in modules if name_matches(path, name)]
            if not found:
                raise ValueError(f"LoRA target {name!r} matches no module; linear layers in this model: "
                                 f"{available} ({NEVER_TARGETED} is never targeted)")
            selected += found
        selected = list({path: (path, m) for path, m in selected}.values())
    for path, module in selected:
        if never(path, module):
            raise ValueError(f"LoRA target {path!r} is the output head ({NEVER_TARGETED}), which is never adapted")
        if not is_lora_base(module):
            raise ValueError(f"LoRA target {path!r} is a {type(module).__name__}, not a linear layer; "
                             f"linear layers in this model: {available}")
    return sorted(selected, key=lambda item: item[0])


def pattern_value(patterns: Optional[dict], path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the path
    (`re.match(rf"(.*\\.)?({key})$", path)`, peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.05, targets: Targets = ALL_LINEAR,
               use_rslora: bool = False, use_dora: bool = False, dtype: Optional[torch.dtype] = None, *,
               rank_pattern: Optional[dict] = None, alpha_pattern: Optional[dict] = None) -> nn.Module:
    """Replace the model's target layers by LoRALinear layers over them, in place; freeze
    everything but the adapters. Returns the model.

    targets: "all-linear" (every linear layer but lm_head), module-name suffixes as a list or
        a comma-separated string ("q_proj,k_proj,v_proj,dense,fc1,fc2" for Phi-2,
        "qkv_proj,o_proj,gate_up_proj,down_proj" for Phi-3), or a compiled regex matched
        against whole module paths (PEFT's meaning of a string target_modules).
    dtype: the adapter's dtype (default fp32, whatever the base's).
    rank_pattern / alpha_pattern: PEFT's per-module overrides {regex on the path end: value}.
    """
    replacements = {}
    for path, module in resolve_targets(model, targets):
        replacements[id(module)] = LoRALinear(
            module, r=pattern_value(rank_pattern, path, r), alpha=pattern_value(alpha_pattern, path, alpha),
            dropout=dropout, use_rslora=use_rslora, use_dora=use_dora, dtype=dtype)
    _replace_modules(model, replacements)
    set_adapter_trainable(model, True)
    return model


def set_adapter_trainable(model: nn.Module, trainable: bool = True) -> None:
    """Freeze every parameter, then let the adapter's train (when `trainable`)."""
    for param in model.parameters():
        param.requires_grad_(False)
    if trainable:
        for _, layer in lora_layers(model):
            for param in layer.adapter_parameters().values():
                param.requires_grad_(True)


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapter tensors keyed by model path (`model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    state = {}
    for path, layer in lora_layers(model):
        for suffix, tensor in layer.adapter_parameters().items():
            state[f"{path}.{suffix}"] = tensor
    return state


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight (idempotent)."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of its base weight."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the adapters and put plain base layers back in the LoRA layers' places (for export):
    an nn.Linear holding the merged weight Parameter. The model's state dict is then the base's
    keys only. A quantised base cannot merge: TypeError, and the model is left as it was."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer._mergeable_weight()  # fail before changing anything when some base cannot merge
    replacements = {}
    for layer in layers:
        layer.merge()
        replacements[id(layer)] = layer.base_layer()
    _replace_modules(model, replacements)
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Within the block the model computes its base output (merged layers are unmerged for
    the block and merged again after it)."""
    layers = [layer for _, layer in lora_layers(model)]
    saved = [(layer.adapter_enabled, layer.merged) for layer in layers]
    try:
        for layer in layers:
            layer.unmerge()
            layer.adapter_enabled = False
        yield model
    finally:
        for layer, (enabled, merged) in zip(layers, saved):
            layer.adapter_enabled = enabled
            if merged:
                layer.merge()
